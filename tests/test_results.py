"""The typed results (Metrics, Estimate): their JSON round trip, and older files still read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histolens.errors import DataError
from histolens.evaluation.estimate import build_estimate, estimate_lines
from histolens.evaluation.metrics import (
    EvalResult,
    PredictionRow,
    compute_metrics,
    with_referrals,
)
from histolens.evaluation.results import (
    Estimate,
    EstimateBlock,
    ImageMetrics,
    Metrics,
    ReferMetrics,
    as_estimate,
)

CLASSES = ("benign", "malignant")

# An estimate as a checkpoint of schema 2 stored it (before operating points per magnification),
# with a key this version does not know.
OLD_ESTIMATE = {
    "version": 1,
    "method": "5-fold patient-level cross-validation (out-of-fold predictions)",
    "description": "735 images of 30 patient groups in manifest.csv (magnification all)",
    "task": "binary",
    "classes": ["benign", "malignant"],
    "threshold": 0.41,
    "n_images": 735,
    "n_patients": 30,
    "patients_per_class": {"benign": 8, "malignant": 22},
    "metrics": {"roc_auc": 0.91, "balanced_accuracy": 0.83},
    "ci95": {"roc_auc": [0.85, 0.96], "balanced_accuracy": [0.75, 0.9]},
    "per_magnification": {
        "100X": {
            "n_images": 180,
            "n_patients": 30,
            "patients_per_class": {"benign": 8, "malignant": 22},
            "metrics": {"roc_auc": 0.9},
            "ci95": {"roc_auc": [0.8, 0.97]},
        }
    },
    "warnings": [],
    "computed_by": "histolens 0.3",
}

# An evaluation's metrics.json of a subtype model, written before these classes existed.
OLD_METRICS = {
    "n_images": 3,
    "n_patients": 2,
    "threshold": 0.5,
    "temperature": 1.2,
    "image": {
        "n": 3,
        "accuracy": 0.6667,
        "per_class": {
            "A": {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2},
            "F": {"precision": 0.5, "recall": 1.0, "f1": 0.6667, "support": 1},
        },
        "macro_f1": 0.6667,
        "roc_auc_ovr": 0.75,
        "patient_recognition_rate": 0.75,
        "ci95": {"accuracy": [0.3, 1.0]},
    },
    "split": "test",
}


def _result(alpha: float | None = 0.1) -> EvalResult:
    """Binary predictions of 12 patients at 100X and 400X, every other image referred."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        label = CLASSES[i % 2]
        for mag in (100, 400):
            for j in range(2):
                p = float(np.clip(rng.normal(0.3 if i % 2 == 0 else 0.7, 0.2), 0.01, 0.99))
                probs = (1 - p, p)
                rows.append(
                    PredictionRow(f"p{i}-{mag}-{j}", f"p{i}", mag, label, i % 2, probs, probs)
                )
    result = EvalResult(rows, CLASSES, "binary", 0.5, 1.0)
    if alpha is not None:
        member = np.ones((len(rows), 2), dtype=bool)
        member[::2] = [True, False]
        with_referrals(result, member, None, alpha, "made up")
    return result


def test_metrics_survive_their_json():
    metrics = compute_metrics(_result(), n_boot=30)
    text = json.dumps(metrics.to_dict(), default=float)
    again = Metrics.from_dict(json.loads(text))
    # NaN != NaN, so compare the JSON each gives; and the types are the typed ones again.
    assert json.dumps(again.to_dict(), default=float) == text
    assert isinstance(again.image, ImageMetrics) and isinstance(again.refer, ReferMetrics)
    assert set(again.per_magnification) == {"100X", "400X"}
    assert again.per_magnification["100X"].ci95["refer_rate"] == pytest.approx(
        metrics.per_magnification["100X"].ci95["refer_rate"]
    )


def test_metrics_json_keeps_its_keys_and_their_order():
    out = compute_metrics(_result(), n_boot=30).to_dict()
    assert list(out) == [
        "n_images",
        "n_patients",
        "threshold",
        "temperature",
        "image",
        "image_at_0.5",
        "uncalibrated",
        "per_magnification",
        "refer",
    ]
    assert list(out["image"])[-5:] == [
        "threshold",
        "patient_recognition_rate",
        "patient_auc",
        "n_patients",
        "ci95",
    ]
    assert list(out["uncalibrated"]) == ["brier", "ece"]
    assert list(out["per_magnification"]["100X"])[-5:] == [
        "ci95",
        "n_images",
        "n_benign_patients",
        "n_malignant_patients",
        "refer_rate",
    ]
    assert list(out["refer"])[:5] == ["n_ood", "ood_rate", "ood_reasons", "aurc", "curve"]
    # Without prediction sets or images unlike the training ones, there is no refer block.
    assert "refer" not in compute_metrics(_result(alpha=None), n_boot=0).to_dict()


def test_an_estimate_equals_itself_read_back():
    estimate = build_estimate(_result(), "made-up folds", "48 images", n_boot=40)
    assert Estimate.from_dict(estimate.to_dict()) == estimate
    assert Estimate.from_dict(json.loads(json.dumps(estimate.to_dict()))) == estimate
    block = next(iter(estimate.per_magnification.values()))
    assert EstimateBlock.from_dict(block.to_dict()) == block


def test_an_older_estimate_reads_and_writes_back_unchanged():
    estimate = Estimate.from_dict(OLD_ESTIMATE)
    assert estimate.ci95["roc_auc"] == (0.85, 0.96)
    assert estimate.per_magnification["100X"].metrics == {"roc_auc": 0.9}
    assert estimate.per_magnification["100X"].threshold is None
    assert estimate.operating_point is None and estimate.extra == {"computed_by": "histolens 0.3"}
    assert estimate.to_dict() == OLD_ESTIMATE
    assert list(estimate.to_dict()) == list(OLD_ESTIMATE)
    assert estimate_lines(OLD_ESTIMATE) == estimate_lines(estimate)
    assert as_estimate(OLD_ESTIMATE) == estimate and as_estimate({}) is None


def test_an_older_metrics_file_reads_and_writes_back_unchanged():
    metrics = Metrics.from_dict(OLD_METRICS)
    assert metrics.image.per_class["A"].recall == 0.5
    assert metrics.image.figure("macro_f1") == 0.6667 and metrics.image.figure("roc_auc") is None
    assert metrics.split == "test" and metrics.refer is None and metrics.estimate is None
    assert metrics.to_dict() == OLD_METRICS
    assert Metrics.from_dict(metrics.to_dict()) == metrics


def test_a_stored_estimate_without_its_method_is_refused_in_one_sentence():
    with pytest.raises(DataError, match="A stored Estimate has no method"):
        Estimate.from_dict({"description": "x", "metrics": {}})
    with pytest.raises(DataError, match="not a mapping"):
        Estimate.from_dict(["not", "an", "estimate"])


def test_the_web_schema_is_derived_from_the_dataclass():
    pytest.importorskip("fastapi")
    from histolens.web import schemas

    api = schemas.Estimate.model_validate(OLD_ESTIMATE).model_dump()
    # The fields the API sends (magnification_thresholds since the shared choice: null for an
    # older estimate); bookkeeping (version, task, classes) stays out.
    assert api["magnification_thresholds"] is None
    assert set(api) == {
        "method",
        "description",
        "threshold",
        "operating_point",
        "magnification_thresholds",
        "n_images",
        "n_patients",
        "patients_per_class",
        "metrics",
        "ci95",
        "per_magnification",
        "warnings",
    }
    assert set(schemas.EstimateBlock.model_fields) == {
        "n_images",
        "n_patients",
        "patients_per_class",
        "metrics",
        "ci95",
        "threshold",
    }
    assert schemas.Estimate.model_fields["method"].is_required()
