"""What the viewer shows, as plain values: a prediction, a row of results, the View protocol.

Nothing here runs a model or touches a widget; the presenter builds these values and the Tk
window (or a fake view in tests) draws them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from histolens.inference.shown import ShownPrediction

if TYPE_CHECKING:
    from PIL import Image

    from histolens.gui.model_info import ModelSummary
    from histolens.inference.predictor import Prediction

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_OPACITY",
    "RESEARCH_NOTICE",
    "SORT_COLUMNS",
    "PredictionSummary",
    "ResultRow",
    "View",
    "method_label",
    "set_text",
    "sort_key",
]

RESEARCH_NOTICE = "Research use only — not for diagnosis"
DEFAULT_METHOD = "gradcam"
DEFAULT_OPACITY = 0.45
SORT_COLUMNS = ("file", "class", "probability", "review")


def method_label(method: str) -> str:
    """The name a pathologist reads ('Grad-CAM') for a method key ('gradcam')."""
    from histolens.explain import EXPLANATION_METHODS

    entry = EXPLANATION_METHODS.get(method)
    return entry.display_name if entry is not None else method


@dataclass
class PredictionSummary(ShownPrediction):
    """One image's prediction, ready to display: the shown prediction (histolens.inference.shown)
    and the name of the positive class, in the viewer's words."""

    positive_class: str | None = None

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
    def set_text(self) -> str:
        """'prediction set {malignant} at α=0.10', or '' for a model without a calibration."""
        if not self.prediction_set or self.alpha is None:
            return ""
        return f"prediction set {set_text(self.prediction_set, self.alpha)}"

    @property
    def flag(self) -> str:
        """The badge's first words, for the status line: '' when nothing is flagged."""
        return _review_words(self.review).upper()

    @property
    def review_text(self) -> str:
        """The badge: what is flagged, then why (the reason the prediction carries)."""
        if self.ood:
            return f"{_ood_message().upper()}\n{_sentence(self.ood_reason)}"
        if self.refer and self.alpha is not None and len(self.prediction_set) > 1:
            reason = f"\n{_sentence(self.refer_reason)}" if self.refer_reason else ""
            return f"REFER: {set_text(self.prediction_set, self.alpha)}{reason}"
        if not self.uncertain:
            return ""
        if self.threshold is not None:
            return "Review needed: probability close to the decision threshold"
        return "Review needed: the two most probable classes are close"


def set_text(prediction_set: Sequence[str], alpha: float) -> str:
    """'{benign, malignant} at α=0.10': a prediction set and its error level."""
    level = f"{alpha:.2f}" if round(alpha, 2) == alpha else f"{alpha:g}"
    return "{" + ", ".join(prediction_set) + f"}} at α={level}"


def _sentence(text: str | None) -> str:
    return (text[:1].upper() + text[1:]) if text else ""


def _ood_message() -> str:
    from histolens.inference.ood import (
        OOD_MESSAGE,  # imported when a prediction exists (torch is loaded)
    )

    return OOD_MESSAGE


def _review_words(review: str) -> str:
    """The Flag column's words for a review state (histolens.inference.shown)."""
    if review == "ood":
        return _ood_message()
    return {"refer": "refer", "review": "review needed"}.get(review, "")


@dataclass(frozen=True)
class ResultRow:
    """One line of the results list: a prediction, or a file that could not be read."""

    path: str
    name: str
    prediction: Prediction | None = None
    error: str | None = None

    @functools.cached_property  # a frozen row: built once, read on every sort and redraw
    def shown(self) -> ShownPrediction | None:
        """The prediction as the front ends show it (None for an unreadable file)."""
        return ShownPrediction.from_prediction(self.prediction) if self.prediction else None

    @property
    def label(self) -> str:
        return self.prediction.label if self.prediction else ""

    @property
    def probability(self) -> float | None:
        """The calibrated probability of the positive class (binary) or of the predicted class."""
        return self.shown.shown_probability if self.prediction else None

    @property
    def ood(self) -> bool:
        return bool(self.prediction and self.prediction.ood)

    @property
    def review(self) -> str:
        """The Flag column: unreadable, not like the training images, refer or review needed."""
        if self.error:
            return "unreadable"
        return _review_words(self.shown.review) if self.prediction else ""

    @property
    def flag_rank(self) -> int:
        """How much the row needs a person: unreadable 3, unlike the training images 2, refer
        or review needed 1, else 0."""
        if self.error or not self.prediction:
            return 3 if self.error else 0
        return 2 if self.ood else int(self.shown.flagged)


def sort_key(column: str) -> Callable[[ResultRow], Any]:
    """The key that sorts result rows by one of :data:`SORT_COLUMNS`, ties by file name."""
    if column == "file":
        return lambda r: r.name.lower()
    if column == "class":
        return lambda r: (r.error is not None, r.label, r.name.lower())
    if column == "probability":
        return lambda r: (-1.0 if r.probability is None else r.probability, r.name.lower())
    return lambda r: (r.flag_rank, r.name.lower())


class View(Protocol):
    """What the presenter asks of a window. Called on the UI thread only."""

    def show_model(self, info: ModelSummary | None) -> None: ...

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
