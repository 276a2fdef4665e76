"""The calibration after training, and knowing when not to answer: one path for both heads.

Both heads calibrate on held-out patients' logits through the functions here: the temperature
and threshold (:func:`fit_calibration`), the centred probabilities the prediction sets are fitted
on (:func:`centred_calibration`), and the prediction sets with the feature guard
(:func:`fit_held_out_referral`, giving a :class:`Referral`), so both store the same records in
the checkpoint. The one real difference is which patients are held out, and so where the
logits come from:

- the MLP head (Lightning, :func:`histolens.evaluation.evaluate.finalize_run`) trains once, so
  its held-out patients are its validation split (:func:`fit_referral`: one fold, training ->
  validation, for the guard's limit);
- the linear probe (``histolens.training.probe_validation``) is cheap to refit, so every
  training patient is held out once by patient-level k-fold; its prediction sets are fitted on
  each fold's own calibrated, centred probabilities (each fold has its temperature and
  threshold), and its guard's limit on k folds.

Features come from the frozen backbone's feature cache when it holds them, else from the
model in batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from histolens.data.records import ImageRecord
from histolens.data.splits import targets
from histolens.evaluation.metrics import EvalResult, with_referrals
from histolens.inference.ood import OODGuard, image_size
from histolens.inference.predictor import Predictor, probabilities_from_logits
from histolens.stats.conformal import ConformalCalibration, centred_probabilities

if TYPE_CHECKING:
    from histolens.config import RunConfig
    from histolens.inference.ood import FeatureGuard
    from histolens.models.feature_cache import FeatureCache
    from histolens.models.pipeline import ImageSource
    from histolens.stats.decisions import OperatingPoints

__all__ = [
    "Referral",
    "Scored",
    "add_referrals",
    "centred_calibration",
    "fit_calibration",
    "fit_feature_guard",
    "fit_held_out_referral",
    "fit_prediction_sets",
    "fit_referral",
    "row_prediction_sets",
    "score_records",
    "store_referral",
]


@dataclass
class Scored:
    """Records with their raw logits, pooled backbone features and (when a guard was given)
    why each is unlike the training images (None: it is not)."""

    records: list[ImageRecord]
    logits: torch.Tensor
    features: np.ndarray  # (n, feature_dim), float64
    reasons: list[str | None] | None = None


def score_records(
    predictor: Predictor,
    records: Sequence[ImageRecord],
    images: ImageSource,
    cache: FeatureCache | None = None,
    guard: OODGuard | None = None,
    batch_size: int = 32,
    desc: str | None = None,
) -> Scored:
    """Raw logits and pooled features of ``records``, and with ``guard`` its reasons.

    Features come from ``cache`` when it holds every record (then no image is decoded unless
    ``guard`` must look at the pixels), else from the model, ``batch_size`` images at a time
    (with a progress bar named ``desc`` when given). Unreadable images are left out.
    """
    records = list(records)
    cached = cache is not None and all(r.path in cache.clean for r in records)
    if cached and guard is None and records:
        feats = torch.stack([cache.clean[r.path] for r in records])  # type: ignore[union-attr]
        return Scored(records, _head_logits(predictor, feats), feats.double().numpy())
    by_path = {r.path: r for r in records}
    kept: list[ImageRecord] = []
    logits: list[torch.Tensor] = []
    features: list[torch.Tensor] = []
    reasons: list[str | None] = []
    for paths, batch in _batches(images, [r.path for r in records], batch_size, desc):
        if cached:
            f = torch.stack([cache.clean[p] for p in paths])  # type: ignore[union-attr]
            out = _head_logits(predictor, f)
        else:
            out, f = predictor.logits_and_features(predictor.to_input(batch))
        kept += [by_path[p] for p in paths]
        logits.append(out.float().cpu())
        features.append(f.double().cpu())
        if guard is not None:
            sizes = [image_size(p) for p in paths]
            reasons += guard.reasons(batch, sizes, predictor.preprocess.input_size, f)
    if not kept:
        n_out = 1 if predictor.is_binary else len(predictor.class_names)
        logits, features = [torch.zeros(0, n_out)], [torch.zeros(0, predictor.model.feature_dim)]
    return Scored(
        kept,
        torch.cat(logits),
        torch.cat(features).double().numpy(),
        reasons if guard is not None else None,
    )


def _batches(
    images: ImageSource, paths: list[str], batch_size: int, desc: str | None
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``images.batches``, with a progress bar named ``desc`` (none when it is None)."""
    from histolens.progress import progress_bar

    with progress_bar(len(paths), desc or "", "img", enabled=desc is not None, leave=False) as bar:
        for chunk, batch in images.batches(paths, batch_size):
            yield chunk, batch
            bar.update(len(chunk))


def _head_logits(predictor: Predictor, features: torch.Tensor) -> torch.Tensor:
    """The model head's logits of pooled features (from the feature cache)."""
    with torch.inference_mode():
        return predictor.model.head(features.to(predictor.device)).float().cpu()


@dataclass
class Referral:
    """Knowing when not to answer: the prediction sets' calibration on held-out patients'
    predictions (None when none was scored) and the out-of-distribution guard (its feature
    check None without held-out patients to set its limit on).

    ``calib_p`` are the calibrated, centred probabilities the sets were fitted on, and
    ``held_out_distance`` each image's feature distance when its patient was held out (NaN
    where it never was): the probe's out-of-fold evaluation reuses both."""

    conformal: ConformalCalibration | None
    guard: OODGuard
    calib_p: np.ndarray | None = None
    held_out_distance: np.ndarray | None = None

    def metadata(self) -> dict[str, Any]:
        """The checkpoint metadata's ``conformal`` and ``ood`` records."""
        conformal = self.conformal.to_dict() if self.conformal is not None else None
        return {"conformal": conformal, "ood": self.guard.to_dict()}


def fit_calibration(
    cfg: RunConfig, logits: np.ndarray | torch.Tensor, y: np.ndarray, n_classes: int
) -> tuple[float, float]:
    """Temperature and (two classes) threshold, by ``cfg``'s rule, fitted on held-out
    ``logits`` (rows with NaN, not scored, left out); (1.0, 0.5) when fewer than two of them
    can be used."""
    from histolens.stats.calibration import fit_temperature
    from histolens.stats.operating_points import choose_threshold_for, rule_from_train_config

    logits = np.asarray(logits)
    y = np.asarray(y)
    ok = ~np.isnan(logits).any(1)
    if n_classes > 2:
        # A class absent from a fold's training patients has a logit that never wins (-1e4);
        # its held-out images say nothing about calibration and would drive T to its bound.
        true_logit = np.take_along_axis(np.nan_to_num(logits), y[:, None], axis=1)[:, 0]
        ok &= true_logit > -1e3
    if ok.sum() < 2:
        return 1.0, 0.5
    t_logits = torch.as_tensor(logits[ok], dtype=torch.float32)
    t_y = torch.as_tensor(y[ok])
    temperature = fit_temperature(t_logits, t_y)
    threshold = 0.5
    if n_classes == 2:
        p = probabilities_from_logits(t_logits, temperature)[:, 1].numpy()
        threshold = choose_threshold_for(rule_from_train_config(cfg.train), y[ok], p)
    return temperature, threshold


def centred_calibration(
    logits: np.ndarray | torch.Tensor,
    calibration: tuple[float, float],
    n_classes: int,
    operating_points: OperatingPoints | None = None,
    magnifications: Sequence[int | None] = (),
) -> np.ndarray:
    """Held-out ``logits`` as the probabilities prediction sets are fitted on: calibrated at
    the temperature and (two classes) centred on the threshold of ``calibration``, or on each
    image's magnification's (``operating_points``, ``magnifications`` one per row)."""
    temperature, threshold = calibration
    probs = probabilities_from_logits(torch.as_tensor(logits), temperature).numpy()
    thr = threshold
    if operating_points is not None:
        thr = operating_points.thresholds_for(list(magnifications)[: len(probs)])
    return centred_probabilities(probs, thr if n_classes == 2 else None)


def fit_held_out_referral(
    calib_p: np.ndarray,
    calib_y: np.ndarray,
    classes: Sequence[str],
    alpha: float,
    notes: list[str],
    features: tuple[np.ndarray, Sequence[tuple[np.ndarray, np.ndarray]]],
    groups: np.ndarray,
    magnifications: Sequence[int | None],
) -> Referral:
    """The prediction sets fitted on held-out patients' calibrated, centred probabilities
    ``calib_p`` (``groups`` and ``magnifications``: one per row of them) and the feature guard
    of ``features`` (all pooled features, and the patient folds whose held-out images set its
    limit); ``notes`` says what could not be guaranteed."""
    conformal = fit_prediction_sets(calib_p, calib_y, groups, classes, alpha, notes, magnifications)
    feature_guard, held_out_distance = fit_feature_guard(*features)
    return Referral(conformal, OODGuard(features=feature_guard), calib_p, held_out_distance)


def fit_referral(
    cfg: RunConfig,
    train: Scored,
    val: Scored,
    classes: Sequence[str],
    calibration: tuple[float, float],
    notes: list[str],
    operating_points: OperatingPoints | None = None,
) -> Referral:
    """The MLP head's referral: prediction sets calibrated on the validation patients'
    predictions (at the run's alpha, each patient weighing the same), and the feature guard of
    the training and validation images' features with its limit from the validation patients
    (as a fold of the probe's); ``notes`` says what could not be fitted."""
    mags = [r.magnification for r in val.records]
    calib_p = centred_calibration(val.logits, calibration, len(classes), operating_points, mags)
    y = np.array(targets(val.records, classes, cfg.data.task), dtype=np.int64)
    groups = np.array([r.group or r.patient or r.path for r in val.records], dtype=str)
    n_train, x = len(train.records), np.concatenate([train.features, val.features])
    folds = [(np.arange(n_train), np.arange(n_train, len(x)))] if len(val.records) else []
    referral = fit_held_out_referral(
        calib_p, y, classes, cfg.train.alpha, notes, (x, folds), groups, mags
    )
    fitted = {
        "prediction sets": referral.conformal,
        "feature-distance check": referral.guard.features,
    }
    missing = [name for name, fit in fitted.items() if fit is None]
    if missing:
        notes.append(
            f"No validation images to calibrate on: the checkpoint has no "
            f"{' and no '.join(missing)} (the cheap input checks still flag blank or non-H&E "
            "images). Raise --val-fraction, or add patients."
        )
    return referral


def row_prediction_sets(
    result: EvalResult, conformal: ConformalCalibration | None, alpha: float | None
) -> np.ndarray | None:
    """Membership (n, C) of each row's prediction set at ``alpha`` (None: the calibration's),
    its thresholded label always in it; None without a calibration or rows."""
    if conformal is None or not result.rows:
        return None
    probs = np.array([r.probs for r in result.rows])
    thr = result.thresholds() if len(result.classes) == 2 else None
    predicted = [result.predicted(r) for r in result.rows]
    mags = [r.magnification for r in result.rows]
    return conformal.prediction_sets(centred_probabilities(probs, thr), alpha, predicted, mags)


def add_referrals(result: EvalResult, scored: Scored, referral: Referral, part: str) -> None:
    """Give the evaluated ``part`` ("test" or "val") its prediction sets and flags."""
    conformal = referral.conformal
    alpha = conformal.alpha if conformal is not None else None
    on = "the test patients" if part == "test" else "the same validation patients (optimistic)"
    with_referrals(
        result,
        row_prediction_sets(result, conformal, alpha),
        scored.reasons,
        alpha,
        f"the validation patients' predictions, on {on}",
    )


def store_referral(checkpoint: str | Path, referral: Referral, **changes: Any) -> None:
    """Rewrite ``checkpoint`` with the guard's tensors beside its weights and the calibration,
    the guard and ``changes`` (metadata fields by name) in its metadata: one atomic write."""
    from histolens.checkpoint.io import load_checkpoint, save_checkpoint

    state, meta = load_checkpoint(checkpoint)
    OODGuard.from_checkpoint(state, meta)  # takes out the tensors of a guard stored before
    metadata = {**meta.to_dict(), **changes, **referral.metadata()}
    save_checkpoint(checkpoint, {**state, **referral.guard.state_dict()}, metadata)


def fit_prediction_sets(
    calib_p: np.ndarray,
    calib_y: np.ndarray,
    groups: np.ndarray,
    classes: Sequence[str],
    alpha: float,
    notes: list[str],
    magnifications: Sequence[int | None],
) -> ConformalCalibration | None:
    """The prediction sets' calibration on held-out patients' calibrated, centred probabilities,
    per magnification (``magnifications``, one per row, None where unknown).

    Images are weighted by patient (``groups``); rows with NaN (not scored) are left out, and
    None is returned when none is left. An ``alpha`` too few patients cannot guarantee is noted.
    Shared by the linear probe (out-of-fold predictions) and the MLP head (validation patients).
    """
    from histolens.stats.conformal import ConformalCalibration

    ok = ~np.isnan(calib_p).any(1)
    if not ok.any():
        return None
    mags = np.array(magnifications, dtype=object)[ok]
    conformal = ConformalCalibration.fit(
        calib_p[ok],
        np.asarray(calib_y)[ok],
        np.asarray(groups)[ok],
        classes,
        alpha,
        "probability",
        mags,
    )
    if conformal.quantile() == float("inf"):
        notes.append(
            f"With {conformal.n_patients} calibration patients, prediction sets cannot "
            f"guarantee alpha {alpha:g}: every image would be referred. Use "
            f"alpha {conformal.min_alpha:.2f} or more (predict --alpha), or add patients."
        )
    else:
        _note_thin_strata(conformal, alpha, notes)
    return conformal


def _note_thin_strata(conformal: ConformalCalibration, alpha: float, notes: list[str]) -> None:
    """Note the magnifications with too few calibration patients for their own guarantee."""
    thin = [s for s, q in conformal.stratum_quantiles(alpha).items() if q == float("inf")]
    if thin:
        counts = conformal.stratum_patients()
        names = ", ".join(f"{s}X ({counts[s]} patients)" for s in thin)
        notes.append(
            f"Prediction sets at alpha {alpha:g} hold per magnification; {names} have too few "
            "calibration patients for a guarantee of their own, so their images get the most "
            "cautious threshold of the others. Add patients at those magnifications."
        )


def fit_feature_guard(
    x: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]]
) -> tuple[FeatureGuard | None, np.ndarray]:
    """The feature guard of all the pooled features ``x``, its limit set on the images that
    ``folds`` (split by patient) hold out, and those images' held-out distances (NaN for the
    others); None and all NaN when there are no folds (no held-out patients to set a limit on).
    Shared by the linear probe (k folds) and the MLP head (one: training -> validation).
    """
    from histolens.inference.ood import FeatureGuard

    if not folds:
        return None, np.full(len(x), np.nan)
    return FeatureGuard.calibrated(x, folds)
