"""Training attention MIL with Lightning: one bag per step, data-parallel, early stopping.

``fit_mil`` seeds everything from the config's seed (``lightning.seed_everything``: initial
weights, dropout; the bag order comes from the sampler's own seeded generator), so a run repeats
exactly. With ``--devices N --strategy ddp`` N processes each take one bag per step and average
their gradients: the same steps as one process accumulating N bags (``MilConfig.accumulate``)
on the same bag order. Given the slides' patients, a fifth of them is held out
(:func:`histolens.training.mil_folds.inner_patient_split`); training stops when their loss has
not improved for ``patience`` epochs (Lightning's ``EarlyStopping``) and the best epoch's weights
are kept. Without enough patients it trains a fixed number of epochs and says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from histolens.errors import ConfigError, DataError
from histolens.training.mil import MilConfig, build_mil_model, feature_standardisation
from histolens.training.mil_folds import InnerSplit, inner_patient_split

__all__ = ["MilFit", "MilProcesses", "fit_mil"]


@dataclass(frozen=True)
class MilProcesses:
    """Where training runs: Lightning's accelerator, devices (processes per machine), strategy
    and nodes, as ``histolens train --accelerator/--devices/--strategy/--num-nodes`` give them."""

    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1


@dataclass
class MilFit:
    """A trained model and what its loop measured (epochs 1-based; ``best_epoch`` None when
    there was no validation split and the last epoch's weights are kept)."""

    model: Any
    epoch_seconds: list[float]
    losses: list[float]
    val_losses: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    train_slides: int = 0
    val_slides: int = 0
    val_patients: int = 0
    no_split: str = ""  # why there was no inner validation split, if there was none
    global_rank: int = 0

    @property
    def epochs(self) -> int:
        return len(self.losses)

    def summary(self) -> dict[str, Any]:
        """The run's record of this fit (plain JSON)."""
        best = None if self.best_epoch is None else self.val_losses[self.best_epoch - 1]
        return {
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "best_val_loss": best,
            "early_stopping": self.best_epoch is not None,
            "train_slides": self.train_slides,
            "val_slides": self.val_slides,
            "val_patients": self.val_patients,
            "no_split": self.no_split,
        }


def fit_mil(
    bags: Sequence[np.ndarray],
    targets: Sequence[int],
    config: MilConfig = MilConfig(),
    patients: Sequence[str] | None = None,
    processes: MilProcesses = MilProcesses(),
    echo: str | None = None,
) -> MilFit:
    """Train on ``bags`` (each N_i x D) with slide ``targets`` (0/1); with ``patients`` and
    ``config.early_stopping``, early stopping on an inner patient split (see the module).
    ``echo``: print one line per epoch to stderr, starting with this prefix."""
    if len(bags) != len(targets) or not bags:
        raise ConfigError("MIL training needs one target per bag and at least one bag.")
    y = np.asarray(targets, np.int64)
    everything = np.arange(len(y))
    split = InnerSplit(everything, everything[:0])
    if patients is not None and config.early_stopping:
        split = inner_patient_split(y, patients, config.seed)
    train = [bags[i] for i in split.train]
    fit = _lightning_fit(train, y[split.train], [bags[i] for i in split.val], y[split.val],
                         config, processes, echo)  # fmt: skip
    fit.train_slides, fit.val_slides = len(split.train), len(split.val)
    if patients is not None:
        fit.val_patients = len({patients[i] for i in split.val})
    fit.no_split = split.reason
    return fit


def _tensors(bags: Sequence[np.ndarray], y: np.ndarray):
    import torch

    x = [torch.from_numpy(np.ascontiguousarray(b, np.float32)) for b in bags]
    return x, torch.from_numpy(np.asarray(y, np.float32))


def _lightning_fit(train_bags, train_y, val_bags, val_y, config, processes, echo) -> MilFit:
    """Lightning's fit of a new model (standardised on the training tiles) on the bags."""
    import lightning as L
    import torch

    from histolens.training.distributed import (
        lightning_advice_ignored,
        lightning_devices,
        quiet_lightning,
    )
    from histolens.training.mil_lightning import epoch_record, mil_module

    validate = len(val_bags) > 0
    epochs = config.max_epochs if validate else config.epochs
    positives = float(train_y.sum())
    pos_weight = (len(train_y) - positives) / positives if 0 < positives < len(train_y) else 1.0
    # A few bags per epoch: fewer steps than Lightning's logging interval.
    with quiet_lightning(), lightning_advice_ignored(".*smaller than the logging interval.*"):
        L.seed_everything(config.seed, verbose=False)
        model = build_mil_model(train_bags[0].shape[1], config)
        mean, std = feature_standardisation(train_bags)
        model.mean.copy_(torch.from_numpy(mean))
        model.std.copy_(torch.from_numpy(std))
        val = _tensors(val_bags, val_y) if validate else None
        module = mil_module(model, config, pos_weight, _tensors(train_bags, train_y), val)
        record = epoch_record(epochs, echo, keep_best=validate)
        callbacks = [record]
        if validate:
            from lightning.pytorch.callbacks import EarlyStopping

            callbacks.append(EarlyStopping("val_loss", patience=config.patience, mode="min"))
        try:
            trainer = L.Trainer(
                max_epochs=epochs,
                accelerator=processes.accelerator,
                devices=lightning_devices(processes.devices),
                strategy=processes.strategy,
                num_nodes=processes.num_nodes,
                precision="32-true",
                accumulate_grad_batches=config.accumulate,
                use_distributed_sampler=False,  # the module deals the bags out itself
                limit_val_batches=1.0 if validate else 0,
                callbacks=callbacks,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
            )
        except Exception as exc:  # Lightning's MisconfigurationException and ValueErrors
            raise ConfigError(
                f"Cannot train MIL on accelerator '{processes.accelerator}' with devices "
                f"'{processes.devices}', strategy '{processes.strategy}' and "
                f"{processes.num_nodes} node(s): {exc}"
            ) from None
        trainer.fit(module)
    if validate and record.best_state is None:  # EarlyStopping stops at a non-finite loss
        raise DataError(
            "MIL training gave no finite validation loss (NaN or inf from the first epoch): "
            "check the feature bags for NaN or infinite values, or lower the learning rate."
        )
    if record.best_state is not None:
        model.load_state_dict(record.best_state)
    model.cpu().eval()
    return MilFit(
        model, record.seconds, record.losses, record.val_losses, record.best_epoch,
        global_rank=trainer.global_rank,
    )  # fmt: skip
