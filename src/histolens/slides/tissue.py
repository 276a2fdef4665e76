"""Tissue detection on a low-resolution thumbnail, and the tile grid over the tissue.

The mask: HSV saturation (stained tissue is coloured, glass and background are grey-white),
median blur, Otsu's threshold, morphological closing, then holes and specks below a set area
removed. Areas are in square microns, so the same mask comes out at any thumbnail scale.
Pen marks are saturated too and are kept as tissue: a pen filter is not offered (docs/slides.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["MASK_MPP", "TileGrid", "mask_area_mm2", "tile_grid", "tissue_mask"]

MASK_MPP = 8.0  # microns per pixel of the thumbnail the mask is made on
# Saturation below this is never tissue, whatever Otsu says: a slide that is nearly all glass
# would otherwise have its faint noise split in two.
MIN_SATURATION = 0.05
MIN_OBJECT_UM2 = 0.02e6  # specks smaller than 0.02 mm^2 (about 140 um across) are dropped
MAX_HOLE_UM2 = 0.05e6  # holes smaller than 0.05 mm^2 are filled
CLOSING_UM = 32.0  # radius of the closing that joins tissue split by thin gaps


def tissue_mask(thumbnail: Image.Image, mpp: float) -> np.ndarray:
    """Boolean tissue mask (H, W) of an RGB ``thumbnail`` at ``mpp`` microns per pixel."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    # Saturation as uint8 through Pillow's HSV (255 * (max - min) / max, as skimage's rgb2hsv
    # but one byte a pixel): a float64 HSV image of a whole-slide thumbnail costs ~100 bytes a
    # pixel in temporaries, hundreds of MB on a large slide.
    saturation = np.asarray(thumbnail.convert("RGB").convert("HSV").getchannel("S"))
    saturation = ndimage.median_filter(saturation, size=5)
    if int(saturation.max()) == int(saturation.min()):
        return np.zeros(saturation.shape, bool)
    threshold = max(float(threshold_otsu(saturation)), MIN_SATURATION * 255)
    mask = saturation > threshold
    radius = max(1, round(CLOSING_UM / mpp))
    padded = ndimage.binary_closing(np.pad(mask, radius), structure=disk(radius))
    mask = padded[radius:-radius, radius:-radius]
    px_area = mpp * mpp
    mask = ~_drop_small(~mask, MAX_HOLE_UM2 / px_area)
    return _drop_small(mask, MIN_OBJECT_UM2 / px_area)


def _drop_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_pixels`` pixels."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one slide: level-0 top-left corners (N, 2, int64: x, y), their tissue shares,
    and the level-0 tile size (width, height)."""

    coords: np.ndarray
    tissue: np.ndarray
    size: tuple[int, int]
    stride: tuple[int, int]

    def __len__(self) -> int:
        return len(self.coords)


def tile_grid(
    dimensions: tuple[int, int],
    tile_size: tuple[int, int],
    mask: np.ndarray,
    min_tissue: float = 0.5,
    overlap: float = 0.0,
) -> TileGrid:
    """Tiles of ``tile_size`` (level-0 px) on a grid over a slide of ``dimensions`` (level 0),
    keeping those whose share of ``mask`` (any resolution, same extent) is at least
    ``min_tissue``. ``overlap`` is the share of a tile its neighbour shares (0: none)."""
    W, H = dimensions
    tw, th = tile_size
    sx = max(1, round(tw * (1 - overlap)))
    sy = max(1, round(th * (1 - overlap)))
    # Tiles may hang over the right and bottom edges (read as glass there), so that the last
    # strip of tissue is scored too; their tissue share counts the part outside as glass.
    xs = np.arange(0, W, sx, dtype=np.int64)
    ys = np.arange(0, H, sy, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    share = _mask_share(mask, coords, tile_size, dimensions)
    keep = share >= min_tissue if min_tissue > 0 else np.ones(len(coords), bool)
    return TileGrid(coords[keep], share[keep].astype(np.float32), (tw, th), (sx, sy))


def _mask_share(
    mask: np.ndarray, coords: np.ndarray, size: tuple[int, int], dimensions: tuple[int, int]
) -> np.ndarray:
    """Share of each level-0 box covered by ``mask``, by a summed-area table of the mask with
    box corners rounded to mask pixels (at least one pixel each way); the part of a box outside
    the mask counts as uncovered."""
    mh, mw = mask.shape
    fx, fy = mw / dimensions[0], mh / dimensions[1]
    # int32 holds any count a mask has (under 2^31 pixels); int64 doubled the table's memory.
    table = np.zeros((mh + 1, mw + 1), np.int32)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=table[1:, 1:])
    x0 = np.clip(np.floor(coords[:, 0] * fx + 0.5).astype(np.int64), 0, mw - 1)
    y0 = np.clip(np.floor(coords[:, 1] * fy + 0.5).astype(np.int64), 0, mh - 1)
    x1 = np.clip(np.floor((coords[:, 0] + size[0]) * fx + 0.5).astype(np.int64), x0 + 1, mw)
    y1 = np.clip(np.floor((coords[:, 1] + size[1]) * fy + 0.5).astype(np.int64), y0 + 1, mh)
    inside = table[y1, x1].astype(np.int64) - table[y0, x1] - table[y1, x0] + table[y0, x0]
    full = np.maximum(1.0, np.round(size[0] * fx) * np.round(size[1] * fy))
    return np.minimum(1.0, inside / full)


def mask_area_mm2(mask: np.ndarray, dimensions: tuple[int, int], slide_mpp: float) -> float:
    """Tissue area in mm^2 of a mask spanning a slide of level-0 ``dimensions``."""
    px_um2 = (dimensions[0] * slide_mpp / mask.shape[1]) * (
        dimensions[1] * slide_mpp / mask.shape[0]
    )
    return float(mask.sum()) * px_um2 / 1e6
