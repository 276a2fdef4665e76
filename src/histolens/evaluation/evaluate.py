"""Evaluating a model: its predictions on records, their metrics, plots, CSV and report.

Every prediction travels as a row with its path, patient and label; metrics are computed from
those rows only (:mod:`histolens.evaluation.metrics`). Threshold and temperature are fitted on
the validation split and stored in the checkpoint, so every front end uses them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from histolens.data.records import ImageRecord, target_of
from histolens.evaluation.evaluation_files import (
    write_evaluation,
    write_patients,
    write_predictions_csv,
)
from histolens.evaluation.metrics import (
    EvalResult,
    PredictionRow,
    compute_metrics,
    rows_from_logits,
    with_referrals,
)
from histolens.evaluation.records import records_for_evaluation
from histolens.evaluation.results import Estimate, ImageMetrics, Metrics
from histolens.inference.predictor import Predictor
from histolens.rundir import RunDir
from histolens.stats.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
)
from histolens.stats.metrics import HEADLINE_METRICS
from histolens.stats.operating_points import rule_from_train_config

if TYPE_CHECKING:
    from histolens.config import RunConfig
    from histolens.evaluation.referral import Referral, Scored
    from histolens.stats.decisions import OperatingPoints

__all__ = [
    "EvalResult",
    "PredictionRow",
    "compute_metrics",
    "evaluate_checkpoint",
    "finalize_run",
    "headline_metrics",
    "records_for_evaluation",
    "rows_from_logits",
    "write_evaluation",
    "write_patients",
    "write_predictions_csv",
]


def _logits_for(
    predictor: Predictor,
    records: Sequence[ImageRecord],
    bank=None,
    cache=None,
    progress: bool = False,
) -> tuple[list[ImageRecord], torch.Tensor, list]:
    """Logits for records, from cached features, an image bank, or the files themselves."""
    if not records:
        n_out = 1 if predictor.is_binary else len(predictor.class_names)
        return [], torch.zeros(0, n_out), []
    if cache is not None and all(r.path in cache.clean for r in records):
        with torch.inference_mode():
            feats = torch.stack([cache.clean[r.path] for r in records]).to(predictor.device)
            return list(records), predictor.model.head(feats).float().cpu(), []
    if bank is not None and all(r.path in bank for r in records):
        chunks = []
        for i in range(0, len(records), 32):
            batch = bank.stack([r.path for r in records[i : i + 32]])
            chunks.append(predictor.logits(predictor.to_input(batch)).float().cpu())
        return list(records), torch.cat(chunks), []
    from histolens.progress import progress_bar

    by_path = {r.path: r for r in records}
    with progress_bar(len(records), "Predicting", "img", enabled=progress, leave=False) as bar:
        kept, logits, skipped = predictor.logits_for_paths(
            [r.path for r in records], progress=bar.update
        )
    return [by_path[p] for p in kept], logits, skipped


def _assess_records(
    predictor: Predictor, records: Sequence[ImageRecord], progress: bool
) -> tuple[list[ImageRecord], torch.Tensor, list[str | None], list]:
    """Logits and out-of-distribution reasons of records' files (Predictor.assess_paths)."""
    from histolens.progress import progress_bar

    by_path = {r.path: r for r in records}
    with progress_bar(len(records), "Predicting", "img", enabled=progress, leave=False) as bar:
        kept, logits, reasons, skipped = predictor.assess_paths(
            [r.path for r in records], progress=bar.update
        )
    return [by_path[p] for p in kept], logits, reasons, skipped


def finalize_run(
    run_dir: str | os.PathLike,
    cfg,
    split,
    classes: Sequence[str],
    bank=None,
    cache=None,
    progress: bool = True,
    notes: Sequence[str] = (),
    write_outputs: bool = True,
) -> Metrics:
    """After training: fit temperature and threshold on validation, and on the same patients the
    prediction sets and the out-of-distribution guard; evaluate on test (with referrals) and, with
    ``write_outputs``, write ``evaluation/`` (the caller writes the report from it).

    ``notes`` given as a list also receives the notes this step adds (an unreliable
    temperature, a calibration that could not be fitted), as the run's result shows them.
    """
    from histolens.evaluation.referral import fit_referral, score_records
    from histolens.models.pipeline import image_source

    run_dir = Path(run_dir)
    predictor = Predictor.from_checkpoint(run_dir)
    images = image_source(bank, predictor.preprocess)
    notes = notes if isinstance(notes, list) else list(notes)
    batch = cfg.train.batch_size
    val = score_records(predictor, split.val, images, cache, batch_size=batch)
    temperature, threshold = _fit_on_validation(cfg, val.records, val.logits, classes)
    predictor.temperature, predictor.threshold = temperature, threshold
    ops = _operating_points_on_validation(cfg, val.records, val.logits, classes, temperature)
    predictor.operating_points = ops
    if ops is not None:
        threshold = predictor.threshold = ops.pooled  # one pooled threshold: the operating points'
        notes += [n for n in ops.notes() if n not in notes]
    if temperature in (MIN_TEMPERATURE, MAX_TEMPERATURE):
        notes.append(_temperature_bound_note(temperature))
    desc = "Features for the guard" if progress else None
    train = score_records(predictor, split.train, images, cache, batch_size=batch, desc=desc)
    referral = fit_referral(cfg, train, val, classes, (temperature, threshold), notes, ops)
    test_part = "test" if split.test else "val"
    scored = score_records(predictor, split.test or split.val, images, cache, referral.guard, batch)
    n_boot = 1000 if write_outputs else 0
    result = _evaluated(
        cfg, scored, classes, (temperature, threshold), referral, test_part, n_boot, ops
    )
    summary = {"split": test_part, **headline_metrics(result.metrics)}
    estimate = None
    # Validation patients chose the epoch, threshold and temperature: not an unseen-patient figure.
    if write_outputs and test_part == "test" and len({r.target for r in result.rows}) > 1:
        estimate = _held_out_estimate(result, cfg, test_part)
        notes = notes + [w for w in estimate.warnings if w not in notes]
    _store(run_dir, cfg, referral, (temperature, threshold), summary, estimate, ops)
    if write_outputs:
        write_evaluation(
            result,
            RunDir(run_dir).evaluation.path,
            logs_dir=RunDir(run_dir).logs,
            notes=notes,
        )
    else:
        write_predictions_csv(result, RunDir(run_dir).predictions)
    return result.metrics


def _fit_on_validation(
    cfg: RunConfig,
    val_records: Sequence[ImageRecord],
    val_logits: torch.Tensor,
    classes: Sequence[str],
) -> tuple[float, float]:
    """Temperature and (binary) decision threshold fitted on the validation records' logits
    (``histolens.evaluation.referral.fit_calibration``, as the probe's); 1.0 and 0.5 when
    there are none."""
    from histolens.evaluation.referral import fit_calibration

    if not val_records:
        return 1.0, 0.5
    idx = {c: i for i, c in enumerate(classes)}
    y_val = np.array([idx[target_of(r, cfg.data.task)] for r in val_records], dtype=np.int64)
    return fit_calibration(cfg, val_logits.numpy(), y_val, len(classes))


def _operating_points_on_validation(
    cfg: RunConfig,
    val_records: Sequence[ImageRecord],
    val_logits: torch.Tensor,
    classes: Sequence[str],
    temperature: float,
) -> OperatingPoints | None:
    """The operating points per magnification chosen on the validation patients (binary, the
    path the linear probe takes on its out-of-fold logits); None without validation images."""
    from histolens.stats.decisions import fit_on_logits

    if len(classes) != 2 or not val_records:
        return None
    idx = {c: i for i, c in enumerate(classes)}
    y = np.array([idx[target_of(r, cfg.data.task)] for r in val_records])
    groups = [r.group or r.patient or r.path for r in val_records]
    mags = [r.magnification for r in val_records]
    rule = rule_from_train_config(cfg.train)
    return fit_on_logits(
        rule, val_logits.numpy(), y, groups, mags, temperature, cfg.train.magnification_thresholds
    )


def _evaluated(
    cfg: RunConfig,
    scored: Scored,
    classes: Sequence[str],
    calibration: tuple[float, float],
    referral: Referral,
    part: str,
    n_boot: int,
    operating_points: OperatingPoints | None = None,
) -> EvalResult:
    """The evaluated split's rows, with prediction sets and flags, and their metrics."""
    from histolens.evaluation.referral import add_referrals

    temperature, threshold = calibration
    result = EvalResult(
        rows_from_logits(scored.records, scored.logits, classes, cfg.data.task, temperature),
        tuple(classes),
        cfg.data.task,
        threshold,
        temperature,
        operating_points=operating_points,
    )
    add_referrals(result, scored, referral, part)
    result.metrics = replace(compute_metrics(result, n_boot=n_boot, seed=cfg.data.seed), split=part)
    return result


def _store(
    run_dir: Path,
    cfg: RunConfig,
    referral: Referral,
    calibration: tuple[float, float],
    summary: dict[str, Any],
    estimate: Estimate | None,
    operating_points: OperatingPoints | None = None,
) -> None:
    """Write temperature, threshold, prediction sets, guard, headline and estimate into the
    run's checkpoint, in one rewrite."""
    from histolens.evaluation.referral import store_referral

    temperature, threshold = calibration
    store_referral(
        RunDir(run_dir).checkpoint,
        referral,
        temperature=temperature,
        threshold=threshold,
        metrics=summary,
        threshold_method=cfg.train.threshold_method,
        operating_points=None if operating_points is None else operating_points.to_dict(),
        **({"estimate": estimate.to_dict()} if estimate else {}),
    )


def _temperature_bound_note(temperature: float) -> str:
    """The warning for a calibration temperature fitted at one of its bounds."""
    return (
        f"The calibration temperature reached its bound ({temperature:g}): the validation "
        "patients are "
        + ("perfectly separated" if temperature == MIN_TEMPERATURE else "barely separable")
        + ", so the probabilities' calibration is not well determined."
    )


def _held_out_estimate(result: EvalResult, cfg: RunConfig, test_part: str) -> Estimate:
    """The estimate (histolens.evaluation.estimate) of a run's held-out split, described for its report."""
    from histolens.evaluation.estimate import build_estimate

    return build_estimate(
        result,
        f"the held-out {test_part} split of patients (one split, no cross-validation)",
        f"{result.metrics.n_images} images of {result.metrics.n_patients} patient "
        f"groups in {Path(str(cfg.data.path)).name} (magnification {cfg.data.magnification})",
        seed=cfg.data.seed,
    )


def headline_metrics(metrics: Metrics) -> dict[str, Any]:
    """The headline metrics, and the secondary and calibration figures, kept in the checkpoint
    (its metadata's ``metrics``: a flat mapping, the shape checkpoints have always stored)."""
    img = metrics.image or ImageMetrics()
    keys = (*HEADLINE_METRICS, "pr_auc", "f1", "brier", "ece", "roc_auc_ovr")
    return {k: v for k in keys if (v := img.figure(k)) is not None} | {
        "n_images": metrics.n_images,
        "n_patients": metrics.n_patients,
    }


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    records: Sequence[ImageRecord],
    n_boot: int = 1000,
    progress: bool = True,
    seed: int = 0,
    alpha: float | None = None,
    adapt_batchnorm: bool = False,
    runtime: str | None = None,
    engine: str | None = None,
) -> tuple[EvalResult, list]:
    """Evaluate a checkpoint on records, with its stored threshold, temperature, conformal
    calibration (at ``alpha``, default the training one) and out-of-distribution guard.

    ``adapt_batchnorm``: first re-estimate the backbone's batch-norm statistics on these images
    (AdaBN, unlabelled; for a cohort from another lab). ``runtime``: what runs an ONNX export
    (``Predictor.from_checkpoint``); ``engine``: what computes a torch checkpoint's backbone
    features (``Predictor.use_engine``)."""
    predictor = Predictor.from_checkpoint(checkpoint, runtime=runtime)
    predictor.use_engine(engine)
    predictor.alpha = alpha
    if adapt_batchnorm:
        predictor.adapt_batchnorm([r.path for r in records])
    reasons = None
    if predictor.guard is None:
        kept, logits, skipped = _logits_for(predictor, records, progress=progress)
    else:
        kept, logits, reasons, skipped = _assess_records(predictor, records, progress)
    result = EvalResult(
        rows_from_logits(
            kept, logits, predictor.class_names, predictor.task, predictor.temperature
        ),
        predictor.class_names,
        predictor.task,
        predictor.threshold,
        predictor.temperature,
        operating_points=predictor.operating_points,
    )
    if predictor.conformal is not None or reasons is not None:
        from histolens.evaluation.referral import row_prediction_sets

        with_referrals(
            result,
            row_prediction_sets(result, predictor.conformal, predictor.refer_alpha),
            reasons,
            predictor.refer_alpha,
            "the checkpoint's calibration (out-of-fold predictions of its training patients)",
        )
    result.metrics = compute_metrics(result, n_boot=n_boot, seed=seed)
    return result, skipped
