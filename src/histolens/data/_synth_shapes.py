"""Raster primitives of the synthetic tile painter: smooth noise, collagen fibres, nuclei, layouts.

Each takes its randomness from the generator it is given, so a tile is reproducible from its seed.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise with features about ``scale`` pixels wide (low-res, resized)."""
    h, w = shape
    low = (max(2, math.ceil(h / scale) + 2), max(2, math.ceil(w / scale) + 2))
    small = ndimage.gaussian_filter(rng.standard_normal(low).astype(np.float32), 0.8)
    up = np.array(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    up -= up.mean()
    return up / (up.std() + 1e-6)


def draw_nuclei(
    canvas: np.ndarray,
    rng: np.random.Generator,
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    angle: np.ndarray,
    roughness: float,
    intensity: np.ndarray,
    vesicular: np.ndarray | float = 0.0,
) -> None:
    """Paint anti-aliased noisy ellipses (haematoxylin) into ``canvas``; overlaps keep the max.

    All nuclei of a call are rasterised at once on small stamps around their centres; the outline
    is an ellipse whose radius wobbles with harmonics 2-4 (``roughness``), and ``vesicular``
    lightens the centre relative to the rim, as in the open chromatin of tumour nuclei.
    """
    n = len(cy)
    if n == 0:
        return
    amps = rng.normal(0, roughness, (n, 3)) / np.array([1.0, 1.6, 2.4])
    phases = rng.uniform(0, 2 * np.pi, (n, 3))
    columns = [np.broadcast_to(np.asarray(x, np.float64), (n,)) for x in (cy, cx, a, b, angle)]
    columns += [np.broadcast_to(np.asarray(x, np.float64), (n,)) for x in (intensity, vesicular)]
    # Similar sizes share a stamp size, so big tumour nuclei do not inflate every stamp.
    order = np.argsort(np.maximum(columns[2], columns[3]), kind="stable")
    for chunk in np.array_split(order, max(1, math.ceil(n / 128))):
        _stamp(canvas, *(col[chunk] for col in columns), amps[chunk], phases[chunk], roughness)


def _stamp(
    canvas: np.ndarray,
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    angle: np.ndarray,
    intensity: np.ndarray,
    vesicular: np.ndarray,
    amps: np.ndarray,
    phases: np.ndarray,
    roughness: float,
) -> None:
    """Rasterise one chunk of :func:`draw_nuclei`'s nuclei, all on stamps of one size."""
    n = len(cy)
    h, w = canvas.shape
    cy, cx = cy.astype(np.float32), cx.astype(np.float32)
    a = a.astype(np.float32)[:, None, None]
    b = b.astype(np.float32)[:, None, None]
    amps = amps.astype(np.float32)
    pc = np.cos(phases).astype(np.float32)[:, :, None, None]
    ps = np.sin(phases).astype(np.float32)[:, :, None, None]
    amps = amps[:, :, None, None]
    cos = np.cos(angle).astype(np.float32)[:, None, None]
    sin = np.sin(angle).astype(np.float32)[:, None, None]
    tone = np.asarray(intensity, np.float32)[:, None, None]
    ves = np.broadcast_to(np.asarray(vesicular, np.float32), (n,))[:, None, None]
    reach = int(np.ceil(max(a.max(), b.max()) * (1 + 3 * max(roughness, 0.0)) + 2))
    off = np.arange(-reach, reach + 1)
    iy = np.round(cy).astype(np.int64)[:, None, None] + off[None, :, None]
    ix = np.round(cx).astype(np.int64)[:, None, None] + off[None, None, :]
    dy = (iy - cy[:, None, None]).astype(np.float32)
    dx = (ix - cx[:, None, None]).astype(np.float32)
    u = (dx * cos + dy * sin) / a
    v = (dy * cos - dx * sin) / b
    rho = np.sqrt(u * u + v * v) + 1e-6
    c, s = u / rho, v / rho
    # cos/sin of 2, 3 and 4 times the polar angle by Chebyshev recurrences (no arctan2).
    c2, s2 = 2 * c * c - 1, 2 * s * c
    c3, s3 = c * (4 * c * c - 3), s * (3 - 4 * s * s)
    c4, s4 = 2 * c2 * c2 - 1, 2 * s2 * c2
    radial = 1 + (
        amps[:, 0] * (c2 * pc[:, 0] - s2 * ps[:, 0])
        + amps[:, 1] * (c3 * pc[:, 1] - s3 * ps[:, 1])
        + amps[:, 2] * (c4 * pc[:, 2] - s4 * ps[:, 2])
    )
    q = rho / radial
    cover = np.clip((1 - q) * np.minimum(a, b) + 0.5, 0, 1)
    value = cover * tone * (1 - ves * np.clip(1 - q * q, 0, 1))
    inside = (value > 0) & (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    iy, ix = np.broadcast_to(iy, value.shape)[inside], np.broadcast_to(ix, value.shape)[inside]
    np.maximum.at(canvas, (iy, ix), value[inside])


def collagen_fibres(
    rng: np.random.Generator, shape: tuple[int, int], theta: float, warp: np.ndarray
) -> np.ndarray:
    """Wavy collagen streaks along ``theta``: anisotropic noise sampled on rotated, warped axes.

    Worked out at half resolution and resized, which keeps streaks 2-3 pixels thick and costs a
    quarter of the full-resolution resampling.
    """
    h, w = shape
    hh, hw = (h + 1) // 2, (w + 1) // 2
    side = int(np.hypot(hh, hw)) + 16
    # Streaks run along the base's second axis, stored 3x compressed (they are smooth along it).
    base = rng.standard_normal((side, side // 3 + 2), dtype=np.float32)
    base = ndimage.gaussian_filter(base, (0.6, 2))
    yy, xx = np.mgrid[0:hh, 0:hw].astype(np.float32)
    yy -= hh / 2
    xx -= hw / 2
    cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    sx = (xx * cos + yy * sin + side / 2) / 3
    sy = yy * cos - xx * sin + side / 2 + 2 * warp[::2, ::2]
    half = ndimage.map_coordinates(base, [sy, sx], order=1, mode="reflect")
    out = np.array(Image.fromarray(half).resize((w, h), Image.BICUBIC), dtype=np.float32)
    return out / (out.std() + 1e-6)


def grid_points(
    rng: np.random.Generator, shape: tuple[int, int], spacing: float, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """Jittered grid points: crowded but not piled on top of each other."""
    h, w = shape
    ys, xs = np.mgrid[0 : h + spacing : spacing, 0 : w + spacing : spacing]
    ys = ys.ravel() + rng.uniform(-jitter, jitter, ys.size) * spacing
    xs = xs.ravel() + rng.uniform(-jitter, jitter, xs.size) * spacing
    return ys, xs


def place_glands(
    rng: np.random.Generator, shape: tuple[int, int], radius: float, count: int
) -> list[tuple[float, float, float]]:
    """Non-overlapping gland centres and radii by rejection sampling."""
    h, w = shape
    glands: list[tuple[float, float, float]] = []
    for _ in range(count * 12):
        if len(glands) >= count:
            break
        r = radius * rng.uniform(0.7, 1.3)
        y, x = rng.uniform(-0.3 * r, h + 0.3 * r), rng.uniform(-0.3 * r, w + 0.3 * r)
        if all((y - gy) ** 2 + (x - gx) ** 2 > (1.15 * (r + gr)) ** 2 for gy, gx, gr in glands):
            glands.append((y, x, r))
    return glands
