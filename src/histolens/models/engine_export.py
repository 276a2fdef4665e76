"""A frozen backbone exported to ONNX, truncated at the layers the head reads, and run by OpenVINO
or ONNX Runtime: the exported half of the feature engine (``histolens.models.engine`` chooses).

One graph per (backbone, weights, input size, layers, torch and runtime versions) is kept in the
engine cache directory and checked against PyTorch before it is trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from histolens.errors import check_choice
from histolens.models.openvino_core import infer_per_image, openvino_core

if TYPE_CHECKING:
    from histolens.models.classifier import HistoClassifier

__all__ = [
    "CACHE_ENV",
    "FEATURE_RTOL",
    "ExportedFeatures",
    "OPSET",
    "FixedTileFeatures",
    "engine_cache_dir",
    "feature_difference",
    "runtime_available",
    "trace_to_onnx",
]

log = logging.getLogger("histolens")

CACHE_ENV = "HISTOLENS_CACHE"
# Bumped whenever the exported graph changes meaning: old files are then never read.
ENGINE_FORMAT = 1
OPSET = 17
# How far an exported backbone's pooled features may be from PyTorch's, relative to the largest
# feature magnitude of the batch. Where it comes from: fp32 has eps = 1.2e-7; a runtime sums each
# dot product of K terms (K <= ~1,000 here: 1x1 convs over <= 672 channels, 5x5 depthwise) in
# another order and with other kernels (AVX2 / AVX-512 / fused conv+BN), which moves it by
# about eps * sqrt(K) ~ 4e-6 relative; over the ~20 conv layers up to blocks.5 such errors add
# (depth L ~ 20, and BN's rescaling can amplify them ~10x): 4e-6 * 20 * 10 ~ 1e-3. The mean
# pooling only averages them down. Measured on this AMD AVX2 CPU: see docs/engine.md.
FEATURE_RTOL = 1e-3
# Compiled graphs of this process, by (file, threads).
_COMPILED: dict[tuple[str, int], object] = {}


def engine_cache_dir() -> Path:
    """Where exported backbones are kept: ``$HISTOLENS_CACHE/engines``, else the user's cache."""
    root = os.environ.get(CACHE_ENV, "").strip()
    if root:
        return Path(root).expanduser() / "engines"
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "histolens" / "engines"


class FixedTileFeatures(nn.Module):
    """``model.features`` at one input size, its tiles laid out once (the tracer needs fixed
    shapes); the head is left out, so the export depends on the backbone's weights only.

    The legacy (TorchScript) exporter records tensor shapes as tensors, and the classifier's own
    tiling takes Python ints from ``x.shape``; so the model itself lays the tiles out here, once,
    for its fixed input size. ``histolens.export.onnx`` adds the head on top.
    """

    def __init__(self, model: HistoClassifier, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        model._tiles(torch.zeros(1, 3, *input_size))
        grid, model._grid = model._grid, None
        self.tiles: list[tuple[int, int, int, int]] = []
        if grid is not None:
            _, ys, xs, (th, tw) = grid
            self.tiles = [(y, x, th, tw) for y in ys for x in xs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tiles:
            return self.model._pooled(x)
        crops = [x[:, :, y : y + h, x0 : x0 + w] for y, x0, h, w in self.tiles]
        pooled = self.model._pooled(torch.stack(crops, dim=1).flatten(0, 1))
        return pooled.view(-1, len(self.tiles), pooled.shape[-1]).mean(1)


def trace_to_onnx(
    graph: nn.Module,
    input_size: tuple[int, int],
    path: str | os.PathLike,
    input_name: str,
    output_names: Sequence[str],
) -> None:
    """Trace ``graph`` on a (2, 3, H, W) batch with the legacy exporter into ``path``: opset
    ``OPSET``, every input and output with a dynamic batch axis, constants folded."""
    names = (input_name, *output_names)
    with warnings.catch_warnings():
        # The legacy exporter's notices and the tracer's constant-shape warnings: shapes are
        # fixed by design, and every caller checks the graph against PyTorch before use.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (torch.zeros(2, 3, *input_size),),
            str(path),
            dynamo=False,
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_axes={name: {0: "batch"} for name in names},
            opset_version=OPSET,
            do_constant_folding=True,
        )


def _weights_digest(model: HistoClassifier) -> str:
    """SHA-256 of the backbone's tensors (weights and batch-norm statistics), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _runtime_version(runtime: str) -> str:
    if runtime == "openvino":
        import openvino

        return str(openvino.__version__)
    import onnxruntime

    return str(onnxruntime.__version__)


def runtime_available(runtime: str) -> bool:
    try:
        _runtime_version(runtime)
    except ImportError:
        return False
    return True


def feature_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two feature batches over the largest magnitude of ``a``."""
    scale = float(a.abs().max()) or 1.0
    return float((a.float() - b.float()).abs().max()) / scale


class ExportedFeatures:
    """The backbone exported to ONNX and run by OpenVINO or ONNX Runtime, one graph per input size.

    Each input size's graph is looked up in (or exported to) the engine cache directory on first
    use. ``check``: compare a new graph with PyTorch on a probe batch first, and raise
    ``RuntimeError`` if they differ by more than ``FEATURE_RTOL`` (``auto`` then uses PyTorch).
    """

    def __init__(
        self,
        model: HistoClassifier,
        runtime: str,
        cache_dir: str | os.PathLike | None = None,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.name = check_choice("engine runtime", runtime, ("openvino", "onnxruntime"))
        self.cache_dir = Path(cache_dir) if cache_dir is not None else engine_cache_dir()
        self.threads = int(threads or torch.get_num_threads())
        self._digest = _weights_digest(model)
        self._runs: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()
        self.last_difference: float | None = None  # of the latest probe check

    def key(self, input_size: tuple[int, int]) -> str:
        """The cache key of this backbone's graph at ``input_size``."""
        parts = {
            "format": ENGINE_FORMAT,
            "backbone": self.model.spec.timm_name,
            "weights": self._digest,
            "input_size": list(input_size),
            "layers": self.model.feature_layer,
            "torch": torch.__version__,
            "runtime": [self.name, _runtime_version(self.name)],
            "opset": OPSET,
        }
        blob = json.dumps(parts, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    def path(self, input_size: tuple[int, int]) -> Path:
        safe = self.model.spec.name.replace("/", "_")
        return (
            self.cache_dir / f"{safe}-{input_size[0]}x{input_size[1]}-{self.key(input_size)}.onnx"
        )

    def _export(self, input_size: tuple[int, int], target: Path) -> None:
        from histolens.atomic import atomic_path

        graph = FixedTileFeatures(self.model, input_size).eval()
        with atomic_path(target) as tmp, torch.no_grad():
            trace_to_onnx(graph, input_size, tmp, "input", ("features",))

    def _compile(self, path: Path):
        if self.name == "openvino":
            config = {
                "INFERENCE_NUM_THREADS": self.threads,
                "PERFORMANCE_HINT": "LATENCY",
                # OpenVINO would compute in bf16 on CPUs that have it: not the same features.
                "INFERENCE_PRECISION_HINT": "f32",
            }
            compiled = openvino_core().compile_model(str(path), "CPU", config)
            request = compiled.create_infer_request()
            output = compiled.output(0)
            lock = threading.Lock()

            def run(x):
                with lock:  # one infer request, reused; one image per call (openvino_core)
                    return infer_per_image(request, x, [output])[0]

            return run
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"input": x})[0]

    def _run_for(self, input_size: tuple[int, int]):
        with self._lock:
            run = self._runs.get(input_size)
            if run is not None:
                return run
            path = self.path(input_size)
            # A model rebuilt with the same weights (each fold of a cross-validation) reuses the
            # graph this process compiled and checked already.
            run = _COMPILED.get((str(path), self.threads))
            if run is None:
                fresh = not path.is_file()
                if fresh:
                    log.info("Exporting %s to %s (once)", self.model.spec.name, path)
                    self._export(input_size, path)
                run = self._compile(path)
                self._check(run, input_size, path if fresh else None)
                _COMPILED[(str(path), self.threads)] = run
            self._runs[input_size] = run
            return run

    @torch.inference_mode()
    def _check(self, run, input_size: tuple[int, int], fresh: Path | None) -> None:
        """Compare with PyTorch on a seeded probe batch; a graph that differs is not used (and a
        fresh file that differs is removed)."""
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, *input_size, generator=gen)
        ref = self.model.features(x).float()
        got = torch.from_numpy(run(x.numpy()))
        self.last_difference = feature_difference(ref, got)
        if got.shape != ref.shape or not self.last_difference <= FEATURE_RTOL:
            if fresh is not None:
                fresh.unlink(missing_ok=True)
            raise RuntimeError(
                f"{self.name} features differ from PyTorch's by {self.last_difference:.2e} "
                f"(relative), more than {FEATURE_RTOL:g}"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        run = self._run_for(size)
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(run(arr))

    def prepare(self, input_size: tuple[int, int]) -> None:
        """Export (or load) and check the graph of ``input_size`` now."""
        self._run_for((int(input_size[0]), int(input_size[1])))
