"""The ONNX export as a file: is a path one, and what metadata and tensors it carries.

An export is one self-contained ``.onnx`` file whose ``metadata_props`` carry the checkpoint's
JSON metadata (with an ``export`` section) under ``METADATA_KEY`` and the tensors that are not
weights (the out-of-distribution guard's statistics) as base64-encoded safetensors under
``TENSORS_KEY``. Reading them needs the ``onnx`` package only, not a runtime: this is where
:func:`histolens.checkpoint.io.read_metadata` decides "ONNX or torch"; running an export is
:mod:`histolens.inference.runtimes`.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import torch

from histolens.checkpoint.metadata import CHECKPOINT_FORMAT, CheckpointMetadata
from histolens.errors import CheckpointError

__all__ = [
    "METADATA_KEY",
    "ONNX_SUFFIX",
    "TENSORS_KEY",
    "is_onnx_file",
    "read_onnx_export",
    "read_onnx_metadata",
]

ONNX_SUFFIX = ".onnx"
METADATA_KEY = "histolens"
TENSORS_KEY = "histolens.tensors"


def is_onnx_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an ONNX export (by its suffix): it then runs on ONNX Runtime or
    OpenVINO rather than torch."""
    return Path(path).suffix.lower() == ONNX_SUFFIX


def _load_proto(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable ONNX model ({first}).") from None


def read_onnx_export(
    path: str | os.PathLike,
) -> tuple[CheckpointMetadata, dict[str, torch.Tensor]]:
    """The checkpoint metadata and the non-weight tensors stored in an ONNX export."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"Checkpoint {p} does not exist.")
    props = {entry.key: entry.value for entry in _load_proto(p).metadata_props}
    if METADATA_KEY not in props:
        raise CheckpointError(
            f"{p} is an ONNX model but not a histolens export (no histolens metadata); make one "
            "with 'histolens export RUN'."
        )
    try:
        raw = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{p} has corrupt histolens metadata.") from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not a histolens export.")
    meta = CheckpointMetadata.from_dict(raw, p)  # a newer version is refused here
    if meta.export is None:
        raise CheckpointError(f"{p} is not a histolens export.")
    tensors: dict[str, torch.Tensor] = {}
    if props.get(TENSORS_KEY):
        from safetensors.torch import load as load_tensors

        try:
            tensors = load_tensors(base64.b64decode(props[TENSORS_KEY]))
        except Exception:
            raise CheckpointError(f"{p} has corrupt histolens tensors.") from None
    return meta, tensors


def read_onnx_metadata(path: str | os.PathLike) -> CheckpointMetadata:
    """The JSON metadata of an ONNX export (what ``read_metadata`` gives for a checkpoint)."""
    return read_onnx_export(path)[0]
