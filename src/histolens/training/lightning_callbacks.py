"""The run's Lightning callbacks: best checkpoint, last checkpoint for ``--resume``, epoch log.

``best.safetensors``, ``lightning/last.ckpt`` and the per-epoch CSV log are each written
atomically and on rank 0 only. Lightning is imported inside the factories: it is slow to import,
and ``--help`` should not wait for it. :mod:`histolens.training.lightning_module` re-exports the public
names, where the training code imports them from.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histolens.atomic import atomic_open, atomic_path
from histolens.checkpoint.io import (
    BEST_CHECKPOINT,
    CheckpointMetadata,
    read_metadata,
    save_checkpoint,
)
from histolens.rundir import RunDir

__all__ = [
    "EPOCH_LOG",
    "LAST_CHECKPOINT",
    "atomic_checkpoint_io",
    "run_callbacks",
]

LAST_CHECKPOINT = RunDir.LAST_CHECKPOINT
# One row per epoch; under logs/version_0 where Lightning's CSVLogger used to write it, which
# the training-curve plot and evaluate still read.
EPOCH_LOG = RunDir.EPOCH_LOG
EPOCH_LOG_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "val_acc", "val_auc", "lr")


# Over 60 lines: the Callback subclass is defined inside its factory so that Lightning is imported
# only when a run starts; its qualified name is the key of its state (the best so far) in
# last.ckpt, so moving it out would lose that state when an older run is resumed.
def _export_callback_class():
    from lightning.pytorch.callbacks import Callback

    class ExportBestCheckpoint(Callback):
        """Keeps the best weights (lowest monitored loss) and writes best.safetensors atomically.

        The best state is copied in memory at every improvement and written at most every
        ``flush_seconds`` and at the end (or on an exception), so a fast head-only run is not
        bound by disk writes while an interrupted run still leaves a recent best checkpoint.
        """

        def __init__(
            self,
            path: Path,
            metadata: CheckpointMetadata,
            monitor: str,
            flush_seconds: float = 15.0,
        ) -> None:
            self.path, self.metadata, self.monitor = path, metadata, monitor
            self.flush_seconds = flush_seconds
            self.best = float("inf")
            self.best_epoch = -1
            self._pending: tuple[dict[str, torch.Tensor], CheckpointMetadata] | None = None
            self._last_flush = time.monotonic()

        def _flush(self) -> None:
            if self._pending is not None:
                save_checkpoint(self.path, *self._pending)
                self._pending = None
            self._last_flush = time.monotonic()

        def on_train_epoch_end(self, trainer, pl_module):
            value = trainer.callback_metrics.get(self.monitor)
            if value is None or not trainer.is_global_zero:
                return
            value = float(value)
            if value < self.best:
                self.best, self.best_epoch = value, trainer.current_epoch
                meta = replace(
                    self.metadata,
                    epoch=trainer.current_epoch,
                    best_val_loss=value,
                    val_auc_at_best=float(trainer.callback_metrics.get("val_auc", np.nan)),
                )
                state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
                self._pending = (state, meta)
            if time.monotonic() - self._last_flush >= self.flush_seconds:
                self._flush()

        def on_train_end(self, trainer, pl_module):
            if trainer.is_global_zero:
                self._flush()

        def on_exception(self, trainer, pl_module, exception):
            if trainer.is_global_zero:
                self._flush()

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            # The best model is on disk before last.ckpt records it as the best.
            if trainer.is_global_zero:
                self._flush()

        def state_dict(self):
            return {"best": self.best, "best_epoch": self.best_epoch}

        def load_state_dict(self, state):
            self.best, self.best_epoch = state["best"], state["best_epoch"]
            # A run killed between writing best.safetensors and last.ckpt has a newer best on
            # disk than in last.ckpt; the file is what the resumed run has to beat.
            if self.path.exists():
                meta = read_metadata(self.path)
                if meta.best_val_loss is not None and meta.epoch is not None:
                    self.best, self.best_epoch = meta.best_val_loss, meta.epoch

    return ExportBestCheckpoint


def _last_checkpoint_class():
    from lightning.pytorch.callbacks import ModelCheckpoint

    class LastCheckpoint(ModelCheckpoint):
        """``lightning/last.ckpt`` for --resume, written at the end of each epoch.

        Lightning's ``save_last`` alone writes it only next to a top-k checkpoint (so never with
        ``save_top_k=0``) and at the end of training. Epochs shorter than ``overhead`` times a
        write (head-only epochs on cached features take milliseconds) are batched, up to
        ``max_gap`` seconds of them, so writing costs about 1/overhead of the training time
        and a kill loses at most one epoch or ``max_gap`` seconds of work.
        """

        def __init__(self, dirpath: Path, overhead: float = 50.0, max_gap: float = 10.0) -> None:
            super().__init__(
                dirpath=str(dirpath),
                save_top_k=0,
                save_last=True,
                every_n_epochs=1,
                save_on_train_epoch_end=True,
                enable_version_counter=False,
            )
            self.overhead, self.max_gap = overhead, max_gap
            self.writes, self.write_seconds = 0, 0.0
            # The fastest write so far: one slowed by a busy disk does not stretch the gap.
            self._written_at, self._cost = -math.inf, math.inf

        def _write(self, trainer) -> None:
            start = time.monotonic()
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._written_at = time.monotonic()
            self._cost = min(self._cost, self._written_at - start)
            self.writes += 1
            self.write_seconds += self._written_at - start

        def on_train_epoch_end(self, trainer, pl_module):
            gap = min(self.overhead * self._cost, self.max_gap)
            due = time.monotonic() - self._written_at >= gap
            if due and not self._should_skip_saving_checkpoint(trainer):
                self._write(trainer)

        def on_train_end(self, trainer, pl_module):
            if not self._should_skip_saving_checkpoint(trainer):
                self._write(trainer)

    return LastCheckpoint


def atomic_checkpoint_io():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Writes a checkpoint next to its target, then renames it into place.

        Lightning's fsspec transaction writes to the system temp folder and moves the file,
        which is a copy, torn by a kill, when that folder is on another file system.
        """

        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            with atomic_open(path, "wb") as fh:
                torch.save(checkpoint, fh)

    return AtomicCheckpointIO()


def _read_epoch_log(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return [r for r in csv.DictReader(fh) if r.get("epoch")]


def _epoch_line(row: dict[str, Any], max_epochs: int) -> str:
    values = ", ".join(
        f"{k} {row[k]:.4f}" for k in ("train_loss", "val_loss", "val_auc") if k in row
    )
    return f"epoch {row['epoch'] + 1}/{max_epochs}: {values}"


def _epoch_log_class():
    from lightning.pytorch.callbacks import Callback

    class EpochLog(Callback):
        """One CSV row per finished epoch (and, with ``echo``, one line on stderr).

        Lightning's CSVLogger deletes its file on resume and flushes every 100 steps. This log
        is rewritten atomically with each last.ckpt and at the end and, on resume, keeps only
        the epochs that the checkpoint holds, so a killed and resumed run logs every epoch
        exactly once.
        """

        def __init__(self, path: Path, echo: bool = False) -> None:
            self.path, self.echo = path, echo
            self.rows: list[dict[str, Any]] = []
            self.first_epoch = 0
            self._lr = math.nan

        def _write(self, trainer) -> None:
            if not trainer.is_global_zero:
                return
            buf = io.StringIO()
            writer = csv.DictWriter(buf, EPOCH_LOG_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
            # No fsync: os.replace is what makes a kill safe.
            with atomic_path(self.path) as tmp:
                tmp.write_text(buf.getvalue(), encoding="utf-8")

        def on_train_start(self, trainer, pl_module):
            self.first_epoch = trainer.current_epoch
            done = _read_epoch_log(self.path)
            self.rows = [r for r in done if int(float(r["epoch"])) < self.first_epoch]
            self._write(trainer)

        def on_train_epoch_start(self, trainer, pl_module):
            self._lr = trainer.optimizers[0].param_groups[0]["lr"]

        def on_train_epoch_end(self, trainer, pl_module):
            metrics = trainer.callback_metrics
            row = {"epoch": trainer.current_epoch, "step": trainer.global_step, "lr": self._lr}
            row.update({k: float(metrics[k]) for k in EPOCH_LOG_COLUMNS[2:6] if k in metrics})
            self.rows.append(row)
            if self.echo and trainer.is_global_zero:
                print(_epoch_line(row, trainer.max_epochs), file=sys.stderr, flush=True)

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            self._write(trainer)

        def on_train_end(self, trainer, pl_module):
            self._write(trainer)

        def on_exception(self, trainer, pl_module, exception):
            self._write(trainer)

    return EpochLog


def _loggers(run_dir: Path):
    """TensorBoard when installed (a resumed run adds a version); the CSV log is EpochLog."""
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger
    except ImportError:
        return []
    version = 0
    while (run_dir / "tensorboard" / f"version_{version}").exists():
        version += 1
    return [TensorBoardLogger(str(run_dir), name="tensorboard", version=version)]


def run_callbacks(
    run_dir: Path,
    metadata: CheckpointMetadata,
    monitor: str,
    patience: int,
    write_checkpoints: bool,
    echo_epochs: bool,
    progress_every: int,
):
    """A run's callbacks and loggers, with the two callbacks read after training.

    Early stopping on ``monitor``; ``best.safetensors`` (ExportBestCheckpoint) and, with
    ``write_checkpoints``, Lightning's ``last.ckpt`` for --resume; the epoch log (echoed to
    stderr with ``echo_epochs``); a progress bar redrawn every ``progress_every // 2`` batches
    when ``progress_every`` > 0. Returns (callbacks, loggers, export, epoch_log).
    """
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, TQDMProgressBar

    export = _export_callback_class()(run_dir / BEST_CHECKPOINT, metadata, monitor)
    epoch_log = _epoch_log_class()(run_dir / EPOCH_LOG, echo=echo_epochs)
    loggers = _loggers(run_dir)
    callbacks = [
        EarlyStopping(monitor=monitor, patience=patience, mode="min"),
        # Lightning's last.ckpt is for --resume; the best model is best.safetensors (above).
        *(
            [_last_checkpoint_class()(run_dir / LAST_CHECKPOINT.parent)]
            if write_checkpoints
            else []
        ),
        *([LearningRateMonitor(logging_interval="epoch")] if loggers else []),
        export,
        epoch_log,
    ]
    if progress_every:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, progress_every // 2)))
    return callbacks, loggers, export, epoch_log
