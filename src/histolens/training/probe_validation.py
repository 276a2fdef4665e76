"""How the linear probe of ``histolens train`` is scored on patients it did not train on.

Either a held-out test split of patients, or patient-level k-fold cross-validation whose folds
each choose their own regularisation, temperature and threshold by inner cross-validation; and
the probe's referral on those held-out patients. The temperature, threshold, prediction sets
and feature guard are fitted by :mod:`histolens.evaluation.referral`, as the MLP head's are.
Steps of :mod:`histolens.training.probe_run`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from histolens.config import RunConfig
from histolens.data.records import ImageRecord
from histolens.data.splits import Split
from histolens.errors import DataError
from histolens.evaluation.referral import (
    Referral,
    centred_calibration,
    fit_calibration,
    fit_held_out_referral,
)
from histolens.training.probe import ProbeFit, fit_linear_probe, group_folds

if TYPE_CHECKING:
    from histolens.stats.decisions import OperatingPoints

log = logging.getLogger("histolens")


def _fit(cfg: RunConfig, x, y, g, n_classes: int, seed: int) -> ProbeFit:
    """The probe on these images, C chosen from ``cfg``'s candidates by 5-fold inner CV."""
    return fit_linear_probe(
        x, y, g, n_classes, cfg.train.probe_cs, 5, seed, cfg.train.probe_weighting
    )


@dataclass
class _HeldOut:
    """The evaluated images' held-out logits, and the logits temperature and threshold are fitted on.

    ``fold_temperature`` (n, 1) is each image's fold temperature under cross-validation, whose
    ``logits`` are the folds' decision logits (see :func:`_cross_validated_logits`); it is None
    for a held-out test split, whose ``logits`` are the shipped probe's.
    """

    records: list[ImageRecord]
    logits: np.ndarray
    calib_logits: np.ndarray
    calib_y: np.ndarray
    method: str  # how the evaluated images were held out, in words
    n_folds: int  # 0 for a held-out test split
    fold_temperature: np.ndarray | None = None


def _held_out_logits(
    cfg: RunConfig,
    final: ProbeFit,
    split: Split,
    x: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    n_classes: int,
    x_test: np.ndarray | None,
    progress: bool,
) -> _HeldOut:
    """The held-out test patients scored by ``final``, or else every training image out-of-fold.

    ``x``, ``y``, ``g`` are the features, targets and groups of ``split.train + split.val``;
    ``x_test`` the features of ``split.test`` (None when it is empty).
    """
    if split.test:
        eval_logits = final.logits(x_test)
        return _HeldOut(
            split.test,
            eval_logits,
            final.oof_logits if final.oof_logits is not None else eval_logits[:0],
            y if final.oof_logits is not None else y[:0],
            "a held-out test split of patients",
            0,
        )
    if not cfg.train.cv_folds:
        raise DataError(
            "--cv-folds 0 needs held-out test patients, and the split left none: raise "
            "--test-fraction, add patients, or use cross-validation (--cv-folds 5)."
        )
    mags = [r.magnification for r in split.train + split.val]
    oof, decision, n_folds, fold_t = _cross_validated_logits(
        cfg, x, y, g, n_classes, progress, mags
    )
    unit = "patient-level" if split.patient_level else "image-level (no patient ids)"
    chosen = "C, threshold" if len(cfg.train.probe_cs) > 1 else "threshold"
    method = (
        f"{n_folds}-fold {unit} cross-validation (out-of-fold predictions; {chosen} "
        "and temperature chosen inside each fold)"
    )
    return _HeldOut(split.train + split.val, decision, oof, y, method, n_folds, fold_t)


def _cross_validated_logits(
    cfg: RunConfig,
    x: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    n_classes: int,
    progress: bool,
    magnifications: Sequence[int | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Out-of-fold logits of every image from patient-level k-fold (nested C selection).

    Returns the raw logits and the fold's decision logits: for two classes, shifted so that 0 is
    the fold's own decision boundary (temperature and operating point per magnification chosen
    on the fold's inner out-of-fold predictions, ``magnifications`` one per row of ``x``).
    Scoring those at 0.5 never lets a held-out patient choose its own threshold; they stay on
    the raw scale, since folds calibrated by different temperatures would pool on different
    scales and understate the AUC of one model. Last, each image's fold temperature (n, 1):
    decision / temperature is what the fold's model would call calibrated.
    """
    from scipy.special import logit

    for cls in np.unique(y):
        if len(np.unique(g[y == cls])) < 2:
            raise DataError(
                f"Cross-validation needs at least 2 patient groups of every class; class index "
                f"{cls} has 1. Add patients, or train with --cv-folds 0 and a held-out split."
            )
    folds = group_folds(y, g, cfg.train.cv_folds, cfg.data.seed)
    n_out = 1 if n_classes == 2 else n_classes
    oof = np.full((len(y), n_out), np.nan)
    decision = np.full((len(y), n_out), np.nan)
    fold_temperature = np.ones((len(y), 1))
    for k, (tr, te) in enumerate(folds):
        if len(np.unique(y[tr])) < 2:
            continue
        fit = _fit(cfg, x[tr], y[tr], g[tr], n_classes, cfg.data.seed + k)
        oof[te] = fit.logits(x[te])
        inner = fit.oof_logits if fit.oof_logits is not None else oof[te][:0]
        t_k, thr_k = fit_calibration(cfg, inner, y[tr] if len(inner) else y[:0], n_classes)
        decision[te] = oof[te]
        fold_temperature[te] = t_k
        if n_classes == 2:  # the fold's boundary p = thr_k, with p = sigmoid(z / t_k)
            thr_te = np.full(len(te), thr_k)
            if magnifications is not None and len(inner):
                # Each held-out image at its magnification's threshold, as the fold chose it.
                mags = np.array(list(magnifications), dtype=object)
                ops = _operating_points(cfg, inner, y[tr], g[tr], mags[tr], t_k)
                thr_te = ops.thresholds_for(mags[te])
            decision[te] -= t_k * logit(np.clip(thr_te, 1e-6, 1 - 1e-6))[:, None]
        if progress:
            log.info(
                "fold %d/%d: %d held-out images of %d patients, C=%g",
                k + 1,
                len(folds),
                len(te),
                len(np.unique(g[te])),
                fit.C,
            )
    return oof, decision, len(folds), fold_temperature


def _operating_points(
    cfg: RunConfig,
    logits: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    magnifications: Sequence[int | None],
    temperature: float,
) -> OperatingPoints:
    """The operating points per magnification (``cfg``'s rule) chosen on held-out ``logits``
    (two classes) at ``temperature``; rows with NaN logits are left out."""
    from histolens.stats.decisions import fit_on_logits
    from histolens.stats.operating_points import rule_from_train_config

    ok = ~np.isnan(logits).any(1)
    mags = np.array(list(magnifications), dtype=object)[: len(logits)]
    rule = rule_from_train_config(cfg.train)
    return fit_on_logits(
        rule,
        logits[ok],
        y[ok],
        g[: len(logits)][ok],
        mags[ok],
        temperature,
        cfg.train.magnification_thresholds,
    )


def _referral(
    cfg: RunConfig,
    held: _HeldOut,
    calibration: tuple[float, float],
    x: np.ndarray,
    y: np.ndarray,
    g: np.ndarray,
    classes: Sequence[str],
    notes: list[str],
    magnifications: Sequence[int | None],
    operating_points: OperatingPoints | None = None,
) -> Referral:
    """The probe's referral (``histolens.evaluation.referral``, as the MLP head's), fitted on
    its held-out patients: prediction sets (per magnification: ``magnifications`` of the rows
    of ``x``) on the out-of-fold predictions, each fold's calibrated at its own temperature and
    centred on its own thresholds (or on a test split's training patients' inner out-of-fold
    ones), and the feature guard with its limit from patient-level folds."""
    from histolens.inference.predictor import probabilities_from_logits

    n = len(held.calib_y)
    if held.n_folds:  # each fold's decision logits over its temperature: its calibrated, centred p
        calib_p = probabilities_from_logits(
            torch.as_tensor(held.logits / held.fold_temperature), 1.0
        ).numpy()
    else:
        calib_p = centred_calibration(
            held.calib_logits, calibration, len(classes), operating_points, magnifications
        )
    try:
        guard_folds = group_folds(y, g, cfg.train.cv_folds or 5, cfg.data.seed)
    except DataError:  # one patient group: no held-out patients to set a limit on
        guard_folds = []
    return fit_held_out_referral(
        calib_p,
        held.calib_y,
        classes,
        cfg.train.alpha,
        notes,
        (x, guard_folds),
        g[:n],
        list(magnifications)[:n],
    )
