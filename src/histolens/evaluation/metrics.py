"""Prediction rows and the metrics computed from them, with patient-level CIs.

Every prediction travels as a :class:`PredictionRow` with its path, patient and label; the
metrics (:func:`compute_metrics`, the referral figures of :func:`refer_metrics`) are computed
from those rows only, so predictions and labels cannot misalign. Pure: no model, no files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from histolens.data.records import ImageRecord, target_of
from histolens.errors import DataError
from histolens.evaluation.metric_blocks import (
    binary_block,
    magnification_block,
    multiclass_block,
    ranking_figures,
)
from histolens.evaluation.results import (
    ImageMetrics,
    Metrics,
    ReferMetrics,
    RiskCoverage,
)
from histolens.inference.predictor import probabilities_from_logits
from histolens.stats.decisions import OperatingPoints
from histolens.stats.metrics import (
    binary_metrics,
)

__all__ = [
    "EvalResult",
    "PredictionRow",
    "compute_metrics",
    "rank_scores",
    "refer_metrics",
    "rows_from_logits",
    "with_referrals",
]


@dataclass(frozen=True)
class PredictionRow:
    """One image's prediction with everything that identifies it."""

    path: str
    patient: str
    magnification: int | None
    label: str
    target: int
    probs: tuple[float, ...]
    probs_uncalibrated: tuple[float, ...]
    # Knowing when not to answer (histolens.stats.conformal, histolens.inference.ood): the classes not ruled out
    # (empty: no calibration), whether a person should decide, and whether the image is unlike
    # the training images, with the reason.
    prediction_set: tuple[str, ...] = ()
    refer: bool = False
    ood: bool = False
    ood_reason: str = ""
    # Binary: the positive-class score the image is ranked by in AUCs, when ``probs`` were moved
    # by a threshold that differs between rows (out-of-fold rows, each centred on its fold's
    # threshold per magnification): ranking must see the models' own scores, not the shifts.
    # None: ``probs[1]``.
    rank_score: float | None = None

    def score(self) -> float:
        """Positive-class probability (binary) or the top probability."""
        return self.probs[1] if len(self.probs) == 2 else max(self.probs)


@dataclass
class EvalResult:
    rows: list[PredictionRow]
    classes: tuple[str, ...]
    task: str
    threshold: float
    temperature: float
    metrics: Metrics | None = None
    # The error level of the rows' prediction sets and how they were calibrated (None: no sets).
    alpha: float | None = None
    refer_method: str = ""
    # The threshold per magnification (histolens.stats.decisions); None: ``threshold`` for all.
    operating_points: OperatingPoints | None = None

    def threshold_of(self, row: PredictionRow) -> float:
        """The threshold ``row`` is decided at: its magnification's, else ``threshold``."""
        if self.operating_points is None:
            return self.threshold
        return self.operating_points.threshold_for(row.magnification)

    def thresholds(self, rows: Sequence[PredictionRow] | None = None) -> np.ndarray:
        """``threshold_of`` each of ``rows`` (default: all rows)."""
        rows = self.rows if rows is None else rows
        return np.array([self.threshold_of(r) for r in rows], dtype=np.float64)

    def predicted(self, row: PredictionRow) -> int:
        if len(self.classes) == 2:
            return int(row.probs[1] >= self.threshold_of(row))
        return int(np.argmax(row.probs))


def rows_from_logits(
    records: Sequence[ImageRecord],
    logits: torch.Tensor,
    classes: Sequence[str],
    task: str,
    temperature: float,
) -> list[PredictionRow]:
    """Pair each record with its own logits; raises if the counts differ."""
    if len(records) != len(logits):
        raise ValueError(f"{len(records)} records but {len(logits)} logits.")
    index = {c: i for i, c in enumerate(classes)}
    calibrated = probabilities_from_logits(logits, temperature).numpy()
    raw = probabilities_from_logits(logits, 1.0).numpy()
    rows = []
    for r, pc, pr in zip(records, calibrated, raw, strict=True):
        label = target_of(r, task)
        if label not in index:
            raise DataError(
                f"{r.path} is labelled '{label}', which the model does not know "
                f"(classes: {', '.join(classes)}); is this checkpoint for another task?"
            )
        rows.append(
            PredictionRow(
                r.path,
                r.group or r.patient or r.path,
                r.magnification,
                label,
                index[label],
                tuple(map(float, pc)),
                tuple(map(float, pr)),
            )
        )
    return rows


def with_referrals(
    result: EvalResult,
    member: np.ndarray | None,
    ood_reasons: Sequence[str | None] | None,
    alpha: float | None,
    method: str,
) -> EvalResult:
    """Give each row its prediction set (``member``: (n, C) booleans) and out-of-distribution
    reason; an image is referred when its set holds several classes or it is out of distribution."""
    rows = []
    for i, r in enumerate(result.rows):
        s = (
            tuple(c for c, m in zip(result.classes, member[i], strict=True) if m)
            if member is not None
            else ()
        )
        reason = (ood_reasons[i] if ood_reasons is not None else None) or ""
        rows.append(
            replace(
                r,
                prediction_set=s,
                refer=len(s) > 1 or bool(reason),
                ood=bool(reason),
                ood_reason=reason,
            )
        )
    result.rows = rows
    result.alpha = alpha if member is not None else None
    result.refer_method = method
    return result


def refer_metrics(result: EvalResult) -> ReferMetrics | None:
    """Coverage of the prediction sets, referrals of images and patients, and the images unlike
    the training images (counted apart: the coverage and accuracy figures leave them out)."""
    rows = result.rows
    n_ood = sum(r.ood for r in rows)
    if result.alpha is None and not n_ood:
        return None
    reasons: dict[str, int] = {}
    for r in rows:
        if r.ood:
            kind = r.ood_reason.split(" (")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
    ind = [r for r in rows if not r.ood]
    y = np.array([r.target for r in ind], dtype=int)
    pred = np.array([result.predicted(r) for r in ind], dtype=int)
    figures: dict[str, Any] = _risk_coverage_figures(result, ind, y, pred)
    if result.alpha is not None and ind:
        figures.update(_prediction_set_figures(result, ind, y, pred))
    figures.update(_patient_referral_figures(result))
    return ReferMetrics(
        n_ood=n_ood, ood_rate=n_ood / len(rows) if rows else 0.0, ood_reasons=reasons, **figures
    )


def _risk_coverage_figures(
    result: EvalResult, ind: list[PredictionRow], y: np.ndarray, pred: np.ndarray
) -> dict[str, Any]:
    """AURC and the risk-coverage curve of the in-distribution rows ``ind``, least confident
    referred first (confidence: the predicted class's threshold-centred probability)."""
    from histolens.stats.conformal import centred_probabilities
    from histolens.stats.conformal_metrics import risk_coverage as rc_curve

    probs = np.array([r.probs for r in ind]).reshape(len(ind), len(result.classes))
    thr = result.thresholds(ind) if len(result.classes) == 2 else None
    confidence = centred_probabilities(probs, thr)[np.arange(len(ind)), pred] if len(ind) else pred
    curve = rc_curve(pred == y, confidence)
    return dict(
        aurc=curve["aurc"],
        curve=RiskCoverage(
            referred=[round(float(v), 4) for v in curve["referred"]],
            accuracy=[round(float(v), 4) for v in curve["accuracy"]],
        ),
    )


def _prediction_set_figures(
    result: EvalResult, ind: list[PredictionRow], y: np.ndarray, pred: np.ndarray
) -> dict[str, Any]:
    """Coverage (over patients and images), set size, referral rate and the accuracy of the
    kept and referred images, of the in-distribution rows ``ind`` (not empty)."""
    from histolens.stats.conformal_metrics import coverage

    index = {c: i for i, c in enumerate(result.classes)}
    member = np.zeros((len(ind), len(result.classes)), dtype=bool)
    for i, r in enumerate(ind):
        member[i, [index[c] for c in r.prediction_set]] = True
    refer = np.array([r.refer for r in ind])
    cov = coverage(member, y, np.array([r.patient for r in ind]))
    kept = ~refer
    return dict(
        alpha=result.alpha,
        method=result.refer_method,
        target_coverage=1 - result.alpha,
        coverage=cov["patients"],
        coverage_images=cov["images"],
        mean_set_size=float(member.sum(1).mean()),
        refer_rate=float(refer.mean()),
        accuracy_kept=float((pred == y)[kept].mean()) if kept.any() else float("nan"),
        accuracy_referred=float((pred == y)[refer].mean()) if refer.any() else float("nan"),
    )


def _patient_referral_figures(result: EvalResult) -> dict[str, Any]:
    """The patients referred (half or more of their images referred) and the accuracy of the
    others, each called by the majority of its kept images."""
    from histolens.stats.conformal_metrics import patient_referrals

    rows = result.rows
    decided = patient_referrals([r.refer for r in rows], np.array([r.patient for r in rows]))
    correct = []
    for p, referred in decided.items():
        if referred:
            continue
        mine = [r for r in rows if r.patient == p and not r.refer]
        votes = np.bincount([result.predicted(r) for r in mine], minlength=len(result.classes))
        truth = np.bincount([r.target for r in mine], minlength=len(result.classes)).argmax()
        correct.append(bool(votes.argmax() == truth))
    return dict(
        n_patients=len(decided),
        patients_referred=sorted(p for p, v in decided.items() if v),
        patient_accuracy_kept=float(np.mean(correct)) if correct else float("nan"),
    )


def rank_scores(rows: Sequence[PredictionRow]) -> np.ndarray:
    """Each binary row's ``rank_score`` (``probs[1]`` where it has none): what AUCs rank."""
    return np.array(
        [r.probs[1] if r.rank_score is None else r.rank_score for r in rows], dtype=np.float64
    )


def compute_metrics(result: EvalResult, n_boot: int = 1000, seed: int = 0) -> Metrics:
    """Image- and patient-level metrics of ``result`` with bootstrap CIs over patients."""
    rows = result.rows
    if not rows:
        raise DataError("Nothing to evaluate: no readable images in this split.")
    y = np.array([r.target for r in rows])
    patients = np.array([r.patient for r in rows])
    probs = np.array([r.probs for r in rows])
    if len(result.classes) != 2:
        image = multiclass_block(y, probs, patients, result.classes, n_boot, seed)
        at_05 = uncalibrated = per_magnification = None
    else:
        p = probs[:, 1]
        rank = rank_scores(rows)
        thr = result.thresholds()
        image = binary_block(y, p, patients, thr, n_boot, seed, rank=rank)
        # No threshold in a ranking: the AUCs at 0.5 are the image block's.
        at_05 = ImageMetrics(**{**binary_metrics(y, p, 0.5), **ranking_figures(y, rank)})
        p_raw = np.array([r.probs_uncalibrated[1] for r in rows])
        raw = ImageMetrics(**binary_metrics(y, p_raw, 0.5))
        uncalibrated = ImageMetrics(brier=raw.brier, ece=raw.ece)
        per_magnification = None
        mags = sorted({r.magnification for r in rows if r.magnification})
        if len(mags) > 1:
            # Each magnification with its own CIs over its patients and its referral rate: a
            # pooled figure hides a magnification whose decision sits elsewhere (issue 26).
            per_magnification = {
                f"{m}X": magnification_block(
                    result,
                    rows,
                    y,
                    p,
                    patients,
                    thr,
                    np.array([r.magnification == m for r in rows]),
                    n_boot,
                    seed,
                    rank,
                )
                for m in mags
            }
    ops = result.operating_points
    return Metrics(
        n_images=len(rows),
        n_patients=int(len(np.unique(patients))),
        threshold=result.threshold,
        temperature=result.temperature,
        operating_point=None if ops is None else str(ops.rule),
        image=image,
        image_at_05=at_05,
        uncalibrated=uncalibrated,
        per_magnification=per_magnification,
        refer=refer_metrics(result),
    )
