"""The numerical core of the stain modules: image batches, optical density, Macenko and LAB.

Shared by :mod:`histolens.stain.normalize` (normalisation), :mod:`histolens.stain.reference` (choosing a
reference image) and :mod:`histolens.stain.augment` (HED jitter). Everything works on batched
(B, 3, N) tensors and follows torchstain's maths; a fit that cannot be trusted is reported as a
per-image ``ok`` flag, never as an exception or a NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from histolens.errors import DataError
from histolens.stain.select import tail_order_statistics

# A tile needs at least this many tissue pixels, and this fraction of its pixels, to be fitted.
__all__ = [
    "MIN_LAB_STD",
    "MIN_MAX_CONCENTRATION",
    "MIN_TISSUE_FRACTION",
    "MIN_TISSUE_PIXELS",
    "as_float_batch",
    "as_float_image",
    "chunk_size",
    "enough_tissue",
    "flat_pixels",
    "image_statistics",
    "lab_stats",
    "lab_to_rgb",
    "macenko_fit",
    "macenko_stains",
    "macenko_unmixing",
    "optical_density",
    "pixels_optical_density",
    "rgb_to_lab",
    "stain_statistics",
    "tissue_mask",
]

MIN_TISSUE_PIXELS = 50
MIN_TISSUE_FRACTION = 0.01
# H and E OD vectors are ~40 degrees apart; two fitted unit vectors under 10 degrees apart mean
# one stain or only noise (a flat tile with sensor noise gives ~5), so det(HE^T HE) = sin^2 > this.
_MIN_STAIN_GRAM_DET = math.sin(math.radians(10)) ** 2
# Below this 99th-percentile concentration the rescale ratio explodes (a stain that is absent).
MIN_MAX_CONCENTRATION = 1e-2
# Reinhard: a LAB channel flatter than this (L in 0..100, a/b in about -128..127) is not scaled.
MIN_LAB_STD = 1e-3

# Pixels per batched pass; see chunk_size.
_CPU_CHUNK_PIXELS = 6 * 224 * 224
_GPU_CHUNK_PIXELS = 2**24

# sRGB (D65) -> CIE XYZ, the matrix torchstain and OpenCV use.
_RGB_TO_XYZ = torch.tensor(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ],
    dtype=torch.float64,
)
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ)
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Image batches, chunking, optical density and tissue masks
# --------------------------------------------------------------------------------------------


def as_float_image(image: Any) -> torch.Tensor:
    """Return a float32 (3, H, W) tensor in [0, 1] from a tensor, PIL image or HxWx3 array."""
    if isinstance(image, torch.Tensor):
        tensor = image.detach()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
    else:
        if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
            image = image.convert("RGB")
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise DataError(
                f"Expected an RGB image of shape (H, W, 3), got an array of shape {array.shape}."
            )
        tensor = torch.from_numpy(np.array(array)).permute(2, 0, 1)  # a copy: PIL is read-only
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise DataError(
            f"Expected an RGB image tensor of shape (3, H, W), got {tuple(tensor.shape)}."
        )
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if not tensor.is_floating_point():
        raise DataError(f"Expected a uint8 or floating image, got dtype {tensor.dtype}.")
    tensor = tensor.float()
    finite = tensor[torch.isfinite(tensor)]
    if finite.numel() and (finite.min() < -1e-3 or finite.max() > 1 + 1e-3):
        raise DataError(
            "A floating-point image must hold values in [0, 1]; pass uint8 for 0..255 images."
        )
    return tensor


def as_float_batch(batch: torch.Tensor) -> torch.Tensor:
    """Validate a (B, 3, H, W) batch and return it as floating point in [0, 1]."""
    if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise DataError(f"Expected a batch tensor of shape (B, 3, H, W), got {shape}.")
    if batch.dtype == torch.uint8:
        return batch.float() / 255.0
    if not batch.is_floating_point():
        raise DataError(f"Expected a uint8 or floating batch, got dtype {batch.dtype}.")
    return batch


def flat_pixels(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, N) float32 pixels with NaN/inf replaced and clamped to [0, 1], and (B,) finite."""
    pixels = batch.flatten(2).float()
    finite = torch.isfinite(pixels.sum(dim=(1, 2)))  # one pass: NaN/inf survive a sum
    if not bool(finite.all()):
        pixels = torch.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0)
    return pixels.clamp(0.0, 1.0), finite


def chunk_size(batch: torch.Tensor) -> int:
    """Images per chunk: whole batches on GPU; on CPU chunks small enough to stay in cache.

    On CPU the work is memory-bound; measured on 224x224 tiles, chunks of about 4 to 8 images
    run 1.5x (Macenko) to 5x (Reinhard) faster per image than one 64-image pass.
    """
    n_pixels = batch.shape[-1] * batch.shape[-2]
    budget = _CPU_CHUNK_PIXELS if batch.device.type == "cpu" else _GPU_CHUNK_PIXELS
    return max(1, budget // max(n_pixels, 1))


def optical_density(pixels: torch.Tensor, io: float) -> torch.Tensor:
    """OD = -log((I*255 + 1) / Io) of (B, 3, N) pixels in [0, 1], as torchstain computes it."""
    return (pixels * 255.0).add_(1.0).mul_(1.0 / io).log_().neg_()


def pixels_optical_density(batch: torch.Tensor, io: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, N) optical density of a (B, 3, H, W) batch and (B,) whether it was finite: the
    values of ``optical_density(*flat_pixels(batch))`` in one buffer instead of two."""
    pixels = batch.flatten(2).float()
    finite = torch.isfinite(pixels.sum(dim=(1, 2)))
    if not bool(finite.all()):
        pixels = torch.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0)
    return pixels.clamp(0.0, 1.0).mul_(255.0).add_(1.0).mul_(1.0 / io).log_().neg_(), finite


def tissue_mask(od: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, N) pixels whose optical density is at least ``beta`` in every channel."""
    return od.amin(dim=1) >= beta  # as (od >= beta).all(dim=1), in a sixth of the time


def enough_tissue(mask: torch.Tensor) -> torch.Tensor:
    """Per image: True when the tissue mask has enough pixels to fit stain statistics."""
    n_pixels = mask.shape[-1]
    needed = max(MIN_TISSUE_PIXELS, math.ceil(MIN_TISSUE_FRACTION * n_pixels))
    return mask.sum(dim=-1) >= needed


def _masked_percentiles(
    values: torch.Tensor, mask: torch.Tensor, q: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``q``-th and ``(100 - q)``-th percentiles of ``values[mask]``, q <= 50.

    Uses torchstain's nearest rank, index round(q/100 * (n - 1)), each row with its own count
    of valid values (exact order statistics: :mod:`histolens.stain.select`). ``values`` is
    overwritten with NaN outside the mask.
    """
    count = mask.sum(dim=-1)
    last = (count - 1).clamp_min(0).to(torch.float64)
    rank_low = torch.round(0.01 * q * last).long()
    rank_high = torch.round(0.01 * (100 - q) * last).long()
    from_top = (count - 1).clamp_min(0) - rank_high
    values = values.masked_fill_(~mask, math.nan)
    low, high = tail_order_statistics(values, count, low_rank=rank_low, high_rank=from_top)
    return low, high


def _upper_percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row ``q``-th percentile (q >= 50) over the last dim, torchstain's nearest rank."""
    n = values.shape[-1]
    from_top = n - 1 - round(0.01 * q * (n - 1))
    flat = values.reshape(-1, n)
    count = torch.full((flat.shape[0],), n, dtype=torch.long, device=values.device)
    _, high = tail_order_statistics(flat, count, high_rank=count.new_full(count.shape, from_top))
    return high.view(values.shape[:-1])


# --------------------------------------------------------------------------------------------
# Macenko
# --------------------------------------------------------------------------------------------


def macenko_fit(
    od: torch.Tensor, alpha: float, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stain matrices, concentrations and max concentrations of a (B, 3, N) OD batch.

    Returns ``(he, conc, max_conc, ok)``: he (B, 3, 2) with haematoxylin first, conc (B, 2, N),
    max_conc (B, 2) and ok (B,), False where the fit is degenerate (the other values of such
    an item are then meaningless but finite, so one bad tile cannot break the batch).
    """
    he, ok, mask = macenko_stains(od, alpha, beta)
    del mask
    unmix = macenko_unmixing(he, ok)
    conc = unmix @ od  # (B, 2, N)
    max_conc = _upper_percentile(conc, 99)
    ok &= torch.isfinite(max_conc).all(dim=1) & (max_conc > MIN_MAX_CONCENTRATION).all(dim=1)
    return he, conc, max_conc, ok


def macenko_stains(
    od: torch.Tensor, alpha: float, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stain vectors of a (B, 3, N) OD batch: he (B, 3, 2), haematoxylin first, finite
    everywhere; ok (B,), False where the tissue or its stain axes are too few to fit; and the
    (B, N) tissue mask."""
    batch = od.shape[0]
    mask = tissue_mask(od, beta)
    ok = enough_tissue(mask)
    weights = mask.to(od.dtype).unsqueeze(1)  # (B, 1, N)
    n_tissue = weights.sum(dim=-1, keepdim=True).clamp_min(2.0)  # (B, 1, 1)

    # Per-image covariance of the tissue OD (unbiased, like torchstain's cov).
    mean = (od @ weights.transpose(1, 2)) / n_tissue  # (B, 3, 1)
    centred = (od - mean).mul_(weights)
    cov = centred @ centred.transpose(1, 2) / (n_tissue - 1)
    del centred, weights
    ok &= torch.isfinite(cov).flatten(1).all(dim=1)
    ok &= cov.diagonal(dim1=1, dim2=2).sum(dim=1) > 1e-8  # a flat tile has no stain axes
    eye3 = torch.eye(3, dtype=od.dtype, device=od.device).expand(batch, 3, 3)
    cov = torch.where(ok.view(batch, 1, 1), cov, eye3)  # eigh must never see NaN
    _, eigvecs = torch.linalg.eigh(cov)
    eigvecs = eigvecs[:, :, 1:3]  # the plane of the two largest eigenvalues

    # Angles of the tissue OD projected on that plane; their robust extremes are the stains.
    proj = eigvecs.transpose(1, 2) @ od  # (B, 2, N)
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    del proj
    phi_min, phi_max = _masked_percentiles(phi, mask, alpha)
    del phi
    v_min = (eigvecs @ torch.stack((phi_min.cos(), phi_min.sin()), dim=-1).unsqueeze(-1))[..., 0]
    v_max = (eigvecs @ torch.stack((phi_max.cos(), phi_max.sin()), dim=-1).unsqueeze(-1))[..., 0]
    # Macenko's heuristic: the vector with the larger red OD is haematoxylin.
    h_first = (v_min[:, 0] > v_max[:, 0]).view(batch, 1)
    he = torch.stack((torch.where(h_first, v_min, v_max), torch.where(h_first, v_max, v_min)), -1)
    ok &= torch.isfinite(he).flatten(1).all(dim=1)
    return torch.where(ok.view(batch, 1, 1), he, eye3[:, :, :2]), ok, mask


def macenko_unmixing(he: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) least-squares unmixing (HE^T HE)^-1 HE^T: concentrations C = unmixing @ OD.

    Clears ``ok`` (in place) where the two stain vectors are nearly parallel."""
    batch = he.shape[0]
    gram = he.transpose(1, 2) @ he
    ok &= torch.isfinite(gram).flatten(1).all(dim=1)
    ok &= torch.linalg.det(gram) > _MIN_STAIN_GRAM_DET
    eye2 = torch.eye(2, dtype=he.dtype, device=he.device).expand(batch, 2, 2)
    gram = torch.where(ok.view(batch, 1, 1), gram, eye2)
    return torch.linalg.solve(gram, he.transpose(1, 2))


# --------------------------------------------------------------------------------------------
# Reinhard (CIE L*a*b*, D65, the same conversion as torchstain / OpenCV)
# --------------------------------------------------------------------------------------------


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (B, 3, N) -> CIE L*a*b* (L 0..100), same layout."""
    linear = torch.where(
        rgb > 0.04045, ((rgb.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92
    )
    to_xyz = _RGB_TO_XYZ / _D65_WHITE.unsqueeze(1)
    xyz = to_xyz.to(rgb) @ linear
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(1)
    return torch.stack((116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)), dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b*, (B, 3, N) -> sRGB clamped to [0, 1], same layout."""
    lum, a, b = lab.unbind(1)
    fy = (lum + 16) / 116
    f = torch.stack((fy + a / 500, fy, fy - b / 200), dim=1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16 / 116) / 7.787)
    to_rgb = _XYZ_TO_RGB * _D65_WHITE.unsqueeze(0)
    linear = to_rgb.to(lab) @ xyz
    rgb = torch.where(
        linear > 0.0031308,
        1.055 * linear.clamp_min(0.0031308) ** (1 / 2.4) - 0.055,
        linear * 12.92,
    )
    return rgb.clamp_(0, 1)


def lab_stats(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image channel mean and (unbiased) std of a (B, 3, N) LAB batch over all pixels."""
    std, mean = torch.std_mean(lab, dim=-1)
    return mean, std


def stain_statistics(
    pixels: torch.Tensor, io: float, alpha: float, beta: float, *, macenko: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image's stain statistics from (B, 3, N) pixels, and (B,) whether they could be fitted.

    Macenko: the stain matrix (B, 3, 2) and the max concentrations (B, 2); Reinhard: the LAB
    mean and std (B, 3 each), fitted when the image has enough tissue and no flat channel.
    """
    od = optical_density(pixels, io)
    if macenko:
        he, _, max_conc, ok = macenko_fit(od, alpha, beta)
        return he, max_conc, ok
    mean, std = lab_stats(rgb_to_lab(pixels))
    return mean, std, enough_tissue(tissue_mask(od, beta)) & (std > MIN_LAB_STD).all(dim=1)


def image_statistics(
    images: Iterable[Any],
    io: float,
    alpha: float,
    beta: float,
    *,
    macenko: bool,
    on_image: Callable[[torch.Tensor], None] | None = None,
    chunk: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """:func:`stain_statistics` of each image (None where it cannot be fitted), in order.

    Images of one size are fitted together, ``chunk`` at a time, while no more than a chunk
    per size is held as floats. The default, 1, fits each image alone: a batched fit's float
    sums run in another order (about 1e-5 on the fitted numbers), and a reference fitted
    one image at a time is the one earlier runs computed. ``on_image`` sees every float
    (3, H, W) image in order.
    """
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    pending: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}

    def fit(shape: tuple[int, ...]) -> None:
        indices, chunk = zip(*pending.pop(shape), strict=True)
        pixels, finite = flat_pixels(torch.stack(chunk))
        first, second, ok = stain_statistics(pixels, io, alpha, beta, macenko=macenko)
        for j in (finite & ok).nonzero().flatten().tolist():
            results[indices[j]] = (first[j], second[j])

    for index, image in enumerate(images):
        image = as_float_image(image)
        if on_image is not None:
            on_image(image)
        results.append(None)
        group = pending.setdefault(tuple(image.shape), [])
        group.append((index, image))
        if len(group) >= chunk:
            fit(tuple(image.shape))
    for shape in list(pending):
        fit(shape)
    return results
