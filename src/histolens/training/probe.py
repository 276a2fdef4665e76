"""A linear probe on frozen backbone features, regularised by patient-level inner cross-validation.

The probe is scikit-learn's logistic regression on standardised features (class-balanced). Its
strength ``C`` is chosen by stratified group k-fold over the *training* patients, so the choice
never sees the patients it will be scored on. The fitted standardisation is folded into one
``nn.Linear`` (w' = w / sd, b' = b - w'.mean), so the shipped model is the usual
backbone + head and every front end, Grad-CAM included, uses it unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from histolens.errors import DataError

__all__ = [
    "DEFAULT_CS",
    "WEIGHTINGS",
    "ProbeFit",
    "fit_linear_probe",
    "group_folds",
    "grouped_scores",
    "patient_balanced_weights",
]

# How the probe's loss weighs its training images: "image" (each image of a class the same,
# classes balanced) or "patient" (each patient of a class the same, classes balanced).
WEIGHTINGS = ("image", "patient")

# Inverse regularisation strengths tried by the inner cross-validation: with ~1,000-dimensional
# features and tens of patients, strong regularisation wins (measured: README, "Why these defaults").
DEFAULT_CS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class ProbeFit:
    """A fitted probe as logits = features @ weight.T + bias, and how its C was chosen."""

    weight: (
        np.ndarray
    )  # (n_out, D): one row for two classes (the positive logit), else one per class
    bias: np.ndarray  # (n_out,)
    C: float
    inner_scores: dict[float, float] = field(default_factory=dict)  # C -> inner-CV score
    # Inner out-of-fold logits at the chosen C (NaN rows: not scored), for calibration.
    oof_logits: np.ndarray | None = None

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ self.weight.T + self.bias

    def load_into(self, linear: torch.nn.Linear) -> None:
        """Copy the probe into a ``nn.Linear(D, n_out)`` head layer."""
        if tuple(linear.weight.shape) != self.weight.shape:
            raise ValueError(
                f"Head layer of shape {tuple(linear.weight.shape)} cannot hold a probe of shape "
                f"{self.weight.shape}."
            )
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(self.weight, dtype=linear.weight.dtype))
            linear.bias.copy_(torch.as_tensor(self.bias, dtype=linear.bias.dtype))


def group_folds(
    y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold (shuffled by ``seed``), with fewer folds when groups are few."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    # Each class needs a group in every fold for stratification to mean anything.
    per_class = min(len(np.unique(groups[y == c])) for c in np.unique(y))
    k = max(2, min(n_splits, n_groups, max(per_class, 2)))
    if n_groups < 2:
        raise DataError("Cross-validation needs at least two patient groups.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" chatter
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return [(tr, te) for tr, te in splitter.split(np.zeros(len(y)), y, groups) if len(te)]


def patient_balanced_weights(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Sample weights under which every class weighs the same and, within a class, every patient
    group: an image weighs n / (classes * groups of its class * images of its group and class).

    They sum to n, as scikit-learn's ``class_weight="balanced"`` does, so a probe's ``C`` means
    the same strength under either weighting."""
    y = np.asarray(y)
    groups = np.asarray(groups)
    w = np.empty(len(y), dtype=np.float64)
    classes = np.unique(y)
    for c in classes:
        mine = y == c
        _, inverse, counts = np.unique(groups[mine], return_inverse=True, return_counts=True)
        w[mine] = 1.0 / (len(counts) * counts[inverse])
    return w * len(y) / len(classes)


def _fit(
    x: np.ndarray,
    y: np.ndarray,
    C: float,
    n_classes: int,
    groups: np.ndarray | None = None,
):
    """Standardise, fit, fold the standardisation back in. ``groups``: weigh each patient group
    of a class the same (:func:`patient_balanced_weights`); None: each image (classes balanced)."""
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(0)
    sd = x.std(0)
    sd[sd < 1e-8] = 1.0
    if groups is None:
        model = LogisticRegression(C=C, class_weight="balanced", max_iter=5000)
        model.fit((x - mean) / sd, y)
    else:
        model = LogisticRegression(C=C, max_iter=5000)
        model.fit((x - mean) / sd, y, sample_weight=patient_balanced_weights(y, groups))
    coef = model.coef_  # (1, D) for two classes, (K, D) otherwise
    if n_classes > 2 and coef.shape[0] != n_classes:
        # A class absent from this training fold: give it a logit that never wins.
        full = np.zeros((n_classes, x.shape[1]))
        inter = np.full(n_classes, -1e4)
        if len(model.classes_) == 2:
            # scikit-learn fits two classes as one logit of classes_[1] against 0 for classes_[0].
            full[model.classes_[1]] = coef[0]
            inter[model.classes_[1]] = model.intercept_[0]
            inter[model.classes_[0]] = 0.0
        else:
            full[model.classes_] = coef
            inter[model.classes_] = model.intercept_
        coef, intercept = full, inter
    else:
        intercept = model.intercept_
    weight = coef / sd
    bias = intercept - weight @ mean
    return weight, bias


def _score(y: np.ndarray, logits: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    if n_classes == 2:
        return float(roc_auc_score(y, logits[:, 0])) if len(np.unique(y)) == 2 else float("nan")
    return float(balanced_accuracy_score(y, logits.argmax(1)))


def grouped_scores(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_classes: int,
    C: float,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    weighting: str = "image",
) -> np.ndarray:
    """Out-of-fold logits of a probe with strength ``C`` over the given folds."""
    n_out = 1 if n_classes == 2 else n_classes
    out = np.full((len(y), n_out), np.nan)
    for tr, te in folds:
        if len(np.unique(y[tr])) < 2:
            continue
        w, b = _fit(x[tr], y[tr], C, n_classes, groups[tr] if weighting == "patient" else None)
        out[te] = x[te] @ w.T + b
    return out


def fit_linear_probe(
    features: np.ndarray | torch.Tensor,
    y: Sequence[int] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    n_classes: int,
    Cs: Sequence[float] = DEFAULT_CS,
    inner_folds: int = 5,
    seed: int = 0,
    weighting: str = "image",
) -> ProbeFit:
    """Fit the probe on all given images, with C chosen by inner patient-level cross-validation.

    Binary: the inner score is the pooled out-of-fold ROC AUC; subtypes: balanced accuracy. Ties
    go to the stronger regularisation (smaller C). ``weighting``: one of :data:`WEIGHTINGS`.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y, dtype=int)
    groups = np.asarray(groups)
    if len(np.unique(y)) < 2:
        raise DataError("The linear probe needs images of at least two classes.")
    scores: dict[float, float] = {}
    oofs: dict[float, np.ndarray] = {}
    Cs = sorted(float(c) for c in Cs)
    C = Cs[len(Cs) // 2]
    if len(np.unique(groups)) >= 4:
        folds = group_folds(y, groups, inner_folds, seed)
        for c in Cs:
            oofs[c] = grouped_scores(x, y, groups, n_classes, c, folds, weighting)
            ok = ~np.isnan(oofs[c]).any(1)
            scores[c] = _score(y[ok], oofs[c][ok], n_classes) if ok.any() else float("nan")
        finite = {c: s for c, s in scores.items() if np.isfinite(s)}
        if finite:
            best = max(finite.values())
            C = min(c for c, s in finite.items() if s >= best - 1e-9)
    weight, bias = _fit(x, y, C, n_classes, groups if weighting == "patient" else None)
    return ProbeFit(weight, bias, C, scores, oofs.get(C))
