"""Knowing when not to answer: split-conformal prediction sets with a guarantee about new patients.

Each image gets the set of classes that its nonconformity score does not rule out at a chosen
error level ``alpha``: {benign}, {malignant}, or both (then the image is *referred* to a person).
The calibration is the nonconformity of the out-of-fold predictions of the training patients at
their true class, stored in the checkpoint with the patient of each score, so that ``alpha`` can
be changed at prediction time.

Images of one patient are not exchangeable with each other, so plain split-conformal (one score
per image) would promise coverage for new images of known patients. Here every calibration image
is weighted by 1 / (images of its patient), so every patient counts once, and the threshold is the
weighted (1 - alpha)(1 + 1/P)-quantile over the P calibration patients: hierarchical conformal
prediction as in Lee, Barber & Willett, "Distribution-free inference with hierarchical data"
(2023), the "CDF pooling" of Dunn, Wasserman & Ramdas (JASA 2023). The guarantee: for a new
patient exchangeable with the calibration patients, a randomly chosen image of theirs has its true
class in its set with probability at least 1 - alpha (coverage averaged over patients, not over
images, and not conditional on the class).

A set is never empty: the predicted class is always in it. That can only raise coverage, and
keeps the set and the shown label consistent. An image is referred when its set holds more than
one class; a patient is referred when at least ``PATIENT_REFER_FRACTION`` of its images are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from histolens.errors import CheckpointError, ConfigError, check_choice

__all__ = [
    "DEFAULT_ALPHA",
    "PATIENT_REFER_FRACTION",
    "SCORES",
    "ConformalCalibration",
    "NonconformityScore",
    "centred_probabilities",
    "check_alpha",
    "coverage",
    "leave_one_patient_out_sets",
    "patient_referrals",
    "risk_coverage",
]

DEFAULT_ALPHA = 0.1
# A patient is referred when at least this fraction of its images are (referred or unlike the
# training images): half of the images being undecided leaves no reliable majority.
PATIENT_REFER_FRACTION = 0.5
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class NonconformityScore:
    """How unlike class y an image's prediction is, from probabilities of one or more views.

    ``probs`` is (n, C) or (n, V, C): V views of each image (the four flips of test-time
    augmentation) or V models (an ensemble). The score is one minus the mean probability of the
    class plus ``spread_weight`` times the standard deviation across views: with one view, one
    minus the calibrated probability (the "least ambiguous set" score); with several, a class the
    views disagree on is less certain than its mean says.
    """

    name: str
    description: str
    views: str  # "none" (one prediction), "flips" (test-time augmentation), "members" (ensemble)
    spread_weight: float = 0.0

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim == 2:
            p = p[:, None]
        score = 1.0 - p.mean(1)
        if self.spread_weight and p.shape[1] > 1:
            score = score + self.spread_weight * p.std(1)
        return score


SCORES: dict[str, NonconformityScore] = {
    s.name: s
    for s in (
        NonconformityScore(
            "probability", "one minus the calibrated probability of the class", "none"
        ),
        NonconformityScore(
            "tta",
            "one minus the mean probability over the four flips, plus their spread",
            "flips",
            1.0,
        ),
        NonconformityScore(
            "ensemble",
            "one minus the mean probability over the ensemble's members, plus their spread",
            "members",
            1.0,
        ),
    )
}


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in (0, 1), or a ConfigError saying what it means."""
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ConfigError(
            f"alpha must be between 0 and 1 (the error rate the prediction sets allow), got "
            f"{alpha:g}."
        )
    return alpha


def centred_probabilities(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Calibrated probabilities moved so that the decision threshold sits at 0.5 (binary).

    ``p' = sigmoid(logit(p) - logit(threshold))``: the class of the larger p' is the thresholded
    label, so a set built on p' always agrees with the label shown. Multiclass: unchanged.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[-1] != 2 or threshold is None:
        return p
    eps = 1e-12
    pos = np.clip(p[..., 1], eps, 1 - eps)
    t = float(np.clip(threshold, 1e-6, 1 - 1e-6))
    z = np.log(pos / (1 - pos)) - np.log(t / (1 - t))
    q = 1.0 / (1.0 + np.exp(-z))
    return np.stack([1 - q, q], axis=-1)


def _patient_codes(patients: Sequence[Any]) -> np.ndarray:
    _, codes = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    return codes.astype(np.int64)


def _weighted_quantile(scores: np.ndarray, codes: np.ndarray, alpha: float) -> float:
    """The hierarchical (patient-weighted) conformal quantile; +inf when patients are too few."""
    if len(scores) == 0:
        return float("inf")
    counts = np.bincount(codes)
    n_patients = int((counts > 0).sum())
    weights = 1.0 / counts[codes]
    level = (1.0 - alpha) * (1.0 + 1.0 / n_patients)
    if level > 1.0:
        return float("inf")
    order = np.argsort(scores, kind="stable")
    cdf = np.cumsum(weights[order]) / n_patients
    # The smallest score whose pooled CDF reaches the level (a hair of slack for rounding).
    i = int(np.searchsorted(cdf, level - 1e-12, side="left"))
    return float(scores[order[min(i, len(order) - 1)]])


def _sets_from_scores(
    class_scores: np.ndarray, q: float, predicted: np.ndarray | None = None
) -> np.ndarray:
    """(n, C) membership: classes whose score is within the quantile, plus the predicted class
    (by default the class of the lowest score)."""
    member = class_scores <= q
    best = class_scores.argmin(1) if predicted is None else np.asarray(predicted, dtype=np.int64)
    member[np.arange(len(class_scores)), best] = True
    return member


@dataclass(frozen=True)
class ConformalCalibration:
    """Out-of-fold nonconformity scores of the training patients, at their true classes.

    Build with :meth:`fit`; :meth:`prediction_sets` then gives each new image its set at any
    ``alpha`` (by default the one chosen at training).
    """

    scores: np.ndarray  # (n,) nonconformity of each calibration image at its true class
    labels: np.ndarray  # (n,) class index
    patients: np.ndarray  # (n,) patient code (0..P-1): images of one patient share a code
    classes: tuple[str, ...]
    alpha: float = DEFAULT_ALPHA
    score: str = "probability"

    def __post_init__(self) -> None:
        check_choice("nonconformity score", self.score, SCORES)
        check_alpha(self.alpha)
        if not len(self.scores) == len(self.labels) == len(self.patients):
            raise ValueError("scores, labels and patients must have one entry per image.")

    @classmethod
    def fit(
        cls,
        probs: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        patients: Sequence[Any] | np.ndarray,
        classes: Sequence[str],
        alpha: float = DEFAULT_ALPHA,
        score: str = "probability",
    ) -> ConformalCalibration:
        """Calibrate on out-of-fold probabilities (n, C) or (n, V, C), centred for binary."""
        check_choice("nonconformity score", score, SCORES)
        y = np.asarray(labels, dtype=np.int64)
        class_scores = SCORES[score](probs)
        if len(y) != len(class_scores):
            raise ValueError(f"{len(class_scores)} predictions but {len(y)} labels.")
        s = class_scores[np.arange(len(y)), y] if len(y) else np.zeros(0)
        return cls(s, y, _patient_codes(patients), tuple(classes), check_alpha(alpha), score)

    @property
    def n_patients(self) -> int:
        return len(np.unique(self.patients))

    @property
    def min_alpha(self) -> float:
        """The smallest alpha these patients can guarantee (below it every set is every class)."""
        return 1.0 / (self.n_patients + 1) if self.n_patients else 1.0

    def quantile(self, alpha: float | None = None) -> float:
        """The score threshold for error level ``alpha`` (default: the training one)."""
        a = self.alpha if alpha is None else check_alpha(alpha)
        return _weighted_quantile(self.scores, self.patients, a)

    def class_scores(self, probs: np.ndarray) -> np.ndarray:
        """Nonconformity (n, C) of every class for probabilities (n, C) or (n, V, C)."""
        return SCORES[self.score](probs)

    def prediction_sets(
        self,
        probs: np.ndarray,
        alpha: float | None = None,
        predicted: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Boolean membership (n, C): which classes each image's set holds.

        ``predicted`` (class indices) is always in the set; by default the least nonconforming
        class, which for centred probabilities is the label a threshold gives.
        """
        pred = None if predicted is None else np.asarray(predicted, dtype=np.int64)
        return _sets_from_scores(self.class_scores(probs), self.quantile(alpha), pred)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for the checkpoint's metadata."""
        return {
            "format_version": _FORMAT_VERSION,
            "method": "split-conformal, patient-weighted (hierarchical) quantile",
            "score": self.score,
            "alpha": self.alpha,
            "classes": list(self.classes),
            "n_images": int(len(self.scores)),
            "n_patients": self.n_patients,
            "scores": [round(float(s), 6) for s in self.scores],
            "labels": [int(v) for v in self.labels],
            "patients": [int(v) for v in self.patients],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalCalibration:
        try:
            if int(d.get("format_version", 1)) > _FORMAT_VERSION:
                raise CheckpointError(
                    "The checkpoint's conformal calibration was written by a newer histolens; "
                    "upgrade."
                )
            return cls(
                np.asarray(d["scores"], dtype=np.float64),
                np.asarray(d["labels"], dtype=np.int64),
                np.asarray(d["patients"], dtype=np.int64),
                tuple(d["classes"]),
                float(d.get("alpha", DEFAULT_ALPHA)),
                str(d.get("score", "probability")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"The checkpoint's conformal calibration is damaged ({exc})."
            ) from None


def leave_one_patient_out_sets(
    probs: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    patients: Sequence[Any] | np.ndarray,
    alpha: float,
    score: str = "probability",
) -> np.ndarray:
    """Prediction sets of out-of-fold predictions, each patient's from the others' calibration.

    What a new patient would get from a model calibrated on everyone else: the honest way to
    measure coverage on the training patients' out-of-fold predictions.
    """
    check_alpha(alpha)
    y = np.asarray(labels, dtype=np.int64)
    codes = _patient_codes(patients)
    class_scores = SCORES[score](probs)
    own = class_scores[np.arange(len(y)), y]
    member = np.zeros(class_scores.shape, dtype=bool)
    for p in np.unique(codes):
        mine = codes == p
        others = ~mine
        q = _weighted_quantile(own[others], codes[others], alpha)
        member[mine] = _sets_from_scores(class_scores[mine], q)
    return member


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
