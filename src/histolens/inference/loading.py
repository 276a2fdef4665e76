"""Loading what a Predictor is made of from a torch checkpoint or an ONNX export: the model, its
metadata and the calibration stored with it (guard, conformal, stain). ``Predictor.from_checkpoint``
assembles the Predictor."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from histolens.checkpoint.io import CheckpointMetadata, load_checkpoint, resolve_checkpoint_path
from histolens.errors import CheckpointError, ConfigError, check_choice
from histolens.inference.ood import OODGuard
from histolens.inference.runtimes import ONNX_RUNTIMES, RUNTIME_ENV, is_onnx_file
from histolens.models.backbones import get_backbone_spec
from histolens.models.classifier import HistoClassifier, build_model
from histolens.stats.conformal import ConformalCalibration

__all__ = ["LoadedModel", "load_model", "resolve_runtime"]


class LoadedModel(NamedTuple):
    """A loaded model with what its checkpoint says: the arguments of ``Predictor._with_metadata``."""

    model: HistoClassifier
    meta: CheckpointMetadata
    calibration: tuple[OODGuard | None, ConformalCalibration | None, Any]
    device: torch.device
    source: str
    # What computes the logits when it is not ``model`` itself: ONNX Runtime or OpenVINO for an
    # export.
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None


def resolve_runtime(path: str | os.PathLike, runtime: str | None = None) -> str | None:
    """The runtime that runs ``path``: for an ONNX export ``runtime``, else the
    ``HISTOLENS_ONNX_RUNTIME`` environment variable, else onnxruntime; None for a torch
    checkpoint, which refuses a runtime given explicitly (the variable does not apply to it)."""
    if not is_onnx_file(path):
        if runtime is not None:
            raise ConfigError(
                f"The ONNX runtime ({runtime}) applies to .onnx exports only, and "
                f"{Path(path).name} is a torch checkpoint; export one with 'histolens export RUN'."
            )
        return None
    if runtime is None:
        runtime = os.environ.get(RUNTIME_ENV, "").strip().lower() or "onnxruntime"
        name = f"ONNX runtime (${RUNTIME_ENV})"
    else:
        name = "ONNX runtime"
    return check_choice(name, runtime, ONNX_RUNTIMES)


def load_model(
    path: str | os.PathLike, device: str = "cpu", runtime: str | None = None
) -> LoadedModel:
    """The model, metadata and stored calibration of a checkpoint (file or run dir), or of an
    ONNX export (a ``.onnx`` file), whose logits then come from ``runtime`` (see
    :func:`resolve_runtime`)."""
    onnx_runtime = resolve_runtime(path, runtime)
    if onnx_runtime is not None:
        return _load_onnx(path, device, onnx_runtime, from_env=runtime is None)
    state, meta = load_checkpoint(path)
    spec = get_backbone_spec(meta.backbone)
    model = build_model(
        spec,
        len(meta.class_names),
        "none",
        meta.head.dims,
        meta.head.dropouts,
        meta.feature_layer,
    )
    calibration = _calibration(state, meta)  # takes the guard's tensors out of ``state``
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"Checkpoint {path} does not fit a {meta.backbone} model "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors)."
        )
    dev = torch.device(device)
    model.to(dev).eval()
    if dev.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return LoadedModel(model, meta, calibration, dev, str(resolve_checkpoint_path(path)))


def _load_onnx(
    path: str | os.PathLike, device: str, runtime: str, from_env: bool = False
) -> LoadedModel:
    """A model whose logits come from ``runtime`` (ONNX Runtime or OpenVINO; ``from_env``: chosen
    by $HISTOLENS_ONNX_RUNTIME); its ``model`` loads the torch checkpoint the export was made from
    only when something needs the module (heatmaps)."""
    from histolens.inference.runtimes import ExportedTorchModel, make_runner, read_onnx_export

    meta, state = read_onnx_export(path)
    spec = get_backbone_spec(meta.backbone)
    return LoadedModel(
        ExportedTorchModel(spec, meta, path, "cpu", _torch_module),  # type: ignore[arg-type]
        meta,
        _calibration(state, meta),
        torch.device("cpu"),  # inputs are prepared on the CPU; the runtime places them
        str(Path(path)),
        runner=make_runner(path, device, runtime, from_env=from_env),
    )


def _torch_module(path: str | os.PathLike, device: str) -> HistoClassifier:
    """The torch classifier of a checkpoint: what an ONNX export's heatmaps load."""
    return load_model(path, device).model


def _calibration(
    state: dict[str, torch.Tensor], meta: CheckpointMetadata
) -> tuple[OODGuard | None, ConformalCalibration | None, Any]:
    """The out-of-distribution guard, conformal calibration and stain normaliser a checkpoint
    (or an ONNX export) stores; the guard's tensors are taken out of ``state``."""
    guard = OODGuard.from_checkpoint(state, meta)
    conformal = ConformalCalibration.from_dict(meta.conformal) if meta.conformal else None
    stain = None
    if meta.stain:
        from histolens.stain.normalize import StainNormalizer

        stain = StainNormalizer.from_dict(meta.stain)
    return guard, conformal, stain
