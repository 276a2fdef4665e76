import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from histolens.cli.commands import main
from histolens.data.audit import (
    TELL_MIN_ODDS_RATIO,
    audit_dataset,
    categorical_oof_scores,
    estimate_jpeg_quality,
    read_image_facts,
    value_tells,
)
from histolens.data.records import ImageRecord, discover

# (class, patient index, image index) -> ((width, height), PIL format)
Recipe = Callable[[str, int, int], tuple[tuple[int, int], str]]


def _texture(size: tuple[int, int], seed: int) -> Image.Image:
    """The same H&E-ish noise for the same seed, whatever the class."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.array([200.0, 120.0, 170.0]) + rng.normal(0, 25, (h, w, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def _name(cls: str, patient: int, image: int, fmt: str) -> str:
    code, subtype, pid = (
        ("M", "DC", 1000 + patient) if cls == "malignant" else ("B", "F", 2000 + patient)
    )
    ext = "jpg" if fmt == "JPEG" else "png"
    return f"SOB_{code}_{subtype}-14-{pid}-100-{image + 1:03d}.{ext}"


def _make_dataset(
    root: Path, recipe: Recipe, n_malignant: int = 7, n_benign: int = 5, per_patient: int = 4
) -> Path:
    """root/<class>/<BreakHis name>: one patient group per patient, content independent of class."""
    for cls, n_patients in (("malignant", n_malignant), ("benign", n_benign)):
        for p in range(n_patients):
            for i in range(per_patient):
                size, fmt = recipe(cls, p, i)
                path = root / cls / _name(cls, p, i, fmt)
                path.parent.mkdir(parents=True, exist_ok=True)
                _texture(size, seed=i).save(path, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return root


def _finding(report, name):
    return next(f for f in report.findings if f.name == name)


@pytest.fixture(scope="module")
def size_shortcut(tmp_path_factory) -> Path:
    """Every malignant image 48x48, every benign one 60x40."""
    return _make_dataset(
        tmp_path_factory.mktemp("size") / "data",
        lambda cls, p, i: ((48, 48) if cls == "malignant" else (60, 40), "PNG"),
    )


def test_planted_size_shortcut_is_flagged(size_shortcut):
    report = audit_dataset(size_shortcut, progress=False)
    assert (report.n_images, report.n_groups, report.grouping) == (48, 12, "patient group")
    assert report.positive == "malignant"
    for name in ("image width", "image height", "aspect ratio", "pixel count"):
        finding = _finding(report, name)
        assert finding.flagged, name
        assert finding.auc == pytest.approx(1.0)
        assert finding.n_values == 2
    width = _finding(report, "image width")
    assert width.message.startswith(
        "image width 48 is 100% malignant (others 0%), 58% of the images (AUC 1.00 over patient "
        "groups): a model may learn how the images were made instead of the tissue."
    )
    assert width.message in report.warnings
    assert _finding(report, "file format").detail == "constant (PNG)"
    assert not _finding(report, "file format").flagged
    table = report.render()
    assert "image width" in table and "FLAG" in table and "48 is 100% malignant" in table


def test_planted_format_shortcut_is_flagged(tmp_path):
    root = _make_dataset(
        tmp_path / "data", lambda cls, p, i: ((48, 40), "JPEG" if cls == "malignant" else "PNG")
    )
    report = audit_dataset(root, progress=False)
    fmt = _finding(report, "file format")
    assert fmt.flagged and fmt.auc == pytest.approx(1.0)
    assert fmt.message.startswith("file format JPEG is 100% malignant (others 0%)")
    # Only the malignant JPEGs have a quality: nothing to compare across classes.
    quality = _finding(report, "JPEG quality")
    assert (quality.flagged, quality.detail) == (False, "constant (85)")
    assert not _finding(report, "image width").flagged


def test_same_dataset_without_the_shortcut_is_clean(tmp_path):
    # Sizes and formats vary by image number within every patient, never by class.
    root = _make_dataset(
        tmp_path / "data",
        lambda cls, p, i: ((48, 48) if i % 2 else (60, 40), "JPEG" if i < 2 else "PNG"),
    )
    report = audit_dataset(root, progress=False)
    assert report.warnings == []
    for name in ("image width", "pixel count", "file format", "bytes per pixel", "mean red"):
        finding = _finding(report, name)
        assert finding.auc is not None and finding.auc < 0.6, (name, finding.auc)
    assert _finding(report, "image width").n_values == 2
    assert "No attribute predicts 'malignant' across patient groups." in report.render()


def test_per_patient_size_that_does_not_separate_classes_is_not_flagged(tmp_path):
    # Each patient's images share one of three sizes; each size has as many benign as
    # malignant patients, so the size identifies patients but not the class.
    sizes = [(48, 48), (60, 40), (40, 56)]
    root = _make_dataset(
        tmp_path / "data", lambda cls, p, i: (sizes[p % 3], "PNG"), n_malignant=6, n_benign=6
    )
    report = audit_dataset(root, progress=False)
    width = _finding(report, "image width")
    assert width.n_values == 3 and not width.flagged
    assert width.auc < 0.5  # held-out patients are always the minority of their size
    assert report.warnings == []


def test_folder_per_patient_is_not_a_shortcut_across_groups(tmp_path):
    # One folder per patient separates classes perfectly image by image, and says nothing
    # about a new patient: the grouped audit must not flag it.
    rows = []
    for cls, n in (("malignant", 6), ("benign", 6)):
        for p in range(n):
            for i in range(3):
                rel = Path(f"{cls[0]}{p}") / _name(cls, p, i, "PNG")
                (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
                _texture((40, 40), seed=i).save(tmp_path / rel)
                rows.append([rel.as_posix(), cls])
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label"], *rows])
    report = audit_dataset(manifest, progress=False)
    folder = _finding(report, "source folder")
    assert folder.n_values == 12
    assert folder.auc == pytest.approx(0.5)
    assert not folder.flagged


def test_cli_prints_table_and_warnings(size_shortcut):
    res = CliRunner().invoke(main, ["data", "audit", str(size_shortcut), "--quiet", "--no-colour"])
    assert res.exit_code == 0, res.output
    assert "image width" in res.output
    assert "warning: image width 48 is 100% malignant (others 0%)" in res.output
    res = CliRunner().invoke(main, ["data", "audit", str(size_shortcut), "--threshold", "0.3"])
    assert res.exit_code == 2 and "0.3" in res.output


def test_too_few_patient_groups_is_a_note_not_an_error(tmp_path):
    root = _make_dataset(
        tmp_path / "data", lambda cls, p, i: ((48, 48), "PNG"), n_malignant=2, n_benign=1
    )
    report = audit_dataset(root, progress=False)
    assert report.findings == [] and report.warnings == []
    assert "needs at least 2 classes and 4 patient groups" in report.notes[0]
    assert "3 group(s)" in report.render()


def test_a_class_with_one_image_is_a_note_not_an_error(tmp_path):
    root = _make_dataset(
        tmp_path / "data",
        lambda cls, p, i: ((48, 48), "PNG"),
        n_malignant=1,
        n_benign=5,
        per_patient=1,
    )
    report = audit_dataset(root, progress=False)
    assert report.findings == []
    assert report.notes == [
        "the audit needs at least 2 images of every class; benign: 5, malignant: 1."
    ]


def test_few_groups_are_audited_with_a_caution(tmp_path):
    root = _make_dataset(
        tmp_path / "data",
        lambda cls, p, i: ((48, 48) if cls == "malignant" else (60, 40), "PNG"),
        n_malignant=3,
        n_benign=3,
        per_patient=2,
    )
    report = audit_dataset(root, progress=False, colour=False)
    assert "image width" in report.flagged
    assert report.notes == [
        "only 6 patient groups: each AUC is a rough estimate, so treat flags as hints and check "
        "them on more patients."
    ]
    # Headers only: no colour attributes.
    assert [f.name for f in report.findings if f.name.startswith("mean")] == []


def test_unreadable_and_odd_images_are_skipped_or_read(tmp_path):
    root = _make_dataset(tmp_path / "data", lambda cls, p, i: ((48, 48), "PNG"))
    (root / "benign" / "SOB_B_F-14-2000-100-009.png").write_bytes(b"not a png")
    Image.new("RGBA", (30, 20), (10, 20, 30, 0)).save(
        root / "benign" / "SOB_B_F-14-2001-100-009.png"
    )
    Image.new("I;16", (30, 20), 4000).save(root / "malignant" / "SOB_M_DC-14-1000-100-009.png")
    report = audit_dataset(root, progress=False)
    assert report.n_images == 50
    assert [Path(s.path).name for s in report.skipped] == ["SOB_B_F-14-2000-100-009.png"]
    assert "cannot be read" in report.skipped[0].reason
    assert "Skipped files: 1" in report.render()


def test_records_without_patients_are_grouped_by_image(tmp_path):
    root = _make_dataset(tmp_path / "data", lambda cls, p, i: ((48, 48), "PNG"))
    records = [ImageRecord(r.path, r.label) for r in discover(root).records]
    report = audit_dataset(records, root=root, progress=False)
    assert (report.grouping, report.n_groups) == ("image", 48)
    assert "no patient ids" in report.notes[0]


@pytest.mark.parametrize("quality", [30, 75, 90])
def test_jpeg_quality_is_recovered_from_the_tables(tmp_path, quality):
    path = tmp_path / "x.jpg"
    _texture((64, 48), 0).save(path, "JPEG", quality=quality)
    facts = read_image_facts(path)
    assert (facts.format, facts.jpeg_quality, facts.width, facts.height) == (
        "JPEG",
        quality,
        64,
        48,
    )
    assert facts.mean_rgb is not None and 0.5 < facts.mean_rgb[0] < 0.95
    assert estimate_jpeg_quality(None) is None
    assert estimate_jpeg_quality({1: [1] * 64}) is None


def test_png_facts_have_no_quality_and_a_thumbnail_colour(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (300, 200), (255, 0, 0)).save(path)
    facts = read_image_facts(path)
    assert (facts.format, facts.jpeg_quality, facts.width, facts.height) == ("PNG", None, 300, 200)
    assert facts.mean_rgb == pytest.approx((1.0, 0.0, 0.0))
    assert facts.saturation == pytest.approx(1.0)


def test_unseen_value_scores_zero_lift_and_is_never_a_tell():
    # Values unique to their fold's patients: training folds never saw them.
    values = ["a", "a", "b", "b", "c", "c", "d", "d"]
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    folds = [([2, 3, 4, 5, 6, 7], [0, 1]), ([0, 1, 4, 5, 6, 7], [2, 3])]
    folds += [([0, 1, 2, 3, 6, 7], [4, 5]), ([0, 1, 2, 3, 4, 5], [6, 7])]
    scores = categorical_oof_scores(values, y, folds)
    assert np.allclose(scores, 0.0)
    assert value_tells(values, y, scores) == []


def test_shared_value_with_different_odds_is_a_tell():
    values = ["x"] * 6 + ["y"] * 6
    y = np.array([1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    folds = [(list(range(12))[k + 1 :] + list(range(12))[:k], [k]) for k in range(12)]
    scores = categorical_oof_scores(values, y, folds)
    tells = value_tells(values, y, scores)
    assert [t.value for t in tells] == ["x", "y"]
    assert (tells[0].rate, tells[0].rest_rate) == pytest.approx((5 / 6, 1 / 6))
    assert tells[0].log_odds_ratio > np.log(TELL_MIN_ODDS_RATIO)


@pytest.mark.real_data
def test_real_breakhis_224px_source_is_flagged(real_data):
    report = audit_dataset(real_data / "manifest.csv", progress=False)
    assert (report.n_images, report.n_groups) == (735, 30)
    flagged = set(report.flagged)
    assert {"image width", "image height", "pixel count", "source folder"} <= flagged
    folder = _finding(report, "source folder")
    assert folder.detail == "'200X-224px' is 82% malignant (others 53%)"
    assert _finding(report, "image width").detail == "224 is 82% malignant (others 53%)"
    assert not _finding(report, "bytes per pixel").flagged


def test_source_folder_is_found_from_a_relative_path(tmp_path, monkeypatch):
    # Record paths are absolute; a dataset given by a relative path must still have folders.
    for folder, cls, n in (("lab_a", "malignant", 6), ("lab_b", "benign", 6)):
        for p in range(n):
            for i in range(2):
                path = tmp_path / "data" / folder / cls / _name(cls, p, i, "PNG")
                path.parent.mkdir(parents=True, exist_ok=True)
                _texture((40, 40), seed=i).save(path)
    monkeypatch.chdir(tmp_path)
    report = audit_dataset("data", progress=False, colour=False)
    folder = _finding(report, "source folder")
    assert folder.n_values == 2
    assert folder.flagged
