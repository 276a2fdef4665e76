"""Batched H&E stain normalisation (Macenko, Macenko haematoxylin-only, Reinhard): StainNormalizer.

The maths (in :mod:`histolens.stain.math`) follows torchstain, which the tests use as the oracle,
but runs as batched tensor operations, with no per-image Python loop. It never raises on a bad
tile and never emits NaN: a tile that cannot be normalised (white background, a flat colour, too
few tissue pixels, a degenerate fit) is returned unchanged and flagged. The fitted state is plain
JSON so that a checkpoint carries exactly the normalisation that training used. Choosing the
reference image is :mod:`histolens.stain.reference`; HED stain augmentation is
:mod:`histolens.stain.augment`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch

from histolens.errors import ConfigError, DataError, check_choice
from histolens.stain.math import (
    MIN_LAB_STD,
    MIN_MAX_CONCENTRATION,
    MIN_TISSUE_FRACTION,
    MIN_TISSUE_PIXELS,
    as_float_batch,
    as_float_image,
    chunk_size,
    enough_tissue,
    flat_pixels,
    image_statistics,
    lab_stats,
    lab_to_rgb,
    macenko_fit,
    optical_density,
    pixels_optical_density,
    rgb_to_lab,
    tissue_mask,
)

__all__ = ["MACENKO_METHODS", "STAIN_METHODS", "StainNormalizer"]

STAIN_METHODS = ("macenko", "macenko-h", "reinhard")
# Fitted like Macenko; "macenko-h" then recomposes the haematoxylin concentration alone.
MACENKO_METHODS = ("macenko", "macenko-h")


class StainNormalizer:
    """Maps every image of a batch to the stain appearance of one reference image.

    Macenko estimates each image's haematoxylin/eosin OD vectors and recomposes its stain
    concentrations with the reference's vectors; "macenko-h" recomposes the haematoxylin
    concentration alone (nuclei and their texture in the reference's haematoxylin colour, the
    eosin left out); Reinhard matches per-channel CIE L*a*b* mean and std. Tiles that cannot
    be normalised are returned unchanged (in colour, for "macenko-h" too) and flagged, and
    ``fallbacks`` / ``seen`` count them across calls.

    Args:
        method: ``"macenko"``, ``"macenko-h"`` or ``"reinhard"``.
        io: transmitted light intensity (0..255 scale) for optical density.
        alpha: percentile (0..100) of the stain angles taken as the stain extremes (Macenko).
        beta: OD below which a pixel counts as background in any channel.
    """

    def __init__(
        self, method: str, *, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15
    ) -> None:
        self.method = check_choice("stain normalisation", method, STAIN_METHODS)
        if not io > 0 or not 0 <= alpha < 50 or not beta >= 0:
            raise ConfigError(
                f"Stain normalisation needs io > 0, 0 <= alpha < 50 and beta >= 0; "
                f"got io={io}, alpha={alpha}, beta={beta}."
            )
        self.io = float(io)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.stain_matrix: torch.Tensor | None = None  # Macenko (3, 2), haematoxylin first
        self.max_concentrations: torch.Tensor | None = None  # Macenko (2,)
        self.lab_mean: torch.Tensor | None = None  # Reinhard (3,)
        self.lab_std: torch.Tensor | None = None  # Reinhard (3,)
        # What the reference was fitted from (see cache_key); None until fitted or loaded.
        self.reference_digest: str | None = None
        self.fallbacks = 0
        self.seen = 0

    def __repr__(self) -> str:
        state = "fitted" if self.fitted else "not fitted"
        return (
            f"StainNormalizer({self.method!r}, {state}, fell back on {self.fallbacks}/{self.seen})"
        )

    @property
    def fitted(self) -> bool:
        """True once a reference has been fitted or loaded."""
        if self.method in MACENKO_METHODS:
            return self.stain_matrix is not None and self.max_concentrations is not None
        return self.lab_mean is not None and self.lab_std is not None

    def cache_key(self) -> dict[str, Any]:
        """The method, its parameters and a digest of what the reference was fitted from.

        A key for caches of normalised images' features. The fitted floats themselves are no
        such key: their reductions run in an order that depends on the thread count and the
        CPU's vector width, so two processes fitting the same images can differ in the last bit.
        The inputs (the images' exact pixel values, or a loaded state's stored numbers) cannot.
        """
        return {
            "method": self.method,
            "io": self.io,
            "alpha": self.alpha,
            "beta": self.beta,
            "reference": self.reference_digest,
        }

    def fit(self, reference: Any) -> StainNormalizer:
        """Learn the target stain from one reference image.

        Args:
            reference: uint8 or [0, 1] float tensor (3, H, W), PIL image, or HxWx3 array.

        Raises:
            DataError: the reference has too little tissue, or no stain contrast, to fit.
        """
        image = as_float_image(reference)
        digest = hashlib.sha256()
        _add_to_digest(digest, image)
        pixels, finite = flat_pixels(image.unsqueeze(0))
        od = optical_density(pixels, self.io)
        if not bool(finite[0]):
            raise DataError("The stain reference image contains NaN or infinite values.")
        if not bool(enough_tissue(tissue_mask(od, self.beta))[0]):
            raise DataError(
                f"The stain reference image has too little tissue to fit {self.method} "
                f"normalisation: at least {MIN_TISSUE_PIXELS} pixels and "
                f"{MIN_TISSUE_FRACTION:.0%} of the image must be stained; choose another."
            )
        if self.method in MACENKO_METHODS:
            he, _, max_conc, ok = macenko_fit(od, self.alpha, self.beta)
            if not bool(ok[0]):
                raise DataError(
                    "The stain reference image has no usable haematoxylin/eosin contrast "
                    "(degenerate Macenko fit); choose another."
                )
            self.stain_matrix = he[0].clone()
            self.max_concentrations = max_conc[0].clone()
        else:
            mean, std = lab_stats(rgb_to_lab(pixels))
            if not bool((std > MIN_LAB_STD).all()):
                raise DataError(
                    "The stain reference image has a flat colour channel; Reinhard "
                    "normalisation needs colour variation. Choose another."
                )
            self.lab_mean = mean[0].clone()
            self.lab_std = std[0].clone()
        self.reference_digest = digest.hexdigest()
        return self

    def fit_median(self, images: Sequence[torch.Tensor] | torch.Tensor) -> StainNormalizer:
        """Learn the target stain as the median over many images (a label-free, robust reference).

        Macenko: the element-wise median of the images' unit stain vectors (renormalised) and of
        their 99th-percentile concentrations; Reinhard: the median LAB mean and std. Unlike one
        reference image, a median is not thrown by one unusual slide. Images that cannot be
        fitted are skipped.

        Raises:
            DataError: none of the images can be fitted.
        """
        tensors = list(images) if not isinstance(images, torch.Tensor) else list(images.unbind(0))
        digest = hashlib.sha256()
        fitted = image_statistics(
            tensors,
            self.io,
            self.alpha,
            self.beta,
            macenko=self.method in MACENKO_METHODS,
            on_image=lambda image: _add_to_digest(digest, image),
        )
        firsts = [stats[0] for stats in fitted if stats is not None]
        seconds = [stats[1] for stats in fitted if stats is not None]
        if not firsts:
            raise DataError(
                f"None of the {len(tensors)} images has enough tissue to fit {self.method} "
                "stain statistics for a median reference."
            )
        first = torch.stack(firsts).median(dim=0).values
        second = torch.stack(seconds).median(dim=0).values
        if self.method in MACENKO_METHODS:
            self.stain_matrix = first / first.norm(dim=0, keepdim=True).clamp_min(1e-8)
            self.max_concentrations = second
        else:
            self.lab_mean, self.lab_std = first, second
        self.reference_digest = digest.hexdigest()
        return self

    def __call__(
        self, batch: torch.Tensor, *, inplace: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise a batch.

        Args:
            batch: float (B, 3, H, W) in [0, 1] (uint8 is accepted and scaled).
            inplace: write the result over ``batch`` when it is a contiguous float32 tensor
                (one the caller no longer needs) instead of into a new one: a batch-sized
                allocation less, which for tens of MB is a fresh mapping to page in each time.

        Returns:
            ``(normalised, fell_back)``: the batch in [0, 1], same dtype and device, and a bool
            (B,) tensor marking images returned unchanged because they could not be normalised.
        """
        if not self.fitted:
            raise RuntimeError(
                f"StainNormalizer({self.method!r}) is not fitted; call fit() or from_dict()."
            )
        fresh = batch.dtype == torch.uint8  # as_float_batch makes a new float tensor of it
        batch = as_float_batch(batch)
        size = batch.shape[0]
        if size == 0:
            return batch.clone(), torch.zeros(0, dtype=torch.bool, device=batch.device)
        writable = (fresh or inplace) and batch.dtype == torch.float32 and batch.is_contiguous()
        # A contiguous buffer whatever the batch's layout (empty_like would copy a transposed
        # one's strides), so each chunk's (B, 3, N) is a view: ``view`` raises, never copies.
        out = (
            batch
            if writable
            else torch.empty(batch.shape, dtype=torch.float32, device=batch.device)
        )
        step = chunk_size(batch)
        ok = torch.cat(
            [
                self._normalise(
                    batch[i : i + step], out[i : i + step].view(-1, 3, out[0, 0].numel())
                )
                for i in range(0, size, step)
            ]
        )
        fell_back = ~ok
        self.seen += size
        self.fallbacks += int(fell_back.sum())
        return out.to(batch.dtype), fell_back

    def _normalise(self, batch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Normalise one chunk into ``out`` (B, 3, N; it may be ``batch`` itself) and return
        the (B,) success mask."""
        if self.method in MACENKO_METHODS:
            return self._macenko(batch, out)
        pixels, ok = flat_pixels(batch)
        od = optical_density(pixels, self.io)
        normalised, fitted = self._reinhard(pixels, od)
        ok &= fitted
        # Finite by construction; nan_to_num is the last guard that no NaN ever leaves.
        normalised = torch.where(ok.view(-1, 1, 1), normalised, pixels).nan_to_num_(0.0, 1.0, 0.0)
        out.copy_(normalised.clamp_(0.0, 1.0))
        return ok

    def _macenko(self, batch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write the normalised chunk into ``out``; return which images were fitted."""
        od, ok = pixels_optical_density(batch, self.io)
        _, conc, max_conc, fitted = macenko_fit(od, self.alpha, self.beta)
        del od
        if self.method == "macenko-h":  # (B, 2, N): haematoxylin first; no eosin
            conc[:, 1:] = 0.0
        ratio = self.max_concentrations.to(conc) / max_conc.clamp_min(MIN_MAX_CONCENTRATION)
        # Rescaling the concentrations to the reference maxima is folded into the stain matrix,
        # and its sign too: I / 255 = exp(-mixing @ conc) * io / 255.
        mixing = self.stain_matrix.to(conc) * ratio.unsqueeze(1)  # (B, 3, 2)
        ok &= fitted & torch.isfinite(mixing).flatten(1).all(dim=1)
        # Images that fall back are returned as read (clamped); taken before ``out``, which
        # may be ``batch``, is written.
        kept = None if bool(ok.all()) else flat_pixels(batch[~ok])[0]
        # Finite where ok by construction (finite mixing and concentrations; exp of a huge
        # OD overflows to inf, which the clamp turns into 1), and in [0, 1].
        torch.bmm(mixing.neg_(), conc, out=out)
        out.exp_().mul_(self.io / 255.0).clamp_(0.0, 1.0)
        if kept is not None:
            out[~ok] = kept
        return ok

    def _reinhard(
        self, pixels: torch.Tensor, od: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lab = rgb_to_lab(pixels)
        mean, std = lab_stats(lab)
        ok = enough_tissue(tissue_mask(od, self.beta))
        ok &= torch.isfinite(std).all(dim=1) & (std > MIN_LAB_STD).all(dim=1)
        scale = self.lab_std.to(lab) / std.clamp_min(MIN_LAB_STD)
        shift = self.lab_mean.to(lab) - mean * scale
        return lab_to_rgb(lab.mul_(scale.unsqueeze(-1)).add_(shift.unsqueeze(-1))), ok

    def reset_counts(self) -> None:
        """Zero the ``fallbacks`` and ``seen`` counters (e.g. at the start of an epoch)."""
        self.fallbacks = 0
        self.seen = 0

    def to_dict(self) -> dict[str, Any]:
        """The method, its parameters and the fitted reference as plain JSON-able values."""
        state: dict[str, Any] = {
            "method": self.method,
            "io": self.io,
            "alpha": self.alpha,
            "beta": self.beta,
        }
        if self.method in MACENKO_METHODS and self.fitted:
            state["stain_matrix"] = self.stain_matrix.double().tolist()
            state["max_concentrations"] = self.max_concentrations.double().tolist()
        elif self.method == "reinhard" and self.fitted:
            state["lab_mean"] = self.lab_mean.double().tolist()
            state["lab_std"] = self.lab_std.double().tolist()
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> StainNormalizer:
        """Rebuild a normaliser saved with :meth:`to_dict` (e.g. from checkpoint metadata)."""
        if not isinstance(state, dict) or "method" not in state:
            raise ConfigError("Stain normalisation state must be a dict with a 'method' key.")
        params = {k: state[k] for k in ("io", "alpha", "beta") if k in state}
        norm = cls(state["method"], **params)
        expected = (
            {"stain_matrix": (3, 2), "max_concentrations": (2,)}
            if norm.method in MACENKO_METHODS
            else {"lab_mean": (3,), "lab_std": (3,)}
        )
        present = [key for key in expected if key in state]
        if not present:
            return norm
        for key, shape in expected.items():
            try:
                value = torch.tensor(state[key], dtype=torch.float32)
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(
                    f"Stain normalisation state has a bad or missing '{key}'."
                ) from exc
            if tuple(value.shape) != shape or not torch.isfinite(value).all():
                raise ConfigError(
                    f"Stain normalisation state '{key}' must be {shape} finite numbers, "
                    f"got shape {tuple(value.shape)}."
                )
            setattr(norm, key, value)
        stored = {key: state[key] for key in expected}
        norm.reference_digest = hashlib.sha256(
            json.dumps(stored, sort_keys=True).encode()
        ).hexdigest()
        return norm


def _add_to_digest(digest: Any, image: torch.Tensor) -> None:
    """Feed a float (3, H, W) image's shape and exact values to a hashlib digest."""
    digest.update(repr(tuple(image.shape)).encode())
    digest.update(image.detach().cpu().contiguous().numpy())  # its bytes, without a copy
