"""ONNX Runtime (default) or OpenVINO as the Predictor's model runner, for models exported by
``histolens export``.

An export is one self-contained ``.onnx`` file. Its graph maps a model-input batch (stain and
mean/std normalised by the Predictor, at the model's input size, tiling inside the graph) to
logits and pooled features; its ``metadata_props`` carry the checkpoint's JSON metadata, with an
``export`` section, and the tensors that are not weights (the out-of-distribution guard's
statistics), base64-encoded safetensors.

Which runtime runs an export: ``onnxruntime`` (a dependency) or ``openvino`` (``pip install
openvino``, CPU only; faster for EfficientNet-Lite0 on the 2-core CPU of
``benchmarks/bench_inference.py``), chosen by the caller or by $HISTOLENS_ONNX_RUNTIME.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

# The export as a file (its metadata, its tensors) belongs to the checkpoint package; re-exported
# here beside the runners that run it.
from histolens.checkpoint.onnx_file import (
    METADATA_KEY,
    ONNX_SUFFIX,
    TENSORS_KEY,
    is_onnx_file,
    read_onnx_export,
    read_onnx_metadata,
)
from histolens.errors import CheckpointError, ConfigError, check_choice
from histolens.models.openvino_core import infer_per_image, openvino_core

if TYPE_CHECKING:
    from histolens.checkpoint.metadata import CheckpointMetadata

__all__ = [
    "INPUT_NAME",
    "METADATA_KEY",
    "ONNX_RUNTIMES",
    "ONNX_SUFFIX",
    "OUTPUT_NAMES",
    "RUNTIME_ENV",
    "TENSORS_KEY",
    "ExportedTorchModel",
    "OnnxRunner",
    "OpenVinoRunner",
    "check_runtime_usable",
    "is_onnx_file",
    "make_runner",
    "read_onnx_export",
    "read_onnx_metadata",
]

INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "features")
ONNX_RUNTIMES = ("onnxruntime", "openvino")
RUNTIME_ENV = "HISTOLENS_ONNX_RUNTIME"


def _providers(device: str | torch.device) -> list:
    """ONNX Runtime execution providers for a torch-style device name."""
    import onnxruntime as ort

    dev = str(device).lower()
    if dev in ("cpu", "auto"):
        return ["CPUExecutionProvider"]
    if dev.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError(
                "This onnxruntime has no CUDA provider (pip install onnxruntime-gpu), so an ONNX "
                "model runs with --device cpu only."
            )
        index = int(dev.split(":", 1)[1]) if ":" in dev else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise ConfigError(f"Unknown device '{device}' for an ONNX model; choose cpu or cuda[:N].")


def _check_graph(path: str | os.PathLike, inputs: list[str], outputs: set[str]) -> None:
    """Refuse a graph without the export's input and output names."""
    if inputs != [INPUT_NAME] or not outputs >= set(OUTPUT_NAMES):
        raise CheckpointError(
            f"{path} is not a histolens export (its graph has inputs {inputs} and outputs "
            f"{sorted(outputs)}, not '{INPUT_NAME}' -> {', '.join(OUTPUT_NAMES)})."
        )


def _first_line(exc: Exception, limit: int = 160) -> str:
    return str(exc).splitlines()[0][:limit] if str(exc) else type(exc).__name__


class OnnxRunner:
    """An ONNX export on ONNX Runtime, called like the torch classifier: input -> logits.

    ``threads`` defaults to torch's thread count, so one setting governs both backends.
    """

    runtime = "onnxruntime"

    def __init__(
        self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: no warnings about unused initialisers
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=_providers(device))
        except ConfigError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"ONNX Runtime cannot load {path} ({_first_line(exc)})."
            ) from None
        _check_graph(
            path,
            [i.name for i in self.session.get_inputs()],
            {o.name for o in self.session.get_outputs()},
        )

    def _run(self, inputs: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        x = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
        return [torch.from_numpy(a) for a in self.session.run(names, {INPUT_NAME: x})]

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._run(inputs, ["logits"])[0]

    def forward_with_features(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and pooled features in one pass, as ``HistoClassifier.forward_with_features``."""
        logits, features = self._run(inputs, list(OUTPUT_NAMES))
        return logits, features


class OpenVinoRunner:
    """An ONNX export on OpenVINO's CPU plugin, called like :class:`OnnxRunner`.

    Computes in f32 (OpenVINO would use bf16 on CPUs that have it, which changes the
    probabilities) with the latency hint. One infer request serves every call, one call at a
    time: the web service runs the model on one worker thread anyway. ``from_env``: OpenVINO was
    chosen by $HISTOLENS_ONNX_RUNTIME, which the sentence refusing it then names.
    """

    runtime = "openvino"

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        threads: int | None = None,
        *,
        from_env: bool = False,
    ) -> None:
        _openvino(device, from_env)  # installed, and the device is the CPU
        self.path = Path(path)
        config = {
            "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        }
        try:
            self.compiled = openvino_core().compile_model(str(path), "CPU", config)
        except Exception as exc:
            raise CheckpointError(f"OpenVINO cannot load {path} ({_first_line(exc)}).") from None
        _check_graph(
            path,
            [_port_name(port, INPUT_NAME) for port in self.compiled.inputs],
            {name for port in self.compiled.outputs for name in port.get_names()},
        )
        self._outputs = {name: self.compiled.output(name) for name in OUTPUT_NAMES}
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def _run(self, inputs: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        x = inputs.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:  # one image per call, copied out: the request is reused
            outputs = infer_per_image(self._request, x, [self._outputs[n] for n in names])
        return [torch.from_numpy(a) for a in outputs]

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._run(inputs, ["logits"])[0]

    def forward_with_features(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and pooled features in one pass, as ``HistoClassifier.forward_with_features``."""
        logits, features = self._run(inputs, list(OUTPUT_NAMES))
        return logits, features


def _choose_onnx_runtime(from_env: bool) -> str:
    """How to run on ONNX Runtime instead of OpenVINO, by undoing what chose OpenVINO: the
    environment variable (which explain and the desktop app also read) or the caller's choice."""
    if from_env:
        return f"unset ${RUNTIME_ENV}, which chose OpenVINO"
    return "--onnx-runtime onnxruntime"


def _openvino(device: str | torch.device, from_env: bool) -> Any:
    """The openvino module, when it is installed and ``device`` is the CPU (its only device here);
    otherwise one sentence saying how to run the model, ``from_env`` telling what chose OpenVINO."""
    if str(device).lower() not in ("cpu", "auto"):
        raise ConfigError(
            f"OpenVINO runs an ONNX model on the CPU only, not on '{device}'; use --device "
            f"cpu, or ONNX Runtime for a GPU ({_choose_onnx_runtime(from_env)})."
        )
    try:
        import openvino
    except ImportError:
        raise ConfigError(
            "OpenVINO is not installed: pip install openvino (or pip install "
            "'histolens[openvino]'), or run the model on ONNX Runtime "
            f"({_choose_onnx_runtime(from_env)})."
        ) from None
    return openvino


def check_runtime_usable(
    runtime: str, device: str | torch.device = "cpu", *, from_env: bool = False
) -> None:
    """Refuse, in the sentence the runner would raise, a runtime that cannot run an export on
    ``device`` here (not installed, or not on that device), without loading the model: for a
    front end to check before it starts. ``from_env``: $HISTOLENS_ONNX_RUNTIME chose it."""
    check_choice("ONNX runtime", runtime, ONNX_RUNTIMES)
    if runtime == "openvino":
        _openvino(device, from_env)
    else:
        _providers(device)


def _port_name(port: Any, wanted: str) -> str:
    """``wanted`` if it is one of the names of an OpenVINO port (a port may have several)."""
    names = port.get_names()
    return wanted if wanted in names else port.get_any_name()


def make_runner(
    path: str | os.PathLike,
    device: str = "cpu",
    runtime: str = "onnxruntime",
    *,
    from_env: bool = False,
) -> OnnxRunner | OpenVinoRunner:
    """The runner of an ONNX export on ``runtime`` (one of :data:`ONNX_RUNTIMES`);
    ``from_env``: $HISTOLENS_ONNX_RUNTIME chose it, which its errors then say."""
    check_choice("ONNX runtime", runtime, ONNX_RUNTIMES)
    if runtime == "openvino":
        return OpenVinoRunner(path, device, from_env=from_env)
    return OnnxRunner(path, device)


_OWN_ATTRIBUTES = frozenset({"_metadata", "_export_path", "_device", "_loader", "_module", "_lock"})


class ExportedTorchModel:
    """Stands in for the torch module of a Predictor running an ONNX export.

    Heatmaps need gradients, which ONNX Runtime does not give: the first use of anything of the
    module (its backbone, parameters, forward) loads the torch checkpoint the export was made
    from, where it still is (as recorded, or beside the export), and otherwise raises one
    sentence naming it. ``spec`` (the backbone) is known without loading; ``loader(path,
    device)`` builds the torch module of a checkpoint (``histolens.inference.loading`` gives it).
    """

    def __init__(
        self,
        spec: Any,
        metadata: CheckpointMetadata,
        export_path: str | os.PathLike,
        device: str,
        loader: Callable[[Path, str], torch.nn.Module],
    ) -> None:
        self.spec = spec
        self._loader = loader
        self._metadata = metadata
        self._export_path = Path(export_path)
        self._device = device
        self._module: torch.nn.Module | None = None
        self._lock = threading.Lock()

    @property
    def recorded_checkpoint(self) -> str | None:
        """The torch checkpoint the export was made from, as recorded at export."""
        return self._metadata.export_source

    def _checkpoint(self) -> Path:
        recorded = self.recorded_checkpoint
        if recorded:
            for candidate in (Path(recorded), self._export_path.parent / Path(recorded).name):
                if candidate.is_file():
                    return candidate
        raise CheckpointError(
            f"Heatmaps need gradients, which the ONNX model {self._export_path.name} cannot give: "
            f"explain with its torch checkpoint {recorded or '(not recorded in the export)'}, "
            "which is not there."
        )

    def load(self) -> torch.nn.Module:
        """The torch classifier the export was made from (loaded once)."""
        with self._lock:
            if self._module is None:
                from histolens.checkpoint.io import read_metadata

                path = self._checkpoint()
                theirs = read_metadata(path)
                if (theirs.model_id, theirs.saved_at) != (
                    self._metadata.model_id,
                    self._metadata.saved_at,
                ):
                    raise CheckpointError(
                        f"Heatmaps need the torch checkpoint {self._export_path.name} was exported "
                        f"from, and {path} holds another model (model id or save time differ)."
                    )
                self._module = self._loader(path, self._device)
            return self._module

    def __getattr__(self, name: str) -> Any:
        # Only attributes not set in __init__ reach here: those of the torch module.
        if name.startswith("__") or name in _OWN_ATTRIBUTES:
            raise AttributeError(name)
        return getattr(self.load(), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()(*args, **kwargs)
