"""Self-describing checkpoints: safetensors weights with JSON metadata in the file's header.

One file holds everything needed to rebuild the model and its preprocessing (backbone, head,
classes, mean/std, stain reference, threshold, temperature) plus what it was trained on and
how well it did. It loads without pickle.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from histolens.atomic import atomic_path
from histolens.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "BEST_CHECKPOINT",
    "load_checkpoint",
    "read_metadata",
    "resolve_checkpoint_path",
    "save_checkpoint",
    "update_metadata",
    "versions",
]

CHECKPOINT_FORMAT = "histolens-checkpoint"
FORMAT_VERSION = 1
BEST_CHECKPOINT = "best.safetensors"
_META_KEY = "histolens"


def versions() -> dict[str, str]:
    """Versions of the packages that shape a checkpoint's numbers."""
    import timm

    from histolens import __version__

    return {
        "histolens": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory meaning its best checkpoint."""
    p = Path(path).expanduser()
    if p.is_dir():
        best = p / BEST_CHECKPOINT
        if not best.is_file():
            raise CheckpointError(
                f"{p} is a folder without {BEST_CHECKPOINT}; give a checkpoint file or a run "
                "directory made by 'histolens train'."
            )
        return best
    if not p.exists():
        raise CheckpointError(f"Checkpoint {p} does not exist.")
    return p


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module | dict[str, torch.Tensor],
    metadata: dict[str, Any],
) -> Path:
    """Write weights (a module or its state dict) and metadata atomically; an interrupted save
    leaves the old file intact."""
    from safetensors.torch import save_file

    meta = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        **metadata,
    }
    weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
    state = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    target = Path(path)
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata={_META_KEY: json.dumps(meta, default=_json_default)})
    return target


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without loading its weights (of an ONNX export too)."""
    p = resolve_checkpoint_path(path)
    if p.suffix.lower() == ".onnx":
        from histolens.onnx_backend import read_onnx_metadata

        return read_onnx_metadata(p)
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(_META_KEY)
    except Exception as exc:
        raise CheckpointError(
            f"{p} is not a readable histolens checkpoint (not a valid safetensors file: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})."
        ) from None
    if raw is None:
        raise CheckpointError(
            f"{p} is a safetensors file but not a histolens checkpoint (no histolens metadata); "
            "to start from its weights use 'histolens train --pretrained FILE'."
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{p} has corrupt histolens metadata.") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not a histolens checkpoint.")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{p} was written by a newer histolens (format {meta['format_version']}); upgrade."
        )
    return meta


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata of a checkpoint (file or run directory)."""
    p = resolve_checkpoint_path(path)
    meta = read_metadata(p)
    from safetensors.torch import load_file

    try:
        state = load_file(str(p))
    except Exception as exc:
        raise CheckpointError(f"{p} has corrupt weights ({type(exc).__name__}).") from None
    return state, meta


def update_metadata(path: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    """Rewrite a checkpoint's metadata (e.g. threshold, temperature, metrics), atomically."""
    from safetensors.torch import save_file

    state, meta = load_checkpoint(path)
    meta.update(changes)
    p = resolve_checkpoint_path(path)
    with atomic_path(p) as tmp:
        save_file(state, str(tmp), metadata={_META_KEY: json.dumps(meta, default=_json_default)})
    return meta
