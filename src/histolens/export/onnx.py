"""Export a trained classifier to ONNX (fp32, or int8 by static quantisation), verified first.

The graph is the whole classifier at the model's input size, tiling included: a batch of model
inputs (B, 3, H, W), stain and mean/std normalised by the Predictor, gives logits and the pooled
features the out-of-distribution guard reads. The checkpoint's JSON metadata travels in the
model's ``metadata_props`` (see :mod:`histolens.inference.runtimes`), so ``Predictor.from_checkpoint``
takes the one ``.onnx`` file wherever a checkpoint goes.

Nothing is written until the export has been checked. An fp32 export is compared with PyTorch
on the run's validation images (or, when every patient trained the model, on up to 64 of its
training images): its probabilities may differ by at most ``FP32_TOLERANCE``. An int8 export is
compared with the fp32 export on patients the model was not fitted on (see
:mod:`histolens.export.guard` and docs/int8-guard.md): it may lose at most
``INT8_AUC_TOLERANCE`` of image AUC.

This module holds the orchestration (``export_onnx``), the traced graph, the tolerances and the
metadata written into the file; :mod:`histolens.export.quantize` holds the int8 quantisation,
:mod:`histolens.export.verify` the fp32 comparison with PyTorch and
:mod:`histolens.export.guard` the int8 guard.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from histolens.atomic import atomic_path
from histolens.checkpoint.io import CheckpointMetadata, load_checkpoint, resolve_checkpoint_path
from histolens.data.records import ImageRecord
from histolens.errors import ConfigError, check_choice
from histolens.export.guard import (
    Int8Check,
    UnseenImages,
    enforce_int8_limit,
    score_unseen,
    unseen_patient_images,
)
from histolens.export.quantize import fp32_stages, quantize_int8
from histolens.export.verify import (
    ExportError,
    compare_with_torch,
    model_inputs,
    run_records,
    spread_evenly,
    verification_records,
)
from histolens.inference.predictor import Predictor
from histolens.inference.runtimes import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAMES,
    TENSORS_KEY,
    OnnxRunner,
    is_onnx_file,
)
from histolens.models.classifier import HistoClassifier
from histolens.models.engine_export import OPSET, FixedTileFeatures, trace_to_onnx

__all__ = [
    "EXPORT_FORMATS",
    "FP32_TOLERANCE",
    "INT8_AUC_TOLERANCE",
    "QUANTIZATIONS",
    "ExportError",
    "ExportResult",
    "default_export_path",
    "export_onnx",
    "trace_onnx",
]

EXPORT_FORMATS = ("onnx",)
QUANTIZATIONS = ("none", "int8")
# The most an fp32 export's probability may differ from PyTorch's on the verification images,
# and the most image AUC an int8 export may lose against the fp32 export on unseen patients.
FP32_TOLERANCE = 0.01
INT8_AUC_TOLERANCE = 0.005


@dataclass(frozen=True)
class ExportResult:
    """What was written and how closely it follows the torch model."""

    path: Path
    source: Path
    quantization: str
    n_images: int  # verification images
    images_from: str
    max_probability_change: float  # fp32: from PyTorch; int8: from the fp32 export
    n_calibration: int  # int8 only: training images the activation ranges were measured on
    size_bytes: int
    seconds: float
    int8_check: Int8Check | None = None  # int8 only: against fp32 on unseen patients

    @property
    def auc_drop(self) -> float | None:
        return None if self.int8_check is None else self.int8_check.drop

    def verification(self) -> dict[str, Any]:
        """The figures stored in the export's metadata."""
        keep = ("n_images", "images_from", "max_probability_change")
        out = {k: v for k, v in asdict(self).items() if k in keep}
        check = self.int8_check
        if check is not None:
            out.update(
                n_patients=check.n_patients,
                auc_fp32=_finite(check.auc_fp32),
                auc_int8=_finite(check.auc_int8),
                auc_drop=_finite(check.drop),
                auc_drop_ci=[_finite(v) for v in check.drop_ci],
            )
        return out


def default_export_path(checkpoint: str | os.PathLike, quantization: str = "none") -> Path:
    """Beside the checkpoint: ``best.onnx`` (fp32) or ``best-int8.onnx`` for ``best.safetensors``;
    in the run directory, evaluate and explain find the run's split and checkpoint there."""
    source = resolve_checkpoint_path(checkpoint)
    suffix = "" if quantization == "none" else f"-{quantization}"
    return source.with_name(f"{source.stem}{suffix}.onnx")


class _ExportGraph(FixedTileFeatures):
    """The classifier at one input size: (B, 3, H, W) -> (logits, pooled features).

    The tiles are laid out once by :class:`FixedTileFeatures` (the legacy exporter needs fixed
    shapes); verification compares the result with ``model.forward``.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        features = super().forward(x)
        return self.model.head(features), features


def trace_onnx(
    model: HistoClassifier, input_size: tuple[int, int], path: str | os.PathLike
) -> None:
    """Write the fp32 ONNX graph of ``model`` at ``input_size`` (dynamic batch axis) to ``path``,
    unverified: ``export_onnx`` is the checked way to an export."""
    size = (int(input_size[0]), int(input_size[1]))
    trace_to_onnx(_ExportGraph(model, size).eval(), size, path, INPUT_NAME, OUTPUT_NAMES)


def attach_metadata(graph: Path, meta: CheckpointMetadata, tensors: dict[str, torch.Tensor]) -> Any:
    """The ONNX model at ``graph`` with the histolens metadata (and non-weight tensors)."""
    import onnx
    from safetensors.torch import save as save_tensors

    model = onnx.load(str(graph))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta.to_dict())
    if tensors:
        entry = model.metadata_props.add()
        entry.key = TENSORS_KEY
        entry.value = base64.b64encode(save_tensors(tensors)).decode("ascii")
    model.producer_name = "histolens"
    model.doc_string = (
        "histolens classifier: model input (stain and mean/std normalised, see the metadata's "
        "preprocess and stain) -> logits, pooled features"
    )
    return model


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def export_onnx(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike | None = None,
    quantization: str = "none",
    *,
    calibration_images: int = 64,
    verify_images: int = 256,
    verify_data: str | os.PathLike | None = None,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a checkpoint (file or run directory) to one self-contained ``.onnx`` file.

    Args:
        quantization: 'none' (fp32) or 'int8' (static quantisation calibrated on up to
            ``calibration_images`` of the run's training images).
        verify_images: at most this many images are compared (fp32: validation images against
            PyTorch; int8: unseen-patient images against the fp32 export).
        verify_data: int8 only: labelled images of patients the model was not fitted on (folder
            or CSV manifest) to check the int8 export on, instead of the run's own.
        progress: called with a short line as each step starts.

    Raises:
        ExportError: the export strays from its reference by more than the tolerance (with the
            figures) or cannot be verified; nothing is written then.
    """
    start = time.perf_counter()
    say = progress or (lambda _line: None)
    source, target = _export_paths(checkpoint, out, quantization)
    if verify_data is not None and quantization != "int8":
        raise ConfigError("--verify-data checks an int8 export; add --quantize int8.")
    predictor = Predictor.from_checkpoint(source)
    int8 = quantization == "int8"
    if int8:
        unseen = unseen_patient_images(source, verify_data, verify_images)
    else:
        verify, where = verification_records(source, verify_images)
    with tempfile.TemporaryDirectory(prefix="histolens-export-") as tmp:
        graph = Path(tmp) / "fp32.onnx"
        say(f"Exporting {predictor.backbone_name} at {predictor.preprocess.input_size}")
        trace_onnx(predictor.model, predictor.preprocess.input_size, graph)
        if int8:
            result = _int8_export(
                predictor, source, target, graph, unseen, calibration_images, batch_size, say
            )
            graph = graph.with_name("int8.onnx")
        else:
            say(f"Verifying against PyTorch on {where}")
            n, change, _, _ = compare_with_torch(predictor, OnnxRunner(graph), verify, batch_size)
            _check_fp32(where, change)
            result = ExportResult(target, source, quantization, n, where, change, 0, 0, 0.0)
        _save_export(graph, predictor, result)
    return replace(result, size_bytes=target.stat().st_size, seconds=time.perf_counter() - start)


def _int8_export(
    predictor: Predictor,
    source: Path,
    target: Path,
    fp32: Path,
    unseen: UnseenImages,
    calibration_images: int,
    batch_size: int,
    say: Callable[[str], None],
) -> ExportResult:
    """Quantise ``fp32`` into ``int8.onnx`` beside it and check it against ``fp32`` on the
    unseen-patient images; the result, or ExportError when it loses too much AUC."""
    _, n_calibration = _quantised_graph(
        predictor, source, fp32, calibration_images, batch_size, say, unseen.records
    )
    say(f"Checking int8 against fp32 on {unseen.where}")
    check = score_unseen(
        predictor, fp32, fp32.with_name("int8.onnx"), unseen, source, batch_size, say
    )
    enforce_int8_limit(check, INT8_AUC_TOLERANCE)
    return ExportResult(
        target,
        source,
        "int8",
        check.n_images,
        check.images_from,
        check.max_probability_change,
        n_calibration,
        0,
        0.0,
        check,
    )


def _export_paths(
    checkpoint: str | os.PathLike, out: str | os.PathLike | None, quantization: str
) -> tuple[Path, Path]:
    """The torch checkpoint to export and the ``.onnx`` file to write, both checked."""
    check_choice("quantisation", quantization, QUANTIZATIONS)
    source = resolve_checkpoint_path(checkpoint)
    if is_onnx_file(source):
        raise ConfigError(
            f"{source} is already an ONNX export; export from the torch checkpoint "
            "(.safetensors) or its run directory."
        )
    target = Path(out) if out is not None else default_export_path(source, quantization)
    if not is_onnx_file(target):
        raise ConfigError(
            f"The export's file name must end in .onnx (not '{target.name}'), which is how "
            "histolens knows to run it on ONNX Runtime."
        )
    return source, target


def _quantised_graph(
    predictor: Predictor,
    source: Path,
    fp32: Path,
    calibration_images: int,
    batch_size: int,
    say: Callable[[str], None],
    verify: Sequence[ImageRecord] = (),
) -> tuple[Path, int]:
    """The int8 graph (beside ``fp32``) calibrated on the run's training images, and how many
    images the calibration read. Images in ``verify`` are left out of the calibration while
    others remain, so that the accuracy check is not made on the images calibrated on."""
    train, _ = run_records(source, "train")
    verifying = {r.path for r in verify}
    calibration = spread_evenly(
        [r for r in train if r.path not in verifying] or train, calibration_images
    )
    if not calibration:
        raise ExportError(
            f"{source} cannot be quantised: its run lists no training images to calibrate on."
        )
    say(f"Calibrating int8 on {len(calibration)} training images")
    batches = (x.numpy() for _, x in model_inputs(predictor, calibration, batch_size))
    graph = fp32.with_name("int8.onnx")
    n_calibration = quantize_int8(fp32, graph, batches, fp32_stages(predictor.model))
    if not n_calibration:
        raise ExportError("The int8 export cannot be calibrated: no training image was readable.")
    return graph, n_calibration


def _save_export(graph: Path, predictor: Predictor, result: ExportResult) -> None:
    """Write the verified ``graph`` to ``result.path`` atomically, with the checkpoint's
    metadata (and its tensors that are not the model's weights) and the export's record."""
    import onnx

    state, meta = load_checkpoint(result.source)
    own = set(predictor.model.state_dict())
    tensors = {k: v for k, v in state.items() if k not in own}
    export = _export_record(predictor, result)
    model = attach_metadata(graph, replace(meta, export=export), tensors)
    with atomic_path(result.path) as part:
        onnx.save(model, str(part))


def _export_record(predictor: Predictor, result: ExportResult) -> dict[str, Any]:
    """The metadata's ``export`` entry: format, graph interface, source, verification, versions."""
    import onnx
    import onnxruntime

    return {
        "format": "onnx",
        "quantization": result.quantization,
        "opset": OPSET,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, *predictor.preprocess.input_size]},
        "outputs": list(OUTPUT_NAMES),
        "source_checkpoint": str(result.source.resolve()),
        "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "calibration_images": result.n_calibration,
        "verification": result.verification(),
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }


def _check_fp32(where: str, change: float) -> None:
    """Refuse an fp32 export that strays from PyTorch, with the figure, in one sentence."""
    if change > FP32_TOLERANCE:
        raise ExportError(
            f"The ONNX export's probabilities differ from PyTorch's by up to {change:.4f} on "
            f"{where}, more than the {FP32_TOLERANCE} allowed, so nothing was written."
        )
