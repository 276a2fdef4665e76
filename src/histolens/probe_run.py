"""``histolens train`` with the linear head (the default): every patient trains the shipped model.

Steps: decode the images once; compute the frozen backbone's pooled features once (cached on
disk); estimate performance on unseen patients by patient-level k-fold cross-validation, each
fold choosing its own regularisation by inner cross-validation; fit temperature and threshold on
the out-of-fold predictions; fit the shipped probe on all patients; write the checkpoint with
the estimate, and the evaluation of the out-of-fold predictions.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histolens.atomic import atomic_write_text
from histolens.backbones import get_backbone_spec
from histolens.checkpoint import (
    BEST_CHECKPOINT,
    HeadSpec,
    ProbeChoice,
    save_checkpoint,
    update_metadata,
)
from histolens.config import RunConfig
from histolens.data import ImageRecord
from histolens.errors import DataError
from histolens.model import build_model, resolve_feature_layer
from histolens.pipeline import FeatureCache, ImageBank, ImageSource, InputPipeline, image_source
from histolens.probe import ProbeFit, fit_linear_probe, group_folds
from histolens.splits import Split, balanced_class_weights, split_by_patient

__all__ = ["train_probe"]

log = logging.getLogger("histolens")


def _group_of(r: ImageRecord) -> str:
    return r.group or r.patient or r.path


def _choose_split(cfg: RunConfig, records: list[ImageRecord], notes: list[str]) -> Split:
    """All patients train (cross-validated estimate), or the configured held-out split."""
    if cfg.train.cv_folds:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Only for its checks and warnings (no patient ids, too few patients): no held-out part.
            check = split_by_patient(
                records, cfg.data.task, 0.0, 0.0, cfg.data.seed, cfg.data.group_by
            )
        notes += [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
        return Split(check.train, [], [], check.patient_level, check.warnings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = split_by_patient(
            records,
            cfg.data.task,
            0.0,  # the probe needs no validation patients: C comes from inner CV
            cfg.data.test_fraction,
            cfg.data.seed,
            cfg.data.group_by,
        )
    notes += [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return split


def _features(
    cfg: RunConfig,
    model,
    images: ImageSource,
    pipeline: InputPipeline,
    paths: Sequence[str],
    run_dir: Path,
    feature_store: dict | None,
    preprocess,
    progress: bool,
    write_outputs: bool,
    fabric,
) -> FeatureCache:
    """The frozen backbone's features of ``paths``, computed once (shared out between ranks)."""
    from histolens.training import FEATURE_CACHE

    spec = model.spec
    fingerprint = FeatureCache.fingerprint_of(
        backbone=spec.timm_name,
        feature_layer=model.feature_layer,
        pretrained=cfg.model.pretrained,
        preprocess=preprocess.to_dict(),
        stain=pipeline.stain.to_dict() if pipeline.stain is not None else None,
    )
    store = feature_store if feature_store is not None else {}
    cache = store.get(fingerprint) or FeatureCache.load(run_dir / FEATURE_CACHE, fingerprint)
    if cache is None:
        cache = FeatureCache({}, {}, fingerprint)
    store[fingerprint] = cache
    before = len(cache.clean)
    with fabric.autocast():
        bs = cfg.train.batch_size
        cache.extend(model, images, pipeline, paths, [], 0, bs, progress, fabric=fabric)
    changed = len(cache.clean) != before
    if fabric.is_global_zero and write_outputs and feature_store is None and changed:
        cache.save(run_dir / FEATURE_CACHE)
    return cache


def _fit(cfg: RunConfig, x, y, g, n_classes: int, seed: int) -> ProbeFit:
    return fit_linear_probe(x, y, g, n_classes, cfg.train.probe_cs, 5, seed)


def _cross_validated_logits(
    cfg: RunConfig, x: np.ndarray, y: np.ndarray, g: np.ndarray, n_classes: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Out-of-fold logits of every image from patient-level k-fold (nested C selection).

    Returns the raw logits and the fold's decision logits: for two classes, shifted so that 0 is
    the fold's own decision boundary (threshold and temperature chosen on the fold's inner
    out-of-fold predictions). Scoring those at 0.5 never lets a held-out patient choose its own
    threshold; they stay on the raw scale, since folds calibrated by different temperatures would
    pool on different scales and understate the AUC of one model. Last, each image's fold
    temperature (n, 1): decision / temperature is what the fold's model would call calibrated.
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
        t_k, thr_k = _calibrate(cfg, inner, y[tr] if len(inner) else y[:0], n_classes)
        decision[te] = oof[te]
        fold_temperature[te] = t_k
        if n_classes == 2:  # the fold's boundary p = thr_k, with p = sigmoid(z / t_k)
            decision[te] -= t_k * logit(np.clip(thr_k, 1e-6, 1 - 1e-6))
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


def _calibrate(cfg: RunConfig, logits: np.ndarray, y: np.ndarray, n_classes: int):
    from histolens.calibration import choose_threshold, fit_temperature
    from histolens.predictor import probabilities_from_logits

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
        threshold = choose_threshold(
            y[ok], p, cfg.train.threshold_method, cfg.train.target_sensitivity
        )
    return temperature, threshold


def train_probe(
    cfg: RunConfig,
    run_dir: Path,
    split: Split | None = None,
    progress: bool = True,
    evaluate: bool = True,
    bank: ImageBank | None = None,
    feature_store: dict | None = None,
    write_outputs: bool = True,
    fabric=None,
):
    """Train the linear-probe model as ``cfg`` says; see the module docstring for the steps.

    With ``split`` given, the probe trains on its train + val images and is scored on its test
    images (what cross-validation benchmarks use); otherwise ``cfg.train.cv_folds`` decides.
    With a launched ``fabric`` of several processes, the ranks share the feature extraction
    and rank 0 alone fits the probe and writes the files.
    """
    from histolens.distributed import launch
    from histolens.evaluation import EvalResult, compute_metrics, rows_from_logits
    from histolens.training import CONFIG_FILE, SPLIT_FILE, TrainResult, _checkpoint_metadata
    from histolens.training_data import fit_stain, prepare_records, readable_split, write_skipped
    from histolens.training_data import targets as _targets
    from histolens.transforms import resolve_preprocess

    start = time.perf_counter()
    notes: list[str] = []
    spec = get_backbone_spec(cfg.model.backbone)
    dataset, records, classes = prepare_records(cfg)
    if split is None:
        notes += _audit_notes(records, progress)
        split = _choose_split(cfg, records, notes)
    notes = list(dict.fromkeys(notes + split.warnings))
    fabric = fabric if fabric is not None else launch(cfg.train)
    main = fabric.is_global_zero
    for n in notes if main else ():
        log.warning(n)
    n_classes = len(classes)
    layer = resolve_feature_layer(spec, cfg.model.feature_layer, "linear")
    # As the Lightning path's seed_everything: a randomly initialised backbone (--pretrained none)
    # is then the same in every run, so features shared through feature_store match its weights.
    torch.manual_seed(cfg.train.seed)
    model = build_model(spec, n_classes, cfg.model.pretrained, (), (), layer)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    size = spec.input_size_for(cfg.model.input_size)
    preprocess = resolve_preprocess(model.backbone, size)
    model.set_trainable(0)
    model.eval().to(fabric.device)
    if fabric.device.type == "cpu":
        model.to(memory_format=torch.channels_last)

    # Streamed from disk (only the features are kept) unless a shared bank holds the images.
    images = image_source(bank, preprocess)
    stain, stain_ref = fit_stain(cfg, images, [r.path for r in split.train + split.val], preprocess)
    pipeline = InputPipeline(preprocess, None, stain, cfg.train.seed, fabric.device)
    cache = _features(
        cfg,
        model,
        images,
        pipeline,
        [r.path for r in split.train + split.val + split.test],
        run_dir,
        feature_store,
        preprocess,
        progress,
        write_outputs,
        fabric,
    )
    split = readable_split(split, images, notes)
    fit_records = split.train + split.val
    if not fit_records:
        raise DataError("No readable training images.")
    if not main:  # rank 0 fits the probe on the gathered features and writes the files
        ckpt = run_dir / BEST_CHECKPOINT
        return TrainResult(run_dir, ckpt, 0, 0, float("nan"), 0.0, global_rank=fabric.global_rank)
    write_skipped(run_dir, images, dataset)
    if write_outputs:
        split.write_csv(run_dir / SPLIT_FILE)
        atomic_write_text(run_dir / CONFIG_FILE, cfg.to_json())

    def arrays(recs: Sequence[ImageRecord]):
        x = torch.stack([cache.clean[r.path] for r in recs]).double().numpy()
        return (
            x,
            np.array(_targets(recs, classes, cfg.data.task)),
            np.array([_group_of(r) for r in recs]),
        )

    x, y, g = arrays(fit_records)
    if len(np.unique(y)) < 2:
        raise DataError("The training images hold only one class; the probe needs two or more.")
    final = _fit(cfg, x, y, g, n_classes, cfg.data.seed)
    unit = "patient-level" if split.patient_level else "image-level (no patient ids)"
    if split.test:
        eval_records = split.test
        eval_logits = final.logits(arrays(split.test)[0])
        calib_logits = final.oof_logits if final.oof_logits is not None else eval_logits[:0]
        calib_y = y if final.oof_logits is not None else y[:0]
        method = "a held-out test split of patients"
        n_folds = 0
    elif not cfg.train.cv_folds:
        raise DataError(
            "--cv-folds 0 needs held-out test patients, and the split left none: raise "
            "--test-fraction, add patients, or use cross-validation (--cv-folds 5)."
        )
    else:
        oof, eval_logits, n_folds, fold_t = _cross_validated_logits(
            cfg, x, y, g, n_classes, progress
        )
        eval_records, calib_logits, calib_y = fit_records, oof, y
        chosen = "C, threshold" if len(cfg.train.probe_cs) > 1 else "threshold"
        method = (
            f"{n_folds}-fold {unit} cross-validation (out-of-fold predictions; {chosen} "
            "and temperature chosen inside each fold)"
        )
    temperature, threshold = _calibrate(cfg, calib_logits, calib_y, n_classes)
    # Out-of-fold decision logits are already centred on each fold's own threshold.
    eval_temperature, eval_threshold = (temperature, threshold) if n_folds == 0 else (1.0, 0.5)
    final.load_into(model.head.out)
    # Knowing when not to answer: prediction sets calibrated on held-out patients' predictions,
    # and the feature distance beyond which an image is unlike the training images.
    from histolens.conformal import ConformalCalibration, centred_probabilities
    from histolens.ood import FeatureGuard, OODGuard
    from histolens.predictor import probabilities_from_logits

    if n_folds:  # each fold's decision logits over its temperature: its calibrated, centred p
        calib_p = probabilities_from_logits(torch.as_tensor(eval_logits / fold_t), 1.0).numpy()
    else:
        calib_p = probabilities_from_logits(torch.as_tensor(calib_logits), temperature).numpy()
        calib_p = centred_probabilities(calib_p, threshold if n_classes == 2 else None)
    calib_ok = ~np.isnan(calib_p).any(1)
    conformal = None
    if calib_ok.any():
        conformal = ConformalCalibration.fit(
            calib_p[calib_ok],
            calib_y[calib_ok],
            g[: len(calib_y)][calib_ok],
            classes,
            cfg.train.alpha,
        )
        if conformal.quantile() == float("inf"):
            notes.append(
                f"With {conformal.n_patients} calibration patients, prediction sets cannot "
                f"guarantee alpha {cfg.train.alpha:g}: every image would be referred. Use "
                f"alpha {conformal.min_alpha:.2f} or more (predict --alpha), or add patients."
            )
    try:
        guard_folds = group_folds(y, g, cfg.train.cv_folds or 5, cfg.data.seed)
        feature_guard, held_out_distance = FeatureGuard.calibrated(x, guard_folds)
    except DataError:  # one patient group: no held-out patients to set a limit on
        feature_guard, held_out_distance = None, np.full(len(y), np.nan)
    guard = OODGuard(features=feature_guard)

    weights = balanced_class_weights(fit_records, classes, cfg.data.task)
    metadata = _checkpoint_metadata(
        cfg, spec, classes, preprocess, stain, stain_ref, split, weights, dataset
    )
    metadata = replace(
        metadata,
        head=HeadSpec.linear(),
        feature_layer=layer,
        threshold=threshold,
        temperature=temperature,
        threshold_method=cfg.train.threshold_method,
        probe=ProbeChoice(final.C, {f"{c:g}": s for c, s in final.inner_scores.items()}),
        conformal=conformal.to_dict() if conformal is not None else None,
        ood=guard.to_dict(),
    )
    ckpt = run_dir / BEST_CHECKPOINT
    save_checkpoint(ckpt, {**model.state_dict(), **guard.state_dict()}, metadata)

    result = TrainResult(run_dir, ckpt, 0, 0, float("nan"), 0.0, notes=notes)
    if evaluate:
        scored = ~np.isnan(eval_logits).any(1)
        kept = [r for r, ok in zip(eval_records, scored, strict=True) if ok]
        logits = torch.as_tensor(eval_logits[scored], dtype=torch.float32)
        ev = EvalResult(
            rows_from_logits(kept, logits, classes, cfg.data.task, eval_temperature),
            tuple(classes),
            cfg.data.task,
            eval_threshold,
            eval_temperature,
        )
        if n_folds:
            distances, refer_p = held_out_distance[scored], calib_p[scored]
        elif feature_guard is not None:
            distances, refer_p = feature_guard.distance(arrays(split.test)[0]), None
        else:
            distances, refer_p = np.full(len(kept), np.nan), None
        _add_referrals(ev, conformal, guard, images, distances, refer_p, cfg.train.alpha)
        result.metrics = compute_metrics(
            ev, n_boot=1000 if write_outputs else 0, seed=cfg.data.seed
        )
        result.metrics["split"] = "out-of-fold" if n_folds else "test"
        ev.metrics = result.metrics
        if write_outputs:
            _write_outputs(run_dir, ev, cfg, method, dataset, notes, n_folds, result.metrics)
        else:
            from histolens.evaluation import write_predictions_csv

            write_predictions_csv(ev, run_dir / "predictions.csv")
    result.seconds = time.perf_counter() - start
    return result


def _add_referrals(ev, conformal, guard, bank, distances, oof_probs, alpha: float) -> None:
    """Prediction sets and out-of-distribution flags of the evaluated images.

    Out-of-fold predictions (``oof_probs`` given) get leave-one-patient-out sets, and their
    held-out feature distances (``distances``); a test split gets the stored calibration.
    """
    from histolens.conformal import centred_probabilities, leave_one_patient_out_sets
    from histolens.evaluation import with_referrals

    y = np.array([r.target for r in ev.rows], dtype=int)
    patients = np.array([r.patient for r in ev.rows])
    member, method = None, ""
    if conformal is not None and oof_probs is not None:
        member = leave_one_patient_out_sets(oof_probs, y, patients, alpha, conformal.score)
        method = (
            "leave-one-patient-out over the out-of-fold predictions (each patient's sets "
            "calibrated on the other patients)"
        )
    elif conformal is not None and ev.rows:
        probs = np.array([r.probs for r in ev.rows])
        thr = ev.threshold if len(ev.classes) == 2 else None
        predicted = [ev.predicted(r) for r in ev.rows]
        member = conformal.prediction_sets(centred_probabilities(probs, thr), alpha, predicted)
        method = "the training patients' inner out-of-fold predictions, on the test patients"
    reasons: list[str | None] = (
        guard.features.reasons_for_distances(distances)
        if guard.features is not None
        else [None] * len(ev.rows)
    )
    paths = [r.path for r in ev.rows]
    for i in range(0, len(paths), 64):
        content = guard.checks.content_reasons(bank.stack(paths[i : i + 64]))
        reasons[i : i + 64] = [c or f for c, f in zip(content, reasons[i : i + 64], strict=True)]
    with_referrals(ev, member, reasons, alpha, method)


def _audit_notes(records: Sequence[ImageRecord], progress: bool) -> list[str]:
    """The shortcut audit's warnings (image size, source folder, format) at the start of a run."""
    from histolens.audit import audit_dataset

    try:
        report = audit_dataset(list(records), progress=False, colour=False)
    except DataError:
        return []
    if not report.warnings:
        return []
    others = report.flagged[1:]
    also = f" Also flagged: {', '.join(others)}." if others else ""
    return [f"Shortcut audit: {report.warnings[0]}{also} See 'histolens data audit' for the table."]


def _write_outputs(
    run_dir: Path, ev, cfg: RunConfig, method: str, dataset, notes, n_folds: int, metrics
) -> None:
    from histolens.estimate import build_estimate
    from histolens.evaluation import _headline, write_evaluation

    groups = {r.patient for r in ev.rows}
    description = (
        f"{len(ev.rows)} images of {len(groups)} patient groups in {Path(cfg.data.path).name}"
        f" (magnification {cfg.data.magnification})"
    )
    estimate = build_estimate(ev, method, description, n_boot=1000, seed=cfg.data.seed)
    summary: dict[str, Any] = {"split": metrics["split"], **_headline(metrics)}
    update_metadata(run_dir / BEST_CHECKPOINT, estimate=estimate, metrics=summary)
    notes = list(notes) + estimate["warnings"]
    write_evaluation(ev, run_dir / "evaluation", logs_dir=None, report_dir=run_dir, notes=notes)
