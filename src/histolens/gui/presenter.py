"""What the desktop viewer does, without a toolkit: the window's actions, over a few parts.

The presenter never touches widgets. It tells a :class:`View` (the Tk window, or a fake in tests)
what to show. Its parts, each in its own module:

- :class:`~histolens.gui.jobs.BackgroundJobs` runs model work on an injectable executor and
  answers on the UI thread when the window calls :meth:`Presenter.poll`;
- :class:`~histolens.gui.inspector.ImageInspector` shows one image, its prediction and heatmap;
- :class:`~histolens.gui.batch.BatchRunner` fills the results list from a folder or many files;
- :func:`~histolens.gui.export.export_results` writes the results and their overlays.

The presenter loads checkpoints and routes each action to the part that does it. The names
other code imports from here (``Presenter``, ``find_images``, ...) stay importable from here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar, overload

from histolens.gui.batch import BATCH_CHUNK, BatchRunner, find_images, images_in
from histolens.gui.display import (
    DEFAULT_METHOD,
    DEFAULT_OPACITY,
    RESEARCH_NOTICE,
    SORT_COLUMNS,
    PredictionSummary,
    ResultRow,
    View,
    method_label,
)
from histolens.gui.export import ExportSummary, export_results
from histolens.gui.inspector import SINGLE_PASS_METHODS, ImageInspector
from histolens.gui.jobs import BackgroundJobs, ImmediateExecutor, report_error
from histolens.gui.model_info import ModelSummary, ViewerModel

if TYPE_CHECKING:
    from histolens.explain import Explainer
    from histolens.inference.predictor import Prediction, Predictor

__all__ = [
    "BATCH_CHUNK",
    "DEFAULT_METHOD",
    "DEFAULT_OPACITY",
    "RESEARCH_NOTICE",
    "SINGLE_PASS_METHODS",
    "SORT_COLUMNS",
    "ExportSummary",
    "ImmediateExecutor",
    "ModelSummary",
    "PredictionSummary",
    "Presenter",
    "ResultRow",
    "View",
    "export_results",
    "find_images",
    "method_label",
    "open_predictor",
]

log = logging.getLogger(__name__)
T = TypeVar("T")


def open_predictor(path: str, engine: str | None = None) -> Predictor:
    """The Predictor of ``path``, a torch checkpoint's backbone forward passes on the feature
    engine (``engine``, else $HISTOLENS_ENGINE, else auto), as ``predict`` runs it; the
    heatmaps take their gradients from PyTorch."""
    from histolens.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(path)
    predictor.use_engine(engine)
    return predictor


def _make_explainer(predictor: Predictor) -> Explainer:
    from PIL import Image

    from histolens.explain import Explainer

    explainer = Explainer(predictor)
    # One throw-away Grad-CAM while the checkpoint loads: the first explanation pays for the
    # CAM's construction and the first backward pass (about 3 s for VGG16 on 2 CPU cores), and
    # that belongs to "loading the model", not to the first image the pathologist opens.
    try:
        explainer.explain(Image.new("RGB", (64, 64), (226, 190, 214)), method=DEFAULT_METHOD)
    except Exception:  # a warm-up only; a real failure shows on the first image
        log.debug("explainer warm-up failed", exc_info=True)
    return explainer


def _available_methods() -> tuple[str, ...]:
    from histolens.explain import CAM_METHODS

    return tuple(CAM_METHODS)


class _Answered(Generic[T]):
    """A read-only attribute of the presenter that one of its parts answers: ``part``'s
    attribute ``name`` (default: the same name as the presenter's)."""

    def __init__(self, part: str, doc: str | None = None, name: str | None = None) -> None:
        self._part, self._name, self.__doc__ = part, name, doc

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = self._name or name

    @overload
    def __get__(self, obj: None, owner: type) -> _Answered[T]: ...

    @overload
    def __get__(self, obj: object, owner: type) -> T: ...

    def __get__(self, obj: object | None, owner: type) -> T | _Answered[T]:
        if obj is None:
            return self
        return getattr(getattr(obj, self._part), self._name)

    def __set__(self, obj: object, value: T) -> None:
        raise AttributeError(f"{self._name} is read-only")


class Presenter:
    """State and actions of the viewer window; see the module docstring for its parts.

    Args:
        view: the window (or a fake view).
        executor: where model work runs; one worker thread in the app.
        load_predictor: checkpoint path -> Predictor (injectable for tests).
        make_explainer: Predictor -> Explainer (injectable for tests).
        methods: the heatmap methods offered, or a callable returning them.
        batch_chunk: images per batch job.
    """

    def __init__(
        self,
        view: View,
        executor: Executor,
        *,
        load_predictor: Callable[[str], Predictor] = open_predictor,
        make_explainer: Callable[[Predictor], Explainer] = _make_explainer,
        methods: Sequence[str] | Callable[[], Sequence[str]] = _available_methods,
        batch_chunk: int = BATCH_CHUNK,
    ) -> None:
        self._view = view
        self._load_predictor = load_predictor
        self._make_explainer = make_explainer
        self._methods_source = methods
        self._jobs = BackgroundJobs(view, executor)
        self._model = ViewerModel()
        self._inspector = ImageInspector(view, self._jobs, self._model)
        self._batch = BatchRunner(view, self._jobs, batch_chunk)
        self._batch_after_load: tuple[Callable[[], list[str]], Path | None] | None = None
        self.last_export: ExportSummary | None = None

    # --- what the window reads ------------------------------------------------------------------
    busy = _Answered[bool]("_jobs", "True while a job is queued or running (a busy cursor).")
    predictor = _Answered["Predictor | None"]("_model")
    explainer = _Answered["Explainer | None"]("_model")
    model_info = _Answered[ModelSummary | None]("_model", name="info")
    methods = _Answered[tuple[str, ...]]("_inspector")
    method = _Answered[str]("_inspector")
    opacity = _Answered[float]("_inspector")
    heatmap_visible = _Answered[bool]("_inspector")
    results = _Answered[list[ResultRow]]("_batch")
    sort_column = _Answered[str | None]("_batch")
    sort_descending = _Answered[bool]("_batch")
    batch_total = _Answered[int]("_batch", name="total")
    batch_done = _Answered[int]("_batch", name="done")

    @property
    def current_path(self) -> str | None:
        cur = self._inspector.current
        return cur.path if cur else None

    @property
    def current_prediction(self) -> Prediction | None:
        cur = self._inspector.current
        return cur.prediction if cur else None

    @property
    def current_timings(self) -> dict[str, float]:
        """Seconds from opening the current image to its prediction / heatmap being shown."""
        cur = self._inspector.current
        return dict(cur.timings) if cur else {}

    def poll(self) -> int:
        """Apply finished jobs and progress reports; call often on the UI thread. Returns count."""
        return self._jobs.poll()

    # --- checkpoint -----------------------------------------------------------------------------
    def open_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint (file or run folder) in the background; keep the old one on error."""
        path = str(path)
        self._view.show_status(f"Loading checkpoint {path} …")
        self._model.loading += 1

        def job() -> tuple[Predictor, Explainer]:
            predictor = self._load_predictor(path)
            return predictor, self._make_explainer(predictor)

        def failed(exc: BaseException) -> None:
            self._model.loading -= 1
            if not self._model.loading:
                self._batch_after_load = None
            report_error(self._view, "Cannot load checkpoint", exc)

        self._jobs.submit(job, self._checkpoint_loaded, failed)

    def _checkpoint_loaded(self, loaded: tuple[Predictor, Explainer]) -> None:
        model = self._model
        model.loading -= 1
        old = model.explainer
        model.predictor, model.explainer = loaded
        if old is not None:
            # Queued behind any running explanation, so its hooks are never pulled mid-use.
            self._jobs.submit(old.close, lambda _: None, lambda exc: log.warning("close: %s", exc))
        predictor = model.predictor
        model.info = ModelSummary.from_predictor(predictor)
        source = self._methods_source
        self._inspector.use_methods(source() if callable(source) else source)
        self._view.show_model(model.info)
        self._view.show_methods(self.methods, self.method)
        self._view.show_status(
            f"Model {model.info.model_id} ({predictor.backbone_name}, {predictor.task}) loaded"
        )
        # Results on screen came from the previous model: compute them again with this one.
        if self._batch_after_load is not None:
            deferred, self._batch_after_load = self._batch_after_load, None
            self._run_batch(*deferred)
        else:
            self._batch.restart(predictor)
        self._inspector.reopen()

    # --- one image ------------------------------------------------------------------------------
    def open_image(self, path: str | os.PathLike) -> None:
        """Show an image, its prediction and its heatmap (computed in the background)."""
        self._inspector.open(str(path))

    def select_result(self, path: str) -> None:
        """Show a row of the results list (its prediction at once, the heatmap when ready)."""
        row = self._batch.row(path)
        self._inspector.open(path, row.prediction if row else None)

    def set_method(self, method: str) -> None:
        """Switch the CAM method; computed once per image and method, then cached."""
        self._inspector.set_method(method)

    def set_opacity(self, opacity: float) -> None:
        """Re-blend the current heatmap at a new opacity (0..1); never re-runs the model."""
        self._inspector.set_opacity(opacity)

    def set_heatmap_visible(self, visible: bool) -> None:
        self._inspector.set_heatmap_visible(visible)

    # --- batches --------------------------------------------------------------------------------
    def open_folder(self, folder: str | os.PathLike) -> None:
        """Classify every image under ``folder`` in the background, filling the results list."""
        root = Path(folder)
        self._run_batch(lambda: find_images(root), root)

    def open_paths(self, paths: Sequence[str | os.PathLike]) -> None:
        """Open what the command line or the file dialog names, as ``histolens predict`` does.

        One image is shown; one folder, or several paths (folders searched for images), run as a
        batch into the results list.
        """
        given = [Path(os.path.abspath(p)) for p in paths]
        if len(given) == 1:
            (self.open_folder if given[0].is_dir() else self.open_image)(given[0])
        elif given:
            folders = [p if p.is_dir() else p.parent for p in given]
            self._run_batch(lambda: images_in(given), Path(os.path.commonpath(folders)))

    def cancel_batch(self) -> None:
        """Stop the running batch after its current chunk; keep the results so far."""
        self._batch.cancel()

    def _run_batch(self, list_paths: Callable[[], list[str]], root: Path | None) -> None:
        if self._model.waiting:
            self._batch_after_load = (list_paths, root)  # runs when the checkpoint is loaded
            self._view.show_status("Waiting for the checkpoint to load …")
            return
        if self._model.predictor is None:
            self._view.show_error(
                "No model loaded", "Open a checkpoint first (File ▸ Open checkpoint, Ctrl+L)."
            )
            return
        self._batch.start(self._model.predictor, list_paths, root)

    def batch_summary(self, seconds: float | None = None) -> str:
        """One line: how many images, how many per class, how many need review or were unread."""
        return self._batch.summary(seconds)

    def sort_results(self, column: str) -> None:
        """Sort the results list by a column; the same column again reverses the order."""
        self._batch.sort(column)

    # --- export ---------------------------------------------------------------------------------
    def export(self, folder: str | os.PathLike) -> None:
        """Write the results (CSV) and their heatmap overlays (PNG) into ``folder``."""
        if not self.results:
            self._view.show_error(
                "Nothing to export",
                "Open a folder or several images first; their results are what gets exported.",
            )
            return
        # Results exist only once a model is loaded, so the model is there.
        rows, folder, model = list(self.results), Path(folder), self._model
        explainer, method, opacity = model.explainer, self.method, self.opacity
        classes, model_id = tuple(model.predictor.class_names), model.info.model_id
        self._view.show_status(f"Exporting {len(rows)} results to {folder} …")
        self._view.show_progress(0, len(rows))

        def progress(done: int, total: int) -> None:
            self._jobs.post(lambda: self._view.show_progress(done, total))

        def job() -> ExportSummary:
            return export_results(
                rows, folder, explainer, method, opacity, classes, model_id, progress
            )

        def failed(exc: BaseException) -> None:
            self._view.show_progress(0, 0)
            report_error(self._view, "Export failed", exc)

        self._jobs.submit(job, self._exported, failed)

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
        self._batch.stop()
        explainer, self._model.explainer = self._model.explainer, None
        if explainer is not None:
            self._jobs.submit(explainer.close, lambda _: None, lambda exc: None)
        self._jobs.close()
