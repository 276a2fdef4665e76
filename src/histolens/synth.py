"""A synthetic H&E-like breast-tissue generator, so the whole pipeline can be run without BreakHis.

Tiles are painted as haematoxylin and eosin concentration maps and turned into colour with the
Beer-Lambert law (OD = c_H * v_H + c_E * v_E, RGB = I0 * exp(-OD)), so stain tools such as
Macenko normalisation see two clean stain vectors. Benign tiles show orderly glands of small,
evenly spaced nuclei; malignant tiles carry a lesion of large, dark, crowded, irregular nuclei
whose extent is written as a mask for checking heatmaps. Each patient has its own stains, nucleus
size and density, so images of one patient resemble each other, as on real slides.
"""

# Over 400 lines: one generator; its painting steps (stains, glands, nuclei, lesion mask) only make
# sense together.

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from histolens.atomic import atomic_open, atomic_path
from histolens.data import BENIGN_SUBTYPES, MAGNIFICATIONS, MALIGNANT_SUBTYPES, patient_group
from histolens.errors import ConfigError

__all__ = ["SynthSummary", "generate_synthetic", "mask_path_for", "write_contact_sheet"]

MANIFEST_COLUMNS = ("path", "label", "subtype", "patient", "group", "magnification", "mask")
# Reference stain vectors (optical density per unit concentration) used by Macenko/torchstain.
_H_VECTOR = np.array([0.5626, 0.7201, 0.4062])
_E_VECTOR = np.array([0.2159, 0.8012, 0.5581])
# Structures shrink at lower magnification, but not in proportion, or 40X nuclei would vanish.
_MAG_SCALE = {40: 0.35, 100: 0.5, 200: 0.7, 400: 1.0}
# Per-subtype flavour: (white fraction, gland radius factor, gland count factor, nucleus factor,
# smallest gland aspect ratio); fibroadenoma and phyllodes ducts are compressed into slits.
_SUBTYPE_STYLE = {
    "A": (0.06, 0.7, 1.6, 0.95, 0.6),
    "F": (0.05, 1.2, 0.8, 1.0, 0.3),
    "PT": (0.04, 1.1, 0.6, 1.05, 0.35),
    "TA": (0.08, 0.85, 1.4, 1.0, 0.7),
    "DC": (0.06, 1.0, 1.0, 1.05, 1.0),
    "LC": (0.05, 1.0, 1.0, 0.85, 1.0),
    "MC": (0.18, 1.0, 1.0, 1.0, 1.0),
    "PC": (0.08, 1.0, 1.0, 1.0, 1.0),
}
_SUFFIXES = ("", "", "", "A", "B", "C", "D", "E", "F", "AB", "CD", "EF")


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_synthetic` wrote."""

    out_dir: Path
    n_images: int
    n_patients: int
    counts: dict[str, int]
    seconds: float
    contact_sheet: Path
    manifest: Path


@dataclass(frozen=True, eq=False)
class _Patient:
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


def _patient_ids(rng: np.random.Generator, n: int) -> list[str]:
    cores = rng.choice(np.arange(1000, 30000), size=n, replace=False)
    years = rng.choice([14, 15], size=n)
    suffixes = rng.choice(len(_SUFFIXES), size=n)
    return [f"{y}-{c}{_SUFFIXES[s]}" for y, c, s in zip(years, cores, suffixes, strict=True)]


def _split_counts(rng: np.random.Generator, total: int, parts: int) -> list[int]:
    """Split ``total`` images over ``parts`` patients, every one at least one, unevenly."""
    weights = rng.uniform(0.6, 1.4, size=parts)
    extra = rng.multinomial(total - parts, weights / weights.sum())
    return [int(1 + e) for e in extra]


def _make_patients(seed: int, n: int, n_patients: int, magnification: int) -> list[_Patient]:
    # Benign a little fewer, as in BreakHis (about 31/69 there; 45/55 here keeps classes usable).
    n_benign = max(1, round(n * 0.45))
    n_malignant = n - n_benign
    p_benign = min(n_benign, max(1, n_patients // 2))
    p_malignant = min(n_malignant, max(1, n_patients - p_benign))
    plan_rng = np.random.default_rng([seed, 7_301])
    ids = _patient_ids(plan_rng, p_benign + p_malignant)
    counts = _split_counts(plan_rng, n_benign, p_benign) + _split_counts(
        plan_rng, n_malignant, p_malignant
    )
    scale = _MAG_SCALE[magnification]
    patients = []
    for index, (pid, count) in enumerate(zip(ids, counts, strict=True)):
        label = "benign" if index < p_benign else "malignant"
        within = index if label == "benign" else index - p_benign
        subtypes = BENIGN_SUBTYPES if label == "benign" else MALIGNANT_SUBTYPES
        subtype = subtypes[within % len(subtypes)]
        rng = np.random.default_rng([seed, index, 0])
        stain_h = _H_VECTOR + rng.normal(0, 0.06, 3)
        stain_e = _E_VECTOR + rng.normal(0, 0.06, 3)
        patients.append(
            _Patient(
                index=index,
                label=label,
                subtype=subtype,
                patient=pid,
                n_images=count,
                stain_h=np.abs(stain_h) / np.linalg.norm(stain_h),
                stain_e=np.abs(stain_e) / np.linalg.norm(stain_e),
                intensity=float(rng.uniform(225, 252)),
                nucleus_radius=float(rng.uniform(4.5, 6.0) * scale * _SUBTYPE_STYLE[subtype][3]),
                density=float(rng.uniform(0.6, 1.0)),
                eosin=float(rng.uniform(0.45, 0.8)),
                haem_background=float(rng.uniform(0.04, 0.12)),
                gland_radius=float(rng.uniform(60, 95) * scale * _SUBTYPE_STYLE[subtype][1]),
                blur=float(rng.uniform(0.6, 1.1)),
            )
        )
    return patients


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise with features about ``scale`` pixels wide (low-res, resized)."""
    h, w = shape
    low = (max(2, math.ceil(h / scale) + 2), max(2, math.ceil(w / scale) + 2))
    small = ndimage.gaussian_filter(rng.standard_normal(low).astype(np.float32), 0.8)
    up = np.array(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    up -= up.mean()
    return up / (up.std() + 1e-6)


def _draw_nuclei(
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


def _fibres(
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


def _grid_points(
    rng: np.random.Generator, shape: tuple[int, int], spacing: float, jitter: float
) -> tuple[np.ndarray, np.ndarray]:
    """Jittered grid points: crowded but not piled on top of each other."""
    h, w = shape
    ys, xs = np.mgrid[0 : h + spacing : spacing, 0 : w + spacing : spacing]
    ys = ys.ravel() + rng.uniform(-jitter, jitter, ys.size) * spacing
    xs = xs.ravel() + rng.uniform(-jitter, jitter, xs.size) * spacing
    return ys, xs


def _place_glands(
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


def _render_tile(
    p: _Patient, rng: np.random.Generator, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one tile: returns (RGB uint8 HxWx3, lesion mask uint8 HxW with 0/255)."""
    shape = (height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    style = _SUBTYPE_STYLE[p.subtype]
    nr = p.nucleus_radius

    # Stroma: wavy collagen bundles along a random direction, modulated by smooth noise.
    theta = rng.uniform(0, np.pi)
    warp = _smooth_noise(rng, shape, 80)
    fibres = _fibres(rng, shape, theta, warp)
    medium = _smooth_noise(rng, shape, 25)
    coarse = _smooth_noise(rng, shape, 120)
    c_e = p.eosin * (0.8 + 0.16 * fibres + 0.08 * medium + 0.1 * coarse)
    c_e *= 1 - 0.5 * np.clip(fibres - 1.6, 0, 1)  # thin pale gaps between bundles
    c_h = p.haem_background * (1 + 0.3 * medium)

    # Near-white clefts and background where the section is thin or torn.
    white_field = _smooth_noise(rng, shape, 70) + 0.35 * coarse + 0.08 * fibres
    frac = style[0] * rng.uniform(0.4, 1.6)
    cut = np.quantile(white_field[::4, ::4], 1 - frac)
    white = np.clip((white_field - cut) / 0.2, 0, 1)

    nuclei = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.uint8)
    if p.label == "malignant":
        # Lesion: an irregular blob at a random place covering 20-50% of the tile.
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        aspect = rng.uniform(0.55, 1.0)
        rot = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)
        v = (yy - cy) * np.cos(rot) - (xx - cx) * np.sin(rot)
        dist = np.sqrt(u**2 + (v / aspect) ** 2) / max(height, width)
        dist += 0.07 * _smooth_noise(rng, shape, 50)
        cut = np.quantile(dist[::4, ::4], rng.uniform(0.2, 0.5))
        inside = dist < cut
        mask[inside] = 255
        lesion = np.clip((cut - dist) / 0.015 + 0.5, 0, 1).astype(np.float32)
        occupied = lesion
        # Tumour nests separated by thin stromal strands; cells thin out towards the edge.
        nests = np.clip((_smooth_noise(rng, shape, 35) + 1.3) / 0.4, 0, 1)
        cells = lesion * nests
        white *= 1 - 0.9 * lesion
        c_e = c_e * (1 - 0.45 * cells) + cells * p.eosin * 0.6 * (1 + 0.12 * medium)
        c_h = c_h + cells * (0.16 + 0.05 * medium)
        size_mean = nr * 1.7
        spacing = 2 * size_mean * rng.uniform(0.85, 1.0) / np.sqrt(p.density)
        ys, xs = _grid_points(rng, shape, spacing, 0.4)
        iy = np.clip(ys.astype(int), 0, height - 1)
        ix = np.clip(xs.astype(int), 0, width - 1)
        edge = np.clip((cut - dist[iy, ix]) / 0.04, 0.35, 1)
        keep = inside[iy, ix] & (rng.uniform(size=ys.size) < 0.95 * edge * nests[iy, ix])
        ys, xs = ys[keep], xs[keep]
        k = len(ys)
        size = size_mean * rng.lognormal(0, 0.2, k)
        a = size * rng.uniform(1.0, 1.3, k)
        b = size * rng.uniform(0.65, 1.0, k)
        tone = rng.uniform(1.2, 2.0, k)
        ves = rng.uniform(0.0, 0.45, k)
        _draw_nuclei(nuclei, rng, ys, xs, a, b, rng.uniform(0, np.pi, k), 0.1, tone, ves)
        # Prominent nucleoli in some tumour nuclei.
        m = rng.uniform(size=k) < 0.4
        r0 = size[m] * rng.uniform(0.15, 0.25, int(m.sum()))
        jitter = rng.normal(0, 0.25, (2, int(m.sum()))) * size[m]
        _draw_nuclei(nuclei, rng, ys[m] + jitter[0], xs[m] + jitter[1], r0, r0, 0.0, 0.05, 2.6)
    else:
        nuclei, white, c_e, c_h, occupied = _benign_structures(
            p, rng, shape, nuclei, white, c_e, c_h, medium, yy, xx
        )

    # Sparse stromal cells outside lesions and glands: spindle fibroblasts, round lymphocytes.
    k = int(height * width / (3000 / p.density) * rng.uniform(0.6, 1.4) / max(nr / 4, 0.5) ** 2)
    ys, xs = rng.uniform(0, height, k), rng.uniform(0, width, k)
    iy, ix = ys.astype(int), xs.astype(int)
    free = (white[iy, ix] < 0.3) & (nuclei[iy, ix] == 0) & (occupied[iy, ix] < 0.5)
    ys, xs = ys[free], xs[free]
    k = len(ys)
    spindle = rng.uniform(size=k) < 0.7
    a = np.where(spindle, nr * rng.uniform(1.5, 2.3, k), nr * rng.uniform(0.6, 0.8, k))
    b = np.where(spindle, nr * rng.uniform(0.35, 0.5, k), a * rng.uniform(0.9, 1.0, k))
    ang = np.where(spindle, theta + rng.normal(0, 0.2, k), 0.0)
    tone = np.where(spindle, rng.uniform(0.8, 1.1, k), rng.uniform(1.4, 1.8, k))
    _draw_nuclei(nuclei, rng, ys, xs, a, b, ang, 0.05, tone)

    # Chromatin texture, then a nucleus replaces the cytoplasm's eosin where it sits.
    chromatin = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.2)
    nuclei *= 1 + 1.2 * chromatin
    c_e = c_e * (1 - 0.5 * np.clip(nuclei, 0, 1))
    c_h = c_h + nuclei
    c_e = c_e * (1 - 0.93 * white)
    c_h = c_h * (1 - 0.9 * white)

    # Optics: defocus blur, Beer-Lambert colour, vignetting, sensor noise.
    c_h = ndimage.gaussian_filter(np.clip(c_h, 0, None), p.blur)
    c_e = ndimage.gaussian_filter(np.clip(c_e, 0, None), p.blur)
    od = c_h[..., None] * p.stain_h.astype(np.float32)
    od += c_e[..., None] * p.stain_e.astype(np.float32)
    r2 = ((xx - width / 2) / width) ** 2 + ((yy - height / 2) / height) ** 2
    light = p.intensity * rng.uniform(0.97, 1.03) * (1 - rng.uniform(0.05, 0.15) * r2)
    rgb = light[..., None] * np.exp(-od)
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(2.2)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mask


def _benign_structures(
    p: _Patient,
    rng: np.random.Generator,
    shape: tuple[int, int],
    nuclei: np.ndarray,
    white: np.ndarray,
    c_e: np.ndarray,
    c_h: np.ndarray,
    medium: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ducts lined by rows of small, regular nuclei around a lumen, on pink stroma."""
    height, width = shape
    style = _SUBTYPE_STYLE[p.subtype]
    nr = p.nucleus_radius
    n_glands = height * width / (np.pi * p.gland_radius**2) * 0.3 * style[2]
    n_glands = max(1, int(round(n_glands * rng.uniform(0.7, 1.3))))
    epithelium = np.zeros(shape, np.float32)
    lumen = np.zeros(shape, np.float32)
    parts: list[tuple[np.ndarray, ...]] = []
    for gy, gx, gr in _place_glands(rng, shape, p.gland_radius, n_glands):
        aspect = rng.uniform(style[4], 1.0)
        rot = rng.uniform(0, np.pi)
        lumen_frac = rng.uniform(0.35, 0.6)
        pad = int(gr * 1.25) + 2
        y0, y1 = max(0, int(gy) - pad), min(height, int(gy) + pad)
        x0, x1 = max(0, int(gx) - pad), min(width, int(gx) + pad)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = yy[y0:y1, x0:x1] - gy, xx[y0:y1, x0:x1] - gx
        u = dx * np.cos(rot) + dy * np.sin(rot)
        v = dy * np.cos(rot) - dx * np.sin(rot)
        d = np.sqrt(u**2 + (v / aspect) ** 2) / gr + 0.04 * medium[y0:y1, x0:x1]
        epithelium[y0:y1, x0:x1] = np.maximum(
            epithelium[y0:y1, x0:x1], np.clip((1.0 - d) / 0.04, 0, 1)
        )
        lumen[y0:y1, x0:x1] = np.maximum(
            lumen[y0:y1, x0:x1], np.clip((lumen_frac - d) / 0.03, 0, 1)
        )
        # Rows of luminal nuclei evenly spaced around the ring, then flattened myoepithelial cells.
        rows = max(1, int((0.9 - lumen_frac) * gr / (2.6 * nr)))
        radii = [lumen_frac + (0.9 - lumen_frac) * (i + 0.5) / (rows + 0.4) for i in range(rows)]
        layers = [(r, 2.4, 1.0, 1.0) for r in radii] + [(0.95, 4.0, 0.5, 0.85)]
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
                    gy + lu * np.sin(rot) + lv * np.cos(rot),
                    gx + lu * np.cos(rot) - lv * np.sin(rot),
                    nr * rng.uniform(0.95, 1.15, len(t)) * (1.5 if flat < 1 else 1.0),
                    nr * rng.uniform(0.85, 1.0, len(t)) * flat,
                    tangent,
                    rng.uniform(0.9, 1.15, len(t)) * tone,
                )
            )
    if parts:
        cy, cx, a, b, ang, tone = (np.concatenate(col) for col in zip(*parts, strict=True))
        _draw_nuclei(nuclei, rng, cy, cx, a, b, ang, 0.035, tone, 0.1)
    # Epithelial cytoplasm is denser pink-purple; lumina are empty, some with pale secretion.
    white = white * (1 - epithelium)
    c_e = c_e * (1 - 0.35 * epithelium) + epithelium * p.eosin * 0.75
    c_h = c_h + 0.07 * epithelium
    secretion = rng.uniform(0.0, 0.3)
    c_e = c_e * (1 - lumen) + lumen * p.eosin * secretion * (1 + 0.3 * medium)
    c_h = c_h * (1 - lumen)
    return nuclei * (1 - lumen), white, c_e, c_h, np.maximum(epithelium, lumen)


def _worker_count(workers: int | None, n_jobs: int) -> int:
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}.")
    return min(workers, max(1, n_jobs))


def _render_job(job: tuple) -> dict:
    """Render and save one image and its mask; returns its manifest row (runs in a worker)."""
    p, seed, number, width, height, out, rel, mask_rel = job
    rgb, mask = _render_tile(p, np.random.default_rng([seed, p.index, number]), width, height)
    _save_png(rgb, out / rel)
    _save_png(mask, out / mask_rel)
    return {
        "path": rel.as_posix(),
        "label": p.label,
        "subtype": p.subtype,
        "patient": p.patient,
        "group": p.group,
        "magnification": int(rel.parts[0].rstrip("X")),
        "mask": mask_rel.as_posix(),
    }


def _save_png(array: np.ndarray, target: Path) -> None:
    with atomic_path(target) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


def _check_fresh(folders: Iterable[Path], names: set[str]) -> None:
    """Refuse to mix a new dataset with images of an earlier, different run."""
    for folder in folders:
        if folder.is_dir():
            stale = sorted(p.name for p in folder.glob("*.png") if p.name not in names)
            if stale:
                raise ConfigError(
                    f"{folder} already holds {len(stale)} image(s) this run would not write "
                    f"(e.g. {stale[0]}); give an empty or new output folder."
                )


def generate_synthetic(
    out_dir: str | os.PathLike,
    n: int = 240,
    seed: int = 0,
    magnification: int = 400,
    size: tuple[int, int] = (700, 460),
    n_patients: int | None = None,
    progress: Callable[[int, int], object] | None = None,
    workers: int | None = None,
) -> SynthSummary:
    """Write a BreakHis-like dataset of ``n`` H&E-like tiles, lesion masks, a manifest and a sheet.

    Layout: ``<out_dir>/<MAG>X/{benign,malignant}/SOB_*.png``, masks under ``<out_dir>/masks/``
    with the same relative paths, ``manifest.csv`` and ``contact_sheet.png`` in ``out_dir``.
    Same seed, same bytes: every image draws from a generator seeded by (seed, patient, image).

    Args:
        out_dir: Output folder (created if needed).
        n: Number of images, split about 45/55 benign/malignant.
        seed: Seed for everything random.
        magnification: One of 40, 100, 200, 400; used in names and to scale structures.
        size: Tile (width, height) in pixels.
        n_patients: Number of patients; default ``max(8, n // 15)``.
        progress: Optional ``callable(done, total)`` called after each image.
        workers: Threads to render with; default up to 4 (one per CPU).
            The output does not depend on it.
    """
    start = time.perf_counter()
    if magnification not in MAGNIFICATIONS:
        raise ConfigError(
            f"Unknown magnification {magnification!r}; choose one of: "
            f"{', '.join(map(str, MAGNIFICATIONS))}."
        )
    if n < 2:
        raise ConfigError(f"n must be at least 2 (one image per class), got {n}.")
    width, height = (int(s) for s in size)
    if width < 32 or height < 32:
        raise ConfigError(f"size must be at least 32x32 pixels, got {width}x{height}.")
    n_patients = max(8, n // 15) if n_patients is None else int(n_patients)
    if n_patients < 2:
        raise ConfigError(f"n_patients must be at least 2 (one per class), got {n_patients}.")

    out = Path(out_dir)
    mag_folder = f"{magnification}X"
    patients = _make_patients(seed, n, n_patients, magnification)
    plan = []
    for p in patients:
        code = "B" if p.label == "benign" else "M"
        for number in range(1, p.n_images + 1):
            name = f"SOB_{code}_{p.subtype}-{p.patient}-{magnification}-{number:03d}.png"
            rel = Path(mag_folder) / p.label / name
            plan.append((p, number, rel, Path("masks") / rel))
    _check_fresh(
        [out / mag_folder / label for label in ("benign", "malignant")],
        {r.name for _, _, r, _ in plan},
    )

    jobs = [
        (p, seed, number, width, height, out, rel, mask_rel) for p, number, rel, mask_rel in plan
    ]
    workers = _worker_count(workers, len(jobs))
    rows = []
    if workers == 1:
        results: Iterable[dict] = map(_render_job, jobs)
        for done, row in enumerate(results, start=1):
            rows.append(row)
            if progress is not None:
                progress(done, len(jobs))
    else:
        # Threads, not processes: numpy, scipy and PNG encoding release the GIL for most of the
        # work, and a process pool would break callers without a __main__ guard or with a GUI.
        with ThreadPoolExecutor(workers) as pool:
            for done, row in enumerate(pool.map(_render_job, jobs), start=1):
                rows.append(row)
                if progress is not None:
                    progress(done, len(jobs))

    manifest = out / "manifest.csv"
    with atomic_open(manifest, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    # Two images per patient show the between-patient variety at a glance.
    sample = [out / rel for p, number, rel, _ in plan if number <= 2][:48]
    sheet = write_contact_sheet(sample, out / "contact_sheet.png")
    counts = {label: sum(r["label"] == label for r in rows) for label in ("benign", "malignant")}
    return SynthSummary(
        out_dir=out,
        n_images=len(rows),
        n_patients=len(patients),
        counts=counts,
        seconds=time.perf_counter() - start,
        contact_sheet=sheet,
        manifest=manifest,
    )


def _caption_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=11)
    except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font.
        return ImageFont.load_default()


def write_contact_sheet(
    image_paths: Sequence[str | os.PathLike],
    out_png: str | os.PathLike,
    columns: int = 8,
    thumb: tuple[int, int] = (175, 115),
    labels: bool = True,
) -> Path:
    """Write a grid of thumbnails (captioned with file name and class) as one PNG, atomically.

    The class is read from the parent folder name; benign thumbnails get a blue frame, malignant
    a red one, so a sheet shows at a glance whether the two classes look different.
    """
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ConfigError("write_contact_sheet needs at least one image.")
    if columns < 1:
        raise ConfigError(f"columns must be at least 1, got {columns}.")
    tw, th = thumb
    caption = 28 if labels else 0
    gap = 4
    cols = min(columns, len(paths))
    rows = math.ceil(len(paths) / cols)
    sheet = Image.new(
        "RGB", (cols * (tw + gap) + gap, rows * (th + caption + gap) + gap), (255, 255, 255)
    )
    draw = ImageDraw.Draw(sheet)
    font = _caption_font()
    frame = {"benign": (40, 90, 200), "malignant": (200, 40, 40)}
    for i, path in enumerate(paths):
        x = gap + (i % cols) * (tw + gap)
        y = gap + (i // cols) * (th + caption + gap)
        with Image.open(path) as img:
            tile = img.convert("RGB").resize((tw, th), Image.BILINEAR)
        sheet.paste(tile, (x, y))
        label = path.parent.name.lower()
        if label in frame:
            draw.rectangle([x, y, x + tw - 1, y + th - 1], outline=frame[label], width=2)
        if labels:
            stem = path.stem.removeprefix("SOB_")
            draw.text((x + 1, y + th + 1), stem, fill=(0, 0, 0), font=font)
            draw.text((x + 1, y + th + 14), label, fill=frame.get(label, (0, 0, 0)), font=font)
    out = Path(out_png)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def mask_path_for(image_path: str | os.PathLike) -> Path | None:
    """The lesion mask of an image in a synthetic dataset, or None when it has none.

    Masks mirror the image tree under ``<root>/masks/``; the root is looked for up to four
    folders above the image, so both ``400X/malignant/x.png`` and deeper layouts work.
    """
    path = Path(image_path)
    if "masks" in path.parts[:-1]:
        return None
    for root in list(path.parents)[:4]:
        candidate = root / "masks" / path.relative_to(root)
        if candidate.is_file():
            return candidate
    return None
