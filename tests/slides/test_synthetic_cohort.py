"""The synthetic slide cohort of ``data synth --slides N --patients P``: each patient looks like
themselves, labels tumour/normal, same seed same cohort."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import tifffile
from PIL import Image

from histolens.errors import ConfigError
from histolens.slides.synthetic_cohort import LABELS_CSV, write_slide_cohort


def _benign_colour(folder, row) -> np.ndarray:
    """Mean RGB of the slide's benign tissue (tissue outside the planted lesion) on the
    pyramid's second level (downsample 4; the masks are at downsample 16)."""
    name = row["slide"].removesuffix(".tiff")
    with tifffile.TiffFile(folder / row["slide"]) as tif:
        image = tif.pages[1].asarray()
    masks = [np.asarray(Image.open(folder / "masks" / f"{name}.{k}.png")) > 0
             for k in ("tissue", "planted")]  # fmt: skip
    benign = np.kron(masks[0] & ~masks[1], np.ones((4, 4), bool))
    return image[benign[: image.shape[0], : image.shape[1]]].mean(axis=0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    written = write_slide_cohort(out, 8, 4, seed=3, size=(1024, 1024), magnification=400)
    with open(written.manifest, newline="") as fh:
        return written, list(csv.DictReader(fh))


def test_patients_differ_and_a_patients_slides_share_their_look(cohort):
    written, manifest = cohort
    colours: dict[str, list[np.ndarray]] = {}
    for row in manifest:
        colours.setdefault(row["patient"], []).append(_benign_colour(written.folder, row))
    assert len(colours) == 4 and all(len(c) == 2 for c in colours.values())
    within = max(float(np.linalg.norm(a - b)) for a, b in colours.values())
    means = [np.mean(c, axis=0) for c in colours.values()]
    between = min(float(np.linalg.norm(a - b)) for a, b in itertools.combinations(means, 2))
    # Patients' looks differ by draws of the stain vectors (sd 0.06 on unit vectors) and the
    # illumination (225-252): ~10 of 255 levels; one patient's slides only by tissue shape and
    # which of the same 4 bank tiles paints each 512-px block (~1 level). One bank for every
    # slide (the single-slide synth's design) gives patients ~1 level apart and fails this.
    assert between > 5 and within < between / 5, (between, within, means)


def test_labels_are_tumour_and_normal_by_patient(cohort):
    written, manifest = cohort
    by_patient = {}
    for row in manifest:
        by_patient.setdefault(row["patient"], set()).add(row["label"])
        assert (float(row["lesion_fraction"]) > 0) == (row["label"] == "tumour"), row
    assert all(len(v) == 1 for v in by_patient.values())
    assert sorted(next(iter(v)) for v in by_patient.values()) == ["normal"] * 2 + ["tumour"] * 2
    with open(written.folder / LABELS_CSV, newline="") as fh:
        labels = list(csv.DictReader(fh))
    assert [r["label"] for r in labels] == [r["label"] for r in manifest]


def test_same_seed_same_cohort(cohort, tmp_path):
    written, manifest = cohort
    again = write_slide_cohort(tmp_path, 8, 4, seed=3, size=(1024, 1024), magnification=400)
    assert again.manifest.read_bytes() == written.manifest.read_bytes()
    for a, b in zip(again.slides, written.slides, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_bad_cohort_options_stop_with_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="2 to 4 patients"):
        write_slide_cohort(tmp_path, 4, 5, size=(512, 512))
