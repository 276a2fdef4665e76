"""The processes of a training run: one by default, several for data-parallel training.

``--devices N`` (and ``--num-nodes M``) start N processes per machine through Lightning's own
launcher, or join those that torchrun or SLURM started. Every rank runs the same steps; the
expensive one, the frozen backbone's features, is shared out between them, and only rank 0
writes files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from histolens.config import TrainConfig
from histolens.errors import ConfigError

__all__ = [
    "OneProcess",
    "launch",
    "lightning_devices",
    "needs_fabric",
    "lightning_advice_ignored",
    "quiet_lightning",
    "scoped_matmul_precision",
]

_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


def lightning_devices(value: str) -> int | str:
    """Lightning's ``devices`` for a config value: 'auto' is one process per launched process
    (torchrun's LOCAL_WORLD_SIZE), else one; Lightning's own 'auto' would take every GPU."""
    if value in ("auto", ""):
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(value) if str(value).isdigit() else value


class OneProcess:
    """What the linear probe asks of a launched Fabric, for a run of one process on the CPU at
    full precision: there Fabric adds nothing, and importing Lightning costs seconds."""

    device = torch.device("cpu")
    global_rank = 0
    world_size = 1
    is_global_zero = True

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Fabric's autocast at "32-true": nothing changes."""
        return contextlib.nullcontext()


def needs_fabric(train: TrainConfig) -> bool:
    """Whether a run needs Lightning's Fabric: several processes (or torchrun/SLURM started
    it), an accelerator other than the CPU, or a precision other than "32-true"."""
    if train.accelerator not in ("auto", "cpu") or train.precision != "32-true":
        return True
    if train.accelerator == "auto" and (
        torch.cuda.is_available() or torch.backends.mps.is_available()
    ):
        return True
    started = any(os.environ.get(k, "1") != "1" for k in ("WORLD_SIZE", "SLURM_NTASKS"))
    return (
        started
        or train.strategy != "auto"
        or train.num_nodes != 1
        or lightning_devices(train.devices) != 1
    )


def launch(train: TrainConfig, lightning: bool = True) -> Any:
    """A launched ``lightning.fabric.Fabric`` for the run's accelerator, devices and nodes.

    With more than one process in all, this starts the other processes (each runs the same
    command from its start) unless torchrun or SLURM did, and joins the process group. With
    ``lightning=False`` (the linear probe), a run that does not need Fabric gets ``OneProcess``.
    """
    if not lightning and not needs_fabric(train):
        return OneProcess()
    from lightning.fabric import Fabric

    try:
        fabric = Fabric(
            accelerator=train.accelerator,
            strategy=train.strategy,
            devices=lightning_devices(train.devices),
            num_nodes=train.num_nodes,
            precision=train.precision,
        )
    except Exception as exc:  # Lightning's MisconfigurationException and ValueErrors
        raise ConfigError(
            f"Cannot run on accelerator '{train.accelerator}' with devices "
            f"'{train.devices}', strategy '{train.strategy}' and {train.num_nodes} node(s): {exc}"
        ) from None
    if fabric.world_size > 1:
        fabric.launch()
    return fabric


# Lightning's advice that does not apply to histolens's loops: data in memory or decoded by its
# own threads (few loader workers), every rank scores the whole validation set (its logged
# metrics need no reduction), frozen backbones in eval mode, and a pytree deprecation.
_LIGHTNING_ADVICE = (
    ".*does not have many workers.*",
    ".*sync_dist=True.*",
    ".*module\\(s\\) in eval mode.*",
    ".*LeafSpec.*",
)


@contextlib.contextmanager
def lightning_advice_ignored(*extra: str) -> Iterator[None]:
    """Lightning's warnings that do not apply here (and the ``extra`` message patterns) off,
    and back after."""
    with warnings.catch_warnings():
        for message in (*_LIGHTNING_ADVICE, *extra):
            warnings.filterwarnings("ignore", message)
        yield


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info messages (GPU available, distributed banners) off, and back after."""
    import lightning  # noqa: F401  (importing it sets its loggers' levels, so first)

    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def scoped_matmul_precision(precision: str = "high") -> Iterator[None]:
    """torch's float32 matmul precision (TF32 tensor cores on GPUs) for a block, then restored."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
