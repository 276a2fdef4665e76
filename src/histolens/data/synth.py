"""A synthetic H&E-like breast-tissue generator, so the whole pipeline can be run without BreakHis.

Tiles are painted as haematoxylin and eosin concentration maps and turned into colour with the
Beer-Lambert law (OD = c_H * v_H + c_E * v_E, RGB = I0 * exp(-OD)), so stain tools such as
Macenko normalisation see two clean stain vectors. Benign tiles show orderly glands of small,
evenly spaced nuclei; malignant tiles carry a lesion of large, dark, crowded, irregular nuclei
whose extent is written as a mask for checking heatmaps. Each patient has its own stains, nucleus
size and density, so images of one patient resemble each other, as on real slides.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from histolens.atomic import atomic_open, atomic_path
from histolens.data._synth_paint import SUBTYPE_STYLE, Patient, render_tile
from histolens.data.records import BENIGN_SUBTYPES, MAGNIFICATIONS, MALIGNANT_SUBTYPES
from histolens.errors import ConfigError

__all__ = [
    "SynthSummary",
    "draw_patient",
    "generate_synthetic",
    "mask_path_for",
    "write_contact_sheet",
]

MANIFEST_COLUMNS = ("path", "label", "subtype", "patient", "group", "magnification", "mask")
# Reference stain vectors (optical density per unit concentration) used by Macenko/torchstain.
_H_VECTOR = np.array([0.5626, 0.7201, 0.4062])
_E_VECTOR = np.array([0.2159, 0.8012, 0.5581])
# Structures shrink at lower magnification, but not in proportion, or 40X nuclei would vanish.
_MAG_SCALE = {40: 0.35, 100: 0.5, 200: 0.7, 400: 1.0}
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


def draw_patient(
    rng: np.random.Generator,
    subtype: str,
    magnification: int,
    index: int = 0,
    patient: str = "",
    n_images: int = 0,
) -> Patient:
    """One patient's look, drawn from ``rng``: stains, illumination, nucleus size and density,
    eosin, background haematoxylin, gland size and blur. ``subtype`` sets the label and scales
    nucleus and gland size; the draws do not depend on it, so two generators seeded alike give
    one patient's benign and malignant tissue the same stains, optics and base sizes."""
    scale = _MAG_SCALE[magnification]
    stain_h = _H_VECTOR + rng.normal(0, 0.06, 3)
    stain_e = _E_VECTOR + rng.normal(0, 0.06, 3)
    return Patient(
        index=index,
        label="benign" if subtype in BENIGN_SUBTYPES else "malignant",
        subtype=subtype,
        patient=patient,
        n_images=n_images,
        stain_h=np.abs(stain_h) / np.linalg.norm(stain_h),
        stain_e=np.abs(stain_e) / np.linalg.norm(stain_e),
        intensity=float(rng.uniform(225, 252)),
        nucleus_radius=float(rng.uniform(4.5, 6.0) * scale * SUBTYPE_STYLE[subtype][3]),
        density=float(rng.uniform(0.6, 1.0)),
        eosin=float(rng.uniform(0.45, 0.8)),
        haem_background=float(rng.uniform(0.04, 0.12)),
        gland_radius=float(rng.uniform(60, 95) * scale * SUBTYPE_STYLE[subtype][1]),
        blur=float(rng.uniform(0.6, 1.1)),
    )


def make_patients(seed: int, n: int, n_patients: int, magnification: int) -> list[Patient]:
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
    patients = []
    for index, (pid, count) in enumerate(zip(ids, counts, strict=True)):
        label = "benign" if index < p_benign else "malignant"
        within = index if label == "benign" else index - p_benign
        subtypes = BENIGN_SUBTYPES if label == "benign" else MALIGNANT_SUBTYPES
        rng = np.random.default_rng([seed, index, 0])
        patients.append(
            draw_patient(rng, subtypes[within % len(subtypes)], magnification, index, pid, count)
        )
    return patients


def _worker_count(workers: int | None, n_jobs: int) -> int:
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}.")
    return min(workers, max(1, n_jobs))


def _render_job(job: tuple) -> dict:
    """Render and save one image and its mask; returns its manifest row (runs in a worker)."""
    p, seed, number, width, height, out, rel, mask_rel = job
    rgb, mask = render_tile(p, np.random.default_rng([seed, p.index, number]), width, height)
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


def _checked_options(
    n: int, magnification: int, size: tuple[int, int], n_patients: int | None
) -> tuple[int, int, int]:
    """Validate the options of :func:`generate_synthetic`: (width, height, number of patients)."""
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
    return width, height, n_patients


def _plan_images(
    patients: Sequence[Patient], magnification: int
) -> list[tuple[Patient, int, Path, Path]]:
    """(patient, image number, image path, mask path) of every image, paths relative to out_dir."""
    plan = []
    for p in patients:
        code = "B" if p.label == "benign" else "M"
        for number in range(1, p.n_images + 1):
            name = f"SOB_{code}_{p.subtype}-{p.patient}-{magnification}-{number:03d}.png"
            rel = Path(f"{magnification}X") / p.label / name
            plan.append((p, number, rel, Path("masks") / rel))
    return plan


def _render_all(
    jobs: Sequence[tuple], workers: int, progress: Callable[[int, int], object] | None
) -> list[dict]:
    """Render every job on ``workers`` threads; manifest rows in job order."""
    if workers == 1:
        return _collect_rows(map(_render_job, jobs), len(jobs), progress)
    # Threads, not processes: numpy, scipy and PNG encoding release the GIL for most of the
    # work, and a process pool would break callers without a __main__ guard or with a GUI.
    with ThreadPoolExecutor(workers) as pool:
        return _collect_rows(pool.map(_render_job, jobs), len(jobs), progress)


def _collect_rows(
    results: Iterable[dict], total: int, progress: Callable[[int, int], object] | None
) -> list[dict]:
    """Gather rendered rows, calling ``progress(done, total)`` after each one."""
    rows = []
    for done, row in enumerate(results, start=1):
        rows.append(row)
        if progress is not None:
            progress(done, total)
    return rows


def _write_manifest(rows: Iterable[dict], manifest: Path) -> None:
    """Write the manifest CSV (one row per image), atomically."""
    with atomic_open(manifest, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


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
    width, height, n_patients = _checked_options(n, magnification, size, n_patients)
    out = Path(out_dir)
    patients = make_patients(seed, n, n_patients, magnification)
    plan = _plan_images(patients, magnification)
    _check_fresh(
        [out / f"{magnification}X" / label for label in ("benign", "malignant")],
        {r.name for _, _, r, _ in plan},
    )
    jobs = [
        (p, seed, number, width, height, out, rel, mask_rel) for p, number, rel, mask_rel in plan
    ]
    rows = _render_all(jobs, _worker_count(workers, len(jobs)), progress)
    manifest = out / "manifest.csv"
    _write_manifest(rows, manifest)

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
