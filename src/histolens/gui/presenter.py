"""What the desktop viewer does, without a toolkit: state, background jobs, what to show.

The presenter never touches widgets. It tells a :class:`View` (the Tk window, or a fake in tests)
what to show, and runs model work through an injectable :class:`concurrent.futures.Executor`
(one worker thread in the app: the Explainer is not safe for concurrent calls). Finished jobs
come back through a queue that the UI thread drains with :meth:`Presenter.poll` (the Tk window
calls it from ``after()``), so the view is only ever called on the UI thread.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from histolens.atomic import atomic_path, atomic_write_text
from histolens.errors import DataError, HistolensError, ImageLoadError, did_you_mean
from histolens.imageio import IMAGE_SUFFIXES, is_image_name, load_rgb

if TYPE_CHECKING:
    from PIL import Image

    from histolens.predictor import Prediction, Predictor

__all__ = [
    "BATCH_CHUNK",
    "DEFAULT_METHOD",
    "DEFAULT_OPACITY",
    "RESEARCH_NOTICE",
    "SINGLE_PASS_METHODS",
    "SORT_COLUMNS",
    "ExportSummary",
    "ImmediateExecutor",
    "ModelInfo",
    "PredictionSummary",
    "Presenter",
    "ResultRow",
    "View",
    "export_results",
    "find_images",
    "method_label",
]

log = logging.getLogger(__name__)

RESEARCH_NOTICE = "Research use only — not for diagnosis"
DEFAULT_METHOD = "gradcam"
DEFAULT_OPACITY = 0.45
# Images per batch job: small enough that a click on a result (queued behind the running job on
# the single worker) is answered within a second or two, large enough to batch the forward pass.
BATCH_CHUNK = 16
SORT_COLUMNS = ("file", "class", "probability", "review")
# Gradient CAMs decide the class from their own forward pass, so one explain() call gives both
# the prediction and the heatmap; other methods (Score-CAM: hundreds of forward passes) would
# keep the prediction waiting, so the image is classified first.
SINGLE_PASS_METHODS = frozenset({"gradcam", "gradcam++", "hirescam", "layercam"})

_METHOD_LABELS = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "gradcampp": "Grad-CAM++",
    "gradcamplusplus": "Grad-CAM++",
    "hirescam": "HiResCAM",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "eigencam": "Eigen-CAM",
    "eigengradcam": "EigenGrad-CAM",
    "scorecam": "Score-CAM",
    "ablationcam": "Ablation-CAM",
    "fullgrad": "FullGrad",
    "gradcamelementwise": "Grad-CAM (element-wise)",
}


def method_label(method: str) -> str:
    """The name a pathologist reads ('Grad-CAM') for a method key ('gradcam')."""
    return _METHOD_LABELS.get(method.lower().replace("_", "").replace("-", ""), method)


# --- what the view shows ------------------------------------------------------------------------
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
class ModelInfo:
    """What the window says about the loaded checkpoint."""

    source: str
    model_id: str
    backbone: str
    task: str
    class_names: tuple[str, ...]
    threshold: float | None
    temperature: float
    training_data: str
    performance: tuple[str, ...]
    performance_title: str
    saved_at: str

    @classmethod
    def from_predictor(cls, predictor: Predictor) -> ModelInfo:
        from histolens.performance import checkpoint_estimate, is_from_metrics, performance_lines

        meta = predictor.metadata or {}
        estimate = checkpoint_estimate(meta)
        return cls(
            source=str(getattr(predictor, "source", "")),
            model_id=str(meta.get("model_id") or Path(str(predictor.source)).stem),
            backbone=predictor.backbone_name,
            task=predictor.task,
            class_names=tuple(predictor.class_names),
            threshold=predictor.threshold if len(predictor.class_names) == 2 else None,
            temperature=float(predictor.temperature),
            training_data=_describe_data(meta.get("data"), meta.get("magnification")),
            performance=tuple(performance_lines(estimate)),
            performance_title=(
                "PERFORMANCE ON UNSEEN PATIENTS"
                if estimate and not is_from_metrics(estimate)
                else "MEASURED PERFORMANCE"
            ),
            saved_at=str(meta.get("saved_at", "")),
        )

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs, in display order."""
        rows = [
            ("Model", self.model_id),
            ("Backbone", self.backbone),
            ("Task", f"{self.task}: {', '.join(self.class_names)}"),
            ("Threshold", "—" if self.threshold is None else f"{self.threshold:.3f}"),
            ("Temperature", f"{self.temperature:.3g}"),
            ("Training data", self.training_data or "—"),
        ]
        if self.saved_at:
            rows.append(("Saved", self.saved_at))
        rows.append(("File", self.source))
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


_WARNING = "warning: "


def _describe_data(data: Any, magnification: Any = None) -> str:
    if not isinstance(data, dict):
        return str(data) if data else ""
    parts = [str(data.get("path", "?"))]
    if data.get("layout"):
        parts.append(f"({data['layout']})")
    if magnification not in (None, ""):
        parts.append(f"magnification {magnification}" + ("" if magnification == "all" else "X"))
    split = data.get("split")
    if isinstance(split, dict) and split:
        sizes = ", ".join(
            f"{name} {part.get('images', '?')}"
            for name, part in split.items()
            if isinstance(part, dict)
        )
        parts.append(f"split: {sizes}")
    if data.get("patient_level_split") is False:
        parts.append("(split not patient-level)")
    return " ".join(parts)


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


def _sort_key(column: str) -> Callable[[ResultRow], Any]:
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


class ImmediateExecutor(Executor):
    """Runs each job at once on the calling thread (tests, scripts, benchmarks)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the future like a real executor
            future.set_exception(exc)
        return future


# --- folders and export -------------------------------------------------------------------------
def find_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (recursive, sorted; hidden entries and masks/ skipped)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder.")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # masks/ holds lesion masks next to synthetic data, not tissue to classify.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "masks")
        found += [os.path.join(dirpath, n) for n in sorted(filenames) if is_image_name(n)]
    if not found:
        raise DataError(
            f"No images in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)."
        )
    return found


@dataclass
class ExportSummary:
    """What an export wrote."""

    csv_path: Path
    n_rows: int
    n_overlays: int
    failed: list[tuple[str, str]] = field(default_factory=list)


def _overlay_name(row: ResultRow, method: str, used: set[str]) -> str:
    stem = Path(row.name).with_suffix("").as_posix().replace("/", "__")
    name = f"{stem}_{method}.png"
    n = 2
    while name in used:
        name = f"{stem}-{n}_{method}.png"
        n += 1
    used.add(name)
    return name


def export_results(
    rows: Sequence[ResultRow],
    folder: str | os.PathLike,
    explainer: Any,
    method: str,
    opacity: float,
    class_names: Sequence[str] = (),
    model_id: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> ExportSummary:
    """Write ``predictions.csv`` and one heatmap overlay PNG per prediction into ``folder``.

    Every file is written atomically. Without an explainer only the CSV is written. Images that
    fail to load or explain are listed in the CSV's ``error`` column, not raised.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    overlay_dir = out / "overlays"
    used: set[str] = set()
    failed: list[tuple[str, str]] = []
    records: list[dict[str, Any]] = []
    n_overlays = 0
    for i, row in enumerate(rows):
        pred = row.prediction
        record: dict[str, Any] = {
            "file": row.name,
            "path": row.path,
            "prediction": row.label,
            "probability": "" if pred is None else f"{pred.probability:.6f}",
            "positive_probability": ""
            if pred is None or pred.positive_probability is None
            else f"{pred.positive_probability:.6f}",
            "threshold": "" if pred is None or pred.threshold is None else f"{pred.threshold:.6f}",
            "review_needed": "" if pred is None else str(bool(pred.uncertain)).lower(),
            "overlay": "",
            "error": row.error or "",
        }
        for c in class_names:
            record[f"p_{c}"] = "" if pred is None else f"{pred.scores.get(c, float('nan')):.6f}"
        if pred is not None and explainer is not None:
            try:
                explanation = explainer.explain(load_rgb(row.path), method=method)
                name = _overlay_name(row, method, used)
                with atomic_path(overlay_dir / name) as tmp:
                    explanation.overlay(opacity).save(tmp, format="PNG")
                record["overlay"] = f"overlays/{name}"
                n_overlays += 1
            except ImageLoadError as exc:
                record["error"] = exc.reason
                failed.append((row.path, exc.reason))
            except Exception as exc:  # one bad image must not lose the whole export
                log.exception("heatmap export failed for %s", row.path)
                record["error"] = f"heatmap failed: {exc}"
                failed.append((row.path, str(exc)))
        records.append(record)
        if progress:
            progress(i + 1, len(rows))
    fields = [
        "file",
        "path",
        "prediction",
        "probability",
        "positive_probability",
        "threshold",
        "review_needed",
        *[f"p_{c}" for c in class_names],
        "overlay",
        "error",
    ]
    buffer = io.StringIO()
    buffer.write(
        f"# histolens predictions; model {model_id or '?'}; heatmap {method}; {RESEARCH_NOTICE}\n"
    )
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    csv_path = atomic_write_text(out / "predictions.csv", buffer.getvalue())
    return ExportSummary(csv_path, len(records), n_overlays, failed)


# --- the presenter ------------------------------------------------------------------------------
def _load_predictor(path: str) -> Predictor:
    from histolens.predictor import Predictor

    return Predictor.from_checkpoint(path)


def _make_explainer(predictor: Predictor) -> Any:
    """The Explainer for ``predictor``, or None while histolens.explain is not installed."""
    try:
        from histolens.explain import Explainer
    except ImportError:
        return None
    explainer = Explainer(predictor)
    # One throw-away Grad-CAM while the checkpoint loads: the first explanation pays for the
    # CAM's construction and the first backward pass (about 3 s for VGG16 on 2 CPU cores), and
    # that belongs to "loading the model", not to the first image the pathologist opens.
    from PIL import Image

    try:
        explainer.explain(Image.new("RGB", (64, 64), (226, 190, 214)), method=DEFAULT_METHOD)
    except Exception:  # a warm-up only; a real failure shows on the first image
        log.debug("explainer warm-up failed", exc_info=True)
    return explainer


def _available_methods() -> tuple[str, ...]:
    try:
        from histolens.explain import CAM_METHODS
    except ImportError:
        return ()
    return tuple(CAM_METHODS)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, ImageLoadError):
        return f"{Path(exc.path).name}: {exc.reason}"
    if isinstance(exc, HistolensError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


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


class Presenter:
    """State and actions of the viewer window; see the module docstring for the threading."""

    def __init__(
        self,
        view: View,
        executor: Executor,
        *,
        load_predictor: Callable[[str], Predictor] = _load_predictor,
        make_explainer: Callable[[Predictor], Any] = _make_explainer,
        methods: Sequence[str] | Callable[[], Sequence[str]] = _available_methods,
        batch_chunk: int = BATCH_CHUNK,
    ) -> None:
        self._view = view
        self._executor = executor
        self._load_predictor = load_predictor
        self._make_explainer = make_explainer
        self._methods_source = methods
        self._batch_chunk = max(1, int(batch_chunk))
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._pending = 0
        self._explainer: Any = None
        self._current: _Current | None = None
        self._batch_token = 0
        self._batch_paths: list[str] = []
        self._batch_root: Path | None = None
        self._batch_started = 0.0
        self._closed = False
        self._checkpoint_loading = 0
        self._batch_after_load: tuple[Callable[[], list[str]], Path | None] | None = None
        self.predictor: Predictor | None = None
        self.model_info: ModelInfo | None = None
        self.methods: tuple[str, ...] = ()
        self.method = DEFAULT_METHOD
        self.opacity = DEFAULT_OPACITY
        self.heatmap_visible = True
        self.results: list[ResultRow] = []
        self.sort_column: str | None = None
        self.sort_descending = False
        self.batch_total = 0
        self.batch_done = 0
        self.last_export: ExportSummary | None = None

    # --- job plumbing ---------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True while a job is queued or running (the window shows a busy cursor)."""
        return self._pending > 0

    @property
    def current_path(self) -> str | None:
        return self._current.path if self._current else None

    @property
    def current_prediction(self) -> Prediction | None:
        return self._current.prediction if self._current else None

    @property
    def current_timings(self) -> dict[str, float]:
        """Seconds from opening the current image to its prediction / heatmap being shown."""
        return dict(self._current.timings) if self._current else {}

    @property
    def heatmaps_available(self) -> bool:
        return self._explainer is not None

    def _submit(
        self,
        job: Callable[[], Any],
        on_done: Callable[[Any], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        def run() -> None:
            try:
                result = job()
            except Exception as exc:
                self._inbox.put(lambda error=exc: self._finish(on_error, error))
            else:
                self._inbox.put(lambda: self._finish(on_done, result))

        self._pending += 1
        if self._pending == 1:
            self._view.set_busy(True)
        try:
            self._executor.submit(run)
        except RuntimeError as exc:  # executor shut down: the window is closing
            self._pending -= 1
            log.debug("job not submitted: %s", exc)

    def _finish(self, callback: Callable[[Any], None], value: Any) -> None:
        self._pending -= 1
        try:
            if not self._closed:
                callback(value)
        finally:
            if self._pending == 0:
                self._view.set_busy(False)

    def _post(self, message: Callable[[], None]) -> None:
        """From the worker: run ``message`` on the UI thread at the next poll."""
        self._inbox.put(message)

    def poll(self) -> int:
        """Apply finished jobs and progress reports; call often on the UI thread. Returns count."""
        handled = 0
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return handled
            handled += 1
            try:
                message()
            except Exception as exc:  # a bug in a callback must not kill the poll loop
                log.exception("viewer callback failed")
                self._error("Unexpected error", exc)

    def _error(self, title: str, exc: BaseException) -> None:
        if not isinstance(exc, HistolensError):
            log.error("%s", title, exc_info=exc)
        text = _error_text(exc)
        self._view.show_status(f"{title}: {text}")
        self._view.show_error(title, text)

    # --- checkpoint -----------------------------------------------------------------------------
    def open_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint (file or run folder) in the background; keep the old one on error."""
        path = str(path)
        self._view.show_status(f"Loading checkpoint {path} …")
        self._checkpoint_loading += 1

        def job() -> tuple[Predictor, Any]:
            predictor = self._load_predictor(path)
            return predictor, self._make_explainer(predictor)

        def failed(exc: BaseException) -> None:
            self._checkpoint_loading -= 1
            if not self._checkpoint_loading:
                self._batch_after_load = None
            self._error("Cannot load checkpoint", exc)

        self._submit(job, self._checkpoint_loaded, failed)

    def _checkpoint_loaded(self, loaded: tuple[Predictor, Any]) -> None:
        self._checkpoint_loading -= 1
        predictor, explainer = loaded
        old = self._explainer
        self.predictor, self._explainer = predictor, explainer
        if old is not None:
            # Queued behind any running explanation, so its hooks are never pulled mid-use.
            self._submit(old.close, lambda _: None, lambda exc: log.warning("close: %s", exc))
        self.model_info = ModelInfo.from_predictor(predictor)
        source = self._methods_source
        self.methods = tuple(source() if callable(source) else source) if explainer else ()
        if self.methods and self.method not in self.methods:
            self.method = DEFAULT_METHOD if DEFAULT_METHOD in self.methods else self.methods[0]
        self._view.show_model(self.model_info)
        self._view.show_methods(self.methods, self.method)
        note = "" if explainer else " (heatmaps unavailable: histolens.explain is not installed)"
        self._view.show_status(
            f"Model {self.model_info.model_id} ({predictor.backbone_name}, "
            f"{predictor.task}) loaded{note}"
        )
        # Results on screen came from the previous model: compute them again with this one.
        if self._batch_after_load is not None:
            deferred, self._batch_after_load = self._batch_after_load, None
            self._run_batch(*deferred)
        elif self._batch_paths:
            self._run_batch(lambda paths=list(self._batch_paths): paths, self._batch_root)
        if self._current is not None:
            self.open_image(self._current.path)

    # --- one image ------------------------------------------------------------------------------
    def open_image(self, path: str | os.PathLike) -> None:
        """Show an image, its prediction and its heatmap (computed in the background)."""
        self._open(str(path), None)

    def select_result(self, path: str) -> None:
        """Show a row of the results list (its prediction at once, the heatmap when ready)."""
        row = next((r for r in self.results if r.path == path), None)
        self._open(path, row.prediction if row else None)

    def _open(self, path: str, prediction: Prediction | None) -> None:
        cur = self._current = _Current(path, time.perf_counter(), prediction=prediction)
        self._view.show_prediction(self._summary(prediction) if prediction else None)
        self._view.show_heatmap(None, "")
        self._view.show_status(f"Opening {Path(path).name} …")
        self._submit(
            lambda: load_rgb(path),
            lambda image: self._image_loaded(cur, image),
            lambda exc: self._image_failed(cur, exc),
        )

    def _summary(self, prediction: Prediction) -> PredictionSummary:
        positive = self.predictor.positive_class if self.predictor else None
        return PredictionSummary.from_prediction(prediction, positive)

    def _image_failed(self, cur: _Current, exc: BaseException) -> None:
        if cur is not self._current:
            return
        self._view.show_image(cur.path, None)
        self._view.show_prediction(None)
        self._error("Cannot open image", exc)

    def _image_loaded(self, cur: _Current, image: Image.Image) -> None:
        if cur is not self._current:
            return
        cur.image = image
        self._view.show_image(cur.path, image)
        if self.predictor is None and self._checkpoint_loading:
            self._view.show_heatmap(None, "Waiting for the checkpoint to load …")
            return  # _checkpoint_loaded opens the current image again
        if self.predictor is None:
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
            self._image_loaded_predict(cur)

    def _single_pass(self) -> bool:
        return (
            self._explainer is not None
            and self.heatmap_visible
            and self.method in SINGLE_PASS_METHODS
        )

    def _prediction_ready(self, cur: _Current, prediction: Prediction | None) -> None:
        if cur is not self._current or prediction is None:
            return
        prediction.path = cur.path
        cur.prediction = prediction
        cur.timings.setdefault("prediction_s", time.perf_counter() - cur.opened_at)
        summary = self._summary(prediction)
        self._view.show_prediction(summary)
        review = "  ·  REVIEW NEEDED" if summary.uncertain else ""
        self._view.show_status(
            f"{Path(cur.path).name}: {summary.label} ({summary.probability_text}){review}"
        )
        self._request_heatmap()

    def _request_heatmap(self) -> None:
        cur = self._current
        if cur is None or cur.image is None:
            return
        if cur.prediction is None and not self._single_pass():
            # Heatmap hidden or switched to a slow method before the prediction came: predict.
            if "prediction" not in cur.pending and self.predictor is not None:
                cur.pending.add("prediction")
                self._image_loaded_predict(cur)
            return
        if self._explainer is None:
            self._view.show_heatmap(None, "Heatmaps unavailable (histolens.explain not installed)")
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
        explainer, image = self._explainer, cur.image

        def failed(exc: BaseException) -> None:
            cur.pending.discard(method)
            if cur is self._current:
                self._view.show_heatmap(None, f"{method_label(method)} failed")
                self._error("Heatmap failed", exc)

        def job() -> Any:
            # Skip work for an image the user has already left (arrow keys in the results list).
            return None if cur is not self._current else explainer.explain(image, method=method)

        self._submit(job, lambda e: self._explained(cur, method, e), failed)

    def _explained(self, cur: _Current, method: str, explanation: Any) -> None:
        cur.pending.discard(method)
        if explanation is None:
            return
        cur.explanations[method] = explanation
        if cur is not self._current:
            return
        if cur.prediction is None:
            self._prediction_ready(cur, explanation.prediction)  # shows the overlay too
        elif method == self.method and self.heatmap_visible:
            self._show_overlay()

    def _image_loaded_predict(self, cur: _Current) -> None:
        predictor, image = self.predictor, cur.image

        def done(pred: Prediction | None) -> None:
            cur.pending.discard("prediction")
            self._prediction_ready(cur, pred)

        self._submit(
            lambda: None if cur is not self._current else predictor.predict_image(image),
            done,
            lambda exc: self._error("Prediction failed", exc),
        )

    def _show_overlay(self) -> None:
        cur = self._current
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
        cur = self._current
        if cur and self.heatmap_visible and self.method in cur.explanations:
            self._show_overlay()

    def set_heatmap_visible(self, visible: bool) -> None:
        self.heatmap_visible = bool(visible)
        self._request_heatmap()

    # --- batches --------------------------------------------------------------------------------
    def open_folder(self, folder: str | os.PathLike) -> None:
        """Classify every image under ``folder`` in the background, filling the results list."""
        root = Path(folder)
        self._run_batch(lambda: find_images(root), root)

    def open_images(self, paths: Sequence[str | os.PathLike]) -> None:
        """One path opens that image; several run as a batch into the results list."""
        paths = [str(p) for p in paths]
        if len(paths) == 1:
            self.open_image(paths[0])
        elif paths:
            root = Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]))
            self._run_batch(lambda: paths, root)

    def cancel_batch(self) -> None:
        """Stop the running batch after its current chunk; keep the results so far."""
        if self.batch_total and self.batch_done < self.batch_total:
            self._batch_token += 1
            self._view.show_progress(0, 0)
            self._view.show_status(f"Stopped after {self.batch_done} of {self.batch_total} images.")

    def _run_batch(self, list_paths: Callable[[], list[str]], root: Path | None) -> None:
        if self.predictor is None and self._checkpoint_loading:
            self._batch_after_load = (list_paths, root)  # runs when the checkpoint is loaded
            self._view.show_status("Waiting for the checkpoint to load …")
            return
        if self.predictor is None:
            self._view.show_error(
                "No model loaded", "Open a checkpoint first (File ▸ Open checkpoint, Ctrl+L)."
            )
            return
        self._batch_token += 1
        token = self._batch_token
        self._batch_root = root
        self.results = []
        self.batch_total = self.batch_done = 0
        self._batch_started = time.perf_counter()
        self._view.show_results([], self.sort_column, self.sort_descending)
        self._view.show_status(f"Looking for images in {root} …")
        self._submit(
            list_paths,
            lambda paths: self._batch_listed(token, paths),
            lambda exc: self._batch_failed(token, exc),
        )

    def _batch_listed(self, token: int, paths: list[str]) -> None:
        if token != self._batch_token:
            return
        self._batch_paths = list(paths)
        self.batch_total, self.batch_done = len(paths), 0
        self._view.show_progress(0, self.batch_total)
        self._view.show_status(f"Analysing {self.batch_total} images …")
        self._submit_chunk(token, 0)

    def _submit_chunk(self, token: int, start: int) -> None:
        chunk = self._batch_paths[start : start + self._batch_chunk]
        predictor = self.predictor
        self._submit(
            lambda: predictor.predict_paths(chunk, batch_size=len(chunk)),
            lambda result: self._chunk_done(token, start, chunk, result),
            lambda exc: self._batch_failed(token, exc),
        )

    def _row_name(self, path: str) -> str:
        if self._batch_root is not None:
            try:
                return Path(path).relative_to(self._batch_root).as_posix()
            except ValueError:
                pass
        return Path(path).name

    def _chunk_done(self, token: int, start: int, chunk: list[str], result: tuple) -> None:
        if token != self._batch_token:
            return
        predictions, skipped = result
        by_path: dict[str, ResultRow] = {}
        for pred in predictions:
            by_path[str(pred.path)] = ResultRow(
                str(pred.path), self._row_name(str(pred.path)), prediction=pred
            )
        for skip in skipped:
            by_path[str(skip.path)] = ResultRow(
                str(skip.path), self._row_name(str(skip.path)), error=skip.reason
            )
        rows = [by_path[p] for p in chunk if p in by_path]
        self.results += rows
        self._view.append_results(rows)
        self.batch_done = min(self.batch_total, start + len(chunk))
        self._view.show_progress(self.batch_done, self.batch_total)
        if self.batch_done < self.batch_total:
            self._submit_chunk(token, start + len(chunk))
            return
        self._batch_token += 1  # finished: nothing stale can arrive
        if self.sort_column:
            self.results.sort(key=_sort_key(self.sort_column), reverse=self.sort_descending)
            self._view.show_results(self.results, self.sort_column, self.sort_descending)
        self._view.show_progress(0, 0)
        self._view.show_status(self.batch_summary(time.perf_counter() - self._batch_started))

    def batch_summary(self, seconds: float | None = None) -> str:
        """One line: how many images, how many per class, how many need review or were unread."""
        counts: dict[str, int] = {}
        for r in self.results:
            if r.prediction:
                counts[r.label] = counts.get(r.label, 0) + 1
        parts = [f"{n} {label}" for label, n in sorted(counts.items())]
        review = sum(r.uncertain for r in self.results)
        unreadable = sum(r.error is not None for r in self.results)
        text = f"Analysed {len(self.results)} images: " + (", ".join(parts) or "none classified")
        text += f"; {review} review needed"
        if unreadable:
            text += f"; {unreadable} unreadable"
        if seconds is not None:
            text += f" ({seconds:.1f} s)"
        return text

    def _batch_failed(self, token: int, exc: BaseException) -> None:
        if token != self._batch_token:
            return
        self._batch_token += 1
        self._view.show_progress(0, 0)
        self._error("Batch stopped", exc)

    def sort_results(self, column: str) -> None:
        """Sort the results list by a column; the same column again reverses the order."""
        if column not in SORT_COLUMNS:
            raise ValueError(f"Unknown column '{column}'; choose one of {', '.join(SORT_COLUMNS)}.")
        if column == self.sort_column:
            self.sort_descending = not self.sort_descending
        else:
            # Most useful first: highest probability, review-needed rows on top.
            self.sort_column, self.sort_descending = column, column in ("probability", "review")
        self.results.sort(key=_sort_key(column), reverse=self.sort_descending)
        self._view.show_results(self.results, self.sort_column, self.sort_descending)

    # --- export ---------------------------------------------------------------------------------
    def export(self, folder: str | os.PathLike) -> None:
        """Write the results (CSV) and their heatmap overlays (PNG) into ``folder``."""
        if not self.results:
            self._view.show_error(
                "Nothing to export",
                "Open a folder or several images first; their results are what gets exported.",
            )
            return
        rows, folder = list(self.results), Path(folder)
        explainer, method, opacity = self._explainer, self.method, self.opacity
        classes = tuple(self.predictor.class_names) if self.predictor else ()
        model_id = self.model_info.model_id if self.model_info else ""
        self._view.show_status(f"Exporting {len(rows)} results to {folder} …")
        self._view.show_progress(0, len(rows))

        def progress(done: int, total: int) -> None:
            self._post(lambda: self._view.show_progress(done, total))

        def job() -> ExportSummary:
            return export_results(
                rows, folder, explainer, method, opacity, classes, model_id, progress
            )

        def failed(exc: BaseException) -> None:
            self._view.show_progress(0, 0)
            self._error("Export failed", exc)

        self._submit(job, self._exported, failed)

    def _exported(self, summary: ExportSummary) -> None:
        self.last_export = summary
        self._view.show_progress(0, 0)
        text = (
            f"Exported {summary.n_rows} results and {summary.n_overlays} overlays to "
            f"{summary.csv_path.parent}"
        )
        if summary.failed:
            text += f"; {len(summary.failed)} overlays failed (see the CSV's error column)"
        self._view.show_status(text)

    # --- shutdown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop batches and release the explainer's hooks (queued behind any running job)."""
        self._batch_token += 1
        explainer, self._explainer = self._explainer, None
        if explainer is not None:
            self._submit(explainer.close, lambda _: None, lambda exc: None)
        self._closed = True
