"""Patient-level folds of slides: the outer cross-validation and the inner validation split.

Both are scikit-learn's ``StratifiedGroupKFold`` (seeded): a patient's slides are never on both
sides, and each side keeps about the share of each label. The inner split holds out one fifth of
the training patients to choose when MIL stops training (early stopping). One fifth, fixed before
any benchmark run: CLAM holds out 10% on cohorts of hundreds of patients, but at the scale of a
few dozen patients a tenth is two or three patients, a validation loss decided by one of them; a
fifth (~5 patients, ~10 slides of 24 training patients) is the smallest share that keeps several
patients of each label, at the cost of a fifth of the training slides.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histolens.errors import DataError

__all__ = ["INNER_FOLDS", "InnerSplit", "inner_patient_split", "patient_folds"]

# The inner validation split is one of INNER_FOLDS patient folds (a fifth of the patients).
INNER_FOLDS = 5


def patient_folds(
    targets: Sequence[int], patients: Sequence[str], n_splits: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold over patients: (train, test) slide indices, patient-disjoint."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.asarray(patients)
    n_groups = len(set(patients))
    if n_groups < n_splits:
        raise DataError(
            f"{n_splits}-fold cross-validation needs at least {n_splits} patients; "
            f"the slides have {n_groups}."
        )
    y = np.asarray(targets)
    if np.bincount(y, minlength=2).min() < 2:
        raise DataError("Cross-validation needs at least two slides of each label.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" with few patients
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        folds = list(cv.split(np.zeros(len(y)), y, groups))
    for train, test in folds:
        if set(groups[train]) & set(groups[test]):
            raise AssertionError("a patient is on both sides of a fold")  # a bug, not bad input
    return folds


@dataclass(frozen=True)
class InnerSplit:
    """Slide indices that train and that validate (patient-disjoint), or why there are none."""

    train: np.ndarray
    val: np.ndarray
    reason: str = ""

    @property
    def usable(self) -> bool:
        return len(self.val) > 0


def inner_patient_split(
    targets: Sequence[int], patients: Sequence[str], seed: int = 0
) -> InnerSplit:
    """One fifth of the patients held out for validation, stratified by label.

    Needs at least :data:`INNER_FOLDS` patients with slides of each label, so that the held-out
    fifth can have a patient of each; otherwise every slide trains and ``reason`` says why.
    """
    y = np.asarray(targets, np.int64)
    groups = np.asarray(patients)
    everything = np.arange(len(y))
    counts = [len(set(groups[y == label])) for label in (0, 1)]
    if min(counts) < INNER_FOLDS:
        return InnerSplit(
            everything,
            everything[:0],
            f"an inner validation split needs {INNER_FOLDS} patients of each label, the "
            f"training slides have {counts[0]} and {counts[1]}",
        )
    train, val = patient_folds(y, patients, INNER_FOLDS, seed)[0]
    if len(set(y[val])) < 2:
        return InnerSplit(everything, everything[:0], "the inner validation fold has one label")
    return InnerSplit(train, val)
