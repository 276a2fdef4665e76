"""``histolens train`` with the linear head (the default): every patient trains the shipped model.

Steps: decode the images once; compute the frozen backbone's pooled features once (cached on
disk); estimate performance on unseen patients by patient-level k-fold cross-validation, each
fold choosing its own regularisation by inner cross-validation; fit temperature and threshold on
the out-of-fold predictions; fit the shipped probe on all patients; write the checkpoint with
the estimate, and the evaluation of the out-of-fold predictions. The held-out scoring lives in
:mod:`histolens.training.probe_validation` (calibrated through
:mod:`histolens.evaluation.referral`, as the MLP head is), the evaluation in
:mod:`histolens.training.probe_evaluation`, the frozen features in
:mod:`histolens.training.probe_features`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from histolens.atomic import atomic_write_text
from histolens.checkpoint.io import BEST_CHECKPOINT, HeadSpec, ProbeChoice, save_checkpoint
from histolens.config import RunConfig
from histolens.data.records import ImageRecord
from histolens.data.splits import Split, balanced_class_weights, split_by_patient
from histolens.errors import DataError
from histolens.evaluation.plot_worker import PlotWorker
from histolens.evaluation.referral import Referral, fit_calibration
from histolens.models.backbones import get_backbone_spec
from histolens.models.feature_cache import FeatureCache
from histolens.models.pipeline import ImageBank
from histolens.training.probe import ProbeFit
from histolens.training.probe_evaluation import _evaluate
from histolens.training.probe_features import FrozenBackbone, frozen_features
from histolens.training.probe_validation import (
    _fit,
    _held_out_logits,
    _operating_points,
    _referral,
)

if TYPE_CHECKING:
    from histolens.stats.decisions import OperatingPoints
    from histolens.training.common import TrainResult

__all__ = ["train_probe"]

log = logging.getLogger("histolens")

# From this many images a run draws its plots in a worker process started with it
# (histolens.evaluation.plot_worker): it saves about 1 s at the end of a run; a smaller run
# takes a few seconds, and a second interpreter importing matplotlib would cost as much.
PLOT_WORKER_MIN_IMAGES = 200


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


def _arrays(
    cache: FeatureCache,
    recs: Sequence[ImageRecord],
    classes: Sequence[str],
    task: str,
    views: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cached features, class indices and patient groups of ``recs``; with ``views``, each
    image's features are the mean of its clean view and its cached augmented views."""
    from histolens.data.splits import targets

    def features(path: str) -> torch.Tensor:
        if not views:
            return cache.clean[path]
        return torch.cat([cache.clean[path][None], cache.views[path][:views]]).mean(0)

    x = torch.stack([features(r.path) for r in recs]).double().numpy()
    return x, np.array(targets(recs, classes, task)), np.array([_group_of(r) for r in recs])


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
    from histolens.training.common import TrainResult
    from histolens.training.data import prepare_records, readable_split
    from histolens.training.distributed import launch

    start = time.perf_counter()
    notes: list[str] = []
    spec = get_backbone_spec(cfg.model.backbone)
    dataset, records, classes = prepare_records(cfg)
    fabric = fabric if fabric is not None else launch(cfg.train, lightning=False)
    main = fabric.is_global_zero
    worker = None
    if main and evaluate and write_outputs and len(records) >= PLOT_WORKER_MIN_IMAGES:
        worker = PlotWorker()  # imports matplotlib while this process works; draws at the end
    try:
        if split is None:
            notes += _audit_notes(records, progress)
            split = _choose_split(cfg, records, notes)
        notes = list(dict.fromkeys(notes + split.warnings))
        for n in notes if main else ():
            log.warning(n)
        frozen = frozen_features(
            cfg,
            spec,
            len(classes),
            split,
            run_dir,
            bank,
            feature_store,
            progress,
            write_outputs,
            fabric,
        )
        split = readable_split(split, frozen.images, notes)
        if not split.train + split.val:
            raise DataError("No readable training images.")
        if not main:  # rank 0 fits the probe on the gathered features and writes the files
            ckpt = run_dir / BEST_CHECKPOINT
            return TrainResult(
                run_dir, ckpt, 0, 0, float("nan"), 0.0, global_rank=fabric.global_rank
            )
        cfg = replace(cfg, train=replace(cfg.train, engine=frozen.engine))
        run = _ProbeRun(cfg, run_dir, frozen, classes, split, dataset)
        result = _fit_and_write(run, notes, progress, evaluate, write_outputs, worker)
    finally:
        if worker is not None:
            worker.close()
    result.seconds = time.perf_counter() - start
    return result


@dataclass(frozen=True)
class _ProbeRun:
    """What rank 0's steps share: the run's config (its engine resolved), folder, frozen
    backbone and features, classes, patient-level split and dataset."""

    cfg: RunConfig
    run_dir: Path
    frozen: FrozenBackbone
    classes: Sequence[str]
    split: Split
    dataset: Any


def _fit_and_write(
    run: _ProbeRun,
    notes: list[str],
    progress: bool,
    evaluate: bool,
    write_outputs: bool,
    plot_worker: PlotWorker | None = None,
) -> TrainResult:
    """Rank 0's part: write the run's files, fit the probe on the train + val features, score it
    on held-out patients, and write the checkpoint and (with ``evaluate``) the evaluation."""
    from histolens.training.common import CONFIG_FILE, SPLIT_FILE, TrainResult
    from histolens.training.data import write_skipped

    cfg, run_dir, frozen, classes, split = run.cfg, run.run_dir, run.frozen, run.classes, run.split
    dataset = run.dataset
    write_skipped(run_dir, frozen.images, dataset)
    if write_outputs:
        split.write_csv(run_dir / SPLIT_FILE)
        atomic_write_text(run_dir / CONFIG_FILE, cfg.to_json())
    n_classes = len(classes)
    train_recs = split.train + split.val
    x, y, g = _arrays(frozen.cache, train_recs, classes, cfg.data.task, cfg.train.probe_views)
    if len(np.unique(y)) < 2:
        raise DataError("The training images hold only one class; the probe needs two or more.")
    final = _fit(cfg, x, y, g, n_classes, cfg.data.seed)
    x_test = _arrays(frozen.cache, split.test, classes, cfg.data.task)[0] if split.test else None
    held = _held_out_logits(cfg, final, split, x, y, g, n_classes, x_test, progress)
    calibration = fit_calibration(cfg, held.calib_logits, held.calib_y, n_classes)
    mags = [r.magnification for r in split.train + split.val]
    ops = None
    if n_classes == 2:  # the threshold per magnification, on the same held-out logits
        ops = _operating_points(cfg, held.calib_logits, held.calib_y, g, mags, calibration[0])
        notes += [n for n in ops.notes() if n not in notes]
        calibration = (calibration[0], ops.pooled)  # one pooled threshold: the operating points'
    referral = _referral(cfg, held, calibration, x, y, g, classes, notes, mags, ops)
    ckpt = _save_probe_checkpoint(run, final, calibration, referral, ops)
    result = TrainResult(run_dir, ckpt, 0, 0, float("nan"), 0.0, notes=notes)
    if evaluate:
        result.metrics = _evaluate(
            cfg,
            run_dir,
            held,
            calibration,
            classes,
            referral,
            x_test,
            frozen.images,
            dataset,
            notes,
            write_outputs,
            ops,
            frozen.content,
            plot_worker,
        )
    return result


def _save_probe_checkpoint(
    run: _ProbeRun,
    final: ProbeFit,
    calibration: tuple[float, float],
    referral: Referral,
    operating_points: OperatingPoints | None = None,
) -> Path:
    """Load ``final`` into the head and write the checkpoint (with the guard's state); its path."""
    from histolens.training.common import initial_metadata

    cfg, frozen, classes, split = run.cfg, run.frozen, run.classes, run.split
    temperature, threshold = calibration
    final.load_into(frozen.model.head.out)
    weights = balanced_class_weights(split.train + split.val, classes, cfg.data.task)
    metadata = initial_metadata(
        cfg,
        frozen.spec,
        classes,
        frozen.preprocess,
        frozen.stain,
        frozen.stain_ref,
        split,
        weights,
        run.dataset,
    )
    metadata = replace(
        metadata,
        head=HeadSpec.linear(),
        feature_layer=frozen.layer,
        threshold=threshold,
        temperature=temperature,
        threshold_method=cfg.train.threshold_method,
        probe=ProbeChoice(final.C, {f"{c:g}": s for c, s in final.inner_scores.items()}),
        conformal=referral.conformal.to_dict() if referral.conformal is not None else None,
        ood=referral.guard.to_dict(),
        operating_points=None if operating_points is None else operating_points.to_dict(),
    )
    ckpt = run.run_dir / BEST_CHECKPOINT
    save_checkpoint(ckpt, {**frozen.model.state_dict(), **referral.guard.state_dict()}, metadata)
    return ckpt


def _audit_notes(records: Sequence[ImageRecord], progress: bool) -> list[str]:
    """The shortcut audit's warnings (image size, source folder, format) at the start of a run."""
    from histolens.data.audit import audit_dataset

    try:
        report = audit_dataset(list(records), progress=False, colour=False)
    except DataError:
        return []
    if not report.warnings:
        return []
    others = report.flagged[1:]
    also = f" Also flagged: {', '.join(others)}." if others else ""
    return [f"Shortcut audit: {report.warnings[0]}{also} See 'histolens data audit' for the table."]
