"""The int8 guard's decision and its choice of images, on inputs that decide them on any CPU:
known probabilities for the comparison, and split files for the choice of unseen patients."""

from __future__ import annotations

import numpy as np
import pytest

from histolens.data.records import ImageRecord
from histolens.data.splits import Split
from histolens.export.guard import (
    compare_int8,
    enforce_int8_limit,
    unseen_patient_images,
)
from histolens.export.verify import ExportError


def _binary(p: list[float]) -> np.ndarray:
    p = np.asarray(p, float)
    return np.stack([1 - p, p], axis=1)


# Four benign and four malignant images, one per patient; fp32 ranks every malignant image above
# every benign one (AUC 1).
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
PATIENTS = [f"p{i}" for i in range(8)]
FP32 = [0.10, 0.20, 0.30, 0.40, 0.60, 0.70, 0.80, 0.90]


def test_identical_probabilities_pass_with_no_drop():
    check = compare_int8(Y, PATIENTS, _binary(FP32), _binary(FP32), "the test images")
    assert (check.auc_fp32, check.auc_int8, check.drop) == (1.0, 1.0, 0.0)
    assert check.drop_ci == (0.0, 0.0)
    assert check.max_probability_change == 0.0
    assert (check.n_images, check.n_patients) == (8, 8)
    enforce_int8_limit(check, 0.005)  # accepted: nothing raised


def test_a_changed_probability_that_keeps_the_ranking_passes():
    int8 = list(FP32)
    int8[4] = 0.45  # still above every benign image
    check = compare_int8(Y, PATIENTS, _binary(FP32), _binary(int8), "the test images")
    assert check.drop == 0.0
    assert check.max_probability_change == pytest.approx(0.15)
    enforce_int8_limit(check, 0.005)


def test_one_swapped_pair_is_refused_with_the_figures_in_one_sentence():
    int8 = list(FP32)
    int8[4] = 0.35  # the lowest malignant image now ranks below one benign image (0.40)
    check = compare_int8(Y, PATIENTS, _binary(FP32), _binary(int8), "the test images")
    assert check.auc_int8 == 15 / 16 and check.drop == 1 / 16  # one pair of 16 swapped
    lo, hi = check.drop_ci
    assert 0.0 <= lo <= check.drop <= hi
    message = (
        r"^The int8 export loses 0\.0625 of image AUC \(1\.0000 -> 0\.9375, 95% CI of the drop "
        r"over patients .*; largest probability change 0\.2500\) on the test images, more than "
        r"the 0\.005 allowed, so nothing was written; the fp32 export keeps the model's "
        r"figures\.$"
    )
    with pytest.raises(ExportError, match=message):
        enforce_int8_limit(check, 0.005)
    enforce_int8_limit(check, 0.07)  # the same check under a wider limit passes


def test_the_ci_resamples_patients_not_images():
    # Two patients of each class with four images each; int8 lowers one malignant patient's
    # images below every benign image. Resampling patients, a resample without that patient
    # has no drop at all, so the CI reaches 0; resampling images would almost never do so.
    y = np.repeat([0, 0, 1, 1], 4)
    patients = np.repeat(["b1", "b2", "m1", "m2"], 4)
    fp32 = np.repeat([0.2, 0.3, 0.7, 0.8], 4) + np.tile([0, 0.01, 0.02, 0.03], 4)
    int8 = fp32.copy()
    int8[patients == "m1"] -= 0.6
    check = compare_int8(y, patients, _binary(fp32), _binary(int8), "x", n_boot=500)
    assert check.drop == 0.5 and check.n_patients == 4
    assert check.drop_ci[0] == 0.0 and check.drop_ci[1] == pytest.approx(1.0)


def test_several_classes_compare_their_macro_auc():
    y = np.array([0, 0, 1, 1, 2, 2])
    fp32 = np.eye(3)[y] * 0.7 + 0.1
    int8 = fp32.copy()
    int8[[0, 2]] = int8[[2, 0]]  # two images of classes 0 and 1 swap their probabilities
    check = compare_int8(y, [f"p{i}" for i in range(6)], fp32, int8, "x", n_boot=0)
    assert check.auc_fp32 == 1.0 and check.drop > 0.1
    assert np.isnan(check.drop_ci).all()


def test_a_single_class_cannot_be_checked():
    with pytest.raises(ExportError, match="hold a single class, so there is no AUC"):
        compare_int8(np.ones(4, int), list("abcd"), _binary([0.5] * 4), _binary([0.6] * 4), "x")


# --- which images -------------------------------------------------------------------------------


def _records(prefix: str, patients: list[str]) -> list[ImageRecord]:
    return [
        ImageRecord(f"/data/{prefix}-{p}-{i}.png", label, patient=p, group=p)
        for k, p in enumerate(patients)
        for label in [("benign", "malignant")[k % 2]]
        for i in range(3)
    ]


def _run_dir(tmp_path, split: Split, head: str = "linear"):
    """A checkpoint beside a split.csv; only the metadata matters to the choice of images."""
    from histolens.testing import make_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    ckpt = make_checkpoint(run / "best.safetensors")
    if head == "linear":
        from dataclasses import replace

        from histolens.checkpoint.io import load_checkpoint, save_checkpoint
        from histolens.checkpoint.parts import HeadSpec

        state, meta = load_checkpoint(ckpt)
        meta = replace(meta, head=HeadSpec.linear())
        save_checkpoint(ckpt, state, meta)
    split.write_csv(run / "split.csv")
    return ckpt


def test_a_held_out_run_is_checked_on_its_validation_and_test_patients(tmp_path):
    train, val, test = _records("t", ["a", "b"]), _records("v", ["c", "d"]), _records("s", ["e"])
    ckpt = _run_dir(tmp_path, Split(train, val, test))
    unseen = unseen_patient_images(ckpt, None, 100)
    assert unseen.records == val + test and not unseen.refit
    assert unseen.where == (
        "9 of the 9 images (3 patients) of the held-out (validation and test) patients of the "
        "run's split.csv"
    )
    assert len(unseen_patient_images(ckpt, None, 4).records) == 4


def test_a_cross_validated_probe_is_refit_per_fold(tmp_path):
    train = _records("t", ["a", "b", "c", "d"])
    ckpt = _run_dir(tmp_path, Split(train, [], []))
    unseen = unseen_patient_images(ckpt, None, 100)
    assert unseen.refit and unseen.records == train
    assert "each scored by the probe refit without its fold" in unseen.where


def test_without_unseen_patients_the_export_is_refused_naming_verify_data(tmp_path):
    ckpt = _run_dir(tmp_path, Split(_records("t", ["a", "b"]), [], []), head="mlp")
    with pytest.raises(ExportError, match=r"keeps no held-out images .*--verify-data PATH\.$"):
        unseen_patient_images(ckpt, None, 100)
    (ckpt.parent / "split.csv").unlink()
    with pytest.raises(ExportError, match=r"no split\.csv beside it .*--verify-data PATH\.$"):
        unseen_patient_images(ckpt, None, 100)


def test_verify_data_of_the_training_patients_is_refused(tmp_path):
    import csv

    train = _records("t", ["a", "b"])
    ckpt = _run_dir(tmp_path, Split(train, [], []))
    manifest = tmp_path / "verify.csv"
    rows = _records("n", ["x", "b"])  # patient b trained the model
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "patient"])
        for r in rows:
            image = tmp_path / r.path.lstrip("/")
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(b"")
            writer.writerow([image, r.label, r.patient])
    with pytest.raises(ExportError, match=r"shares 1 patients or images .*\(e\.g\. b\)"):
        unseen_patient_images(ckpt, manifest, 100)
