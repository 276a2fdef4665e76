"""The loaded model, and what the window says about it.

This is the one place the desktop viewer reads the checkpoint's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from histolens.checkpoint.io import TrainingData
    from histolens.explain import Explainer
    from histolens.inference.predictor import Predictor

__all__ = ["ViewerModel", "ModelSummary"]

_WARNING = "warning: "
_RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime (ONNX export)", "openvino": "OpenVINO (ONNX export)"}


@dataclass(frozen=True)
class ModelSummary:
    """What the window says about the loaded checkpoint."""

    source: str
    model_id: str
    backbone: str
    licence: str | None
    task: str
    class_names: tuple[str, ...]
    threshold: float | None
    temperature: float
    training_data: str
    performance: tuple[str, ...]
    performance_title: str
    saved_at: str
    # What computes the predictions: torch, or onnxruntime / openvino for an ONNX export.
    runtime: str = "torch"
    # True when ``runtime`` computes a torch checkpoint's backbone features (the feature engine).
    engine: bool = False

    @classmethod
    def from_predictor(cls, predictor: Predictor) -> ModelSummary:
        from histolens.evaluation.performance import (
            headline_estimate,
            is_from_metrics,
            performance_lines,
        )
        from histolens.models.engine import EngineClassifier

        meta = predictor.metadata
        estimate = headline_estimate(meta)
        return cls(
            source=str(getattr(predictor, "source", "")),
            model_id=predictor.model_id,
            backbone=predictor.backbone_name,
            licence=meta.licence if meta is not None else None,
            task=predictor.task,
            class_names=tuple(predictor.class_names),
            threshold=predictor.threshold if predictor.is_binary else None,
            temperature=float(predictor.temperature),
            training_data=_describe_data(meta.data, meta.magnification) if meta else "",
            performance=tuple(performance_lines(estimate)),
            performance_title=(
                "PERFORMANCE ON UNSEEN PATIENTS"
                if estimate and not is_from_metrics(estimate)
                else "MEASURED PERFORMANCE"
            ),
            saved_at=(meta.saved_at if meta is not None else None) or "",
            runtime=getattr(getattr(predictor, "runner", None), "runtime", "torch"),
            engine=isinstance(getattr(predictor, "runner", None), EngineClassifier),
        )

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs, in display order."""
        rows = [
            ("Model", self.model_id),
            ("Backbone", self.backbone),
            ("Licence", self.licence or "see the backbone's model card"),
            ("Task", f"{self.task}: {', '.join(self.class_names)}"),
            ("Threshold", "—" if self.threshold is None else f"{self.threshold:.3f}"),
            ("Temperature", f"{self.temperature:.3g}"),
            ("Training data", self.training_data or "—"),
        ]
        if self.saved_at:
            rows.append(("Saved", self.saved_at))
        rows.append(("File", self.source))
        if self.engine:
            name = _RUNTIME_NAMES.get(self.runtime, self.runtime).split(" (")[0]
            rows.append(("Runtime", f"{name} (backbone features; heatmaps on PyTorch)"))
        elif self.runtime != "torch":
            rows.append(("Runtime", _RUNTIME_NAMES.get(self.runtime, self.runtime)))
        return rows

    @property
    def performance_text(self) -> tuple[str, ...]:
        """What the figures were measured on, the support and the figures, without warnings."""
        return tuple(line for line in self.performance if not line.startswith(_WARNING))

    @property
    def performance_about(self) -> tuple[str, ...]:
        """What the figures were measured on, and the patients of each class behind them."""
        return tuple(line for line in self.performance_text if not line.startswith("  "))

    @property
    def performance_figures(self) -> tuple[str, ...]:
        """'ROC AUC: 0.916 (95% CI 0.71-1.00)', ..., then one line per magnification."""
        return tuple(line.strip() for line in self.performance_text if line.startswith("  "))

    @property
    def performance_warnings(self) -> tuple[str, ...]:
        """The figures' warnings in words (too few patients of a class, no CI stored, ...)."""
        return tuple(
            line[len(_WARNING) :] for line in self.performance if line.startswith(_WARNING)
        )


def _describe_data(data: TrainingData, magnification: str) -> str:
    parts = [data.path or "?"]
    if data.layout:
        parts.append(f"({data.layout})")
    if magnification:
        parts.append(f"magnification {magnification}" + ("" if magnification == "all" else "X"))
    if data.split:
        sizes = ", ".join(
            f"{name} {'?' if part.images is None else part.images}"
            for name, part in data.split.items()
        )
        parts.append(f"split: {sizes}")
    if data.patient_level_split is False:
        parts.append("(split not patient-level)")
    return " ".join(parts)


@dataclass
class ViewerModel:
    """The model the viewer works with, shared by the presenter's parts.

    ``predictor`` and ``explainer`` are replaced together when a checkpoint finishes loading;
    ``loading`` counts the checkpoint loads still running.
    """

    predictor: Predictor | None = None
    explainer: Explainer | None = None
    info: ModelSummary | None = None
    loading: int = 0

    @property
    def waiting(self) -> bool:
        """True while no model is loaded yet but one is on its way."""
        return self.predictor is None and self.loading > 0
