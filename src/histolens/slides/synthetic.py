"""Synthetic pyramidal slides with planted lesions and known masks, and the coverage measure.

A slide is tissue (a union of ellipses) on glass; inside the tissue the synthetic H&E painter of
:func:`histolens.data.synth.render_tile` fills 512-pixel blocks from a small bank of benign tiles, and inside
planted lesion ellipses from a bank of malignant tiles. The truth of "lesion" is pixel-exact: a
pixel is lesion where it lies in a planted ellipse and the malignant tile painted there marks it
as lesion. Slides are written as tiled JPEG pyramidal TIFF (each level a top-level page,
``subfiletype=1`` on reduced levels, resolution in centimetres): what OpenSlide reads as a
generic tiled TIFF with every level and its microns per pixel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histolens.atomic import atomic_path
from histolens.errors import ConfigError

__all__ = [
    "Ellipse",
    "SyntheticSlide",
    "TextureBank",
    "lesion_coverage",
    "SyntheticSlides",
    "coverage_of",
    "make_synthetic_slide",
    "write_synthetic_slides",
    "write_pyramid_tiff",
]

BLOCK = 512  # level-0 pixels of one painted tile of the bank
TIFF_TILE = 256


@dataclass(frozen=True)
class Ellipse:
    """An axis-aligned ellipse in level-0 pixels."""

    cx: float
    cy: float
    rx: float
    ry: float

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ((x - self.cx) / self.rx) ** 2 + ((y - self.cy) / self.ry) ** 2 <= 1.0


@dataclass
class TextureBank:
    """Painted 512 x 512 tiles: benign RGB, malignant RGB and the malignant tiles' lesion masks."""

    benign: np.ndarray  # (K, 512, 512, 3) uint8
    malignant: np.ndarray  # (K, 512, 512, 3) uint8
    lesion: np.ndarray  # (K, 512, 512) bool

    @classmethod
    def paint(cls, seed: int = 0, k: int = 4, magnification: int = 200) -> TextureBank:
        """The bank of ``data synth``'s first benign and first malignant patient of ``seed``
        (two patients, each with their own look)."""
        from histolens.data.synth import make_patients

        benign_p, malignant_p = make_patients(seed, 2, 2, magnification)
        return cls.of_patients(benign_p, malignant_p, (seed,), k)

    @classmethod
    def of_patients(cls, benign, malignant, key: tuple[int, ...], k: int = 4) -> TextureBank:
        """``k`` benign tiles painted with the ``benign`` patient's look and ``k`` malignant
        tiles with the ``malignant`` one's (:class:`histolens.data.synth` patients), tile ``i``
        drawn from the generator seeded ``(*key, 0 or 1, i)``."""
        from histolens.data.synth import render_tile

        ben, mal, les = [], [], []
        for i in range(k):
            rng = np.random.default_rng([*key, 0, i])
            ben.append(render_tile(benign, rng, BLOCK, BLOCK)[0])
            rgb, mask = render_tile(malignant, np.random.default_rng([*key, 1, i]), BLOCK, BLOCK)
            mal.append(rgb)
            les.append(mask > 0)
        return cls(np.stack(ben), np.stack(mal), np.stack(les))


@dataclass
class SyntheticSlide:
    """A synthetic slide: size, scale, tissue and lesion ellipses and the painted tile bank."""

    width: int
    height: int
    mpp: float
    tissue: list[Ellipse]
    lesions: list[Ellipse]
    bank: TextureBank = field(repr=False)
    seed: int = 0

    def render(self, x0: int, y0: int, w: int, h: int, step: int = 1) -> tuple[np.ndarray, ...]:
        """RGB (h, w, 3), tissue and lesion truth (h, w) of the level-0 region starting at
        (x0, y0), sampling every ``step`` level-0 pixels (a reduced level's pixels)."""
        xs = x0 + np.arange(w, dtype=np.int64) * step + step // 2
        ys = y0 + np.arange(h, dtype=np.int64) * step + step // 2
        X, Y = np.meshgrid(xs, ys)
        tissue = np.zeros((h, w), bool)
        for e in self.tissue:
            tissue |= e.contains(X, Y)
        planted = np.zeros((h, w), bool)
        for e in self.lesions:
            planted |= e.contains(X, Y)
        planted &= tissue
        k = len(self.bank.benign)
        # Which bank tile paints each 512-block: a fixed hash of the block's position.
        block = ((X // BLOCK) * 7919 + (Y // BLOCK) * 104729 + self.seed) % k
        u, v = X % BLOCK, Y % BLOCK
        rgb = np.full((h, w, 3), 242, np.uint8)
        rgb[tissue] = self.bank.benign[block[tissue], v[tissue], u[tissue]]
        rgb[planted] = self.bank.malignant[block[planted], v[planted], u[planted]]
        lesion = np.zeros((h, w), bool)
        lesion[planted] = self.bank.lesion[block[planted], v[planted], u[planted]]
        return rgb, tissue, lesion

    def truth(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Tissue and lesion masks of the whole slide at one pixel per ``step`` level-0 px."""
        w, h = math.ceil(self.width / step), math.ceil(self.height / step)
        _, tissue, lesion = self.render(0, 0, w, h, step)
        return tissue, lesion


def make_synthetic_slide(
    width: int,
    height: int,
    mpp: float = 0.5,
    n_lesions: int = 2,
    seed: int = 0,
    bank: TextureBank | None = None,
    tissue_fraction: float = 0.8,
) -> SyntheticSlide:
    """A slide of tissue blobs filling about ``tissue_fraction`` of a (width, height) frame,
    with ``n_lesions`` lesion ellipses planted inside them, all drawn from ``seed``."""
    if width < 256 or height < 256:
        raise ConfigError(
            f"A synthetic slide needs at least 256 x 256 pixels, not {width} x {height}."
        )
    rng = np.random.default_rng([seed, 23])
    s = math.sqrt(tissue_fraction)
    tissue = [Ellipse(width / 2, height / 2, width * s / 2, height * s / 2)]
    tissue += [
        Ellipse(
            float(rng.uniform(0.3, 0.7) * width),
            float(rng.uniform(0.3, 0.7) * height),
            float(rng.uniform(0.2, 0.35) * width),
            float(rng.uniform(0.2, 0.35) * height),
        )
        for _ in range(2)
    ]
    lesions = []
    main = tissue[0]
    for _ in range(n_lesions):
        rx, ry = rng.uniform(0.08, 0.16) * width, rng.uniform(0.08, 0.16) * height
        # Centres well inside the main tissue ellipse, so the lesions lie in tissue.
        angle, r = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 1)) * 0.55
        cx = main.cx + r * math.cos(angle) * main.rx
        cy = main.cy + r * math.sin(angle) * main.ry
        lesions.append(Ellipse(float(cx), float(cy), float(rx), float(ry)))
    return SyntheticSlide(
        width, height, mpp, tissue, lesions, bank or TextureBank.paint(seed), seed
    )


def _level_tiles(slide: SyntheticSlide, step: int) -> Iterator[np.ndarray]:
    """The TIFF tiles of the level at downsample ``step``, row by row (edges padded white)."""
    w, h = math.ceil(slide.width / step), math.ceil(slide.height / step)
    for ty in range(0, h, TIFF_TILE):
        for tx in range(0, w, TIFF_TILE):
            rgb, _, _ = slide.render(tx * step, ty * step, TIFF_TILE, TIFF_TILE, step)
            # Outside the slide is glass too (the frame is cropped by the TIFF's image size).
            yield rgb


def write_pyramid_tiff(
    slide: SyntheticSlide,
    path: str | os.PathLike,
    levels: int = 3,
    quality: int = 85,
    aperio: bool = False,
) -> Path:
    """Write ``slide`` as a tiled JPEG pyramidal TIFF with ``levels`` levels (downsample 1, 4,
    16, ...), atomically; memory stays one tile whatever the slide's size.

    ``aperio``: level 0 carries an Aperio ImageDescription (``MPP`` and ``AppMag`` by the 10 /
    objective power convention), so OpenSlide, and tools that go by the format (TIAToolbox opens
    a generic multi-page TIFF as one in-memory image), read the file as an SVS; name it ``.svs``.
    """
    import tifffile

    path = Path(path)
    description = (
        f"Aperio Image Library histolens synthetic\r\n{slide.width}x{slide.height} "
        f"({TIFF_TILE}x{TIFF_TILE}) JPEG/RGB Q={quality}|AppMag = {10 / slide.mpp:g}"
        f"|MPP = {slide.mpp:g}"
        if aperio
        else None
    )
    with atomic_path(path) as tmp:
        big = slide.width * slide.height * 3 > 2**31
        with tifffile.TiffWriter(tmp, bigtiff=big) as tif:
            for level in range(levels):
                step = 4**level
                w, h = math.ceil(slide.width / step), math.ceil(slide.height / step)
                if level and min(w, h) < TIFF_TILE:
                    break
                px_per_cm = 1e4 / (slide.mpp * step)
                tif.write(
                    _level_tiles(slide, step),
                    shape=(h, w, 3),
                    dtype=np.uint8,
                    tile=(TIFF_TILE, TIFF_TILE),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": quality},
                    subfiletype=1 if level else 0,
                    resolution=(px_per_cm, px_per_cm),
                    resolutionunit="CENTIMETER",
                    metadata=None,
                    description=description if level == 0 else None,
                )
    return path


def lesion_coverage(
    coords: np.ndarray,
    tile_size: tuple[int, int],
    flagged: np.ndarray,
    tissue: np.ndarray,
    lesion: np.ndarray,
    step: int,
) -> tuple[float, float]:
    """(share of the lesion area covered by flagged tiles, share of the other tissue covered),
    on truth masks at one pixel per ``step`` level-0 pixels."""
    covered = np.zeros(lesion.shape, bool)
    for x, y in coords[np.asarray(flagged, bool)]:
        covered[y // step : (y + tile_size[1]) // step, x // step : (x + tile_size[0]) // step] = (
            True
        )
    rest = tissue & ~lesion
    hit = float((covered & lesion).sum() / max(1, lesion.sum()))
    false = float((covered & rest).sum() / max(1, rest.sum()))
    return hit, false


TRUTH_STEP = 16  # the truth masks keep one pixel per 16 level-0 pixels (8 um at 0.5 um/px)
SLIDE_MANIFEST = "slides.csv"


@dataclass(frozen=True)
class SyntheticSlides:
    """What :func:`write_synthetic_slides` wrote."""

    folder: Path
    slides: list[Path]
    manifest: Path


def write_synthetic_slides(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    size: tuple[int, int] = (8192, 6144),
    magnification: int = 200,
) -> SyntheticSlides:
    """Write ``n`` synthetic slides with planted lesions under ``out/slides``: the pyramidal
    TIFFs, their tissue and lesion truth masks (``masks/<slide>.tissue.png``,
    ``masks/<slide>.lesion.png``, one pixel per ``TRUTH_STEP`` level-0 pixels) and a manifest."""
    import csv

    from histolens.slides.scale import BREAKHIS_MPP

    if n < 1:
        raise ConfigError(f"--slides must be at least 1, not {n}.")
    from PIL import Image

    folder = Path(out) / "slides"
    mpp = BREAKHIS_MPP[magnification]
    bank = TextureBank.paint(seed, magnification=magnification)
    rows, paths = [], []
    for i in range(n):
        slide = make_synthetic_slide(*size, mpp=mpp, n_lesions=1 + i % 3, seed=seed + i, bank=bank)
        path = write_pyramid_tiff(slide, folder / f"synthetic_{i:03d}.tiff")
        tissue, lesion = slide.truth(TRUTH_STEP)
        for kind, mask in (("tissue", tissue), ("lesion", lesion)):
            with atomic_path(folder / "masks" / f"{path.stem}.{kind}.png") as tmp:
                Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        px_mm2 = (TRUTH_STEP * mpp) ** 2 / 1e6
        rows.append(
            {
                "slide": path.name,
                "width": slide.width,
                "height": slide.height,
                "mpp": mpp,
                "truth_step": TRUTH_STEP,
                "tissue_mm2": round(float(tissue.sum()) * px_mm2, 4),
                "lesion_mm2": round(float(lesion.sum()) * px_mm2, 4),
            }
        )
        paths.append(path)
    manifest = folder / SLIDE_MANIFEST
    from histolens.atomic import atomic_open

    with atomic_open(manifest, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return SyntheticSlides(folder, paths, manifest)


def coverage_of(results: str | os.PathLike, slides: str | os.PathLike) -> list[dict]:
    """Per synthetic slide scored in ``results`` (a ``slide predict`` output): the share of the
    planted lesion area covered by tiles at or above the threshold, and of the other tissue."""
    import h5py
    from PIL import Image

    from histolens.errors import DataError
    from histolens.slides.outputs import SlideOutputs, read_summary

    folder = Path(slides)
    rows = []
    for lesion_png in sorted((folder / "masks").glob("*.lesion.png")):
        name = lesion_png.name[: -len(".lesion.png")]
        outputs = SlideOutputs(Path(results), name)
        summary = read_summary(outputs.summary)
        if summary is None or not outputs.h5.is_file():
            continue
        lesion = np.asarray(Image.open(lesion_png)) > 0
        tissue = np.asarray(Image.open(folder / "masks" / f"{name}.tissue.png")) > 0
        with h5py.File(outputs.h5, "r") as f:
            coords, scores = f["coords"][:], f["score"][:]
            size = tuple(int(v) for v in f["coords"].attrs["patch_size_level0"])
        hit, false = lesion_coverage(
            coords, size, scores >= summary.threshold, tissue, lesion, TRUTH_STEP
        )
        rows.append({"slide": name, "lesion_covered": hit, "other_tissue_covered": false})
    if not rows:
        raise DataError(f"No slide of {folder} has results in {results}.")
    return rows
