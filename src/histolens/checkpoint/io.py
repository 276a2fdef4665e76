"""Self-describing checkpoints: safetensors weights with JSON metadata in the file's header.

One file holds everything needed to rebuild the model and its preprocessing (backbone, head,
classes, mean/std, stain reference, threshold, temperature) plus what it was trained on and
how well it did. It loads without pickle.

The metadata is one typed, versioned contract, :class:`CheckpointMetadata`: training builds it,
:func:`save_checkpoint` writes it, and :func:`read_metadata` / :func:`load_checkpoint` give it
back validated, with every default filled in and files of older versions migrated, to the
Predictor, evaluation, the report, the desktop app, the web service and the ONNX export. The
contract itself lives in :mod:`histolens.checkpoint.metadata`; this module reads and writes files.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from histolens.atomic import atomic_path
from histolens.checkpoint import metadata as checkpoint_metadata
from histolens.checkpoint.metadata import *  # noqa: F403  (re-exported: see ``__all__``)
from histolens.checkpoint.metadata import CHECKPOINT_FORMAT, CheckpointMetadata
from histolens.checkpoint.onnx_file import is_onnx_file, read_onnx_metadata
from histolens.checkpoint.parts import _plain
from histolens.errors import CheckpointError
from histolens.rundir import RunDir

# The metadata contract's names are importable from here too, with the file functions.
__all__ = [
    *checkpoint_metadata.__all__,
    "BEST_CHECKPOINT",
    "load_checkpoint",
    "read_metadata",
    "resolve_checkpoint_path",
    "save_checkpoint",
    "update_metadata",
    "versions",
]

BEST_CHECKPOINT = RunDir.CHECKPOINT
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
    metadata: CheckpointMetadata | Mapping[str, Any],
) -> Path:
    """Write weights (a module or its state dict) and metadata atomically; an interrupted save
    leaves the old file intact.

    A mapping is read as a file's JSON is (:meth:`CheckpointMetadata.from_dict`), so what is
    written is always the current schema and a missing field is refused before anything is.
    ``saved_at`` and ``versions`` are filled in unless the metadata carries them.
    """
    meta = (
        metadata
        if isinstance(metadata, CheckpointMetadata)
        else CheckpointMetadata.from_dict(_plain(metadata))
    )
    meta = dataclasses.replace(
        meta,
        saved_at=meta.saved_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions=meta.versions or versions(),
    )
    weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
    state = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    return _write(Path(path), state, meta)


def _write(target: Path, state: dict[str, torch.Tensor], meta: CheckpointMetadata) -> Path:
    from safetensors.torch import save_file

    header = json.dumps(meta.to_dict(), default=_json_default)
    with atomic_path(target) as tmp:
        save_file(state, str(tmp), metadata={_META_KEY: header})
    return target


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _read_json(p: Path) -> dict[str, Any]:
    """The raw JSON in a checkpoint's header, checked to be a histolens checkpoint's."""
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as fh:
            header = (fh.metadata() or {}).get(_META_KEY)
    except Exception as exc:
        raise CheckpointError(
            f"{p} is not a readable histolens checkpoint (not a valid safetensors file: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})."
        ) from None
    if header is None:
        raise CheckpointError(
            f"{p} is a safetensors file but not a histolens checkpoint (no histolens metadata); "
            "to start from its weights use 'histolens train --pretrained FILE'."
        )
    try:
        raw = json.loads(header)
    except json.JSONDecodeError:
        raise CheckpointError(f"{p} has corrupt histolens metadata.") from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not a histolens checkpoint.")
    return raw


def read_metadata(path: str | os.PathLike) -> CheckpointMetadata:
    """The metadata of a checkpoint, without loading its weights (of an ONNX export too)."""
    p = resolve_checkpoint_path(path)
    if is_onnx_file(p):  # the one place that decides "ONNX export or torch checkpoint"
        return read_onnx_metadata(p)
    return CheckpointMetadata.from_dict(_read_json(p), p)


def load_checkpoint(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], CheckpointMetadata]:
    """Weights and metadata of a checkpoint (file or run directory)."""
    p = resolve_checkpoint_path(path)
    meta = read_metadata(p)
    from safetensors.torch import load_file

    try:
        state = load_file(str(p))
    except Exception as exc:
        raise CheckpointError(f"{p} has corrupt weights ({type(exc).__name__}).") from None
    return state, meta


def update_metadata(path: str | os.PathLike, **changes: Any) -> CheckpointMetadata:
    """Rewrite a checkpoint's metadata (e.g. threshold, temperature, metrics), atomically.

    ``changes`` are fields by name, as typed values or as their JSON; an older file is written
    back in the current schema.
    """
    state, meta = load_checkpoint(path)
    p = resolve_checkpoint_path(path)
    meta = CheckpointMetadata.from_dict({**meta.to_dict(), **_plain(changes)}, p)
    _write(p, state, meta)
    return meta
