"""``histolens calibrate``: choose a trained model's operating point again, without retraining.

The checkpoint keeps the held-out predictions its operating points were chosen on (out-of-fold
predictions of the linear probe's cross-validation, or the MLP head's validation patients). A
new rule (:mod:`histolens.stats.operating_points`) chooses the thresholds per magnification on them
again; the prediction sets are recalibrated on the same predictions centred on the new
thresholds, so that a set still always holds the label shown. An estimate made from
out-of-fold predictions is measured again at the new operating point, its thresholds
cross-fitted over patient folds (each fold decided by thresholds chosen on the other patients),
so that it stays a figure about patients the choice did not see. Everything is one atomic
rewrite of the checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from histolens.errors import CheckpointError, ConfigError
from histolens.evaluation.performance import stored_estimate
from histolens.evaluation.results import Estimate
from histolens.stats.decisions import OperatingPoints
from histolens.stats.operating_points import (
    OperatingPointRule,
    check_magnification_thresholds,
    parse_operating_point,
)

__all__ = ["Recalibration", "cross_fitted_thresholds", "recalibrate_checkpoint"]

# Patient folds the new estimate's thresholds are cross-fitted over (as training's default
# --cv-folds).
CROSS_FIT_FOLDS = 5
_CHOSEN_AGAIN = "; operating point "  # how an estimate's method names a later choice


@dataclass
class Recalibration:
    """What ``histolens calibrate`` changed: the checkpoint, the old and new operating points,
    and the new estimate (None when the stored one could not be measured again)."""

    checkpoint: Path
    before: OperatingPoints
    after: OperatingPoints
    estimate: Estimate | None
    notes: list[str]


def cross_fitted_thresholds(
    ops: OperatingPoints,
    rule: OperatingPointRule,
    n_folds: int = CROSS_FIT_FOLDS,
    seed: int = 0,
    method: str | None = None,
) -> np.ndarray:
    """Each stored prediction's threshold chosen by ``rule`` (and ``method``; None: ``ops``'s)
    on the other patient folds' ones."""
    from histolens.training.probe import group_folds

    y, codes = ops.y, ops.patient_codes
    thresholds = np.full(len(y), ops.pooled)
    for tr, te in group_folds(y, codes, n_folds, seed):
        fold = OperatingPoints.fit(
            rule,
            y[tr],
            ops.p[tr],
            codes[tr],
            ops.strata[tr],
            keep_predictions=False,
            method=method or ops.method,
        )
        thresholds[te] = fold.thresholds_for(ops.strata[te])
    return thresholds


def _stored_predictions(path: Path, meta) -> OperatingPoints:
    if not meta.is_binary:
        raise ConfigError(
            f"{path} has {len(meta.class_names)} classes; operating points are thresholds of a "
            "two-class model."
        )
    ops = meta.decision
    if ops is None or not ops.has_predictions:
        raise CheckpointError(
            f"{path} stores no out-of-fold predictions to choose an operating point on (it was "
            "trained by an older histolens); retrain it with --operating-point instead."
        )
    return ops


def _estimate_again(
    meta, old: Estimate, ops: OperatingPoints, decision: OperatingPoints, alpha: float
) -> Estimate:
    """The stored estimate measured again from the stored out-of-fold predictions (``ops``, as
    the checkpoint holds them) at the new ``decision`` (its rule and way, chosen on them)."""
    from histolens.evaluation.estimate import build_estimate
    from histolens.evaluation.metrics import EvalResult, PredictionRow, with_referrals
    from histolens.stats.conformal import centred_probabilities
    from histolens.stats.conformal_metrics import leave_one_patient_out_sets

    classes = meta.class_names
    rule = decision.rule
    thresholds = cross_fitted_thresholds(
        ops, rule, seed=int(meta.run_config.data.seed), method=decision.method
    )
    centred = centred_probabilities(np.stack([1 - ops.p, ops.p], axis=1), thresholds)
    rows = [
        PredictionRow(
            f"out-of-fold image {i}",
            f"patient {int(code)}",
            int(s) if s else None,
            classes[int(t)],
            int(t),
            tuple(map(float, c)),
            tuple(map(float, c)),
            rank_score=float(p),  # ranked by the stored probabilities, not the centred ones
        )
        for i, (code, s, t, c, p) in enumerate(
            zip(ops.patient_codes, ops.strata, ops.y, centred, ops.p, strict=True)
        )
    ]
    ev = EvalResult(rows, classes, meta.task, 0.5, 1.0)
    member = leave_one_patient_out_sets(
        centred, ops.y, ops.patient_codes, alpha, "probability", [s or None for s in ops.strata]
    )
    # A model calibrated before says so once: the latest choice replaces the earlier one.
    measured = old.method.split(_CHOSEN_AGAIN, 1)[0]
    method = (
        f"{measured}{_CHOSEN_AGAIN}{rule} chosen again by histolens calibrate, its "
        f"thresholds cross-fitted over {CROSS_FIT_FOLDS} patient folds"
    )
    with_referrals(
        ev, member, None, alpha, "leave-one-patient-out over the out-of-fold predictions"
    )
    return build_estimate(ev, method, old.description, seed=0, decision=decision)


def recalibrate_checkpoint(
    checkpoint: str | os.PathLike,
    operating_point: str | OperatingPointRule,
    magnification_thresholds: str | None = None,
) -> Recalibration:
    """Rewrite ``checkpoint``'s decision at ``operating_point`` (one atomic write), its
    magnifications' thresholds chosen ``magnification_thresholds``' way (``shared`` or
    ``separate``; None: as the checkpoint chose them)."""
    from histolens.checkpoint.io import read_metadata, resolve_checkpoint_path, update_metadata
    from histolens.stats.conformal import DEFAULT_ALPHA, ConformalCalibration, centred_probabilities

    rule = parse_operating_point(operating_point)
    if magnification_thresholds is not None:
        check_magnification_thresholds(magnification_thresholds)
    path = resolve_checkpoint_path(checkpoint)
    if path.suffix.lower() == ".onnx":
        raise ConfigError(
            f"{path} is an ONNX export; calibrate the checkpoint it came from, then export again."
        )
    meta = read_metadata(path)
    before = _stored_predictions(path, meta)
    method = magnification_thresholds or before.method
    after = before.refit(rule, method)
    notes = after.notes()
    changes: dict[str, Any] = {
        "threshold": after.pooled,
        "threshold_method": str(rule),
        "operating_points": after.to_dict(),
    }
    config = dict(meta.config)
    if config:
        config["train"] = {
            **config.get("train", {}),
            "operating_point": str(rule),
            "magnification_thresholds": method,
        }
        changes["config"] = config
    alpha = DEFAULT_ALPHA
    if meta.conformal is not None:
        old = ConformalCalibration.from_dict(meta.conformal)
        alpha = old.alpha
        probs = np.stack([1 - after.p, after.p], axis=1)
        centred = centred_probabilities(probs, after.thresholds_for(after.strata))
        mags = None if old.strata is None else after.strata
        new = ConformalCalibration.fit(
            centred, after.y, after.patient_codes, meta.class_names, alpha, old.score, mags
        )
        changes["conformal"] = new.to_dict()
    estimate, stored = None, stored_estimate(meta)
    if stored is not None and "cross-validation" in stored.method:
        estimate = _estimate_again(meta, stored, before, after, alpha)
        changes["estimate"] = estimate.to_dict()
    elif stored is not None:
        stale = (
            f"This estimate was measured at the operating point the model was trained with; "
            f"its decision is now {rule}, thresholds per magnification {method} (histolens "
            "calibrate). Evaluate it on held-out "
            "patients again (histolens evaluate)."
        )
        changes["estimate"] = replace(stored, warnings=[*stored.warnings, stale]).to_dict()
        notes.append(stale)
    update_metadata(path, **changes)
    return Recalibration(path, before, after, estimate, notes)
