"""Layers that viewers lay over a slide: tile scores and the tissue mask as RGBA images.

Both front ends draw these: the web viewer's ``overlay.png`` over the Deep Zoom slide, and the
desktop app's layers over the slide's thumbnail. Each layer covers the whole slide at the size
asked, transparent where it has nothing to say, so it can be shown, hidden or stacked freely.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["HEATMAP_COLOURS", "mask_overlay", "score_legend", "score_overlay"]

HEATMAP_COLOURS = "inferno"  # matplotlib's colour map of tile scores: black (0) to yellow (1)
MASK_COLOUR = (64, 214, 255)  # a cyan that neither inferno nor H&E stain uses


def score_overlay(
    coords: np.ndarray,
    scores: np.ndarray,
    tile_size: tuple[int, int],
    size: tuple[int, int],
    scale: tuple[float, float],
    alpha: int = 255,
) -> Image.Image:
    """Tile scores painted as an RGBA image of ``size`` (width, height).

    Args:
        coords: level-0 top-left corners of the tiles (N, 2).
        scores: the tiles' scores, 0 to 1 (NaN paints as 0).
        tile_size: a tile's level-0 (width, height).
        size: the image's (width, height).
        scale: image pixels per level-0 pixel, (x, y).
        alpha: the opacity of a scored tile (0-255); unscored areas stay transparent.
    """
    from matplotlib import colormaps

    ow, oh = int(size[0]), int(size[1])
    sx, sy = scale
    rgba = np.zeros((oh, ow, 4), np.uint8)
    scores = np.nan_to_num(np.asarray(scores, np.float64), nan=0.0)
    colours = (colormaps[HEATMAP_COLOURS](scores) * 255).astype(np.uint8)
    colours[:, 3] = alpha
    for (x, y), colour in zip(np.asarray(coords), colours, strict=True):
        # Every tile gets at least one pixel, however small the image.
        x0, y0 = int(x * sx), int(y * sy)
        x1 = max(x0 + 1, int(round((x + tile_size[0]) * sx)))
        y1 = max(y0 + 1, int(round((y + tile_size[1]) * sy)))
        rgba[y0:y1, x0:x1] = colour
    return Image.fromarray(rgba, "RGBA")


def mask_overlay(
    mask: np.ndarray, size: tuple[int, int], fill_alpha: int = 56, edge_px: int = 2
) -> Image.Image:
    """The tissue ``mask`` (any resolution, same extent as the image) as an RGBA image of
    ``size``: tissue tinted lightly, its outline ``edge_px`` wide drawn solid, glass clear."""
    from scipy import ndimage

    up = Image.fromarray(np.asarray(mask, np.uint8) * 255).resize(
        (int(size[0]), int(size[1])), Image.Resampling.NEAREST
    )
    tissue = np.asarray(up) > 127
    inner = ndimage.binary_erosion(tissue, iterations=max(1, edge_px), border_value=0)
    rgba = np.zeros((*tissue.shape, 4), np.uint8)
    rgba[..., :3] = MASK_COLOUR
    rgba[..., 3] = np.where(tissue, fill_alpha, 0)
    rgba[tissue & ~inner, 3] = 255
    return Image.fromarray(rgba, "RGBA")


def score_legend(width: int = 100, height: int = 10) -> Image.Image:
    """The tile-score colours from 0 (left) to 1 (right), as a strip for a legend."""
    from matplotlib import colormaps

    ramp = colormaps[HEATMAP_COLOURS](np.linspace(0.0, 1.0, width))[:, :3]
    strip = np.repeat((ramp * 255).astype(np.uint8)[None], height, axis=0)
    return Image.fromarray(strip, "RGB")
