"""HED stain augmentation in torch: :class:`StainAugmenter` jitters each stain's amount per image.

A training-time colour augmentation (used by :class:`histolens.models.transforms.Augmenter`); unlike
normalisation it is random, with every random number drawn from the caller's generator.
"""

from __future__ import annotations

import math

import torch

from histolens.errors import ConfigError
from histolens.stain.math import as_float_batch, chunk_size, flat_pixels

__all__ = ["StainAugmenter"]


class StainAugmenter:
    """HED colour augmentation (Tellez et al., 2018): jitter each stain's amount per image.

    Each image is deconvolved into haematoxylin, eosin and DAB with scikit-image's
    ``hed_from_rgb`` (in ``skimage.color.rgb2hed`` units); every channel is scaled by
    U(1 - sigma, 1 + sigma) and shifted by U(-bias, bias), then recomposed and clamped. Unlike
    ``rgb2hed`` the stains are not clipped at zero, so sigma = bias = 0 is the identity.
    Pixel positions never move: only colour changes.

    Args:
        sigma: half-width of the multiplicative jitter.
        bias: half-width of the additive jitter.
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.05) -> None:
        from skimage.color import hed_from_rgb, rgb_from_hed

        if not sigma >= 0 or not bias >= 0:
            raise ConfigError(
                f"StainAugmenter needs sigma >= 0 and bias >= 0; got {sigma}, {bias}."
            )
        self.sigma = float(sigma)
        self.bias = float(bias)
        self._hed_from_rgb = torch.tensor(hed_from_rgb, dtype=torch.float32)
        self._rgb_from_hed = torch.tensor(rgb_from_hed, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"StainAugmenter(sigma={self.sigma}, bias={self.bias})"

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw per-image, per-stain ``(scale, shift)``, each (batch_size, 3)."""
        device = generator.device if generator is not None else torch.device("cpu")
        draws = torch.rand(2, batch_size, 3, generator=generator, device=device)
        return 1 + (2 * draws[0] - 1) * self.sigma, (2 * draws[1] - 1) * self.bias

    def apply(self, batch: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Apply given HED ``scale`` and ``shift`` (each (B, 3)) to a (B, 3, H, W) batch."""
        batch = as_float_batch(batch)
        scale = scale.to(batch.device, torch.float32)
        shift = shift.to(batch.device, torch.float32)
        step = chunk_size(batch)
        parts = [
            self._apply(batch[i : i + step], scale[i : i + step], shift[i : i + step])
            for i in range(0, batch.shape[0], step)
        ]
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out.view(batch.shape).to(batch.dtype)

    def _apply(self, batch: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        pixels, _ = flat_pixels(batch)
        # skimage's rgb2hed: hed = (log(rgb) / log(1e-6)) @ hed_from_rgb, pixels as rows.
        log_adjust = math.log(1e-6)
        to_hed = self._hed_from_rgb.T.to(pixels) / log_adjust
        hed = to_hed @ torch.log(pixels.clamp_min(1e-6))  # (B, 3, N)
        hed = hed * scale.unsqueeze(-1) + shift.unsqueeze(-1)
        rgb = torch.exp((self._rgb_from_hed.T.to(pixels) * log_adjust) @ hed)
        return rgb.clamp_(0.0, 1.0)

    def __call__(
        self, batch: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Augment a (B, 3, H, W) batch in [0, 1]; all randomness comes from ``generator``."""
        scale, shift = self.sample(batch.shape[0], generator)
        return self.apply(batch, scale, shift)
