"""Painting one synthetic H&E tile: stroma, then glands or a tumour lesion, nuclei and optics.

A tile is built as haematoxylin and eosin concentration maps (:class:`_StainMaps`) and only at the
end turned into RGB by the Beer-Lambert law (see :mod:`histolens.data.synth`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from histolens.data._synth_shapes import (
    collagen_fibres,
    draw_nuclei,
    grid_points,
    place_glands,
    smooth_noise,
)
from histolens.data.records import patient_group

# Per-subtype flavour: (white fraction, gland radius factor, gland count factor, nucleus factor,
# smallest gland aspect ratio); fibroadenoma and phyllodes ducts are compressed into slits.
SUBTYPE_STYLE = {
    "A": (0.06, 0.7, 1.6, 0.95, 0.6),
    "F": (0.05, 1.2, 0.8, 1.0, 0.3),
    "PT": (0.04, 1.1, 0.6, 1.05, 0.35),
    "TA": (0.08, 0.85, 1.4, 1.0, 0.7),
    "DC": (0.06, 1.0, 1.0, 1.05, 1.0),
    "LC": (0.05, 1.0, 1.0, 0.85, 1.0),
    "MC": (0.18, 1.0, 1.0, 1.0, 1.0),
    "PC": (0.08, 1.0, 1.0, 1.0, 1.0),
}


@dataclass(frozen=True, eq=False)
class Patient:
    """One synthetic patient: identity plus the look shared by all of their images."""

    index: int
    label: str
    subtype: str
    patient: str
    n_images: int
    stain_h: np.ndarray = field(repr=False)
    stain_e: np.ndarray = field(repr=False)
    intensity: float
    nucleus_radius: float
    density: float
    eosin: float
    haem_background: float
    gland_radius: float
    blur: float

    @property
    def group(self) -> str:
        return patient_group(self.patient)


@dataclass(eq=False)
class _StainMaps:
    """A tile being painted: stain concentrations, white clefts and the nuclei's haematoxylin,
    over the tile's pixel grid and the stroma's mid-scale texture (which structures follow)."""

    c_e: np.ndarray  # eosin concentration
    c_h: np.ndarray  # haematoxylin concentration outside the nuclei
    white: np.ndarray  # 0..1 where the section is thin or torn
    nuclei: np.ndarray  # haematoxylin of nuclei; overlaps keep the max
    medium: np.ndarray  # smooth noise at 25 px
    yy: np.ndarray  # each pixel's row, float32
    xx: np.ndarray  # each pixel's column, float32


@dataclass(frozen=True)
class _Gland:
    """One duct: centre, radius, flattening, orientation and the lumen's share of the radius."""

    y: float
    x: float
    radius: float
    aspect: float
    rot: float
    lumen_frac: float


def render_tile(
    p: Patient, rng: np.random.Generator, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one tile: returns (RGB uint8 HxWx3, lesion mask uint8 HxW with 0/255)."""
    shape = (height, width)
    maps, theta = _stroma(p, rng, shape)
    if p.label == "malignant":
        mask, occupied = _malignant_structures(p, rng, maps)
    else:
        mask = np.zeros(shape, np.uint8)
        occupied = _benign_structures(p, rng, maps)
    _stromal_cells(p, rng, maps, occupied, theta)
    _stain_nuclei(rng, maps)
    return _optics(p, rng, maps), mask


def _stroma(
    p: Patient, rng: np.random.Generator, shape: tuple[int, int]
) -> tuple[_StainMaps, float]:
    """Pink stroma with clefts, no nuclei yet; also returns the fibre direction.

    Stroma is wavy collagen bundles along a random direction, modulated by smooth noise.
    """
    theta = rng.uniform(0, np.pi)
    warp = smooth_noise(rng, shape, 80)
    fibres = collagen_fibres(rng, shape, theta, warp)
    medium = smooth_noise(rng, shape, 25)
    coarse = smooth_noise(rng, shape, 120)
    c_e = p.eosin * (0.8 + 0.16 * fibres + 0.08 * medium + 0.1 * coarse)
    c_e *= 1 - 0.5 * np.clip(fibres - 1.6, 0, 1)  # thin pale gaps between bundles
    c_h = p.haem_background * (1 + 0.3 * medium)
    white = _white_clefts(p, rng, shape, fibres, coarse)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    return _StainMaps(c_e, c_h, white, np.zeros(shape, np.float32), medium, yy, xx), theta


def _white_clefts(
    p: Patient,
    rng: np.random.Generator,
    shape: tuple[int, int],
    fibres: np.ndarray,
    coarse: np.ndarray,
) -> np.ndarray:
    """Near-white clefts and background (0..1) where the section is thin or torn."""
    white_field = smooth_noise(rng, shape, 70) + 0.35 * coarse + 0.08 * fibres
    frac = SUBTYPE_STYLE[p.subtype][0] * rng.uniform(0.4, 1.6)
    cut = np.quantile(white_field[::4, ::4], 1 - frac)
    return np.clip((white_field - cut) / 0.2, 0, 1)


def _malignant_structures(
    p: Patient, rng: np.random.Generator, maps: _StainMaps
) -> tuple[np.ndarray, np.ndarray]:
    """A lesion of tumour nests; returns (lesion mask uint8 0/255, lesion cover 0..1)."""
    shape, medium = maps.nuclei.shape, maps.medium
    dist, cut = _lesion_distance(rng, shape, maps.yy, maps.xx)
    inside = dist < cut
    mask = np.zeros(shape, np.uint8)
    mask[inside] = 255
    lesion = np.clip((cut - dist) / 0.015 + 0.5, 0, 1).astype(np.float32)
    # Tumour nests separated by thin stromal strands.
    nests = np.clip((smooth_noise(rng, shape, 35) + 1.3) / 0.4, 0, 1)
    cells = lesion * nests
    maps.white *= 1 - 0.9 * lesion
    maps.c_e = maps.c_e * (1 - 0.45 * cells) + cells * p.eosin * 0.6 * (1 + 0.12 * medium)
    maps.c_h = maps.c_h + cells * (0.16 + 0.05 * medium)
    _tumour_nuclei(p, rng, maps.nuclei, dist, cut, nests)
    return mask, lesion


def _lesion_distance(
    rng: np.random.Generator, shape: tuple[int, int], yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, float]:
    """An irregular blob at a random place covering 20-50% of the tile: (distance map, cut-off).

    The lesion is where the distance is below the cut-off.
    """
    height, width = shape
    cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
    aspect = rng.uniform(0.55, 1.0)
    rot = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)
    v = (yy - cy) * np.cos(rot) - (xx - cx) * np.sin(rot)
    dist = np.sqrt(u**2 + (v / aspect) ** 2) / max(height, width)
    dist += 0.07 * smooth_noise(rng, shape, 50)
    cut = np.quantile(dist[::4, ::4], rng.uniform(0.2, 0.5))
    return dist, cut


def _tumour_nuclei(
    p: Patient,
    rng: np.random.Generator,
    nuclei: np.ndarray,
    dist: np.ndarray,
    cut: float,
    nests: np.ndarray,
) -> None:
    """Large, dark, crowded, irregular nuclei inside the lesion, some with prominent nucleoli."""
    height, width = nuclei.shape
    size_mean = p.nucleus_radius * 1.7
    spacing = 2 * size_mean * rng.uniform(0.85, 1.0) / np.sqrt(p.density)
    ys, xs = grid_points(rng, nuclei.shape, spacing, 0.4)
    iy = np.clip(ys.astype(int), 0, height - 1)
    ix = np.clip(xs.astype(int), 0, width - 1)
    # Cells thin out towards the lesion's edge.
    edge = np.clip((cut - dist[iy, ix]) / 0.04, 0.35, 1)
    inside = dist[iy, ix] < cut
    keep = inside & (rng.uniform(size=ys.size) < 0.95 * edge * nests[iy, ix])
    ys, xs = ys[keep], xs[keep]
    k = len(ys)
    size = size_mean * rng.lognormal(0, 0.2, k)
    a = size * rng.uniform(1.0, 1.3, k)
    b = size * rng.uniform(0.65, 1.0, k)
    tone = rng.uniform(1.2, 2.0, k)
    ves = rng.uniform(0.0, 0.45, k)
    draw_nuclei(nuclei, rng, ys, xs, a, b, rng.uniform(0, np.pi, k), 0.1, tone, ves)
    # Prominent nucleoli in some tumour nuclei.
    m = rng.uniform(size=k) < 0.4
    r0 = size[m] * rng.uniform(0.15, 0.25, int(m.sum()))
    jitter = rng.normal(0, 0.25, (2, int(m.sum()))) * size[m]
    draw_nuclei(nuclei, rng, ys[m] + jitter[0], xs[m] + jitter[1], r0, r0, 0.0, 0.05, 2.6)


def _benign_structures(p: Patient, rng: np.random.Generator, maps: _StainMaps) -> np.ndarray:
    """Ducts lined by rows of small, regular nuclei around a lumen; returns their cover 0..1."""
    shape = maps.nuclei.shape
    height, width = shape
    style = SUBTYPE_STYLE[p.subtype]
    n_glands = height * width / (np.pi * p.gland_radius**2) * 0.3 * style[2]
    n_glands = max(1, int(round(n_glands * rng.uniform(0.7, 1.3))))
    epithelium = np.zeros(shape, np.float32)
    lumen = np.zeros(shape, np.float32)
    parts: list[tuple[np.ndarray, ...]] = []
    for gy, gx, gr in place_glands(rng, shape, p.gland_radius, n_glands):
        aspect = rng.uniform(style[4], 1.0)
        rot = rng.uniform(0, np.pi)
        gland = _Gland(gy, gx, gr, aspect, rot, lumen_frac=rng.uniform(0.35, 0.6))
        if _paint_gland(gland, epithelium, lumen, maps):
            parts += _gland_nuclei(p, rng, gland)
    if parts:
        cy, cx, a, b, ang, tone = (np.concatenate(col) for col in zip(*parts, strict=True))
        draw_nuclei(maps.nuclei, rng, cy, cx, a, b, ang, 0.035, tone, 0.1)
    # Epithelial cytoplasm is denser pink-purple; lumina are empty, some with pale secretion.
    maps.white = maps.white * (1 - epithelium)
    maps.c_e = maps.c_e * (1 - 0.35 * epithelium) + epithelium * p.eosin * 0.75
    maps.c_h = maps.c_h + 0.07 * epithelium
    secretion = rng.uniform(0.0, 0.3)
    maps.c_e = maps.c_e * (1 - lumen) + lumen * p.eosin * secretion * (1 + 0.3 * maps.medium)
    maps.c_h = maps.c_h * (1 - lumen)
    maps.nuclei = maps.nuclei * (1 - lumen)
    return np.maximum(epithelium, lumen)


def _paint_gland(
    gland: _Gland, epithelium: np.ndarray, lumen: np.ndarray, maps: _StainMaps
) -> bool:
    """Add one gland's epithelial ring and lumen (0..1); False when its box misses the tile."""
    height, width = epithelium.shape
    gy, gx, gr = gland.y, gland.x, gland.radius
    pad = int(gr * 1.25) + 2
    y0, y1 = max(0, int(gy) - pad), min(height, int(gy) + pad)
    x0, x1 = max(0, int(gx) - pad), min(width, int(gx) + pad)
    if y0 >= y1 or x0 >= x1:
        return False
    dy, dx = maps.yy[y0:y1, x0:x1] - gy, maps.xx[y0:y1, x0:x1] - gx
    u = dx * np.cos(gland.rot) + dy * np.sin(gland.rot)
    v = dy * np.cos(gland.rot) - dx * np.sin(gland.rot)
    d = np.sqrt(u**2 + (v / gland.aspect) ** 2) / gr + 0.04 * maps.medium[y0:y1, x0:x1]
    epithelium[y0:y1, x0:x1] = np.maximum(epithelium[y0:y1, x0:x1], np.clip((1.0 - d) / 0.04, 0, 1))
    lumen[y0:y1, x0:x1] = np.maximum(
        lumen[y0:y1, x0:x1], np.clip((gland.lumen_frac - d) / 0.03, 0, 1)
    )
    return True


def _gland_nuclei(
    p: Patient, rng: np.random.Generator, gland: _Gland
) -> list[tuple[np.ndarray, ...]]:
    """One gland's nuclei as (cy, cx, a, b, angle, tone) columns, one tuple per ring.

    Rows of luminal nuclei evenly spaced around the ring, then flattened myoepithelial cells.
    """
    nr, gr = p.nucleus_radius, gland.radius
    aspect, rot, lumen_frac = gland.aspect, gland.rot, gland.lumen_frac
    rows = max(1, int((0.9 - lumen_frac) * gr / (2.6 * nr)))
    radii = [lumen_frac + (0.9 - lumen_frac) * (i + 0.5) / (rows + 0.4) for i in range(rows)]
    layers = [(r, 2.4, 1.0, 1.0) for r in radii] + [(0.95, 4.0, 0.5, 0.85)]
    parts = []
    for radial, step, flat, tone in layers:
        ring = gr * radial
        perimeter = np.pi * ring * (1 + aspect)
        count = max(6, int(perimeter / (step * nr)))
        t = np.linspace(0, 2 * np.pi, count, endpoint=False) + rng.uniform(0, 2 * np.pi)
        t = t + rng.normal(0, 0.2 * 2 * np.pi / count, count)
        t = t[rng.uniform(size=count) < 0.8 + 0.2 * p.density]
        rad = ring * (1 + rng.normal(0, 0.025, len(t)))
        lu, lv = rad * np.cos(t), rad * np.sin(t) * aspect
        tangent = np.arctan2(np.cos(t) * aspect, -np.sin(t)) + rot
        parts.append(
            (
                gland.y + lu * np.sin(rot) + lv * np.cos(rot),
                gland.x + lu * np.cos(rot) - lv * np.sin(rot),
                nr * rng.uniform(0.95, 1.15, len(t)) * (1.5 if flat < 1 else 1.0),
                nr * rng.uniform(0.85, 1.0, len(t)) * flat,
                tangent,
                rng.uniform(0.9, 1.15, len(t)) * tone,
            )
        )
    return parts


def _stromal_cells(
    p: Patient,
    rng: np.random.Generator,
    maps: _StainMaps,
    occupied: np.ndarray,
    theta: float,
) -> None:
    """Sparse stromal cells outside lesions and glands: spindle fibroblasts, round lymphocytes."""
    height, width = maps.nuclei.shape
    nr = p.nucleus_radius
    k = int(height * width / (3000 / p.density) * rng.uniform(0.6, 1.4) / max(nr / 4, 0.5) ** 2)
    ys, xs = rng.uniform(0, height, k), rng.uniform(0, width, k)
    iy, ix = ys.astype(int), xs.astype(int)
    free = (maps.white[iy, ix] < 0.3) & (maps.nuclei[iy, ix] == 0) & (occupied[iy, ix] < 0.5)
    ys, xs = ys[free], xs[free]
    k = len(ys)
    spindle = rng.uniform(size=k) < 0.7
    a = np.where(spindle, nr * rng.uniform(1.5, 2.3, k), nr * rng.uniform(0.6, 0.8, k))
    b = np.where(spindle, nr * rng.uniform(0.35, 0.5, k), a * rng.uniform(0.9, 1.0, k))
    ang = np.where(spindle, theta + rng.normal(0, 0.2, k), 0.0)
    tone = np.where(spindle, rng.uniform(0.8, 1.1, k), rng.uniform(1.4, 1.8, k))
    draw_nuclei(maps.nuclei, rng, ys, xs, a, b, ang, 0.05, tone)


def _stain_nuclei(rng: np.random.Generator, maps: _StainMaps) -> None:
    """Chromatin texture, then a nucleus replaces the cytoplasm's eosin where it sits."""
    chromatin = ndimage.gaussian_filter(
        rng.standard_normal(maps.nuclei.shape, dtype=np.float32), 1.2
    )
    maps.nuclei *= 1 + 1.2 * chromatin
    maps.c_e = maps.c_e * (1 - 0.5 * np.clip(maps.nuclei, 0, 1))
    maps.c_h = maps.c_h + maps.nuclei
    maps.c_e = maps.c_e * (1 - 0.93 * maps.white)
    maps.c_h = maps.c_h * (1 - 0.9 * maps.white)


def _optics(p: Patient, rng: np.random.Generator, maps: _StainMaps) -> np.ndarray:
    """Defocus blur, Beer-Lambert colour, vignetting and sensor noise: the RGB uint8 tile."""
    height, width = maps.c_h.shape
    c_h = ndimage.gaussian_filter(np.clip(maps.c_h, 0, None), p.blur)
    c_e = ndimage.gaussian_filter(np.clip(maps.c_e, 0, None), p.blur)
    od = c_h[..., None] * p.stain_h.astype(np.float32)
    od += c_e[..., None] * p.stain_e.astype(np.float32)
    r2 = ((maps.xx - width / 2) / width) ** 2 + ((maps.yy - height / 2) / height) ** 2
    light = p.intensity * rng.uniform(0.97, 1.03) * (1 - rng.uniform(0.05, 0.15) * r2)
    rgb = light[..., None] * np.exp(-od)
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(2.2)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
