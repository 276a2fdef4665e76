"""What Lightning runs for attention MIL: the LightningModule and the callback that records epochs.

One bag is one step (bags differ in size, so they are not batched). The training bags are dealt
to the processes by a ``DistributedSampler`` seeded with the run's seed (the same order on every
rank, and for one process the same order as rank 0 of several); every process scores every
validation bag, so all ranks see the same validation loss and stop at the same epoch. Lightning is
imported inside the factories: it is slow to import, and ``--help`` should not wait for it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

__all__ = ["epoch_record", "mil_module"]


class _Bags(torch.utils.data.Dataset):
    """(tiles N x D, target) pairs, one per bag."""

    def __init__(self, bags: list[torch.Tensor], targets: torch.Tensor) -> None:
        self.bags, self.targets = bags, targets

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bags[i], self.targets[i]


def mil_module(model, config, pos_weight: float, train: _Bags | None = None, val=None):
    """The LightningModule that trains ``model`` on ``train`` = (bags, targets) with Adam and
    class-balanced binary cross-entropy, and scores ``val`` (None: no validation)."""
    import lightning as L
    from torch.utils.data import DataLoader, DistributedSampler

    class MilModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(float(pos_weight)))
            self.train_set, self.val_set = _Bags(*train), (None if val is None else _Bags(*val))
            self.train_losses: list[torch.Tensor] = []
            self.val_losses: list[torch.Tensor] = []

        def _loss(self, batch) -> torch.Tensor:
            tiles, target = batch
            logit, _ = self.model(tiles)
            return self.loss_fn(logit.reshape(1), target.reshape(1))

        def training_step(self, batch, batch_idx):
            loss = self._loss(batch)
            self.train_losses.append(loss.detach())
            return loss

        def validation_step(self, batch, batch_idx):
            self.val_losses.append(self._loss(batch))

        def on_validation_epoch_end(self) -> None:
            value = torch.stack(self.val_losses).mean()
            self.val_losses.clear()
            # Every rank scored every validation bag: the same value everywhere, no reduction.
            self.log("val_loss", value, logger=False, sync_dist=False)

        def take_train_loss(self) -> float:
            """This rank's mean training loss of the epoch (then forgotten)."""
            value = float(torch.stack(self.train_losses).mean()) if self.train_losses else 0.0
            self.train_losses.clear()
            return value

        def train_dataloader(self):
            sampler = DistributedSampler(
                self.train_set,
                num_replicas=self.trainer.world_size,
                rank=self.trainer.global_rank,
                shuffle=True,
                seed=config.seed,
            )  # Lightning calls set_epoch: a new order each epoch, the same for every run
            return DataLoader(self.train_set, batch_size=None, sampler=sampler)

        def val_dataloader(self):
            return DataLoader(self.val_set, batch_size=None)

        def configure_optimizers(self):
            return torch.optim.Adam(
                self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
            )

    return MilModule()


def epoch_record(max_epochs: int, echo: str | None, keep_best: bool):
    """A callback that times each epoch, keeps its losses, copies the weights of the best
    validation loss so far (``keep_best``) and, with ``echo`` (a prefix), prints one line per
    epoch on rank 0's stderr."""
    from lightning.pytorch.callbacks import Callback

    class EpochRecord(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.losses: list[float] = []
            self.val_losses: list[float] = []
            self.best = float("inf")
            self.best_epoch: int | None = None  # 1-based
            self.best_state: dict[str, Any] | None = None
            self._start = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.seconds.append(time.perf_counter() - self._start)
            self.losses.append(pl_module.take_train_loss())
            line = f"train_loss {self.losses[-1]:.4f}"
            value = trainer.callback_metrics.get("val_loss")
            if value is not None:
                self.val_losses.append(float(value))
                line += f", val_loss {self.val_losses[-1]:.4f}"
                if keep_best and self.val_losses[-1] < self.best:
                    self.best, self.best_epoch = self.val_losses[-1], len(self.val_losses)
                    self.best_state = {
                        k: v.detach().clone() for k, v in pl_module.model.state_dict().items()
                    }
            if echo is not None and trainer.is_global_zero:
                epoch = f"epoch {trainer.current_epoch + 1}/{max_epochs}"
                print(f"{echo}{epoch}: {line}", file=sys.stderr, flush=True)

    return EpochRecord()
