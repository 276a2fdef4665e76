"""Pydantic schemas of every response the service sends (they also document /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from histolens.evaluation import results
from histolens.web.derive import schema_of

__all__ = [
    "BatchItem",
    "BatchResponse",
    "DataSummary",
    "ErrorResponse",
    "Estimate",
    "EstimateBlock",
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
        description="True when a person should review the result: 'refer' for models with a "
        "conformal calibration, else a probability close to the decision boundary."
    )
    prediction_set: list[str] = Field(
        default_factory=list,
        description="Classes not ruled out at error level alpha (a new patient's image has its "
        "true class in its set with probability 1 - alpha); empty for models without a "
        "calibration.",
        examples=[["malignant"]],
    )
    alpha: float | None = Field(None, description="Error level of the prediction set.")
    refer: bool = Field(
        False,
        description="True when a person should decide: several classes are plausible, or the "
        "image is not like the training images.",
    )
    refer_reason: str | None = Field(None, examples=["benign and malignant are all plausible"])
    ood: bool = Field(False, description="True when the image is not like the training images.")
    ood_reason: str | None = Field(
        None, examples=["the image is nearly uniform (no visible structure)"]
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


# What /docs says of the estimate's fields; their names and types are the dataclasses' own
# (histolens.evaluation.results), so the shape is spelled once.
_ESTIMATE_DOCS: dict[str, dict[str, Any]] = {
    "patients_per_class": dict(
        description="Patients of each class behind the figures.",
        examples=[{"benign": 8, "malignant": 22}],
    ),
    "metrics": dict(
        description="roc_auc, patient_auc, balanced_accuracy, patient_recognition_rate, "
        "sensitivity, specificity, accuracy (binary); macro_f1, balanced_accuracy, accuracy, "
        "patient_recognition_rate (subtypes).",
    ),
    "ci95": dict(
        description="95% confidence interval [low, high] of each figure, by bootstrap over "
        "patients.",
    ),
    "threshold": dict(
        description="Binary: the decision threshold these images are decided at (per "
        "magnification: that magnification's operating point).",
    ),
    "method": dict(examples=["5-fold patient-level cross-validation (out-of-fold predictions)"]),
    "description": dict(
        examples=["735 images of 30 patient groups in manifest.csv (magnification all)"]
    ),
    "per_magnification": dict(
        description="The same figures at each magnification ('100X'): sensitivity, "
        "specificity, balanced_accuracy and refer_rate at its own threshold, with CIs.",
    ),
    "operating_point": dict(
        description="The rule the thresholds were chosen by, per magnification: youden, "
        "sensitivity:T or specificity:T.",
    ),
    "magnification_thresholds": dict(
        description="How the magnifications' thresholds were chosen: 'shared' (one choice on "
        "probabilities with each magnification's offset taken out, moved back by it) or "
        "'separate' (each on its own images); null when no magnification has a threshold of "
        "its own (one class of too few patients everywhere, slides) or for an estimate from "
        "before the shared choice existed.",
    ),
}

EstimateBlock = schema_of(results.EstimateBlock, _ESTIMATE_DOCS)
Estimate = schema_of(
    results.Estimate, _ESTIMATE_DOCS, {"per_magnification": dict[str, EstimateBlock]}
)


class DataSummary(BaseModel):
    """What the model was trained on: counts only, never a path on the server."""

    name: str | None = Field(None, description="The data folder's or manifest's name.")
    layout: str | None = None
    patient_level_split: bool | None = None
    split: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Images, patient groups and images per class of each part of the split.",
    )


class ModelInfo(BaseModel):
    """What the checkpoint says about the model and how well it does on unseen patients."""

    model_id: str
    backbone: str
    licence: str | None = Field(
        None,
        description="Licence of the backbone's weights (most pathology models: non-commercial).",
    )
    task: str
    class_names: list[str]
    threshold: float | None
    temperature: float
    magnification: str | None = None
    saved_at: str | None = None
    data: DataSummary = Field(default_factory=DataSummary)
    estimate: Estimate | None = Field(
        None,
        description="The performance to quote. None for checkpoints saved before estimates "
        "were stored: then read metrics with metrics_description and metrics_warnings.",
    )
    metrics: dict[str, Any] = Field(
        default_factory=dict,
        description="Headline metrics stored with the checkpoint; 'split' says of what "
        "('out-of-fold' or 'test').",
    )
    metrics_description: str | None = Field(
        None,
        description="What metrics were measured on.",
        examples=["a held-out test split of 7 patients (52 images)"],
    )
    metrics_warnings: list[str] = Field(
        default_factory=list,
        description="Why the figures may not hold for new patients (too few patients of a "
        "class, or in a test split), in words.",
    )
    versions: dict[str, Any] = Field(default_factory=dict)
    runtime: str = Field(
        "torch",
        description="What computes the predictions: torch, or onnxruntime or openvino (an ONNX "
        "export on that runtime, or a checkpoint whose backbone features it computes; heatmaps "
        "always on PyTorch).",
    )
    explain_methods: list[str] = Field(
        default_factory=list, description="Methods /v1/explain accepts."
    )
    auth_required: bool
    limits: Limits
    notice: str


class Health(BaseModel):
    status: Literal["ok"]
    model_id: str
    queue_depth: int
    queue_capacity: int
