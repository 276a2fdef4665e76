"""What GET /v1/model says about the model. The one place the web service reads checkpoint
metadata; the training data's path never leaves the server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from histolens.errors import CheckpointError
from histolens.web.schemas import DataSummary, ModelInfo

if TYPE_CHECKING:
    from collections.abc import Sequence

    from histolens.checkpoint.io import TrainingData
    from histolens.inference.predictor import Predictor
    from histolens.web.settings import ServiceSettings

__all__ = ["NOTICE", "describe_model"]

NOTICE = "Research and education use only; not for diagnosis."


def describe_model(
    predictor: Predictor, settings: ServiceSettings, explain_methods: Sequence[str]
) -> ModelInfo:
    """The model, its checkpoint's metadata and figures, and the service's limits."""
    from histolens.evaluation.performance import (
        estimate_from_metrics,
        headline_estimate,
        is_from_metrics,
    )

    meta = predictor.metadata
    if meta is None:
        raise CheckpointError("The service's model was not loaded from a checkpoint.")
    # The figures to quote, as the desktop viewer quotes them; "estimate" is sent only when the
    # checkpoint stores one, and "metrics_description" always says what "metrics" were measured on.
    quoted = headline_estimate(meta)
    estimate = None if quoted is None or is_from_metrics(quoted) else quoted
    stored = estimate_from_metrics(meta.metrics, list(predictor.class_names), predictor.task)
    return ModelInfo(
        model_id=predictor.model_id,
        backbone=predictor.backbone_name,
        licence=meta.licence,
        task=predictor.task,
        class_names=list(predictor.class_names),
        threshold=predictor.threshold if predictor.is_binary else None,
        temperature=predictor.temperature,
        magnification=meta.magnification,
        saved_at=meta.saved_at,
        data=_data_summary(meta.data),
        estimate=estimate.to_dict() if estimate is not None else None,
        metrics=meta.metrics,
        metrics_description=stored.description if stored else None,
        metrics_warnings=list(quoted.warnings) if quoted else [],
        versions=meta.versions,
        runtime=getattr(predictor.runner, "runtime", "torch"),
        explain_methods=list(explain_methods),
        auth_required=bool(settings.token),
        limits=settings.limits,
        notice=NOTICE,
    )


def _data_summary(data: TrainingData) -> DataSummary:
    """The training data's layout and counts; its path stays on the server."""
    # The last part of the path only (written on Windows or POSIX): never the folders above it.
    name = (data.path or "").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return DataSummary(
        name=name or None,
        layout=data.layout,
        patient_level_split=data.patient_level_split,
        split={k: part.to_dict() for k, part in data.split.items()},
    )
