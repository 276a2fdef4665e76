"""Stored figures in one shape for every front end: estimates, and older test-split metrics."""

from __future__ import annotations

from histolens.evaluation.estimate import estimate_lines
from histolens.evaluation.performance import (
    checkpoint_estimate,
    estimate_from_metrics,
    figure_lines,
    headline,
    performance_lines,
)

CLASSES = ["benign", "malignant"]


def test_an_estimate_is_shown_as_estimate_lines_says_it(estimate):
    stored = checkpoint_estimate(estimate, {"roc_auc": 0.1}, CLASSES, "binary", 0.5)
    assert stored.to_dict() == estimate
    lines = estimate_lines(estimate)
    assert performance_lines(estimate) == lines
    # figure_lines drops exactly the two lines that say what and how many.
    assert lines[0].startswith("Estimated on unseen patients by 5-fold patient-level")
    assert lines[1] == "Support: 66 images of 11 patients (3 benign, 8 malignant)."
    assert figure_lines(estimate) == lines[2:]
    assert figure_lines(estimate)[0].startswith("  ROC AUC: ")
    assert figure_lines(estimate)[-1].startswith("warning: Only 3 benign patients support")


def test_older_test_metrics_are_labelled_with_their_split_and_size():
    metrics = {"split": "test", "patient_auc": 1.0, "n_images": 52, "n_patients": 7}
    est = checkpoint_estimate(None, metrics, CLASSES, "binary", 0.5)
    assert performance_lines(est) == [
        "Measured on a held-out test split of 7 patients (52 images); no confidence interval "
        "was stored.",
        "  patient AUC: 1.000",
        "warning: Measured on only 7 test patients: the figures may not hold for new patients.",
    ]
    assert headline(est) == (
        "patient AUC 1.000 (no confidence interval stored) on a held-out test split of 7 "
        "patients (52 images)"
    )


def test_enough_test_patients_give_no_warning_and_known_classes_name_the_short_one():
    metrics = {"split": "test", "roc_auc": 0.9, "n_images": 300, "n_patients": 12}
    assert estimate_from_metrics(metrics, CLASSES).warnings == []
    est = estimate_from_metrics(metrics, CLASSES, patients_per_class={"benign": 4, "malignant": 8})
    assert est.warnings == [
        "Only 4 benign patients support this estimate: its confidence interval rests on very few "
        "people and may not hold for new patients."
    ]
    assert (
        performance_lines(est)[1] == "Support: 300 images of 12 patients (4 benign, 8 malignant)."
    )


def test_the_oldest_nested_shape_and_missing_counts_still_read():
    est = estimate_from_metrics({"test": {"accuracy": 0.875, "auc": 0.931}}, CLASSES)
    assert est.metrics == {"roc_auc": 0.931, "accuracy": 0.875}
    assert est.description == "a held-out test split (number of patients not stored)"
    assert est.warnings == [
        "The number of test patients is not stored: the figures may not hold for new patients."
    ]
    assert estimate_from_metrics({}, CLASSES) is None
    assert checkpoint_estimate(None, {}, CLASSES, "binary", 0.5) is None
    assert performance_lines(None) == ["No measured performance is stored with this model."]
