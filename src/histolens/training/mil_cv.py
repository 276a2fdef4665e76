"""Patient-level cross-validation of attention MIL against mean pooling + a linear probe.

Both methods see the same stratified group k-fold (patients never straddle a fold's train and
test sides), so their out-of-fold slide probabilities are paired. Inside each fold, MIL holds out
a fifth of the training patients to stop training early (:mod:`histolens.training.mil_fit`). The baseline averages each
bag's features and fits a standardised logistic regression (the linear probe of the tile
workflow, on slide means). AUCs come with 95% CIs that resample patients, not slides.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from histolens.stats.metrics import bootstrap_ci, safe_auc
from histolens.training.mil import MilConfig, mil_logits
from histolens.training.mil_fit import MilProcesses, fit_mil
from histolens.training.mil_folds import patient_folds

__all__ = [
    "MilCrossValidation",
    "auc_with_ci",
    "cross_validate_mil",
    "mean_pool_probe",
    "patient_folds",
]


def mean_pool_probe(
    train_bags: Sequence[np.ndarray], train_y: Sequence[int], test_bags: Sequence[np.ndarray]
) -> np.ndarray:
    """Mean pooling + standardised logistic regression: test slides' probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train = np.stack([b.mean(0) for b in train_bags])
    x_test = np.stack([b.mean(0) for b in test_bags])
    probe = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")
    )
    probe.fit(x_train, np.asarray(train_y))
    return probe.predict_proba(x_test)[:, 1]


def auc_with_ci(
    y: np.ndarray, p: np.ndarray, patients: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Slide AUC and its 95% CI resampling patients."""
    y, p = np.asarray(y), np.asarray(p)
    lo, hi = bootstrap_ci(lambda idx: safe_auc(y[idx], p[idx]), patients, n_boot, seed)
    return safe_auc(y, p), lo, hi


@dataclass
class MilCrossValidation:
    """Out-of-fold slide probabilities of both methods, the fold of each slide, the attention
    weights of each slide (from the model that did not see it), timings, each fold's training
    record (epochs, best epoch, inner split: ``MilFit.summary``)."""

    targets: np.ndarray
    patients: tuple[str, ...]
    fold: np.ndarray
    mil: np.ndarray
    mean_pool: np.ndarray
    attention: list[np.ndarray]
    logits: np.ndarray = field(default_factory=lambda: np.zeros(0))  # MIL, before calibration
    epoch_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    fits: list[dict] = field(default_factory=list)
    global_rank: int = 0

    def table(self, subset: np.ndarray | None = None) -> dict[str, tuple[float, float, float]]:
        """{method: (AUC, CI low, CI high)} over all slides or a boolean ``subset``."""
        keep = np.ones(len(self.targets), bool) if subset is None else np.asarray(subset, bool)
        patients = [p for p, k in zip(self.patients, keep, strict=True) if k]
        y = self.targets[keep]
        return {
            "attention MIL": auc_with_ci(y, self.mil[keep], patients),
            "mean pooling + linear probe": auc_with_ci(y, self.mean_pool[keep], patients),
        }


def cross_validate_mil(
    bags: Sequence[np.ndarray],
    targets: Sequence[int],
    patients: Sequence[str],
    config: MilConfig = MilConfig(),
    n_splits: int = 5,
    processes: MilProcesses = MilProcesses(),
    echo: bool = False,
) -> MilCrossValidation:
    """Patient-level k-fold CV of attention MIL and the mean-pooling probe on the same folds
    (``echo``: one line per MIL epoch on stderr)."""
    start = time.perf_counter()
    y = np.asarray(targets, np.int64)
    folds = patient_folds(y, patients, n_splits, config.seed)
    fold_of = np.full(len(y), -1)
    mil_z, mean_p = np.zeros(len(y)), np.zeros(len(y))
    attention: list[np.ndarray] = [np.empty(0)] * len(y)
    epochs: list[float] = []
    fits: list[dict] = []
    rank = 0
    for k, (train, test) in enumerate(folds):
        prefix = f"fold {k + 1}/{n_splits} " if echo else None
        fit = fit_mil(
            [bags[i] for i in train], y[train], config, [patients[i] for i in train],
            processes, prefix,
        )  # fmt: skip
        epochs += fit.epoch_seconds
        fits.append({"fold": k, **fit.summary()})
        rank = fit.global_rank
        logits, weights = mil_logits(fit.model, [bags[i] for i in test])
        mil_z[test] = logits
        for i, w in zip(test, weights, strict=True):
            attention[i] = w
        mean_p[test] = mean_pool_probe([bags[i] for i in train], y[train], [bags[i] for i in test])
        fold_of[test] = k
    mil_p = 1.0 / (1.0 + np.exp(-mil_z))
    seconds = time.perf_counter() - start
    return MilCrossValidation(
        y, tuple(patients), fold_of, mil_p, mean_p, attention, mil_z, epochs, seconds, fits,
        rank,
    )  # fmt: skip
