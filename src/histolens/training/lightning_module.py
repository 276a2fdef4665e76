"""What Lightning runs for ``histolens train --head mlp``: the LightningModule.

The module trains the head on cached features (frozen backbone) or the head and the unfrozen
stages on images; label smoothing, MixUp and CutMix of its training loss are
:mod:`histolens.training.mixing`'s. The run's callbacks (best and last checkpoints, epoch log) are in
:mod:`histolens.training.lightning_callbacks` and importable from here too. Lightning is imported inside
the factory: it is slow to import, and ``--help`` should not wait for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from histolens.config import RunConfig, TrainConfig
from histolens.models.classifier import HistoClassifier
from histolens.models.pipeline import InputPipeline
from histolens.training.lightning_callbacks import (
    EPOCH_LOG,
    LAST_CHECKPOINT,
    atomic_checkpoint_io,
    run_callbacks,
)
from histolens.training.mixing import (
    batch_generator,
    mix_labelled_batch,
    soft_target_loss,
    soft_targets,
)

__all__ = [
    "EPOCH_LOG",
    "LAST_CHECKPOINT",
    "ClassifierModule",
    "atomic_checkpoint_io",
    "run_callbacks",
]


class ClassifierModule:
    """Factory for the LightningModule (imported lazily: Lightning is slow to import)."""

    def __new__(cls, *args, **kwargs):
        return _lightning_module_class()(*args, **kwargs)


class _ClassifierSteps:
    """The hooks of the LightningModule: trains the head (cached features) or head + unfrozen
    stages (images) of a model. A mixin, so that Lightning is imported only when a run starts
    (:func:`_lightning_module_class` puts it before ``L.LightningModule``)."""

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
        self.n_outputs = model.head.out.out_features
        self.binary = self.n_outputs == 1
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

    def _inputs(self, batch, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's inputs (cached features) or the model's (images), and the labels."""
        if self.cached:
            feats, y = batch
            if feats.dim() == 3:  # (B, K, D): epoch e trains on view e mod K
                feats = feats[:, self.current_epoch % feats.shape[1]]
            return feats, y
        images, y, keys = batch
        if train:
            return self.pipeline.train_inputs(images, keys, self.current_epoch), y
        return self.pipeline.eval_inputs(images), y

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(x) if self.cached else self.model(x)

    def _logits(self, batch, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._inputs(batch, train)
        return self._forward(x), y

    def _loss(
        self, logits: torch.Tensor, y: torch.Tensor, weighted: bool, smoothing: float = 0.0
    ) -> torch.Tensor:
        w = self.class_weights if weighted and self.cfg.train.class_weights else None
        if self.binary:  # w[y] * BCE for hard labels; per class for smoothed ones
            return soft_target_loss(logits, soft_targets(y, 1, smoothing), class_weights=w)
        return F.cross_entropy(logits, y.long(), weight=w, label_smoothing=smoothing)

    def training_step(self, batch, batch_idx):
        x, y = self._inputs(batch, train=True)
        t = self.cfg.train
        w = self.class_weights if t.class_weights else None
        gen = batch_generator(t.seed, self.current_epoch, batch_idx)
        mixed = mix_labelled_batch(x, y, self.n_outputs, t.label_smoothing, t.mixup, t.cutmix, gen)
        if mixed is None:
            loss = self._loss(self._forward(x), y, weighted=True, smoothing=t.label_smoothing)
        else:
            logits = self._forward(mixed.inputs)
            loss = soft_target_loss(logits, mixed.targets, mixed.weights, w)
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
        accuracy, auc = _accuracy_and_auc(logits, y, self.binary)
        self.log("val_acc", accuracy)
        if np.isfinite(auc):
            self.log("val_auc", auc, prog_bar=True)

    def configure_optimizers(self):
        t = self.cfg.train
        opt = _optimizer(self.model, t)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=t.lr_factor, patience=t.lr_patience, min_lr=t.min_lr
        )
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "monitor": self._monitor()},
        }

    def _monitor(self) -> str:
        return "val_loss" if self.trainer is None or self.trainer.val_dataloaders else "train_loss"


def _lightning_module_class():
    """The LightningModule class: :class:`_ClassifierSteps` on ``L.LightningModule``."""
    import lightning as L

    class _ClassifierModule(_ClassifierSteps, L.LightningModule):
        """Trains the head (cached features) or head + unfrozen stages (images) of a model."""

    return _ClassifierModule


def _optimizer(model: HistoClassifier, t: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimiser over what trains: the head at ``lr``, unfrozen backbone stages
    at ``lr * backbone_lr_factor``."""
    head = [p for p in model.head.parameters() if p.requires_grad]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": head, "lr": t.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": t.lr * t.backbone_lr_factor})
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


def _accuracy_and_auc(logits: torch.Tensor, y: torch.Tensor, binary: bool) -> tuple[float, float]:
    """Validation accuracy, and ROC AUC for a binary head (NaN otherwise, or with one class)."""
    from histolens.stats.metrics import safe_auc

    if binary:
        p = torch.sigmoid(logits[:, 0]).numpy()
        return float(((p >= 0.5) == y.numpy().astype(bool)).mean()), safe_auc(y.numpy(), p)
    probs = torch.softmax(logits, 1).numpy()
    return float((probs.argmax(1) == y.numpy()).mean()), float("nan")
