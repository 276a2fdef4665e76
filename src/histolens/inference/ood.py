"""Knowing when an image is not like the training images: cheap checks, then a feature distance.

A classifier of H&E tiles answers "benign" or "malignant" for anything, a photograph of a cat
included. The guard flags such inputs before their answer is trusted, in two steps:

1. Cheap checks of the image itself (:class:`InputChecks`): far smaller than the model's input
   (a 1x1 pixel or a 4000x3 sliver), stretched far from the input's shape, nearly uniform (a
   white or blank tile), or almost no H&E-like colour (greyscale, text, most photographs).
2. A feature-space check (:class:`FeatureGuard`): the Mahalanobis distance of the image's pooled
   backbone features to those of the training images, with the covariance of standardised
   features shrunk by Ledoit-Wolf (scikit-learn). The limit is a high quantile of the distances
   of *held-out* training patients (each fold's statistics scoring the patients it did not see),
   so that real histology of new patients is rarely flagged.

Flagged images keep their prediction, marked "not like the training images" with the reason, and
are counted apart in metrics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from histolens.errors import CheckpointError

if TYPE_CHECKING:
    from histolens.checkpoint.io import CheckpointMetadata

__all__ = [
    "GUARD_QUANTILE",
    "OOD_MESSAGE",
    "FeatureGuard",
    "InputChecks",
    "OODGuard",
    "content_stats",
    "image_size",
]

OOD_MESSAGE = "not like the training images"
# The held-out training patients' distances set the limit at this quantile: about 1% of real
# images of new patients are flagged by the feature check (the issue asks for under 2%).
GUARD_QUANTILE = 0.99
_TENSOR_PREFIX = "ood."
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class InputChecks:
    """Limits of the checks made on the image before the model sees it.

    The defaults leave a wide margin on real BreakHis images: of 735 (700x460 and 224x224 PNGs at
    four magnifications) the lowest grey-level spread is 9.6 and the smallest fraction of
    H&E-coloured pixels 0.13.
    """

    min_scale: float = 0.25  # each side at least this fraction of the model input's side
    max_stretch: float = 4.0  # width/height at most this far from the input's, either way
    min_contrast: float = 4.0  # standard deviation of grey levels (0-255) below: uniform
    # Pixels with colour (max - min channel >= 12) whose green is (about) the smallest channel:
    # haematoxylin purple and eosin pink both absorb green; browns, greens and greys do not.
    min_tissue_fraction: float = 0.03

    def size_reason(self, width: int, height: int, input_size: tuple[int, int]) -> str | None:
        """Why an image of this size is not a tile the model can read, or None."""
        in_h, in_w = input_size
        if width < self.min_scale * in_w or height < self.min_scale * in_h:
            return (
                f"the image is {width}x{height} pixels, far smaller than the model's "
                f"{in_w}x{in_h} input"
            )
        stretch = (width / height) / (in_w / in_h)
        if max(stretch, 1 / stretch) > self.max_stretch:
            return (
                f"the image's shape ({width}x{height}) is stretched over {self.max_stretch:g}x "
                f"from the model's input shape ({in_w}x{in_h})"
            )
        return None

    def content_reasons(self, images_uint8: torch.Tensor) -> list[str | None]:
        """Why each resized uint8 image (B, 3, H, W) is not tissue-like, or None."""
        return [self.reason_for_content(c, t) for c, t in content_stats(images_uint8)]

    def reason_for_content(self, contrast: float, tissue: float) -> str | None:
        """Why an image of this grey-level contrast and H&E-coloured fraction (see
        :func:`content_stats`) is not tissue-like, or None."""
        if contrast < self.min_contrast:
            return "the image is nearly uniform (no visible structure)"
        if tissue < self.min_tissue_fraction:
            return (
                f"the image has almost no H&E-like (pink or purple) colour "
                f"({100 * tissue:.1f}% of pixels)"
            )
        return None


def content_stats(images_uint8: torch.Tensor) -> list[tuple[float, float]]:
    """(grey-level standard deviation, fraction of H&E-coloured pixels) of each resized uint8
    image (B, 3, H, W): what :meth:`InputChecks.reason_for_content` judges. Each image's values
    depend on its own pixels only, so they can be taken wherever a batch is already decoded."""
    x = images_uint8[:, :, ::4, ::4].to(torch.float32)
    grey = x.mean(1).flatten(1)
    hi, lo = x.max(1).values.flatten(1), x.min(1).values.flatten(1)
    r, g, b = (x[:, c].flatten(1) for c in range(3))
    coloured = (hi - lo) >= 12
    tissue = (coloured & (g <= torch.minimum(r, b) + 4)).float().mean(1)
    contrast = grey.std(1)
    return list(zip(contrast.tolist(), tissue.tolist(), strict=True))


@dataclass
class FeatureGuard:
    """The training images' feature distribution and the distance beyond which an image is far.

    ``distance`` is the Mahalanobis distance sqrt((z - 0)' P z) of standardised features z, with
    P the Ledoit-Wolf shrunk precision of the training images' z.
    """

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D)
    threshold: float = float("inf")
    quantile: float = GUARD_QUANTILE
    n_images: int = 0
    # Of the held-out training patients' images, the fraction over the threshold.
    held_out_flag_rate: float | None = None

    @classmethod
    def fit(cls, features: np.ndarray, threshold: float = float("inf")) -> FeatureGuard:
        """The statistics of ``features`` (n, D); ``threshold`` as given."""
        from sklearn.covariance import LedoitWolf

        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError("The feature guard needs at least two feature vectors.")
        mean = x.mean(0)
        scale = x.std(0)
        scale[scale < 1e-8] = 1.0
        lw = LedoitWolf(assume_centered=True).fit((x - mean) / scale)
        return cls(mean, scale, lw.precision_, float(threshold), n_images=len(x))

    @classmethod
    def calibrated(
        cls,
        features: np.ndarray,
        folds: Sequence[tuple[np.ndarray, np.ndarray]],
        quantile: float = GUARD_QUANTILE,
    ) -> tuple[FeatureGuard, np.ndarray]:
        """Fit on all ``features``, with the limit from held-out patients' distances.

        Each fold's statistics score the images of the patients it left out (``folds`` split by
        patient); the limit is the ``quantile`` of those held-out distances. The guard fitted on
        every image then sees new patients at most as far as the folds saw theirs, so the share
        of real images flagged stays near 1 - ``quantile``. Returns the guard and the held-out
        distances (NaN for images no fold held out).
        """
        x = np.asarray(features, dtype=np.float64)
        held_out = np.full(len(x), np.nan)
        for tr, te in folds:
            if len(tr) >= 2 and len(te):
                held_out[te] = cls.fit(x[tr]).distance(x[te])
        scored = held_out[~np.isnan(held_out)]
        threshold = float(np.quantile(scored, quantile)) if len(scored) else float("inf")
        guard = cls.fit(x, threshold)
        guard.quantile = quantile
        if len(scored):
            guard.held_out_flag_rate = float((scored > threshold).mean())
        return guard, held_out

    def distance(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Mahalanobis distance (n,) of features (n, D) to the training images."""
        x = features.detach().double().cpu().numpy() if torch.is_tensor(features) else features
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, self.precision, z), 0.0))

    def reasons(self, features: np.ndarray | torch.Tensor) -> list[str | None]:
        """Why each image's features are far from the training images', or None."""
        return self.reasons_for_distances(self.distance(features))

    def reasons_for_distances(self, distances: np.ndarray) -> list[str | None]:
        """The reason for each distance over the limit (None at or under it, or NaN)."""
        return [
            f"its features are far from the training images' (distance {d:.1f}, limit "
            f"{self.threshold:.1f})"
            if d > self.threshold
            else None
            for d in np.asarray(distances, dtype=np.float64).tolist()
        ]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The statistics as tensors, stored beside the model's weights in the checkpoint."""
        return {
            f"{_TENSOR_PREFIX}mean": torch.as_tensor(self.mean, dtype=torch.float64),
            f"{_TENSOR_PREFIX}scale": torch.as_tensor(self.scale, dtype=torch.float64),
            f"{_TENSOR_PREFIX}precision": torch.as_tensor(self.precision, dtype=torch.float32),
        }

    def to_dict(self) -> dict[str, Any]:
        held = self.held_out_flag_rate
        return {
            "method": "Mahalanobis distance, Ledoit-Wolf shrunk covariance of standardised "
            "pooled features",
            "threshold": self.threshold,
            "quantile": self.quantile,
            "n_images": self.n_images,
            "feature_dim": int(len(self.mean)),
            "held_out_flag_rate": None if held is None else round(held, 6),
        }


@dataclass
class OODGuard:
    """The cheap input checks and, when the checkpoint has one, the feature guard."""

    checks: InputChecks = field(default_factory=InputChecks)
    features: FeatureGuard | None = None

    def input_reasons(
        self,
        images_uint8: torch.Tensor,
        sizes: Sequence[tuple[int, int] | None],
        input_size: tuple[int, int],
    ) -> list[str | None]:
        """Reasons from the images alone: their original (width, height) and resized pixels."""
        content = self.checks.content_reasons(images_uint8)
        return [
            (self.checks.size_reason(*size, input_size) if size else None) or reason
            for size, reason in zip(sizes, content, strict=True)
        ]

    def reasons(
        self,
        images_uint8: torch.Tensor,
        sizes: Sequence[tuple[int, int] | None],
        input_size: tuple[int, int],
        features: torch.Tensor | np.ndarray | None,
    ) -> list[str | None]:
        """Why each image is not like the training images (the first reason found), or None."""
        reasons = self.input_reasons(images_uint8, sizes, input_size)
        if self.features is not None and features is not None:
            far = self.features.reasons(features)
            reasons = [r or f for r, f in zip(reasons, far, strict=True)]
        return reasons

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.features.state_dict() if self.features is not None else {}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for the checkpoint's metadata (the tensors go with the weights)."""
        return {
            "format_version": _FORMAT_VERSION,
            "checks": asdict(self.checks),
            "features": self.features.to_dict() if self.features is not None else None,
        }

    @classmethod
    def from_checkpoint(
        cls, state: dict[str, torch.Tensor], meta: CheckpointMetadata
    ) -> OODGuard | None:
        """The guard stored in a checkpoint (its tensors are removed from ``state``), or None
        for checkpoints saved without one."""
        tensors = {
            k[len(_TENSOR_PREFIX) :]: state.pop(k)
            for k in list(state)
            if k.startswith(_TENSOR_PREFIX)
        }
        info = meta.ood
        if not info:
            return None
        try:
            if int(info.get("format_version", 1)) > _FORMAT_VERSION:
                raise CheckpointError(
                    "The checkpoint's out-of-distribution guard was written by a newer "
                    "histolens; upgrade."
                )
            checks = InputChecks(**info.get("checks", {}))
            features = None
            spec = info.get("features")
            if spec:
                features = FeatureGuard(
                    tensors["mean"].double().numpy(),
                    tensors["scale"].double().numpy(),
                    tensors["precision"].double().numpy(),
                    float(spec["threshold"]),
                    float(spec.get("quantile", GUARD_QUANTILE)),
                    int(spec.get("n_images", 0)),
                    spec.get("held_out_flag_rate"),
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"The checkpoint's out-of-distribution guard is damaged ({exc})."
            ) from None
        return cls(checks, features)


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) from an image file's header (nothing decoded), or None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
