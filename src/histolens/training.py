"""``histolens train``: Lightning runs the loop; a frozen backbone trains its head on cached features.

The run directory holds the resolved config, the split, the feature cache, Lightning's
``last.ckpt`` for ``--resume``, the CSV log, and ``best.safetensors``, the self-describing
checkpoint everything else loads through :class:`histolens.predictor.Predictor`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from histolens.atomic import atomic_open, atomic_path, atomic_write_text
from histolens.backbones import get_backbone_spec
from histolens.checkpoint import BEST_CHECKPOINT, read_metadata, save_checkpoint
from histolens.config import RunConfig
from histolens.data import (
    Dataset as Records,
)
from histolens.data import (
    ImageRecord,
    class_names_for,
    discover,
    filter_records,
    target_of,
)
from histolens.errors import ConfigError, DataError
from histolens.model import HistoClassifier, build_model, resolve_feature_layer
from histolens.pipeline import FeatureCache, ImageBank, InputPipeline
from histolens.splits import Split, balanced_class_weights, split_by_patient
from histolens.transforms import Augmenter, resolve_preprocess

__all__ = ["ClassifierModule", "TrainResult", "prepare_records", "train"]

log = logging.getLogger("histolens")

FEATURE_CACHE = "features.safetensors"
CONFIG_FILE = "config.json"
SPLIT_FILE = "split.csv"
LAST_CHECKPOINT = Path("lightning") / "last.ckpt"
# One row per epoch; under logs/version_0 where Lightning's CSVLogger used to write it, which
# the training-curve plot and evaluate still read.
EPOCH_LOG = Path("logs") / "version_0" / "metrics.csv"
EPOCH_LOG_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "val_acc", "val_auc", "lr")


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    checkpoint: Path
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    first_epoch: int = 0  # where this invocation started: > 0 for a resumed run


def prepare_records(cfg: RunConfig) -> tuple[Records, list[ImageRecord], tuple[str, ...]]:
    """Discover the data, keep the configured magnification and task, and name the classes."""
    dataset = discover(cfg.data.path)
    records = filter_records(dataset.records, cfg.data.magnification, cfg.data.task)
    classes = class_names_for(cfg.data.task, records)
    present = {target_of(r, cfg.data.task) for r in records}
    if len(present) < 2:
        raise DataError(
            f"Training needs at least two classes; {cfg.data.path} has only {', '.join(present)}."
        )
    return dataset, records, classes


class _ImageSet(Dataset):
    def __init__(self, bank: ImageBank, records: Sequence[ImageRecord], targets: Sequence[int]):
        self.bank, self.paths, self.targets = bank, [r.path for r in records], list(targets)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.bank.images[self.paths[i]], self.targets[i], self.paths[i]


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
                "train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y)
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
            # Unweighted, as Keras reports validation loss.
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
            self, path: Path, metadata: dict[str, Any], monitor: str, flush_seconds: float = 15.0
        ) -> None:
            self.path, self.metadata, self.monitor = path, metadata, monitor
            self.flush_seconds = flush_seconds
            self.best = float("inf")
            self.best_epoch = -1
            self._pending: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
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
                meta = {
                    **self.metadata,
                    "epoch": trainer.current_epoch,
                    "best_val_loss": value,
                    "val_auc_at_best": float(trainer.callback_metrics.get("val_auc", np.nan)),
                }
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
                if "best_val_loss" in meta:
                    self.best, self.best_epoch = float(meta["best_val_loss"]), int(meta["epoch"])

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


def _atomic_checkpoint_io():
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


def _fit_stain(
    cfg: RunConfig, bank: ImageBank, train_paths: Sequence[str], preprocess
) -> tuple[Any, str | None]:
    """A StainNormalizer fitted to the given reference image, or to the median of up to 200
    training images (label-free, and robust to one unusual slide)."""
    if cfg.stain.method == "none":
        return None, None
    from histolens.imageio import load_rgb
    from histolens.stain import StainNormalizer

    normalizer = StainNormalizer(cfg.stain.method)
    if cfg.stain.reference and str(cfg.stain.reference).lower().endswith(".json"):
        try:
            state = json.loads(Path(cfg.stain.reference).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"Cannot read the stain reference {cfg.stain.reference}: {exc}"
            ) from None
        fitted = StainNormalizer.from_dict(state)
        if fitted.method != cfg.stain.method or not fitted.fitted:
            raise ConfigError(
                f"The stain reference {cfg.stain.reference} holds no fitted {cfg.stain.method} "
                "state; give an image, or a JSON state saved from the same method."
            )
        return fitted, str(cfg.stain.reference)
    if cfg.stain.reference:
        ref = preprocess.resize(load_rgb(cfg.stain.reference))
        normalizer.fit(ref)
        return normalizer, str(cfg.stain.reference)
    paths = [p for p in train_paths if p in bank]
    step = max(1, -(-len(paths) // 200))  # a median over up to 200 images is plenty
    candidates = paths[::step]
    normalizer.fit_median([bank.images[p] for p in candidates])
    return normalizer, f"median of {len(candidates)} training images"


def _targets(records: Sequence[ImageRecord], classes: Sequence[str], task: str) -> list[int]:
    index = {c: i for i, c in enumerate(classes)}
    return [index[target_of(r, task)] for r in records]


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
    epoch to stderr, for logs that progress bars would fill with carriage returns.
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor

    start = time.perf_counter()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    run_dir = Path(run_dir)
    notes: list[str] = []
    if resume:
        cfg = _resume_config(run_dir, epochs)
    elif (run_dir / LAST_CHECKPOINT).exists() or (run_dir / BEST_CHECKPOINT).exists():
        raise ConfigError(
            f"{run_dir} already holds a training run; use --resume to continue it or choose "
            "another --out."
        )
    if cfg.model.head == "linear":
        from histolens.probe_run import train_probe

        return train_probe(
            cfg, run_dir, split, progress, evaluate, bank, feature_store, write_outputs
        )
    mlp_notes: list[str] = []
    if cfg.train.cv_folds:
        mlp_notes.append(
            "The MLP head is trained and measured on one held-out split (--val-fraction, "
            "--test-fraction); --cv-folds applies to the linear probe."
        )
        cfg = cfg.override({"train.cv_folds": 0})
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")

    spec = get_backbone_spec(cfg.model.backbone)  # a mistyped name fails before any work
    dataset, records, classes = prepare_records(cfg)
    if split is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            split = split_by_patient(
                records,
                cfg.data.task,
                cfg.data.val_fraction,
                cfg.data.test_fraction,
                cfg.data.seed,
                cfg.data.group_by,
            )
        notes += [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    notes += mlp_notes + split.warnings
    for n in notes:
        log.warning(n)

    layer = resolve_feature_layer(spec, cfg.model.feature_layer, cfg.model.head)
    model = build_model(
        spec, len(classes), cfg.model.pretrained, cfg.model.head_dims, cfg.model.dropouts, layer
    )
    # Created only now: a mistyped option, bad data or missing weights leave no empty run folder.
    run_dir.mkdir(parents=True, exist_ok=True)
    size = spec.input_size_for(cfg.model.input_size)
    preprocess = resolve_preprocess(model.backbone, size)
    cached = cfg.train.feature_cache and cfg.model.unfreeze == 0
    model.set_trainable(cfg.model.unfreeze)

    bank, split = readable_split(split, preprocess, bank, progress, run_dir, dataset, notes)
    keep = split.train + split.val + split.test
    if not split.train:
        raise DataError("No readable training images.")
    split.write_csv(run_dir / SPLIT_FILE)

    stain, stain_ref = _fit_stain(cfg, bank, [r.path for r in split.train], preprocess)
    device = torch.device(
        "cuda"
        if torch.cuda.is_available() and cfg.train.accelerator in ("auto", "gpu", "cuda")
        else "cpu"
    )
    model.to(device)
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    pipeline = InputPipeline(preprocess, Augmenter(cfg.augment), stain, cfg.train.seed, device)

    weights = balanced_class_weights(split.train, classes, cfg.data.task)
    y_train = _targets(split.train, classes, cfg.data.task)
    y_val = _targets(split.val, classes, cfg.data.task)

    if cached:
        fingerprint = FeatureCache.fingerprint_of(
            backbone=spec.timm_name,
            feature_layer=layer,
            pretrained=cfg.model.pretrained,
            preprocess=preprocess.to_dict(),
            stain=stain.to_dict() if stain is not None else None,
            augment=cfg.augment,
            views=cfg.train.cache_views,
            seed=cfg.train.seed,
        )
        store = feature_store if feature_store is not None else {}
        cache = store.get(fingerprint) or FeatureCache.load(run_dir / FEATURE_CACHE, fingerprint)
        if cache is None:
            cache = FeatureCache({}, {}, fingerprint)
        store[fingerprint] = cache
        n_views = cfg.train.cache_views if pipeline.augmenter.active else 1
        before = (len(cache.clean), len(cache.views))
        cache.extend(
            model,
            bank,
            pipeline,
            [r.path for r in keep],
            [r.path for r in split.train],
            n_views,
            cfg.train.batch_size,
            progress,
        )
        if feature_store is None and (len(cache.clean), len(cache.views)) != before:
            cache.save(run_dir / FEATURE_CACHE)
        if not pipeline.augmenter.active:
            train_x = torch.stack([cache.clean[r.path] for r in split.train])
        else:
            train_x = torch.stack([cache.views[r.path] for r in split.train])
        train_set = TensorDataset(train_x, torch.tensor(y_train))
        val_set = (
            TensorDataset(
                torch.stack([cache.clean[r.path] for r in split.val]), torch.tensor(y_val)
            )
            if split.val
            else None
        )
    else:
        cache = None
        train_set = _ImageSet(bank, split.train, y_train)
        val_set = _ImageSet(bank, split.val, y_val) if split.val else None

    bs = cfg.train.batch_size
    gen = torch.Generator().manual_seed(cfg.train.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=bs,
        shuffle=True,
        generator=gen,
        drop_last=len(train_set) % bs == 1,
        num_workers=0 if cached else cfg.train.num_workers,
    )
    val_loader = DataLoader(val_set, batch_size=max(bs, 64)) if val_set is not None else None
    monitor = "val_loss" if val_loader is not None else "train_loss"

    metadata = _checkpoint_metadata(
        cfg, spec, classes, preprocess, stain, stain_ref, split, weights, dataset
    )
    module = ClassifierModule(model, cfg, weights, pipeline, cached)
    export = _export_callback_class()(run_dir / BEST_CHECKPOINT, metadata, monitor)
    epoch_log = _epoch_log_class()(run_dir / EPOCH_LOG, echo=epoch_lines and not progress)
    loggers = _loggers(run_dir)
    callbacks = [
        EarlyStopping(monitor=monitor, patience=cfg.train.early_stopping_patience, mode="min"),
        # Lightning's last.ckpt is for --resume; the best model is best.safetensors (above).
        *([_last_checkpoint_class()(run_dir / LAST_CHECKPOINT.parent)] if write_outputs else []),
        *([LearningRateMonitor(logging_interval="epoch")] if loggers else []),
        export,
        epoch_log,
    ]
    if progress:
        from lightning.pytorch.callbacks import TQDMProgressBar

        callbacks.append(TQDMProgressBar(refresh_rate=max(1, len(train_loader) // 2)))
    trainer = L.Trainer(
        max_epochs=cfg.train.epochs,
        accelerator=cfg.train.accelerator,
        devices=_devices(cfg.train.devices),
        precision=cfg.train.precision,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[_atomic_checkpoint_io()],
        enable_progress_bar=progress,
        enable_checkpointing=write_outputs,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, len(train_loader)),
        deterministic=False,
        default_root_dir=str(run_dir),
    )
    last = run_dir / LAST_CHECKPOINT
    atomic_write_text(run_dir / CONFIG_FILE, cfg.to_json())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")
        warnings.filterwarnings("ignore", ".*exists and is not empty.*")
        trainer.fit(
            module,
            train_loader,
            val_loader,
            ckpt_path=str(last) if resume else None,
            weights_only=False,
        )
    if stain is not None:
        notes.append(
            f"Stain normalisation ({cfg.stain.method}) fell back to the unchanged image "
            f"on {stain.fallbacks} of {stain.seen} image passes."
        )
    if not (run_dir / BEST_CHECKPOINT).exists():
        save_checkpoint(
            run_dir / BEST_CHECKPOINT, model, {**metadata, "epoch": trainer.current_epoch}
        )
    result = TrainResult(
        run_dir,
        run_dir / BEST_CHECKPOINT,
        trainer.current_epoch,
        export.best_epoch,
        export.best,
        time.perf_counter() - start,
        notes=notes,
        first_epoch=epoch_log.first_epoch,
    )
    if evaluate and trainer.is_global_zero:
        from histolens.evaluation import finalize_run

        result.metrics = finalize_run(
            run_dir,
            cfg,
            split,
            classes,
            bank=bank,
            cache=cache,
            progress=progress,
            notes=notes,
            write_outputs=write_outputs,
        )
    result.seconds = time.perf_counter() - start
    return result


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


def readable_split(
    split: Split, preprocess, bank: ImageBank | None, progress: bool, run_dir: Path, dataset, notes
) -> tuple[ImageBank, Split]:
    """Decode the split's images once (or reuse ``bank``) and drop the unreadable ones from it,
    listing them in ``skipped.csv`` and a note."""
    everything = split.train + split.val + split.test
    if bank is None or bank.preprocess != preprocess:
        bank = ImageBank([r.path for r in everything], preprocess, progress)
    if bank.skipped:
        notes.append(f"{len(bank.skipped)} unreadable image(s) skipped; see skipped.csv.")
        _write_skipped(run_dir / "skipped.csv", bank.skipped + dataset.skipped)
    parts = [[r for r in part if r.path in bank] for part in (split.train, split.val, split.test)]
    return bank, Split(*parts, split.patient_level, split.warnings)


def _devices(value: str):
    if value in ("auto", ""):
        return "auto"
    return int(value) if str(value).isdigit() else value


def _write_skipped(path: Path, skipped) -> None:
    import csv

    from histolens.atomic import atomic_open

    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason"])
        for s in skipped:
            w.writerow([s.path, s.reason])


def _checkpoint_metadata(
    cfg: RunConfig,
    spec,
    classes,
    preprocess,
    stain,
    stain_ref,
    split: Split,
    weights,
    dataset: Records,
) -> dict[str, Any]:
    return {
        "model_id": f"{spec.name}-{cfg.data.task}-{time.strftime('%Y%m%d-%H%M%S')}",
        "backbone": spec.name,
        "timm_name": spec.timm_name,
        "licence": spec.licence,  # of the backbone's weights (None: see the timm model card)
        "pretrained": cfg.model.pretrained,
        "task": cfg.data.task,
        "class_names": list(classes),
        "head": {"dims": list(cfg.model.head_dims), "dropouts": list(cfg.model.dropouts)},
        "feature_layer": resolve_feature_layer(spec, cfg.model.feature_layer, cfg.model.head),
        "preprocess": preprocess.to_dict(),
        "stain": stain.to_dict() if stain is not None else None,
        "stain_reference": stain_ref,
        "magnification": cfg.data.magnification,
        "threshold": 0.5,
        "temperature": 1.0,
        "config": cfg.to_dict(),
        "class_weights": dict(zip(classes, weights, strict=True)),
        "data": {
            "path": str(cfg.data.path),
            "layout": dataset.layout,
            "patient_level_split": split.patient_level,
            "split": split.summary(cfg.data.task),
        },
    }


def checkpoint_task_guard(checkpoint: str | os.PathLike, task: str) -> None:
    """Refuse to use a checkpoint for another task (binary vs subtype) than it was trained for."""
    meta = read_metadata(checkpoint)
    if meta.get("task") != task:
        raise ConfigError(
            f"The checkpoint was trained for the {meta.get('task')} task "
            f"({', '.join(meta.get('class_names', []))}), not {task}."
        )
