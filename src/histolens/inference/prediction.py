"""What a prediction is: one image's ``Prediction``.

``histolens.inference.predictor.Predictor`` makes them; the name is importable from there too.
This module stays free of torch, so that a front end can name a prediction before a model loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from histolens.inference.predictions_csv import prediction_row
from histolens.lazy import lazy_getattr

__all__ = ["Prediction"]

# Older code imports probabilities_from_logits from here; it is histolens.stats.calibration's.
__getattr__ = lazy_getattr("histolens.stats", {"probabilities_from_logits": "calibration"})


@dataclass
class Prediction:
    """One image's prediction. ``probability`` is that of ``label``; ``scores`` has every class.

    ``prediction_set`` holds the classes not ruled out at error level ``alpha`` (conformal, see
    histolens.stats.conformal; empty for checkpoints without a calibration). ``refer`` says a person
    should decide: the set holds several classes, or the image is not like the training images
    (``ood``, with ``ood_reason``). ``uncertain`` ("review needed") is ``refer`` for calibrated
    checkpoints, else the old closeness-to-threshold rule or ``ood``.
    """

    label: str
    probability: float
    scores: dict[str, float]
    positive_probability: float | None  # binary: calibrated probability of the positive class
    threshold: float | None
    uncertain: bool
    path: str | None = None
    prediction_set: tuple[str, ...] = ()
    alpha: float | None = None
    refer: bool = False
    refer_reason: str | None = None
    ood: bool = False
    ood_reason: str | None = None

    def as_row(self, class_names: Sequence[str] | None = None) -> dict[str, str]:
        """This prediction as a row of the predictions CSV (histolens.inference.predictions_csv), with
        ``p_<class>`` columns for ``class_names`` (default: its scores' classes)."""
        return prediction_row(self, class_names)
