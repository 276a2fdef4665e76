"""What the viewer shows, as plain values: a prediction, a row of results, the View protocol.

Nothing here runs a model or touches a widget; the presenter builds these values and the Tk
window (or a fake view in tests) draws them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from histolens.gui.model_info import ModelInfo
    from histolens.predictor import Prediction

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_OPACITY",
    "RESEARCH_NOTICE",
    "SORT_COLUMNS",
    "PredictionSummary",
    "ResultRow",
    "View",
    "method_label",
    "sort_key",
]

RESEARCH_NOTICE = "Research use only — not for diagnosis"
DEFAULT_METHOD = "gradcam"
DEFAULT_OPACITY = 0.45
SORT_COLUMNS = ("file", "class", "probability", "review")


def method_label(method: str) -> str:
    """The name a pathologist reads ('Grad-CAM') for a method key ('gradcam')."""
    from histolens.explain._methods import EXPLANATION_METHODS

    entry = EXPLANATION_METHODS.get(method)
    return entry.display_name if entry is not None else method


@dataclass(frozen=True)
class PredictionSummary:
    """One image's prediction, ready to display."""

    label: str
    probability: float
    scores: dict[str, float]
    positive_class: str | None
    positive_probability: float | None
    threshold: float | None
    uncertain: bool

    @classmethod
    def from_prediction(
        cls, prediction: Prediction, positive_class: str | None
    ) -> PredictionSummary:
        return cls(
            prediction.label,
            float(prediction.probability),
            dict(prediction.scores),
            positive_class if prediction.positive_probability is not None else None,
            prediction.positive_probability,
            prediction.threshold,
            bool(prediction.uncertain),
        )

    @property
    def probability_text(self) -> str:
        """'P(malignant) = 0.834' for a binary model, 'p = 0.62' for the top of several classes."""
        if self.positive_probability is not None and self.positive_class:
            return f"P({self.positive_class}) = {self.positive_probability:.3f}"
        return f"p = {self.probability:.3f}"

    @property
    def threshold_text(self) -> str:
        if self.threshold is None:
            return "decision: most probable class"
        return f"decision threshold {self.threshold:.2f}"

    @property
    def review_text(self) -> str:
        if not self.uncertain:
            return ""
        if self.threshold is not None:
            return "Review needed: probability close to the decision threshold"
        return "Review needed: the two most probable classes are close"


@dataclass(frozen=True)
class ResultRow:
    """One line of the results list: a prediction, or a file that could not be read."""

    path: str
    name: str
    prediction: Prediction | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return self.prediction.label if self.prediction else ""

    @property
    def probability(self) -> float | None:
        """The calibrated probability of the positive class (binary) or of the predicted class."""
        if self.prediction is None:
            return None
        p = self.prediction.positive_probability
        return float(self.prediction.probability if p is None else p)

    @property
    def uncertain(self) -> bool:
        return bool(self.prediction and self.prediction.uncertain)

    @property
    def review(self) -> str:
        if self.error:
            return "unreadable"
        return "review needed" if self.uncertain else ""


def sort_key(column: str) -> Callable[[ResultRow], Any]:
    """The key that sorts result rows by one of :data:`SORT_COLUMNS`, ties by file name."""
    if column == "file":
        return lambda r: r.name.lower()
    if column == "class":
        return lambda r: (r.error is not None, r.label, r.name.lower())
    if column == "probability":
        return lambda r: (-1.0 if r.probability is None else r.probability, r.name.lower())
    return lambda r: ({"unreadable": 2, "review needed": 1}.get(r.review, 0), r.name.lower())


class View(Protocol):
    """What the presenter asks of a window. Called on the UI thread only."""

    def show_model(self, info: ModelInfo | None) -> None: ...

    def show_methods(self, methods: Sequence[str], current: str) -> None: ...

    def show_image(self, path: str, image: Image.Image | None) -> None: ...

    def show_prediction(self, summary: PredictionSummary | None) -> None: ...

    def show_heatmap(self, overlay: Image.Image | None, caption: str) -> None: ...

    def show_results(
        self, rows: Sequence[ResultRow], sort_column: str | None, descending: bool
    ) -> None: ...

    def append_results(self, rows: Sequence[ResultRow]) -> None: ...

    def show_progress(self, done: int, total: int) -> None: ...

    def show_status(self, message: str) -> None: ...

    def show_error(self, title: str, message: str) -> None: ...

    def set_busy(self, busy: bool) -> None: ...
