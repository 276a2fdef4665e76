"""Choosing a stain reference without labels: the most typical image of a set.

:func:`choose_reference` picks the image whose Macenko stain vectors (or Reinhard LAB statistics)
lie nearest the median over all images, so a :class:`~histolens.stain.normalize.StainNormalizer` is fitted
to an ordinary slide rather than an outlier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from histolens.errors import DataError, check_choice
from histolens.stain.math import (
    as_float_batch,
    as_float_image,
    chunk_size,
    flat_pixels,
    stain_statistics,
)
from histolens.stain.normalize import MACENKO_METHODS, STAIN_METHODS

__all__ = ["choose_reference"]


def choose_reference(
    images: Sequence[torch.Tensor] | torch.Tensor,
    method: str = "macenko",
    *,
    io: float = 240.0,
    alpha: float = 1.0,
    beta: float = 0.15,
) -> int:
    """Index of the most typical image: its stain closest to the median over all images.

    Macenko compares the stain vectors; Reinhard compares LAB mean/std, each statistic scaled
    by its spread over the images. Images that cannot be fitted are skipped.

    Args:
        images: a (B, 3, H, W) batch or a list of (3, H, W) tensors (uint8 or [0, 1] float;
            sizes may differ).
        method: ``"macenko"``, ``"macenko-h"`` or ``"reinhard"``.

    Raises:
        DataError: there are no images, or none of them can be fitted.
    """
    method = check_choice("stain normalisation", method, STAIN_METHODS)
    chunks, total = _reference_chunks(images)
    features, usable = _reference_features(chunks, total, method, io, alpha, beta)
    if not usable.any():
        raise DataError(
            f"None of the {total} candidate reference images has enough tissue to fit "
            f"{method} stain statistics."
        )
    return _most_typical(features, usable, method)


def _reference_chunks(
    images: Sequence[torch.Tensor] | torch.Tensor,
) -> tuple[list[tuple[list[int], torch.Tensor]], int]:
    """The images as (indices, float batch) chunks of one size each, and how many there are.

    Raises:
        DataError: there are no images.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        batch = as_float_batch(images)
        groups = [(list(range(batch.shape[0])), batch)]
    else:
        tensors = [as_float_image(image) for image in images]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, tensor in enumerate(tensors):
            by_shape.setdefault(tuple(tensor.shape), []).append(index)
        groups = [(group, torch.stack([tensors[i] for i in group])) for group in by_shape.values()]
    total = sum(len(group) for group, _ in groups)
    if total == 0:
        raise DataError("choose_reference needs at least one image.")
    chunks = []
    for group, batch in groups:
        step = chunk_size(batch)
        chunks += [(group[i : i + step], batch[i : i + step]) for i in range(0, len(group), step)]
    return chunks, total


def _reference_features(
    chunks: Sequence[tuple[list[int], torch.Tensor]],
    total: int,
    method: str,
    io: float,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's stain statistics, (total, 6) float64, and whether they could be fitted.

    Macenko gives the two stain vectors; Reinhard the LAB mean and std.
    """
    features = torch.zeros(total, 6, dtype=torch.float64)
    usable = torch.zeros(total, dtype=torch.bool)
    for group, batch in chunks:
        pixels, ok = flat_pixels(batch)
        macenko = method in MACENKO_METHODS
        first, second, fitted = stain_statistics(pixels, io, alpha, beta, macenko=macenko)
        # Macenko compares the stain vectors alone; Reinhard the LAB mean and std.
        feats = first.flatten(1) if macenko else torch.cat((first, second), dim=1)
        ok &= fitted & torch.isfinite(feats).all(dim=1)
        index = torch.tensor(group)
        features[index] = feats.double().cpu()
        usable[index] = ok.cpu()
    return features, usable


def _most_typical(features: torch.Tensor, usable: torch.Tensor, method: str) -> int:
    """Index of the usable image whose statistics are nearest their median (Reinhard's scaled
    by their spread, as mean and std are in different units)."""
    candidates = features[usable]
    median = candidates.median(dim=0).values
    if method == "reinhard":
        candidates = candidates / candidates.std(dim=0, unbiased=False).clamp_min(1e-6)
        median = median / features[usable].std(dim=0, unbiased=False).clamp_min(1e-6)
    distance = (candidates - median).norm(dim=1)
    return int(torch.nonzero(usable).flatten()[distance.argmin()])
