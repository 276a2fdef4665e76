"""Pydantic schemas of every response the service sends (they also document /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BatchItem",
    "BatchResponse",
    "ErrorResponse",
    "ExplainResponse",
    "Health",
    "Heatmap",
    "Limits",
    "ModelInfo",
    "PredictionOut",
    "PredictResponse",
]


class ErrorResponse(BaseModel):
    """Every error: one sentence saying what went wrong and, where possible, how to fix it."""

    detail: str = Field(examples=["Upload is larger than the 20 MB limit."])


class PredictionOut(BaseModel):
    """One image's prediction, calibrated (temperature-scaled) and thresholded."""

    model_config = ConfigDict(populate_by_name=True)

    label: str = Field(alias="class", description="Predicted class.", examples=["malignant"])
    probability: float = Field(description="Calibrated probability of the predicted class.")
    positive_probability: float | None = Field(
        None, description="Binary models: calibrated probability of the positive class."
    )
    scores: dict[str, float] = Field(description="Calibrated probability of every class.")
    threshold: float | None = Field(
        None, description="Binary models: decision threshold on the positive-class probability."
    )
    uncertain: bool = Field(
        description="True when the result is close to the decision boundary "
        "and should be reviewed by a person."
    )
    model_id: str


class PredictResponse(PredictionOut):
    filename: str | None = None


class BatchItem(BaseModel):
    """The result for one file of a batch: a prediction, or the error that file got."""

    filename: str | None
    status: int = Field(description="The HTTP status this file would get on its own.")
    prediction: PredictionOut | None = None
    error: str | None = None


class BatchResponse(BaseModel):
    model_id: str
    n_ok: int
    n_failed: int
    results: list[BatchItem]


class Heatmap(BaseModel):
    """A saliency map in [0, 1] at the uploaded image's size (row-major, height x width)."""

    encoding: Literal["list", "base64-float32-le"]
    height: int
    width: int
    data: list[list[float]] | str = Field(
        description="Nested list of rows, or base64 of little-endian float32 values."
    )


class ExplainResponse(BaseModel):
    method: str
    target_class: str
    prediction: PredictionOut
    heatmap: Heatmap


class Limits(BaseModel):
    max_upload_bytes: int
    max_batch_files: int
    max_pixels: int
    max_queue: int
    max_batch: int
    batch_wait_ms: float


class ModelInfo(BaseModel):
    """What the checkpoint says about the model, including its held-out test metrics."""

    model_id: str
    backbone: str
    task: str
    class_names: list[str]
    threshold: float | None
    temperature: float
    magnification: str | None = None
    saved_at: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict, description="Test-set metrics.")
    versions: dict[str, Any] = Field(default_factory=dict)
    explain_methods: list[str] = Field(
        default_factory=list, description="Methods /v1/explain accepts (empty if unavailable)."
    )
    auth_required: bool
    limits: Limits
    notice: str


class Health(BaseModel):
    status: Literal["ok"]
    model_id: str
    queue_depth: int
    queue_capacity: int
