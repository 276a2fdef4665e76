"""The image on screen: its prediction and heatmaps, computed in the background.

Each heatmap is computed once per image and method, then cached: changing the opacity re-blends
the cached heatmap and never runs the model. A result that arrives for an image the user has
already left is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histolens.data.imageio import load_rgb
from histolens.data.records import magnification_from_path
from histolens.errors import did_you_mean
from histolens.explain import EXPLANATION_METHODS
from histolens.gui.display import (
    DEFAULT_METHOD,
    DEFAULT_OPACITY,
    PredictionSummary,
    View,
    method_label,
)
from histolens.gui.jobs import BackgroundJobs, report_error

if TYPE_CHECKING:
    from collections.abc import Sequence

    from PIL import Image

    from histolens.explain import Explanation
    from histolens.gui.model_info import ViewerModel
    from histolens.inference.predictor import Prediction

__all__ = ["SINGLE_PASS_METHODS", "ImageInspector"]

# Gradient CAMs decide the class from their own forward pass, so one explain() call gives both
# the prediction and the heatmap; other methods (Score-CAM: hundreds of forward passes) would
# keep the prediction waiting, so the image is classified first.
# One forward pass gives both the prediction and the map (read from the method registry).
SINGLE_PASS_METHODS = frozenset(m.name for m in EXPLANATION_METHODS.values() if m.single_pass)


@dataclass
class _Current:
    """The image on screen, and what has been computed for it."""

    path: str
    opened_at: float
    image: Image.Image | None = None
    prediction: Prediction | None = None
    explanations: dict[str, Any] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    timings: dict[str, float] = field(default_factory=dict)


class ImageInspector:
    """Shows one image, its prediction and its heatmap; owns the heatmap settings.

    Args:
        view: the window.
        jobs: where model work runs.
        model: the loaded model, shared with the presenter (which replaces its contents).
    """

    def __init__(self, view: View, jobs: BackgroundJobs, model: ViewerModel) -> None:
        self._view = view
        self._jobs = jobs
        self._model = model
        self.current: _Current | None = None
        self.methods: tuple[str, ...] = ()
        self.method = DEFAULT_METHOD
        self.opacity = DEFAULT_OPACITY
        self.heatmap_visible = True

    def use_methods(self, methods: Sequence[str]) -> None:
        """The methods the loaded explainer offers; keeps the chosen one if it is among them."""
        self.methods = tuple(methods)
        if self.methods and self.method not in self.methods:
            self.method = DEFAULT_METHOD if DEFAULT_METHOD in self.methods else self.methods[0]

    # --- opening --------------------------------------------------------------------------------
    def open(self, path: str, prediction: Prediction | None = None) -> None:
        """Show ``path``; a known ``prediction`` (from a batch) is shown before the image loads."""
        cur = self.current = _Current(path, time.perf_counter(), prediction=prediction)
        self._view.show_prediction(self._summary(prediction) if prediction else None)
        self._view.show_heatmap(None, "")
        self._view.show_status(f"Opening {Path(path).name} …")
        self._jobs.submit(
            lambda: load_rgb(path),
            lambda image: self._image_loaded(cur, image),
            lambda exc: self._image_failed(cur, exc),
        )

    def reopen(self) -> None:
        """Open the current image again, from scratch (a new model was loaded)."""
        if self.current is not None:
            self.open(self.current.path)

    def _summary(self, prediction: Prediction) -> PredictionSummary:
        predictor = self._model.predictor
        positive = predictor.positive_class if predictor else None
        return PredictionSummary.from_prediction(prediction, positive_class=positive)

    def _image_failed(self, cur: _Current, exc: BaseException) -> None:
        if cur is not self.current:
            return
        self._view.show_image(cur.path, None)
        self._view.show_prediction(None)
        report_error(self._view, "Cannot open image", exc)

    def _image_loaded(self, cur: _Current, image: Image.Image) -> None:
        if cur is not self.current:
            return
        cur.image = image
        self._view.show_image(cur.path, image)
        if self._model.waiting:
            self._view.show_heatmap(None, "Waiting for the checkpoint to load …")
            return  # the presenter reopens the image when the checkpoint is loaded
        if self._model.predictor is None:
            self._view.show_heatmap(None, "No model loaded")
            self._view.show_status(
                "No model loaded: open a checkpoint (File ▸ Open checkpoint, "
                "Ctrl+L) to classify this image."
            )
            return
        if cur.prediction is not None:
            self._prediction_ready(cur, cur.prediction)
        elif self._single_pass():
            self._request_heatmap()  # the explanation brings the prediction with it
        else:
            cur.pending.add("prediction")
            self._predict(cur)

    def _single_pass(self) -> bool:
        return self.heatmap_visible and self.method in SINGLE_PASS_METHODS

    # --- prediction -----------------------------------------------------------------------------
    def _predict(self, cur: _Current) -> None:
        predictor, image = self._model.predictor, cur.image
        mag = magnification_from_path(cur.path)  # its prediction set's calibration

        def done(pred: Prediction | None) -> None:
            cur.pending.discard("prediction")
            self._prediction_ready(cur, pred)

        self._jobs.submit(
            # Skip work for an image the user has already left (arrow keys in the results list).
            lambda: (
                None
                if cur is not self.current
                else predictor.predict_images([image], magnifications=[mag])[0]
            ),
            done,
            lambda exc: report_error(self._view, "Prediction failed", exc),
        )

    def _prediction_ready(self, cur: _Current, prediction: Prediction | None) -> None:
        if cur is not self.current or prediction is None:
            return
        prediction.path = cur.path
        cur.prediction = prediction
        cur.timings.setdefault("prediction_s", time.perf_counter() - cur.opened_at)
        summary = self._summary(prediction)
        self._view.show_prediction(summary)
        review = f"  ·  {summary.flag}" if summary.flag else ""
        self._view.show_status(
            f"{Path(cur.path).name}: {summary.label} ({summary.probability_text}){review}"
        )
        self._request_heatmap()

    # --- heatmap --------------------------------------------------------------------------------
    def _request_heatmap(self) -> None:
        cur = self.current
        if cur is None or cur.image is None or self._model.predictor is None:
            return
        if cur.prediction is None and not self._single_pass():
            # Heatmap hidden or switched to a slow method before the prediction came: predict.
            if "prediction" not in cur.pending:
                cur.pending.add("prediction")
                self._predict(cur)
            return
        if not self.heatmap_visible:
            self._view.show_heatmap(None, "Heatmap hidden (Ctrl+H shows it)")
            return
        method = self.method
        if method in cur.explanations:
            self._show_overlay()
            return
        self._view.show_heatmap(None, f"Computing {method_label(method)} …")
        if method in cur.pending:
            return
        cur.pending.add(method)
        explainer, image = self._model.explainer, cur.image

        def failed(exc: BaseException) -> None:
            cur.pending.discard(method)
            if cur is self.current:
                self._view.show_heatmap(None, f"{method_label(method)} failed")
                report_error(self._view, "Heatmap failed", exc)

        def job() -> Explanation | None:
            if cur is not self.current:
                return None
            return explainer.explain(image, method, magnification=magnification_from_path(cur.path))

        self._jobs.submit(job, lambda e: self._explained(cur, method, e), failed)

    def _explained(self, cur: _Current, method: str, explanation: Explanation | None) -> None:
        cur.pending.discard(method)
        if explanation is None:
            return
        cur.explanations[method] = explanation
        if cur is not self.current:
            return
        if cur.prediction is None:
            self._prediction_ready(cur, explanation.prediction)  # shows the overlay too
        elif method == self.method and self.heatmap_visible:
            self._show_overlay()

    def _show_overlay(self) -> None:
        cur = self.current
        explanation = cur.explanations[self.method] if cur else None
        if explanation is None:
            return
        cur.timings.setdefault("heatmap_s", time.perf_counter() - cur.opened_at)
        self._view.show_heatmap(
            explanation.overlay(self.opacity),
            f"{method_label(self.method)} · opacity {self.opacity:.0%}",
        )

    def set_method(self, method: str) -> None:
        """Switch the CAM method; computed once per image and method, then cached."""
        if self.methods and method not in self.methods:
            self._view.show_error(
                "Unknown heatmap method",
                f"'{method}' is not one of {', '.join(self.methods)}."
                + did_you_mean(method, self.methods),
            )
            return
        self.method = method
        self._request_heatmap()

    def set_opacity(self, opacity: float) -> None:
        """Re-blend the current heatmap at a new opacity (0..1); never re-runs the model."""
        self.opacity = min(1.0, max(0.0, float(opacity)))
        cur = self.current
        if cur and self.heatmap_visible and self.method in cur.explanations:
            self._show_overlay()

    def set_heatmap_visible(self, visible: bool) -> None:
        self.heatmap_visible = bool(visible)
        self._request_heatmap()
