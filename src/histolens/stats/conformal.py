"""Knowing when not to answer: split-conformal prediction sets with a guarantee about new patients.

Each image gets the classes its nonconformity score does not rule out at error level ``alpha``:
{benign}, {malignant}, or both (then it is *referred* to a person). The calibration (out-of-fold
nonconformity of the training patients' images at their true class, with each image's patient)
is stored in the checkpoint, so ``alpha`` can change at prediction time.

Images of one patient are not exchangeable with each other, so plain split-conformal (one score
per image) would promise coverage for new images of known patients. Here every calibration image
is weighted by 1 / (images of its patient), so every patient counts once, and the threshold is the
weighted (1 - alpha)(1 + 1/P)-quantile over the P calibration patients: hierarchical conformal
prediction as in Lee, Barber & Willett, "Distribution-free inference with hierarchical data"
(2023), the "CDF pooling" of Dunn, Wasserman & Ramdas (JASA 2023). The guarantee: for a new
patient exchangeable with the calibration patients, a randomly chosen image of theirs has its true
class in its set with probability at least 1 - alpha (coverage averaged over patients, not over
images, and not conditional on the class).

Calibration is per magnification (Mondrian conformal prediction, Vovk et al. 2003): images of
different magnifications are not exchangeable (a pooled quantile left new 100X patients of
breakhis-dev at 0.71 coverage where alpha 0.2 promised 0.80). A new image is judged by the
quantile of its own magnification's calibration images, so the guarantee holds per magnification;
an unknown magnification, or one with too few calibration patients for ``alpha``, gets the most
cautious quantile there is (pooled or per magnification), without a guarantee of its own.

A set is never empty: the predicted class is always in it, which can only raise coverage and
keeps the set and the shown label consistent. A patient is referred when at least
``conformal_metrics.PATIENT_REFER_FRACTION`` of its images are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from histolens.errors import ConfigError, check_choice
from histolens.stats.stored import read_stored

__all__ = [
    "DEFAULT_ALPHA",
    "SCORES",
    "ConformalCalibration",
    "NonconformityScore",
    "centred_probabilities",
    "check_alpha",
    "stratum_of",
]

DEFAULT_ALPHA = 0.1
_FORMAT_VERSION = 2  # 2: per-magnification strata


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


def centred_probabilities(probs: np.ndarray, threshold: float | np.ndarray | None) -> np.ndarray:
    """Calibrated probabilities moved so that the decision threshold sits at 0.5 (binary).

    ``p' = sigmoid(logit(p) - logit(threshold))``: the class of the larger p' is the thresholded
    label, so a set built on p' always agrees with the label shown. ``threshold`` is one for all
    rows or one per row (each image's magnification's). Multiclass: unchanged.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[-1] != 2 or threshold is None:
        return p
    eps = 1e-12
    pos = np.clip(p[..., 1], eps, 1 - eps)
    t = np.clip(np.asarray(threshold, dtype=np.float64), 1e-6, 1 - 1e-6)
    if t.ndim and pos.ndim > 1:  # (n, V) views of each row share the row's threshold
        t = t.reshape(-1, *([1] * (pos.ndim - 1)))
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


def stratum_of(magnification: Any) -> str:
    """The calibration stratum of an image: its magnification as text ("100"), "" when unknown."""
    if magnification is None:
        return ""
    try:
        value = float(str(magnification).strip().upper().rstrip("X"))
    except ValueError:
        return ""
    return str(int(value)) if np.isfinite(value) and value > 0 and value == int(value) else ""


def _strata(values: Sequence[Any] | np.ndarray | None, n: int) -> np.ndarray:
    """``values`` as stratum keys (n,), all unknown when None."""
    if values is None:
        return np.full(n, "", dtype=object)
    out = np.array([stratum_of(v) for v in values], dtype=object)
    if len(out) != n:
        raise ValueError(f"{n} images but {len(out)} magnifications.")
    return out


def _stratified_quantiles(
    scores: np.ndarray, codes: np.ndarray, strata: np.ndarray, alpha: float
) -> tuple[dict[str, float], float]:
    """Each known stratum's quantile, and the fallback: the most cautious finite one (pooled
    included), +inf when none is finite."""
    per = {
        s: _weighted_quantile(scores[strata == s], codes[strata == s], alpha)
        for s in sorted(set(strata.tolist()) - {""})
    }
    finite = [
        q for q in (*per.values(), _weighted_quantile(scores, codes, alpha)) if np.isfinite(q)
    ]
    return per, max(finite) if finite else float("inf")


def _image_quantiles(
    scores: np.ndarray,
    codes: np.ndarray,
    strata: np.ndarray | None,
    alpha: float,
    image_strata: np.ndarray,
) -> np.ndarray:
    """The quantile each new image is judged by (see the module docstring)."""
    if strata is None:
        return np.full(len(image_strata), _weighted_quantile(scores, codes, alpha))
    per, fallback = _stratified_quantiles(scores, codes, strata, alpha)
    q = [per.get(s, fallback) for s in image_strata]
    return np.array([v if np.isfinite(v) else fallback for v in q], dtype=np.float64)


def _sets_from_scores(
    class_scores: np.ndarray, q: float | np.ndarray, predicted: np.ndarray | None = None
) -> np.ndarray:
    """(n, C) membership: classes whose score is within the quantile (one, or one per image),
    plus the predicted class (by default the class of the lowest score)."""
    q = np.asarray(q, dtype=np.float64)
    member = class_scores <= (q[:, None] if q.ndim else q)
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
    # (n,) each calibration image's stratum (its magnification, "" when unknown); None: pooled
    # (a calibration stored before strata existed).
    strata: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_choice("nonconformity score", self.score, SCORES)
        check_alpha(self.alpha)
        if not len(self.scores) == len(self.labels) == len(self.patients):
            raise ValueError("scores, labels and patients must have one entry per image.")
        if self.strata is not None and len(self.strata) != len(self.scores):
            raise ValueError("strata must have one entry per image.")

    @classmethod
    def fit(
        cls,
        probs: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        patients: Sequence[Any] | np.ndarray,
        classes: Sequence[str],
        alpha: float = DEFAULT_ALPHA,
        score: str = "probability",
        magnifications: Sequence[Any] | np.ndarray | None = None,
    ) -> ConformalCalibration:
        """Calibrate on out-of-fold probabilities (n, C) or (n, V, C), centred for binary; with
        ``magnifications`` (one per image, None where unknown), per magnification."""
        check_choice("nonconformity score", score, SCORES)
        y = np.asarray(labels, dtype=np.int64)
        class_scores = SCORES[score](probs)
        if len(y) != len(class_scores):
            raise ValueError(f"{len(class_scores)} predictions but {len(y)} labels.")
        s = class_scores[np.arange(len(y)), y] if len(y) else np.zeros(0)
        strata = None if magnifications is None else _strata(magnifications, len(y))
        if strata is not None and not any(strata):
            strata = None  # no magnification known: one pooled calibration, said as such
        codes = _patient_codes(patients)
        return cls(s, y, codes, tuple(classes), check_alpha(alpha), score, strata)

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

    def stratum_quantiles(self, alpha: float | None = None) -> dict[str, float]:
        """Each magnification's score threshold at ``alpha`` (+inf: too few of its patients);
        empty for a pooled calibration."""
        if self.strata is None:
            return {}
        a = self.alpha if alpha is None else check_alpha(alpha)
        return _stratified_quantiles(self.scores, self.patients, self.strata, a)[0]

    def stratum_patients(self) -> dict[str, int]:
        """How many calibration patients each known magnification has."""
        if self.strata is None:
            return {}
        known = sorted(set(self.strata.tolist()) - {""})
        return {s: len(np.unique(self.patients[self.strata == s])) for s in known}

    def basis(self, magnification: Any, alpha: float | None = None) -> str:
        """What an image of ``magnification`` is judged by, as a clause for a reason (empty for a
        pooled calibration): its magnification's patients, or the most cautious threshold."""
        if self.strata is None:
            return ""
        key = stratum_of(magnification)
        q = self.stratum_quantiles(alpha).get(key, float("inf"))
        if np.isfinite(q):
            return f" (calibrated on {key}X images)"
        few = "too few" if self.stratum_patients().get(key, 0) else "no"
        why = f"{few} {key}X calibration patients" if key else "magnification unknown"
        return f" ({why}: the most cautious calibration)"

    def class_scores(self, probs: np.ndarray) -> np.ndarray:
        """Nonconformity (n, C) of every class for probabilities (n, C) or (n, V, C)."""
        return SCORES[self.score](probs)

    def prediction_sets(
        self,
        probs: np.ndarray,
        alpha: float | None = None,
        predicted: Sequence[int] | np.ndarray | None = None,
        magnifications: Sequence[Any] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Boolean membership (n, C): which classes each image's set holds.

        ``predicted`` (class indices) is always in the set; by default the least nonconforming
        class, which for centred probabilities is the label a threshold gives. Each image is
        judged by its magnification's quantile (``magnifications``, None where unknown: see the
        module docstring).
        """
        a = self.alpha if alpha is None else check_alpha(alpha)
        pred = None if predicted is None else np.asarray(predicted, dtype=np.int64)
        class_scores = self.class_scores(probs)
        image_strata = _strata(magnifications, len(class_scores))
        q = _image_quantiles(self.scores, self.patients, self.strata, a, image_strata)
        return _sets_from_scores(class_scores, q, pred)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for the checkpoint's metadata."""
        return {
            "format_version": _FORMAT_VERSION,
            "method": "split-conformal, patient-weighted (hierarchical) quantile"
            + (", per magnification (Mondrian)" if self.strata is not None else ""),
            "score": self.score,
            "alpha": self.alpha,
            "classes": list(self.classes),
            "n_images": int(len(self.scores)),
            "n_patients": self.n_patients,
            "scores": [round(float(s), 6) for s in self.scores],
            "labels": [int(v) for v in self.labels],
            "patients": [int(v) for v in self.patients],
            "strata": None if self.strata is None else [str(v) for v in self.strata],
            "stratum_patients": self.stratum_patients(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalCalibration:
        def read() -> ConformalCalibration:
            return cls(
                np.asarray(d["scores"], dtype=np.float64),
                np.asarray(d["labels"], dtype=np.int64),
                np.asarray(d["patients"], dtype=np.int64),
                tuple(d["classes"]),
                float(d.get("alpha", DEFAULT_ALPHA)),
                str(d.get("score", "probability")),
                None if d.get("strata") is None else np.array(d["strata"], dtype=object),
            )

        return read_stored(d, _FORMAT_VERSION, "The checkpoint's conformal calibration", read)
