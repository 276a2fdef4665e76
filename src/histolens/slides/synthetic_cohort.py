"""A synthetic slide cohort for slide-level (MIL) training: patients, labels, sized lesions.

``histolens data synth --slides N --patients P`` writes N slides of P patients (slides dealt to
patients in turn); half the patients are positive (label ``tumour``), and each of their slides
has one planted lesion whose area is drawn log-uniformly from ``lesion_range`` of the slide's
tissue; the other patients' slides (label ``normal``) have none. ``tumour`` sorts after
``normal``, so ``train --slides`` takes it as the positive class.

**Each patient looks like themselves.** Real cohorts differ between patients (staining,
scanner, tissue make-up), and that variation is what drowns a small lesion in a slide's
average. So each patient gets their own :class:`~histolens.slides.synthetic.TextureBank`,
painted as ``data synth``'s tile-level patients are: one draw of
:func:`histolens.data.synth.draw_patient` (the ranges of ``make_patients``: stain vectors,
illumination, nucleus size and density, eosin, background haematoxylin, gland size, blur) per
patient, with the subtypes cycling as there (patient ``j``: benign subtype ``j % 4`` of
A/F/PT/TA, malignant ``j % 4`` of DC/LC/MC/PC). The patient's benign tissue is painted with that
look as benign tissue of their benign subtype; their lesion with the same draw as malignant
tissue of their malignant subtype (same stains, optics and base sizes: one slide is stained and
scanned once; only the malignant painting and the subtype's size factors differ). Slides of one
patient share the bank (4 benign and 4 malignant 512-px tiles, generators seeded from
``(seed, 27, patient)``); slides differ in tissue shape and in which bank tile paints each block.
No constant of this design was chosen by looking at results. (:func:`write_synthetic_slides`,
the single-slide synth, keeps one bank for all its slides.)

Beside the slides and truth masks of :func:`write_synthetic_slides` (``lesion.png`` marks the
lesion structures inside the malignant tiles, about a quarter of their pixels),
``masks/<slide>.planted.png`` marks the whole area painted with malignant tiles; the manifest
gains ``patient``, ``label`` and the true ``lesion_fraction`` (planted pixels over tissue
pixels), and ``labels.csv`` (``slide,label,patient``) names each slide's bag as ``slide
features`` writes it (``BAGS/h5/<slide>.h5``, ``BAGS`` = ``bags`` beside the slides folder by
default), ready for ``histolens train --slides``.

:func:`pointing_game` is the attention check against those masks: is the most-attended tile's
centre on the planted (malignant-painted) area?
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from histolens.atomic import atomic_open, atomic_path
from histolens.errors import ConfigError
from histolens.slides.synthetic import (
    SLIDE_MANIFEST,
    TRUTH_STEP,
    Ellipse,
    SyntheticSlides,
    TextureBank,
    make_synthetic_slide,
    write_pyramid_tiff,
)

__all__ = ["LABELS_CSV", "patient_bank", "pointing_game", "sized_lesion", "write_slide_cohort"]

LABELS_CSV = "labels.csv"


def sized_lesion(slide, fraction: float, rng: np.random.Generator):
    """``slide`` with one lesion ellipse covering about ``fraction`` of its tissue, centred
    inside the main tissue ellipse (the truth masks give the exact share)."""
    step = 32
    xs, ys = np.meshgrid(np.arange(0, slide.width, step), np.arange(0, slide.height, step))
    tissue = np.zeros(xs.shape, bool)
    for e in slide.tissue:
        tissue |= e.contains(xs, ys)
    area = float(tissue.sum()) * step * step * fraction
    aspect = float(rng.uniform(0.6, 1.6))
    rx = math.sqrt(area / math.pi * aspect)
    main = slide.tissue[0]
    # Far enough inside the main tissue ellipse that most of the lesion lies in tissue.
    room = max(0.0, 1.0 - rx / main.rx) * 0.7
    angle, r = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform(0, 1)) * room
    cx, cy = main.cx + r * math.cos(angle) * main.rx, main.cy + r * math.sin(angle) * main.ry
    return replace(slide, lesions=[Ellipse(float(cx), float(cy), rx, rx / aspect)])


def patient_bank(seed: int, patient: int, magnification: int = 200) -> TextureBank:
    """Patient ``patient``'s texture bank: one ``data synth`` look, painted as benign tissue of
    their benign subtype and as malignant tissue of their malignant subtype (module docstring)."""
    from histolens.data.records import BENIGN_SUBTYPES, MALIGNANT_SUBTYPES
    from histolens.data.synth import draw_patient

    key = (seed, 27, patient)
    benign, malignant = (
        draw_patient(np.random.default_rng(key), subtypes[patient % len(subtypes)],
                     magnification, index=patient, patient=f"patient_{patient:03d}")
        for subtypes in (BENIGN_SUBTYPES, MALIGNANT_SUBTYPES)
    )  # fmt: skip
    return TextureBank.of_patients(benign, malignant, key)


def write_slide_cohort(
    out: str | os.PathLike,
    n: int,
    patients: int,
    seed: int = 0,
    size: tuple[int, int] = (8192, 6144),
    magnification: int = 200,
    lesion_range: tuple[float, float] = (0.01, 0.20),
) -> SyntheticSlides:
    """Write the cohort under ``out/slides`` (see the module docstring), one patient at a time
    (one texture bank in memory)."""
    from histolens.slides.scale import BREAKHIS_MPP

    lo, hi = lesion_range
    if n < 2 or not 2 <= patients <= n or not 0 < lo <= hi < 1:
        raise ConfigError(
            f"A slide cohort needs at least 2 slides, 2 to {n} patients and a lesion range in "
            f"(0, 1); got {n} slides, {patients} patients, {lesion_range}."
        )
    folder = Path(out) / "slides"
    mpp = BREAKHIS_MPP[magnification]
    positive = set(
        np.random.default_rng([seed, 27]).permutation(patients)[: patients // 2].tolist()
    )
    rows: dict[int, dict] = {}
    for patient in range(patients):
        bank = patient_bank(seed, patient, magnification)
        for i in range(patient, n, patients):
            slide = make_synthetic_slide(*size, mpp=mpp, n_lesions=0, seed=seed + i, bank=bank)
            if patient in positive:
                rng = np.random.default_rng([seed, 29, i])  # this slide's lesion size and place
                fraction = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
                slide = sized_lesion(slide, fraction, rng)
            rows[i] = _write_slide(slide, folder / f"synthetic_{i:03d}.tiff")
            rows[i]["patient"] = f"patient_{patient:03d}"
            rows[i]["label"] = "tumour" if patient in positive else "normal"
    ordered = [rows[i] for i in range(n)]
    columns = ["slide", "patient", "label", "lesion_fraction", "mpp", "truth_step"]
    manifest = folder / SLIDE_MANIFEST
    _write_csv(manifest, ordered, columns)
    labels = [
        {"slide": f"../bags/h5/{Path(r['slide']).stem}.h5", "label": r["label"],
         "patient": r["patient"]}
        for r in ordered
    ]  # fmt: skip
    _write_csv(folder / LABELS_CSV, labels, ["slide", "label", "patient"])
    return SyntheticSlides(folder, [folder / r["slide"] for r in ordered], manifest)


def _write_slide(slide, path: Path) -> dict:
    """Write one slide and its tissue, lesion and planted masks; its manifest row so far."""
    from PIL import Image

    path = write_pyramid_tiff(slide, path)
    tissue, lesion = slide.truth(TRUTH_STEP)
    planted = _planted(slide, tissue.shape) & tissue
    for kind, mask in (("tissue", tissue), ("lesion", lesion), ("planted", planted)):
        with atomic_path(path.parent / "masks" / f"{path.stem}.{kind}.png") as tmp:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    return {
        "slide": path.name,
        "lesion_fraction": round(float(planted.sum() / max(1, tissue.sum())), 5),
        "mpp": slide.mpp,
        "truth_step": TRUTH_STEP,
    }


def _planted(slide, shape: tuple[int, int]) -> np.ndarray:
    """Where the lesion ellipses are painted with malignant tiles, one pixel per TRUTH_STEP
    level-0 pixels (sampled at pixel centres, as the truth masks are)."""
    ys, xs = (np.arange(n) * TRUTH_STEP + TRUTH_STEP // 2 for n in shape)
    X, Y = np.meshgrid(xs, ys)
    out = np.zeros(shape, bool)
    for e in slide.lesions:
        out |= e.contains(X, Y)
    return out


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def pointing_game(
    coords: np.ndarray,
    tile_size: tuple[int, int],
    weights: np.ndarray,
    lesion: np.ndarray,
    step: int = TRUTH_STEP,
) -> bool:
    """Whether the centre of the most-attended tile (level-0 corner ``coords``, size
    ``tile_size``) lies on planted lesion (``lesion``: one pixel per ``step`` level-0 pixels)."""
    x, y = coords[int(np.argmax(weights))]
    cx, cy = (int(x) + tile_size[0] // 2) // step, (int(y) + tile_size[1] // 2) // step
    inside = 0 <= cy < lesion.shape[0] and 0 <= cx < lesion.shape[1]
    return bool(inside and lesion[cy, cx])
