"""int8 quantisation of an exported ONNX graph with ONNX Runtime, and what stays fp32.

``quantize_int8`` is the static quantisation step of ``histolens export --quantize int8``;
``fp32_stages`` names the backbone modules kept in fp32 because quantising them costs accuracy.
Both are unverified: :func:`histolens.export.onnx.export_onnx` checks the result against the
fp32 export on unseen patients (:mod:`histolens.export.guard`) before anything is written.
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

__all__ = ["INT8_OP_TYPES", "fp32_stages", "quantize_int8"]

# The operators an int8 export quantises: the convolutions, which hold nearly all the weights and
# time. Everything between them and after them (the tiles' crops, the pooling of each feature
# level, their concatenation, the mean over tiles and the head) stays fp32: with every operator
# quantised, the pooled features of both levels shared one uint8 scale in the concatenation, and
# the input image was rounded to uint8 before the fp32 stem (see docs/int8-guard.md).
INT8_OP_TYPES: tuple[str, ...] = ("Conv",)


def fp32_stages(model: torch.nn.Module) -> tuple[str, ...]:
    """The backbone modules an int8 export keeps in fp32: with several feature levels, the stem
    and every stage up to the shallowest level, whose pooled output the head reads directly.

    Quantising them too cost the default Lite0 0.071 of image AUC on unseen patients
    (``benchmarks/int8_heldout.py``, docs/int8-guard.md). A single-level model is quantised
    whole."""
    levels = getattr(model, "_levels", None)
    if not levels or len(levels) < 2:
        return ()
    return ("conv_stem", "bn1", *(f"blocks.{i}" for i in range(min(levels) + 1)))


def quantize_int8(
    graph: str | os.PathLike,
    out: str | os.PathLike,
    batches: Iterable[np.ndarray],
    keep_fp32: Sequence[str] = (),
    *,
    op_types: Sequence[str] | None = INT8_OP_TYPES,
    reduce_range: bool = True,
) -> int:
    """ONNX Runtime static quantisation of ``graph`` into ``out`` (QDQ, per-channel int8 weights,
    uint8 activations), activation ranges measured on model-input ``batches``; returns the number
    of images they held. Only ``op_types`` are quantised (None: every operator ONNX Runtime can
    quantise); the head, and the backbone modules named in ``keep_fp32`` (see ``fp32_stages``),
    stay fp32. ``reduce_range`` (7-bit weights): x86 CPUs without VNNI multiply uint8 by int8
    in pairs summed into int16, which saturates with full-range weights and not with 7-bit
    ones; so one int8 file computes the same integers on AVX2 as on AVX-512 VNNI, and the
    guard's figures measured on one CPU hold on the other. Unverified: ``export_onnx`` is the
    checked way to an int8 export."""
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
            op_types_to_quantize=list(op_types) if op_types is not None else None,
            reduce_range=reduce_range,
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
