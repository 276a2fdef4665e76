"""What GET /v1/model says about the model. The one place the web service reads checkpoint
metadata; the training data's path never leaves the server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from histolens.web.schemas import DataSummary, ModelInfo

if TYPE_CHECKING:
    from collections.abc import Sequence

    from histolens.predictor import Predictor
    from histolens.web.settings import ServiceSettings

__all__ = ["NOTICE", "describe_model"]

NOTICE = "Research and education use only; not for diagnosis."


def describe_model(
    predictor: Predictor, settings: ServiceSettings, explain_methods: Sequence[str]
) -> ModelInfo:
    """The model, its checkpoint's metadata and figures, and the service's limits."""
    from histolens.performance import estimate_from_metrics

    meta = predictor.metadata
    estimate = meta.get("estimate") if isinstance(meta.get("estimate"), dict) else None
    stored = estimate_from_metrics(meta.get("metrics"), list(predictor.class_names), predictor.task)
    return ModelInfo(
        model_id=predictor.model_id,
        backbone=predictor.backbone_name,
        licence=meta.get("licence"),
        task=predictor.task,
        class_names=list(predictor.class_names),
        threshold=predictor.threshold if len(predictor.class_names) == 2 else None,
        temperature=predictor.temperature,
        magnification=None if meta.get("magnification") is None else str(meta["magnification"]),
        saved_at=meta.get("saved_at"),
        data=_data_summary(meta.get("data")),
        estimate=estimate,
        metrics=meta.get("metrics") or {},
        metrics_description=stored["description"] if stored else None,
        metrics_warnings=(estimate or stored or {}).get("warnings", []),
        versions=meta.get("versions") or {},
        explain_methods=list(explain_methods),
        auth_required=bool(settings.token),
        limits=settings.limits,
        notice=NOTICE,
    )


def _data_summary(data: Any) -> DataSummary:
    """The training data's layout and counts; its path stays on the server."""
    if not isinstance(data, dict):
        return DataSummary()
    # The last part of the path only (written on Windows or POSIX): never the folders above it.
    name = str(data.get("path") or "").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    split = data.get("split")
    return DataSummary(
        name=name or None,
        layout=None if data.get("layout") is None else str(data["layout"]),
        patient_level_split=data.get("patient_level_split"),
        split={k: v for k, v in split.items() if isinstance(v, dict)}
        if isinstance(split, dict)
        else {},
    )
