"""What Lightning runs for ``histolens train --head mlp``: the module and the run's callbacks.

The module trains the head on cached features (frozen backbone) or the head and the unfrozen
stages on images; the callbacks write ``best.safetensors``, ``lightning/last.ckpt`` for
``--resume`` and the per-epoch CSV log, each atomically and on rank 0 only. Lightning is
imported inside the factories: it is slow to import, and ``--help`` should not wait for it.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from histolens.atomic import atomic_open, atomic_path
from histolens.checkpoint import (
    BEST_CHECKPOINT,
    CheckpointMetadata,
    read_metadata,
    save_checkpoint,
)
from histolens.config import RunConfig
from histolens.model import HistoClassifier
from histolens.pipeline import InputPipeline

__all__ = [
    "EPOCH_LOG",
    "LAST_CHECKPOINT",
    "ClassifierModule",
    "atomic_checkpoint_io",
    "run_callbacks",
]

LAST_CHECKPOINT = Path("lightning") / "last.ckpt"
# One row per epoch; under logs/version_0 where Lightning's CSVLogger used to write it, which
# the training-curve plot and evaluate still read.
EPOCH_LOG = Path("logs") / "version_0" / "metrics.csv"
EPOCH_LOG_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "val_acc", "val_auc", "lr")


class ClassifierModule:
    """Factory for the LightningModule (imported lazily: Lightning is slow to import)."""

    def __new__(cls, *args, **kwargs):
        return _lightning_module_class()(*args, **kwargs)


def _lightning_module_class():
    import lightning as L

    class _ClassifierModule(L.LightningModule):
        """Trains the head (cached features) or head + unfrozen stages (images) of a model."""

        def __init__(
            self,
            model: HistoClassifier,
            cfg: RunConfig,
            class_weights: Sequence[float],
            pipeline: InputPipeline | None,
            cached: bool,
        ) -> None:
            super().__init__()
            self.model = model
            self.cfg = cfg
            self.cached = cached
            self.pipeline = pipeline
            self.register_buffer(
                "class_weights", torch.tensor(list(class_weights), dtype=torch.float32)
            )
            self.binary = model.head.out.out_features == 1
            self.frozen_backbone = not any(p.requires_grad for p in model.backbone.parameters())
            # A frozen backbone is rebuilt from its pretrained source on resume, so Lightning's
            # checkpoints (written every epoch) hold only what trains.
            self.strict_loading = not self.frozen_backbone
            self._val_logits: list[torch.Tensor] = []
            self._val_targets: list[torch.Tensor] = []

        def on_save_checkpoint(self, checkpoint):
            if self.frozen_backbone:
                checkpoint["state_dict"] = {
                    k: v
                    for k, v in checkpoint["state_dict"].items()
                    if not k.startswith("model.backbone.")
                }

        def train(self, mode: bool = True):
            super().train(mode)
            # The backbone keeps its ImageNet batch-norm statistics (Keras's frozen layers too).
            self.model.backbone.eval()
            return self

        def _logits(self, batch, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
            if self.cached:
                feats, y = batch
                if feats.dim() == 3:  # (B, K, D): epoch e trains on view e mod K
                    feats = feats[:, self.current_epoch % feats.shape[1]]
                return self.model.head(feats), y
            images, y, keys = batch
            if train:
                x = self.pipeline.train_inputs(images, keys, self.current_epoch)
            else:
                x = self.pipeline.eval_inputs(images)
            return self.model(x), y

        def _loss(self, logits: torch.Tensor, y: torch.Tensor, weighted: bool) -> torch.Tensor:
            w = self.class_weights if weighted and self.cfg.train.class_weights else None
            if self.binary:
                sample_w = w[y.long()] if w is not None else None
                return F.binary_cross_entropy_with_logits(logits[:, 0], y.float(), weight=sample_w)
            return F.cross_entropy(logits, y.long(), weight=w)

        def training_step(self, batch, batch_idx):
            logits, y = self._logits(batch, train=True)
            loss = self._loss(logits, y, weighted=True)
            self.log(
                "train_loss",
                loss,
                on_step=False,
                on_epoch=True,
                prog_bar=True,
                batch_size=len(y),
                sync_dist=True,  # each rank trains on its share of the images
            )
            return loss

        def validation_step(self, batch, batch_idx):
            logits, y = self._logits(batch, train=False)
            self._val_logits.append(logits.detach().float().cpu())
            self._val_targets.append(y.detach().cpu())

        def on_validation_epoch_end(self):
            if not self._val_logits:
                return
            logits, y = torch.cat(self._val_logits), torch.cat(self._val_targets)
            self._val_logits.clear()
            self._val_targets.clear()
            # Unweighted, as Keras reports validation loss. Every rank scores the whole
            # validation set, so all make the same early-stopping and learning-rate decisions.
            self.log("val_loss", self._loss(logits, y, weighted=False), prog_bar=True)
            from histolens.metrics import safe_auc

            if self.binary:
                p = torch.sigmoid(logits[:, 0]).numpy()
                self.log("val_acc", float(((p >= 0.5) == y.numpy().astype(bool)).mean()))
                auc = safe_auc(y.numpy(), p)
            else:
                probs = torch.softmax(logits, 1).numpy()
                self.log("val_acc", float((probs.argmax(1) == y.numpy()).mean()))
                auc = float("nan")
            if np.isfinite(auc):
                self.log("val_auc", auc, prog_bar=True)

        def configure_optimizers(self):
            t = self.cfg.train
            head = [p for p in self.model.head.parameters() if p.requires_grad]
            backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
            groups = [{"params": head, "lr": t.lr}]
            if backbone:
                groups.append({"params": backbone, "lr": t.lr * t.backbone_lr_factor})
            if t.optimizer == "sgd":
                opt = torch.optim.SGD(
                    groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
                )
            elif t.optimizer == "adam":
                opt = torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
            else:
                opt = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, mode="min", factor=t.lr_factor, patience=t.lr_patience, min_lr=t.min_lr
            )
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "monitor": self._monitor()},
            }

        def _monitor(self) -> str:
            return (
                "val_loss" if self.trainer is None or self.trainer.val_dataloaders else "train_loss"
            )

    return _ClassifierModule


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
