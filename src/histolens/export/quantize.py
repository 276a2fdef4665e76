"""int8 quantisation of an exported ONNX graph with ONNX Runtime, and what stays fp32.

``quantize_int8`` is the static quantisation step of ``histolens export --quantize int8``;
``fp32_stages`` names the backbone modules kept in fp32 because quantising them costs accuracy.
Both are unverified: :func:`histolens.export.onnx.export_onnx` compares the result with PyTorch
before anything is written.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from histolens.inference.runtimes import INPUT_NAME

__all__ = ["fp32_stages", "quantize_int8"]


def fp32_stages(model: torch.nn.Module) -> tuple[str, ...]:
    """The backbone modules an int8 export keeps in fp32: with several feature levels, the stem
    and every stage up to the shallowest level, whose pooled output the head reads directly.

    Quantising them cost a real default Lite0 run 0.030 of AUC (0.980 -> 0.950); keeping them
    in fp32 cost 0.002. A single-level model is quantised whole."""
    levels = getattr(model, "_levels", None)
    if not levels or len(levels) < 2:
        return ()
    return ("conv_stem", "bn1", *(f"blocks.{i}" for i in range(min(levels) + 1)))


def quantize_int8(
    graph: str | os.PathLike,
    out: str | os.PathLike,
    batches: Iterable[np.ndarray],
    keep_fp32: Sequence[str] = (),
) -> int:
    """ONNX Runtime static quantisation of ``graph`` into ``out`` (QDQ, per-channel int8 weights,
    uint8 activations), activation ranges measured on model-input ``batches``; returns the number
    of images they held. The head, and the backbone modules named in ``keep_fp32`` (see
    ``fp32_stages``), stay fp32. Unverified: ``export_onnx`` is the checked way to an int8
    export."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    stream = iter(batches)
    seen = [0]

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(stream, None)
            if x is None:
                return None
            seen[0] += len(x)
            return {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}

    with tempfile.TemporaryDirectory(prefix="histolens-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference cannot follow the tiles' slices; ONNX's own inference can.
        quant_pre_process(str(graph), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # The head stays fp32: it costs nothing, and quantised logits come in steps of about
            # 0.3, which ties images the threshold should tell apart.
            nodes_to_exclude=_fp32_nodes(prepared, keep_fp32),
        )
    return seen[0]


def _fp32_nodes(graph: Path, keep_fp32: Sequence[str] = ()) -> list[str]:
    """Names of the nodes of the classifier's head and of the backbone modules ``keep_fp32``
    (the exporter names nodes by module path, e.g. ``/blocks.2/blocks.2.1/conv_pw/Conv``)."""
    import onnx

    modules = "|".join(["head", *(re.escape(m) for m in keep_fp32)])
    kept = re.compile(rf"^/(model/)?(backbone/)?({modules})/")
    return [n.name for n in onnx.load(str(graph)).graph.node if kept.match(n.name)]
