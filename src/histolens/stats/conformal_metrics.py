"""Measuring referral: coverage of prediction sets, the leave-one-patient-out sets that measure
it honestly on out-of-fold predictions, per-patient refer decisions, and the risk-coverage curve
(histolens.stats.conformal makes the sets these measure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from histolens.stats.conformal import (
    SCORES,
    _image_quantiles,
    _patient_codes,
    _sets_from_scores,
    _strata,
    check_alpha,
)

__all__ = [
    "PATIENT_REFER_FRACTION",
    "coverage",
    "leave_one_patient_out_sets",
    "patient_referrals",
    "risk_coverage",
]

# A patient is referred when at least this fraction of its images are (referred or unlike the
# training images): half of the images being undecided leaves no reliable majority.
PATIENT_REFER_FRACTION = 0.5


def coverage(
    member: np.ndarray, labels: Sequence[int] | np.ndarray, patients: Sequence[Any] | np.ndarray
) -> dict[str, float]:
    """Empirical coverage: of images, and averaged over patients (what the guarantee is about)."""
    y = np.asarray(labels, dtype=np.int64)
    if len(y) == 0:
        return {"images": float("nan"), "patients": float("nan")}
    hit = member[np.arange(len(y)), y]
    codes = _patient_codes(patients)
    per_patient = np.bincount(codes, weights=hit) / np.bincount(codes)
    return {"images": float(hit.mean()), "patients": float(per_patient.mean())}


def patient_referrals(
    refer: Sequence[bool] | np.ndarray,
    patients: Sequence[Any] | np.ndarray,
    fraction: float = PATIENT_REFER_FRACTION,
) -> dict[str, bool]:
    """Per patient: referred when at least ``fraction`` of its images are referred."""
    refer = np.asarray(refer, dtype=bool)
    names = np.asarray(patients, dtype=str)
    return {
        str(p): bool(refer[names == p].mean() >= fraction) for p in dict.fromkeys(names.tolist())
    }


def risk_coverage(correct: np.ndarray, confidence: np.ndarray) -> dict[str, np.ndarray | float]:
    """The risk-coverage curve of referring the least confident images first.

    Returns ``referred`` (fraction referred, 0 to (n-1)/n), ``accuracy`` (of the images kept) and
    ``aurc``: the area under risk (1 - accuracy) against coverage, averaged over every coverage
    n/n, (n-1)/n, ..., 1/n; lower is better, and a perfect ranking's is the smallest reachable.
    Ties in confidence are broken by keeping the error last (a pessimistic, order-free curve).
    """
    correct = np.asarray(correct, dtype=bool)
    confidence = np.asarray(confidence, dtype=np.float64)
    n = len(correct)
    if n == 0:
        return {"referred": np.zeros(0), "accuracy": np.zeros(0), "aurc": float("nan")}
    # Most confident first; among ties errors go first, so they are the last to be referred.
    order = np.lexsort((correct, -confidence))
    kept_correct = np.cumsum(correct[order])
    kept = np.arange(1, n + 1)
    accuracy = (kept_correct / kept)[::-1]  # index i: the n - i most confident images kept
    referred = np.arange(n) / n
    return {"referred": referred, "accuracy": accuracy, "aurc": float(np.mean(1 - accuracy))}


def leave_one_patient_out_sets(
    probs: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    patients: Sequence[Any] | np.ndarray,
    alpha: float,
    score: str = "probability",
    magnifications: Sequence[Any] | np.ndarray | None = None,
) -> np.ndarray:
    """Prediction sets of out-of-fold predictions, each patient's from the others' calibration
    (per magnification when ``magnifications`` are given, as a shipped calibration would be).

    What a new patient would get from a model calibrated on everyone else: the honest way to
    measure coverage on the training patients' out-of-fold predictions.
    """
    check_alpha(alpha)
    y = np.asarray(labels, dtype=np.int64)
    codes = _patient_codes(patients)
    class_scores = SCORES[score](probs)
    own = class_scores[np.arange(len(y)), y]
    image_strata = _strata(magnifications, len(y))
    strata = None if magnifications is None else image_strata
    member = np.zeros(class_scores.shape, dtype=bool)
    for p in np.unique(codes):
        mine, others = codes == p, codes != p
        cal_strata = None if strata is None else strata[others]
        q = _image_quantiles(own[others], codes[others], cal_strata, alpha, image_strata[mine])
        member[mine] = _sets_from_scores(class_scores[mine], q)
    return member
