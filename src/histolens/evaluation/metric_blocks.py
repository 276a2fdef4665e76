"""The metric blocks :func:`histolens.evaluation.metrics.compute_metrics` is made of: one set
of images' binary figures (at their thresholds, AUCs ranking their rank scores), one
magnification's row, and the subtype figures, each with bootstrap CIs over patients. Pure."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from histolens.evaluation.results import ClassMetrics, ImageMetrics
from histolens.stats.metrics import (
    binary_metrics,
    bootstrap_ci,
    multiclass_metrics,
    patient_level_auc,
    patient_recognition_rate,
    safe_auc,
)

__all__ = [
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

    def rate(i: np.ndarray, cls: int) -> float:
        of_class = y[i] == cls
        return float((positive[i][of_class] == bool(cls)).mean()) if of_class.any() else np.nan

    stats = {
        "roc_auc": lambda i: safe_auc(y[i], rank[i]),
        "accuracy": lambda i: float(correct[i].mean()),
        "balanced_accuracy": lambda i: float(np.mean([rate(i, 1), rate(i, 0)])),
        "sensitivity": lambda i: rate(i, 1),
        "specificity": lambda i: rate(i, 0),
        "patient_recognition_rate": lambda i: patient_recognition_rate(patients[i], correct[i]),
        "patient_auc": lambda i: patient_level_auc(patients[i], y[i], rank[i]),
    }
    ci95 = None
    if n_boot:
        keys = stats if ci_keys is None else ci_keys
        ci95 = {k: bootstrap_ci(stats[k], patients, n_boot, seed) for k in keys}
    return ImageMetrics(
        **{**binary_metrics(y, p, threshold), **ranking_figures(y, rank)},
        patient_recognition_rate=patient_recognition_rate(patients, correct),
        patient_auc=patient_level_auc(patients, y, rank),
        n_patients=int(len(np.unique(patients))),
        ci95=ci95,
    )


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
                "refer_rate": bootstrap_ci(
                    lambda i, r=refer: float(r[i].mean()), patients[idx], n_boot, seed
                ),
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
        ci95 = {
            "accuracy": bootstrap_ci(lambda i: float(correct[i].mean()), patients, n_boot, seed),
            "patient_recognition_rate": bootstrap_ci(
                lambda i: patient_recognition_rate(patients[i], correct[i]),
                patients,
                n_boot,
                seed,
            ),
        }
    return ImageMetrics(
        **mc,
        per_class=per_class,
        patient_recognition_rate=patient_recognition_rate(patients, correct),
        ci95=ci95,
    )
