"""``histolens train``: a linear probe on frozen features (default), or Lightning's loop.

The run directory holds the resolved config, the split, the feature cache, Lightning's
``last.ckpt`` for ``--resume``, the CSV log, and ``best.safetensors``, the self-describing
checkpoint everything else loads through :class:`histolens.inference.predictor.Predictor`.

Images stream from disk: a frozen backbone sees each image once and only its features are kept;
fine-tuning (``--unfreeze``) decodes the images again each epoch. With ``--devices N`` the run
is N data-parallel processes (``histolens.training.distributed``); rank 0 writes every file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

from histolens.checkpoint.io import (
    BEST_CHECKPOINT,
    read_metadata,
)
from histolens.config import RunConfig
from histolens.data.splits import Split
from histolens.errors import ConfigError
from histolens.models.feature_cache import FeatureCache
from histolens.models.pipeline import ImageBank
from histolens.training.common import CONFIG_FILE, FEATURE_CACHE, SPLIT_FILE, TrainResult
from histolens.training.data import prepare_records
from histolens.training.distributed import launch, needs_fabric, quiet_lightning
from histolens.training.lightning_module import EPOCH_LOG, LAST_CHECKPOINT, ClassifierModule

__all__ = [
    "CONFIG_FILE",
    "EPOCH_LOG",
    "FEATURE_CACHE",
    "SPLIT_FILE",
    "LAST_CHECKPOINT",
    "ClassifierModule",
    "TrainResult",
    "prepare_records",
    "train",
]

log = logging.getLogger("histolens")


def train(
    cfg: RunConfig,
    run_dir: str | os.PathLike,
    resume: bool = False,
    split: Split | None = None,
    progress: bool = True,
    evaluate: bool = True,
    epochs: int | None = None,
    bank: ImageBank | None = None,
    feature_store: dict[str, FeatureCache] | None = None,
    write_outputs: bool = True,
    epoch_lines: bool = False,
) -> TrainResult:
    """Train a model as ``cfg`` says, writing everything into ``run_dir``.

    With ``resume`` the run continues from its ``lightning/last.ckpt`` with its saved config
    (``epochs`` may extend it); the feature cache is reused when its fingerprint matches.
    ``split`` overrides the patient-level split; ``bank`` and ``feature_store`` let several
    runs over the same images (cross-validation folds) decode and featurise each image once;
    ``write_outputs=False`` skips plots and the report. ``epoch_lines`` prints one line per
    epoch to stderr, for logs that progress bars would fill with carriage returns. With
    several devices or nodes in ``cfg.train``, every process runs this and gets a result.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    cfg = _resume_config(run_dir, epochs) if resume else _new_run_config(cfg, run_dir)
    # The linear probe on one CPU process runs without Lightning (importing it takes seconds).
    plain = cfg.model.head == "linear" and not needs_fabric(cfg.train)
    with contextlib.nullcontext() if plain else quiet_lightning():
        fabric = launch(cfg.train, lightning=not plain)
        progress = progress and fabric.is_global_zero
        if resume and fabric.is_global_zero:
            _remove_stale_temp_files(run_dir)
        if cfg.model.head == "linear":
            from histolens.training.probe_run import train_probe

            result = train_probe(
                cfg, run_dir, split, progress, evaluate, bank, feature_store, write_outputs, fabric
            )
        else:
            from histolens.training.lightning_run import RunOptions, train_lightning

            opts = RunOptions(resume, progress, evaluate, write_outputs, epoch_lines, feature_store)
            result = train_lightning(cfg, run_dir, split, bank, fabric, opts)
    result.seconds = time.perf_counter() - start
    return result


def _new_run_config(cfg: RunConfig, run_dir: Path) -> RunConfig:
    if (run_dir / LAST_CHECKPOINT).exists() or (run_dir / BEST_CHECKPOINT).exists():
        raise ConfigError(
            f"{run_dir} already holds a training run; use --resume to continue it or choose "
            "another --out."
        )
    return cfg


def _resume_config(run_dir: Path, epochs: int | None) -> RunConfig:
    """The saved config of the run in ``run_dir``, or a ConfigError saying what to run instead."""
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise ConfigError(
            f"Cannot resume {run_dir}: it has no {CONFIG_FILE}, so no run was started there; "
            f"start one with 'histolens train --data DATA --out {run_dir}'."
        )
    cfg = RunConfig.from_dict(json.loads(saved.read_text(encoding="utf-8")))
    if cfg.model.head == "linear" and (run_dir / BEST_CHECKPOINT).exists():
        raise ConfigError(
            f"{run_dir} is a finished linear-probe run, and a linear probe has nothing to "
            "resume (it is fitted in one go); to train again, run 'histolens train' with a "
            "new --out."
        )
    if cfg.model.head != "linear" and not (run_dir / LAST_CHECKPOINT).is_file():
        raise ConfigError(
            f"Cannot resume {run_dir}: it stopped before its first epoch ended, so it has no "
            f"{LAST_CHECKPOINT.as_posix()}; run the same 'histolens train' command again "
            "without --resume."
        )
    _remove_stale_temp_files(run_dir)
    return cfg.override({"train.epochs": epochs}) if epochs is not None else cfg


def _remove_stale_temp_files(run_dir: Path) -> None:
    """Drop the temp files of atomic writes that a killed run left (never read, but large)."""
    for folder in (run_dir, run_dir / LAST_CHECKPOINT.parent, run_dir / EPOCH_LOG.parent):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def checkpoint_task_guard(checkpoint: str | os.PathLike, task: str) -> None:
    """Refuse to use a checkpoint for another task (binary vs subtype) than it was trained for."""
    meta = read_metadata(checkpoint)
    if meta.task != task:
        raise ConfigError(
            f"The checkpoint was trained for the {meta.task} task "
            f"({', '.join(meta.class_names)}), not {task}."
        )
