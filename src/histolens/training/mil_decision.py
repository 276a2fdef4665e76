"""The honest outputs of a MIL run, fitted on out-of-fold slide predictions.

As the tile workflow does (:mod:`histolens.training.probe_validation`), the shipped MIL model's
temperature (:func:`histolens.stats.calibration.fit_temperature`), operating point
(:class:`histolens.stats.decisions.OperatingPoints`, the ``--operating-point`` rule) and
prediction sets (:class:`histolens.stats.conformal.ConformalCalibration`, patient-weighted) are
fitted on the out-of-fold slide logits of patient-level cross-validation: every slide scored by
a model that did not see its patient.

The estimate is measured on the same out-of-fold predictions, cross-fitted: each fold's slides
are calibrated and decided by a temperature and threshold fitted on the other folds' slides, and
get prediction sets calibrated on the other patients (leave one patient out), so no figure is of
a slide whose patient chose its own decision. Slides are the rows of the evaluation
(:class:`histolens.evaluation.metrics.PredictionRow`, magnification unknown), so the metrics,
CIs over patients, estimate, evaluation files and report are the tile workflow's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from histolens.errors import CheckpointError
from histolens.stats.conformal import ConformalCalibration, centred_probabilities
from histolens.stats.decisions import OperatingPoints
from histolens.stats.operating_points import OperatingPointRule

__all__ = ["MilDecision", "SlideCall", "cross_fitted_evaluation", "fit_mil_decision"]

_LOPO = (
    "leave-one-patient-out over the out-of-fold slide predictions (each patient's sets "
    "calibrated on the other patients)"
)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def _temperature(logits: np.ndarray, y: np.ndarray) -> float:
    import torch

    from histolens.stats.calibration import fit_temperature

    z = torch.as_tensor(np.asarray(logits, np.float32).reshape(-1, 1))
    return fit_temperature(z, torch.as_tensor(np.asarray(y, np.int64)))


@dataclass(frozen=True)
class SlideCall:
    """One slide's answer: class, calibrated probability of the positive class, prediction set."""

    label: str
    probability: float
    prediction_set: tuple[str, ...]

    @property
    def refer(self) -> bool:
        """A set of both classes: a person should decide."""
        return len(self.prediction_set) > 1


@dataclass(frozen=True)
class MilDecision:
    """Temperature, operating point and prediction-set calibration of a MIL checkpoint."""

    temperature: float
    operating_points: OperatingPoints
    conformal: ConformalCalibration | None
    classes: tuple[str, str]

    @property
    def threshold(self) -> float:
        return float(self.operating_points.pooled)

    @property
    def alpha(self) -> float | None:
        return None if self.conformal is None else float(self.conformal.alpha)

    def probabilities(self, logits: Sequence[float] | np.ndarray) -> np.ndarray:
        """Calibrated positive-class probabilities of slide logits."""
        return _sigmoid(np.asarray(logits, np.float64) / self.temperature)

    def decide(
        self, logits: Sequence[float] | np.ndarray, alpha: float | None = None
    ) -> list[SlideCall]:
        """Each slide's class at the operating point and its prediction set at ``alpha``."""
        p = self.probabilities(logits)
        predicted = (p >= self.threshold).astype(np.int64)
        if self.conformal is None:
            member = np.eye(2, dtype=bool)[predicted]
        else:
            centred = centred_probabilities(np.stack([1 - p, p], axis=1), self.threshold)
            member = self.conformal.prediction_sets(centred, alpha, predicted)
        return [
            SlideCall(
                self.classes[k],
                float(q),
                tuple(c for c, m in zip(self.classes, row, strict=True) if m),
            )
            for k, q, row in zip(predicted, p, member, strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": float(self.temperature),
            "threshold": self.threshold,
            "operating_points": self.operating_points.to_dict(),
            "conformal": None if self.conformal is None else self.conformal.to_dict(),
            "classes": list(self.classes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> MilDecision:
        """Read back ``to_dict``; one sentence when the checkpoint has none (version 1)."""
        if not d:
            raise CheckpointError(
                "This MIL checkpoint has no calibration or operating point (it was trained by "
                "an older histolens); train it again with 'histolens train --slides'."
            )
        conformal = d.get("conformal")
        return cls(
            float(d["temperature"]),
            OperatingPoints.from_dict(d["operating_points"]),
            None if conformal is None else ConformalCalibration.from_dict(conformal),
            (str(d["classes"][0]), str(d["classes"][1])),
        )


def fit_mil_decision(
    logits: np.ndarray,
    targets: np.ndarray,
    patients: Sequence[str],
    classes: tuple[str, str],
    rule: OperatingPointRule | str,
    alpha: float,
    notes: list[str],
) -> MilDecision:
    """Temperature, operating point and prediction sets fitted on out-of-fold slide logits."""
    from histolens.evaluation.referral import fit_prediction_sets
    from histolens.stats.decisions import fit_on_logits

    y = np.asarray(targets, np.int64)
    z = np.asarray(logits, np.float64)
    temperature = _temperature(z, y)
    # Slides have no magnification: one pooled threshold ("separate" records that no
    # magnifications shared a choice).
    ops = fit_on_logits(rule, z.reshape(-1, 1), y, list(patients), None, temperature, "separate")
    p = _sigmoid(z / temperature)
    centred = centred_probabilities(np.stack([1 - p, p], axis=1), ops.pooled)
    groups = np.asarray(patients)
    conformal = fit_prediction_sets(centred, y, groups, classes, alpha, notes, [None] * len(y))
    return MilDecision(temperature, ops, conformal, classes)


def _cross_fitted_probabilities(
    logits: np.ndarray, y: np.ndarray, patients: np.ndarray, fold: np.ndarray, rule
) -> tuple[np.ndarray, np.ndarray]:
    """Each slide's calibrated probability and threshold from the other folds' slides."""
    p, thresholds = np.zeros(len(y)), np.zeros(len(y))
    for k in np.unique(fold):
        mine, others = fold == k, fold != k
        t = _temperature(logits[others], y[others])
        q = _sigmoid(logits[others] / t)
        ops = OperatingPoints.fit(
            rule, y[others], q, patients[others], None, False, method="separate"
        )
        p[mine], thresholds[mine] = _sigmoid(logits[mine] / t), ops.pooled
    return p, thresholds


def cross_fitted_evaluation(
    cv,
    slides: Sequence[str],
    classes: tuple[str, str],
    decision: MilDecision,
    rule: OperatingPointRule | str,
    description: str,
    seed: int = 0,
    n_boot: int = 1000,
):
    """(EvalResult with metrics, estimate) of the out-of-fold slides of ``cv``
    (:class:`histolens.training.mil_cv.MilCrossValidation`), cross-fitted as the module says."""
    from histolens.evaluation.estimate import build_estimate
    from histolens.evaluation.metrics import (
        EvalResult,
        PredictionRow,
        compute_metrics,
        with_referrals,
    )
    from histolens.stats.conformal_metrics import leave_one_patient_out_sets

    y = np.asarray(cv.targets, np.int64)
    patients = np.asarray(cv.patients)
    p, thresholds = _cross_fitted_probabilities(cv.logits, y, patients, cv.fold, rule)
    centred = centred_probabilities(np.stack([1 - p, p], axis=1), thresholds)
    raw = _sigmoid(cv.logits)
    rows = [
        PredictionRow(
            str(s), str(g), None, classes[t], int(t), tuple(map(float, c)), (1 - float(r), float(r))
        )
        for s, g, t, c, r in zip(slides, patients, y, centred, raw, strict=True)
    ]
    ev = EvalResult(rows, classes, "binary", 0.5, 1.0)
    alpha = decision.alpha
    if alpha is not None:
        member = leave_one_patient_out_sets(centred, y, patients, alpha, "probability")
        with_referrals(ev, member, None, alpha, _LOPO)
    ev.metrics = dataclasses.replace(
        compute_metrics(ev, n_boot=n_boot, seed=seed), split="out-of-fold"
    )
    folds = len(np.unique(cv.fold))
    method = (
        f"{folds}-fold patient-level cross-validation of attention MIL (out-of-fold slide "
        "predictions; each fold's temperature and threshold fitted on the other folds)"
    )
    estimate = build_estimate(
        ev, method, description, n_boot, seed, decision=decision.operating_points,
        metrics=ev.metrics,
    )  # fmt: skip
    return ev, estimate.to_dict()  # the stored JSON: the MIL checkpoint's metadata carries it
