"""The runtime that computes a frozen backbone's pooled features: one choice for every command.

``feature_engine(model)`` gives an object whose ``features(x)`` equals ``model.features(x)``
(``HistoClassifier``: tiles, the blocks the head reads, pooled and concatenated) to within fp32
rounding, computed by the fastest runtime available here: OpenVINO's CPU plugin (6x PyTorch eager
for Lite0 at batch 32 in ``benchmarks/bench_inference.py``), else ONNX Runtime (3.6x), else
PyTorch. The backbone is exported once, truncated at the layers the head reads, per (backbone,
weights, input size, layers, torch and runtime versions), into the engine cache directory
(``$HISTOLENS_CACHE/engines``, else ``~/.cache/histolens/engines``) and reused; a file appears there
only whole (written to a temporary name, then renamed), so concurrent processes may share it.

The choice: ``--engine`` (``torch``, ``auto``, or a runtime by name), else ``$HISTOLENS_ENGINE``,
else ``auto``. ``auto`` uses PyTorch where an export cannot help (a GPU, reduced precision, a
backbone that will not export) and checks each new export against PyTorch on a probe batch before
trusting it. Gradients (Grad-CAM and the other heatmap methods) always come from PyTorch.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Protocol

import torch

from histolens.config import ENGINES
from histolens.errors import ConfigError, check_choice
from histolens.models.engine_export import (
    CACHE_ENV,
    FEATURE_RTOL,
    ExportedFeatures,
    engine_cache_dir,
    feature_difference,
    runtime_available,
)

if TYPE_CHECKING:
    from histolens.models.classifier import HistoClassifier

__all__ = [
    "CACHE_ENV",
    "ENGINES",
    "ENGINE_ENV",
    "FEATURE_RTOL",
    "EngineClassifier",
    "ExportedFeatures",
    "FeatureEngine",
    "TorchFeatures",
    "engine_cache_dir",
    "feature_difference",
    "feature_engine",
    "resolve_engine",
]

log = logging.getLogger("histolens")

ENGINE_ENV = "HISTOLENS_ENGINE"


class FeatureEngine(Protocol):
    """Computes pooled backbone features of a model-input batch (B, 3, H, W) -> (B, D)."""

    name: str

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


def resolve_engine(setting: str | None = None) -> str:
    """The engine setting: ``setting`` if given, else ``$HISTOLENS_ENGINE``, else 'auto'."""
    if setting:
        return check_choice("engine", setting.strip().lower(), ENGINES)
    value = os.environ.get(ENGINE_ENV, "").strip().lower()
    if value:
        return check_choice(f"engine (${ENGINE_ENV})", value, ENGINES)
    return "auto"


class TorchFeatures:
    """PyTorch eager: ``model.features``."""

    name = "torch"

    def __init__(self, model: HistoClassifier) -> None:
        self.model = model

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def feature_engine(
    model: HistoClassifier,
    setting: str | None = None,
    input_size: tuple[int, int] | None = None,
    *,
    precision: str = "32-true",
    cache_dir: str | os.PathLike | None = None,
) -> FeatureEngine:
    """The engine that computes ``model.features``, chosen once (see the module docstring).

    With ``input_size`` the graph is exported (or loaded) and checked now, so that ``auto``
    falls back to PyTorch at once if it cannot be used; otherwise on the first batch.
    A runtime named explicitly that cannot be used raises ConfigError.
    """
    choice = resolve_engine(setting)
    if choice == "torch":
        return TorchFeatures(model)
    first = next(iter(model.parameters()))
    reason = None
    if first.device.type != "cpu":
        reason = f"the model is on {first.device.type}"
    elif precision not in ("32-true", "32") or first.dtype != torch.float32:
        reason = f"precision {precision}"
    elif model.training:
        reason = "the backbone is training"
    if reason is not None:
        if choice != "auto":
            raise ConfigError(
                f"The {choice} engine cannot run here ({reason}); use --engine torch."
            )
        return TorchFeatures(model)
    candidates = [choice] if choice != "auto" else ["openvino", "onnxruntime"]
    for runtime in candidates:
        if not runtime_available(runtime):
            if choice != "auto":
                raise ConfigError(
                    f"The {runtime} engine is not installed (pip install {runtime}); use --engine "
                    "auto or torch."
                )
            continue
        try:
            engine = ExportedFeatures(model, runtime, cache_dir)
            if input_size is None:
                return _Guarded(engine, model)
            engine.prepare(input_size)
        except Exception as exc:  # an export or runtime problem: PyTorch computes instead
            if choice != "auto":
                raise ConfigError(
                    f"The {runtime} engine cannot run {model.spec.name} ({_first_line(exc)}); use "
                    "--engine torch."
                ) from None
            log.warning(
                "Backbone features on PyTorch: %s could not run %s (%s).",
                runtime,
                model.spec.name,
                _first_line(exc),
            )
            continue
        return engine
    return TorchFeatures(model)


class _Guarded:
    """An exported engine whose graph is made on the first batch; if that fails, PyTorch."""

    def __init__(self, engine: ExportedFeatures, model: HistoClassifier) -> None:
        self.engine, self.model = engine, model
        self.fallback: TorchFeatures | None = None

    @property
    def name(self) -> str:
        return self.fallback.name if self.fallback is not None else self.engine.name

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.fallback is None:
            try:
                return self.engine.features(x)
            except Exception as exc:
                log.warning(
                    "Backbone features on PyTorch: %s could not run %s (%s).",
                    self.engine.name,
                    self.model.spec.name,
                    _first_line(exc),
                )
                self.fallback = TorchFeatures(self.model)
        return self.fallback.features(x)


def _first_line(exc: BaseException, limit: int = 160) -> str:
    return str(exc).splitlines()[0][:limit] if str(exc) else type(exc).__name__


class EngineClassifier:
    """A classifier's logits with the backbone on a feature engine and the head on PyTorch: what
    the Predictor and the faithfulness curves call instead of the module (no gradients)."""

    def __init__(self, model: HistoClassifier, engine: FeatureEngine) -> None:
        self.model, self.engine = model, engine

    @property
    def runtime(self) -> str:
        return self.engine.name

    @torch.inference_mode()
    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.engine.features(x).to(next(iter(self.model.head.parameters())).device)
        return self.model.head(features), features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]
