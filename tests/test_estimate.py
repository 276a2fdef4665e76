"""The estimate on unseen patients: figures against scikit-learn, support per class and per
magnification, warnings when too few patients stand behind it, and the text every front end shows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from histolens.evaluation.estimate import (
    MIN_PATIENTS_PER_CLASS,
    build_estimate,
    class_support_warnings,
    estimate_lines,
    headline_text,
)
from histolens.evaluation.evaluate import EvalResult, PredictionRow

METHOD = "5-fold patient-level cross-validation (out-of-fold predictions)"
DESCRIPTION = "19 images of 9 patient groups in tiny (magnification all)"
CLASSES = ("benign", "malignant")


def _row(path: str, patient: str, mag: int, label: str, p: float) -> PredictionRow:
    return PredictionRow(path, patient, mag, label, CLASSES.index(label), (1 - p, p), (1 - p, p))


@pytest.fixture(scope="module")
def result() -> EvalResult:
    """3 benign and 6 malignant patients, one image each at 100X and 400X, and one 40X image
    of a malignant patient (a magnification with one class only)."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(9):
        label = "benign" if i < 3 else "malignant"
        for mag in (100, 400):
            p = float(np.clip(rng.normal(0.35 if label == "benign" else 0.65, 0.2), 0.01, 0.99))
            rows.append(_row(f"/d/{mag}X/{label}/p{i}.png", f"p{i}", mag, label, p))
    rows.append(_row("/d/40X/malignant/p3.png", "p3", 40, "malignant", 0.8))
    return EvalResult(rows, CLASSES, "binary", 0.5, 1.0)


@pytest.fixture(scope="module")
def estimate(result) -> dict:
    # As a checkpoint's metadata stores it.
    return build_estimate(
        result, METHOD, DESCRIPTION, n_boot=200, per_magnification_boot=100
    ).to_dict()


def _arrays(rows):
    y = np.array([r.target for r in rows])
    p = np.array([r.probs[1] for r in rows])
    return y, p


def test_figures_match_scikit_learn(result, estimate):
    y, p = _arrays(result.rows)
    m = estimate["metrics"]
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p >= 0.5))
    assert m["sensitivity"] == pytest.approx(((p >= 0.5) & (y == 1)).sum() / (y == 1).sum())
    patients = sorted({r.patient for r in result.rows})
    mean_p = [np.mean([r.probs[1] for r in result.rows if r.patient == q]) for q in patients]
    label = [next(r.target for r in result.rows if r.patient == q) for q in patients]
    assert m["patient_auc"] == pytest.approx(roc_auc_score(label, mean_p))
    for key, (lo, hi) in estimate["ci95"].items():
        assert lo <= hi, key
    lo, hi = estimate["ci95"]["roc_auc"]
    assert 0.0 <= lo < hi <= 1.0  # patients resampled: a real interval, not a point


def test_support_counts_images_and_patients_per_class(estimate):
    assert estimate["n_images"] == 19
    assert estimate["n_patients"] == 9
    assert estimate["patients_per_class"] == {"benign": 3, "malignant": 6}
    assert (estimate["method"], estimate["description"]) == (METHOD, DESCRIPTION)
    assert estimate["classes"] == list(CLASSES) and estimate["task"] == "binary"
    assert estimate["threshold"] == 0.5


def test_per_magnification_blocks(result, estimate):
    blocks = estimate["per_magnification"]
    assert set(blocks) == {"40X", "100X", "400X"}
    for mag in (100, 400):
        block = blocks[f"{mag}X"]
        y, p = _arrays([r for r in result.rows if r.magnification == mag])
        assert (block["n_images"], block["n_patients"]) == (9, 9)
        assert block["patients_per_class"] == {"benign": 3, "malignant": 6}
        assert block["metrics"]["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    one_class = blocks["40X"]
    assert (one_class["n_images"], one_class["n_patients"]) == (1, 1)
    assert one_class["patients_per_class"] == {"malignant": 1}
    assert one_class["metrics"] == {} and one_class["ci95"] == {}


def test_too_few_patients_of_a_class_are_warned_about(estimate):
    warnings = estimate["warnings"]
    overall = [w for w in warnings if " at " not in w.split(":")[0]]
    assert overall == [
        "Only 3 benign patients support this estimate: its confidence interval rests on very "
        "few people and may not hold for new patients."
    ]
    assert any(
        w.startswith("Only 3 benign patients support this estimate at 100X:") for w in warnings
    )
    assert any(
        w.startswith("Only 3 benign patients support this estimate at 400X:") for w in warnings
    )
    assert any(
        w.startswith("Only 1 malignant patient supports this estimate at 40X:") for w in warnings
    )
    assert any(
        w.startswith("Only 0 benign patients support this estimate at 40X:") for w in warnings
    )
    assert not any(w.startswith("Only 6 malignant") for w in warnings)  # 6 >= 5: enough


def test_class_support_warnings_threshold():
    assert MIN_PATIENTS_PER_CLASS == 5
    assert class_support_warnings({"benign": 5, "malignant": 9}, CLASSES) == []
    (one,) = class_support_warnings({"benign": 4, "malignant": 9}, CLASSES)
    assert one.startswith("Only 4 benign patients support this estimate:")
    (missing,) = class_support_warnings({"malignant": 9}, CLASSES, "200X")
    assert missing.startswith("Only 0 benign patients support this estimate at 200X:")


def test_estimate_is_plain_json(estimate):
    assert json.loads(json.dumps(estimate)) == estimate


def test_estimate_lines(estimate):
    lines = estimate_lines(estimate)
    assert lines[0] == f"Estimated on unseen patients by {METHOD}: {DESCRIPTION}."
    assert lines[1] == "Support: 19 images of 9 patients (3 benign, 6 malignant)."
    auc = estimate["metrics"]["roc_auc"]
    lo, hi = estimate["ci95"]["roc_auc"]
    assert f"  ROC AUC: {auc:.3f} (95% CI {lo:.2f}-{hi:.2f})" in lines
    (at_40,) = [line for line in lines if line.startswith("  40X:")]
    assert "n/a (one class only)" in at_40 and "1 images of 1 patients (1 malignant)" in at_40
    (at_100,) = [line for line in lines if line.startswith("  100X:")]
    assert at_100.startswith("  100X: ROC AUC ") and "95% CI" in at_100
    # Warnings come last, each marked.
    n = len(estimate["warnings"])
    assert lines[-n:] == [f"warning: {w}" for w in estimate["warnings"]]
    brief = estimate_lines(estimate, per_magnification=False)
    assert not any(line.startswith(("  40X:", "  100X:", "  400X:")) for line in brief)


def test_no_estimate_says_so():
    expected = ["No estimate on unseen patients is stored with this model."]
    assert estimate_lines(None) == expected
    assert estimate_lines({}) == expected


def test_headline_text(estimate):
    auc = estimate["metrics"]["roc_auc"]
    lo, hi = estimate["ci95"]["roc_auc"]
    assert headline_text(estimate) == (
        f"ROC AUC on unseen patients {auc:.3f} (95% CI {lo:.2f}-{hi:.2f}), {METHOD}, "
        "19 images of 9 patients (3 benign, 6 malignant)"
    )


def test_subtype_estimate_leads_with_balanced_accuracy():
    classes = ("A", "F", "DC")
    rng = np.random.default_rng(3)
    rows = []
    for i in range(12):
        target = i % 3
        for j in range(3):
            probs = rng.dirichlet(np.ones(3))
            if j < 2:  # two of three images right
                probs[target] += 1.0
                probs /= probs.sum()
            rows.append(
                PredictionRow(
                    f"/d/p{i}-{j}.png",
                    f"p{i}",
                    400,
                    classes[target],
                    target,
                    tuple(probs),
                    tuple(probs),
                )
            )
    result = EvalResult(rows, classes, "subtype", 0.5, 1.0)
    est = build_estimate(result, METHOD, "36 images", n_boot=200)
    y = np.array([r.target for r in rows])
    pred = np.array([int(np.argmax(r.probs)) for r in rows])
    assert est.metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    lo, hi = est.ci95["balanced_accuracy"]
    assert lo <= est.metrics["balanced_accuracy"] <= hi
    assert est.patients_per_class == {"A": 4, "DC": 4, "F": 4}
    ba = est.metrics["balanced_accuracy"]
    assert headline_text(est).startswith(
        f"balanced accuracy on unseen patients {ba:.3f} (95% CI {lo:.2f}-{hi:.2f})"
    )
