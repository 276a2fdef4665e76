"""The metric blocks :func:`histolens.evaluation.metrics.compute_metrics` is made of: one set
of images' binary figures (at their thresholds, AUCs ranking their rank scores), one
magnification's row, and the subtype figures, each with bootstrap CIs over patients. Pure."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from histolens.evaluation.results import ClassMetrics, ImageMetrics
from histolens.stats.bootstrap import PatientBootstrap
from histolens.stats.metrics import (
    binary_metrics,
    multiclass_metrics,
    patient_level_auc,
    patient_recognition_rate,
    safe_auc,
)

__all__ = [
    "BINARY_CIS",
    "PER_MAGNIFICATION_CIS",
    "binary_block",
    "magnification_block",
    "multiclass_block",
    "ranking_figures",
]

# The CIs each magnification's row shows (the pooled block bootstraps every statistic).
PER_MAGNIFICATION_CIS = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity")


def binary_block(y, p, patients, threshold, n_boot, seed, ci_keys=None, rank=None) -> ImageMetrics:
    """Metrics at ``threshold`` on ``p``; the AUCs rank ``rank`` (None: ``p``)."""
    rank = p if rank is None else rank
    correct = (p >= threshold).astype(int) == y
    positive = p >= threshold
    ci95 = None
    if n_boot:
        keys = BINARY_CIS if ci_keys is None else ci_keys
        ci95 = _binary_cis(
            PatientBootstrap(patients, n_boot, seed), y, rank, correct, positive, keys
        )
    return ImageMetrics(
        **{**binary_metrics(y, p, threshold), **ranking_figures(y, rank)},
        patient_recognition_rate=patient_recognition_rate(patients, correct),
        patient_auc=patient_level_auc(patients, y, rank),
        n_patients=int(len(np.unique(patients))),
        ci95=ci95,
    )


# Every figure of a pooled binary block has a CI over patients.
BINARY_CIS = (
    "roc_auc",
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "patient_recognition_rate",
    "patient_auc",
)


def _binary_cis(boot: PatientBootstrap, y, rank, correct, positive, keys) -> dict:
    """The bootstrap CIs of ``keys`` (BINARY_CIS), each figure computed for every resample at
    once; the same intervals as bootstrap_ci of the per-resample figures (stats.bootstrap)."""
    sensitivity = boot.proportion(positive, y == 1)
    specificity = boot.proportion(~positive, y == 0)
    figures = {
        "roc_auc": lambda: boot.roc_auc(y, rank),
        "accuracy": lambda: boot.proportion(correct),
        # np.mean([a, b]) of two floats is (a + b) / 2, NaN if either is.
        "balanced_accuracy": lambda: (sensitivity + specificity) / 2,
        "sensitivity": lambda: sensitivity,
        "specificity": lambda: specificity,
        "patient_recognition_rate": lambda: boot.recognition_rate(correct),
        "patient_auc": lambda: boot.patient_auc(y, rank),
    }
    return {k: boot.interval(figures[k]()) for k in keys}


def ranking_figures(y: np.ndarray, rank: np.ndarray) -> dict[str, float]:
    """ROC and PR AUC of ``rank`` (empty with one class: binary_metrics' NaNs stand)."""
    from sklearn.metrics import average_precision_score

    if len(np.unique(y)) < 2:
        return {}
    return {"roc_auc": safe_auc(y, rank), "pr_auc": float(average_precision_score(y, rank))}


def magnification_block(result, rows, y, p, patients, thr, idx, n_boot, seed, rank) -> ImageMetrics:
    """One magnification's row (``idx``: its images): its own CIs over its patients, its
    threshold, patients of each class and (with prediction sets) referral rate."""
    block = binary_block(
        *(y[idx], p[idx], patients[idx], thr[idx], n_boot, seed),
        PER_MAGNIFICATION_CIS,
        rank[idx],
    )
    refer_rate, ci95 = None, block.ci95
    if result.alpha is not None:
        refer = np.array([r.refer for r in rows])[idx]
        refer_rate = float(refer.mean())
        if n_boot:
            ci95 = {
                **(ci95 or {}),
                "refer_rate": PatientBootstrap(patients[idx], n_boot, seed).interval_of(refer),
            }
    return replace(
        block,
        threshold=float(thr[idx][0]),
        n_images=int(idx.sum()),
        n_benign_patients=int(len(np.unique(patients[idx][y[idx] == 0]))),
        n_malignant_patients=int(len(np.unique(patients[idx][y[idx] == 1]))),
        refer_rate=refer_rate,
        ci95=ci95,
    )


def multiclass_block(y, probs, patients, classes, n_boot, seed) -> ImageMetrics:
    """Accuracy, per-class figures and the patient recognition rate, with CIs (subtypes)."""
    mc = multiclass_metrics(y, probs, classes)
    correct = probs.argmax(1) == y
    per_class = {c: ClassMetrics(**v) for c, v in mc.pop("per_class").items()}
    ci95 = None
    if n_boot:
        boot = PatientBootstrap(patients, n_boot, seed)
        ci95 = {
            "accuracy": boot.interval(boot.proportion(correct)),
            "patient_recognition_rate": boot.interval(boot.recognition_rate(correct)),
        }
    return ImageMetrics(
        **mc,
        per_class=per_class,
        patient_recognition_rate=patient_recognition_rate(patients, correct),
        ci95=ci95,
    )
