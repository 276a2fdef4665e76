"""What a slide window does, without a toolkit: open, analyse, cancel, pick a region and a tile.

The presenter tells a :class:`SlideView` (the Tk slide window, or a fake in tests) what to
show and never touches widgets. Model work (loading the checkpoint, the analysis, Grad-CAM)
runs on an executor of **one** worker thread, so the model is never used by two jobs at once;
results come back through :class:`~histolens.gui.jobs.BackgroundJobs` when the window calls
:meth:`SlidePresenter.poll`. The analysis reports progress after each tile batch and checks
for Cancel there, so it stops cleanly between two batches.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from histolens.gui.display import DEFAULT_METHOD, DEFAULT_OPACITY, method_label
from histolens.gui.jobs import BackgroundJobs, report_error
from histolens.gui.slide_analysis import (
    AnalysisOutcome,
    OpenedSlide,
    SlideResults,
    desktop_cache_dir,
    open_for_display,
    run_analysis,
)
from histolens.gui.slide_display import LAYERS, AnalysisState, SlideView, TileRow
from histolens.slides.predict import SlideOptions

__all__ = ["LAYERS", "AnalysisState", "SlidePresenter", "SlideView", "TileRow"]

log = logging.getLogger(__name__)

REGION_TILES = 3  # a click selects the tiles of a square this many tiles wide around it
MAX_LISTED = 500  # tiles listed for one region, the highest first


def _load_predictor(path: str) -> Any:
    from histolens.inference.predictor import Predictor

    return Predictor.from_checkpoint(path)


def _make_explainer(predictor: Any) -> Any:
    from histolens.explain import Explainer

    return Explainer(predictor)


class _Model:
    """The slide window's own copy of the model; touched on the worker thread only."""

    def __init__(self, load: Callable[[str], Any], explain: Callable[[Any], Any]) -> None:
        self._load, self._explain = load, explain
        self.source: str | None = None
        self.predictor: Any = None
        self.fingerprint = ""
        self._explainer: Any = None

    def ensure(self, source: str) -> None:
        if source == self.source:
            return
        from histolens.inference.resume import model_fingerprint

        self.close()
        self.predictor = self._load(source)
        self.fingerprint, self.source = model_fingerprint(self.predictor), source

    @property
    def explainer(self) -> Any:
        if self._explainer is None:
            self._explainer = self._explain(self.predictor)
        return self._explainer

    def close(self) -> None:
        explainer, self._explainer = self._explainer, None
        if explainer is not None:
            explainer.close()


class SlidePresenter:
    """State and actions of one slide window.

    Args:
        view: the slide window (or a fake view).
        executor: one worker thread (model work must not run twice at once).
        checkpoint: returns the checkpoint to analyse with (the viewer's), or None.
        load_predictor: checkpoint path -> Predictor (injectable for tests).
        make_explainer: Predictor -> Explainer (injectable for tests).
        options: how slides are tiled and scored (``slide predict``'s options).
        cache: where analyses are kept (default :func:`desktop_cache_dir`).
    """

    def __init__(
        self,
        view: SlideView,
        executor: Executor,
        *,
        checkpoint: Callable[[], str | None],
        load_predictor: Callable[[str], Any] = _load_predictor,
        make_explainer: Callable[[Any], Any] = _make_explainer,
        options: SlideOptions | None = None,
        cache: str | os.PathLike | None = None,
    ) -> None:
        self._view = view
        self._jobs = BackgroundJobs(view, executor)
        self._checkpoint = checkpoint
        self._model = _Model(load_predictor, make_explainer)
        self.options = options or SlideOptions()
        self.cache = Path(cache) if cache is not None else desktop_cache_dir()
        self.slide: OpenedSlide | None = None
        self.results: SlideResults | None = None
        self.analysis = AnalysisState()
        self.visible = dict.fromkeys(LAYERS, True)
        self.region: tuple[int, int, int, int] | None = None
        self.rows: list[TileRow] = []
        self.selected: TileRow | None = None
        self.last_folder: Path | None = None
        self._generation = 0  # bumped per slide: answers about an earlier slide are dropped
        self._stop = threading.Event()
        self._latest: tuple[int, int, int] = (0, 0, 0)
        self._progress_posted = False
        self._explanations: dict[tuple[int, int], tuple[Any, Any, str]] = {}

    @property
    def busy(self) -> bool:
        """True while a job is queued or running."""
        return self._jobs.busy

    def poll(self) -> int:
        """Apply finished jobs and progress; call often on the UI thread. Returns how many."""
        return self._jobs.poll()

    # --- opening ------------------------------------------------------------------------------
    def open_slide(self, path: str | os.PathLike, mpp: float | None = None) -> None:
        """Show a slide's thumbnail and tissue mask, then analyse it if a model is known."""
        self.cancel()
        self._generation += 1
        gen, path = self._generation, Path(path)
        self.slide = self.results = self.selected = self.region = None
        self.rows, self._explanations = [], {}
        self._set_analysis(AnalysisState())
        for name in LAYERS:
            self._view.show_layer(name, None)
        self._view.show_tiles([], None, "")
        self._view.show_tile(None, None, None, "")
        self._view.show_slide(None, f"Opening {path.name} …")
        self._view.show_status(f"Opening {path} …")

        def failed(exc: BaseException) -> None:
            if gen == self._generation:
                self._view.show_slide(None, f"Cannot open {path.name}")
                report_error(self._view, "Cannot open slide", exc)

        self._jobs.submit(
            lambda: open_for_display(path, mpp), lambda s: self._opened(gen, s), failed
        )

    def _opened(self, gen: int, slide: OpenedSlide) -> None:
        if gen != self._generation:
            return
        self.slide = slide
        self._view.show_slide(slide, "")
        self._view.show_layer("mask", slide.mask_layer)
        self._view.show_status(slide.description)
        if self._checkpoint():
            self.analyse()
        else:
            self._view.show_status(
                f"{slide.description}. Open a checkpoint in the main window, then Analyse."
            )

    # --- the analysis -------------------------------------------------------------------------
    def analyse(self) -> None:
        """Score the slide's tiles on the worker thread (or read the finished analysis)."""
        source = self._checkpoint()
        if self.slide is None:
            self._view.show_error("No slide", "Open a slide first (File ▸ Open slide).")
            return
        if self.analysis.running:
            self._view.show_status("The analysis is already running.")
            return
        if not source:
            self._view.show_error(
                "No model loaded", "Open a checkpoint first (File ▸ Open checkpoint, Ctrl+L)."
            )
            return
        slide, gen, stop = self.slide, self._generation, threading.Event()
        self._stop = stop
        self._set_analysis(AnalysisState("loading", message="Loading the model …"))

        def job() -> AnalysisOutcome:
            self._model.ensure(source)
            return run_analysis(
                self._model.predictor,
                slide,
                self.options,
                self.cache,
                self._model.fingerprint,
                lambda done, total: self._post_progress(gen, done, total),
                stop,
            )

        def failed(exc: BaseException) -> None:
            if gen == self._generation:
                self._set_analysis(AnalysisState("failed", message="The analysis failed."))
                report_error(self._view, "Analysis failed", exc)

        self._jobs.submit(job, lambda out: self._analysed(gen, out), failed)

    def cancel(self) -> None:
        """Stop the analysis after the tile batch under way; the tiles scored so far are kept."""
        if not self.analysis.running:
            return
        self._stop.set()
        a = self.analysis
        self._set_analysis(
            AnalysisState("cancelling", a.done, a.total, "Cancelling after the current batch …")
        )

    def _post_progress(self, gen: int, done: int, total: int) -> None:
        """From the worker: the latest count, shown at the next poll (at most one queued)."""
        self._latest = (gen, done, total)
        if not self._progress_posted:
            self._progress_posted = True
            self._jobs.post(self._show_progress)

    def _show_progress(self) -> None:
        self._progress_posted = False
        gen, done, total = self._latest
        a = self.analysis
        if gen != self._generation or not a.running or not total:
            return
        state = "cancelling" if a.state == "cancelling" else "running"
        text = a.message if state == "cancelling" else f"Scoring tiles: {done:,} of {total:,}"
        self._set_analysis(AnalysisState(state, done, total, text))

    def _analysed(self, gen: int, outcome: AnalysisOutcome) -> None:
        if gen != self._generation:
            return
        self.last_folder = outcome.folder
        self.results = outcome.results
        self._view.show_layer("heatmap", outcome.layer)
        n, total = outcome.done, outcome.total
        if outcome.cancelled:
            text = (
                f"Analysis cancelled after {n:,} of {total:,} tiles; Analyse resumes from there."
                if total
                else "Analysis cancelled before any tile was scored."
            )
            self._set_analysis(AnalysisState("cancelled", n, total, f"Cancelled at {n:,} tiles"))
            self._view.show_status(text)
        else:
            s = outcome.results.summary if outcome.results is not None else None
            text = f"Analysed {n:,} tiles"
            if s is not None and n:
                text += (
                    f": mean P({s.score_class}) {s.score_mean:.3f}, top-{s.top_k} "
                    f"{s.score_topk_mean:.3f}, max {s.score_max:.3f}"
                )
            self._set_analysis(AnalysisState("done", n, total, f"Done: {n:,} tiles scored"))
            self._view.show_status(f"{text}. Click the slide to see the tiles there.")
        if self.region is not None:
            self.select_region(*self.region)

    def _set_analysis(self, analysis: AnalysisState) -> None:
        self.analysis = analysis
        self._view.show_analysis(analysis)

    # --- layers -------------------------------------------------------------------------------
    def set_layer_visible(self, name: str, visible: bool) -> None:
        """Show or hide the heatmap or the tissue-mask layer."""
        if name not in LAYERS:
            raise ValueError(f"unknown layer {name!r}; the layers are {', '.join(LAYERS)}")
        self.visible[name] = bool(visible)
        self._view.set_layer_visible(name, bool(visible))

    # --- regions and tiles --------------------------------------------------------------------
    def click(self, x: float, y: float) -> None:
        """Select the tiles around level-0 point (x, y): a square of REGION_TILES tiles."""
        size = self.results.tile_size if self.results is not None else (512, 512)
        hw, hh = size[0] * REGION_TILES / 2, size[1] * REGION_TILES / 2
        self.select_region(x - hw, y - hh, x + hw, y + hh)

    def select_region(self, x0: float, y0: float, x1: float, y1: float) -> None:
        """List the analysed tiles overlapping a level-0 box, highest score first."""
        if self.slide is None:
            return
        w, h = self.slide.dimensions
        box = (
            int(max(0, min(x0, x1))),
            int(max(0, min(y0, y1))),
            int(min(w, max(x0, x1))),
            int(min(h, max(y0, y1))),
        )
        self.region = box
        if self.results is None:
            self.rows = []
            note = "Analyse the slide to see its tiles here."
        else:
            hits = self.results.tiles_in(box)
            self.rows = [self._row(int(i)) for i in hits[:MAX_LISTED]]
            note = f"{len(hits):,} tiles in the region" + (
                f"; the {MAX_LISTED} highest listed" if len(hits) > MAX_LISTED else ""
            )
        self._view.show_tiles(self.rows, box, note)

    def _row(self, i: int) -> TileRow:
        r = self.results
        x, y = (int(v) for v in r.coords[i])
        return TileRow(i, x, y, *r.tile_size, float(r.scores[i]), bool(r.ood[i]), bool(r.refer[i]))

    def select_tile(self, index: int) -> None:
        """Show a listed tile at full resolution with its Grad-CAM (computed once per tile)."""
        row = next((r for r in self.rows if r.index == index), None)
        if row is None or self.slide is None:
            return
        self.selected = row
        key = (self._generation, index)
        if key in self._explanations:
            self._view.show_tile(row, *self._explanations[key])
            return
        source = self._model.source or self._checkpoint()
        if not source:
            self._view.show_error("No model loaded", "Open a checkpoint first.")
            return
        slide, gen = self.slide, self._generation
        self._view.show_tile(row, None, None, f"Computing {method_label(DEFAULT_METHOD)} …")

        def job() -> tuple[Any, Any, str]:
            from histolens.slides.explain import explain_tile
            from histolens.slides.reader import open_slide

            self._model.ensure(source)
            with open_slide(slide.path, slide.mpp_given) as reader:
                e = explain_tile(
                    self._model.explainer, reader, (row.x, row.y), (row.width, row.height)
                )
            caption = f"{method_label(e.method)} · {e.target_class}"
            if float(e.heatmap.max()) <= 0.0:  # nothing in the tile raises the class
                caption += " · flat"
            return e.image, e.overlay(DEFAULT_OPACITY), caption

        def done(shown: tuple[Any, Any, str]) -> None:
            self._explanations[(gen, index)] = shown
            if self.selected is row and gen == self._generation:
                self._view.show_tile(row, *shown)

        def failed(exc: BaseException) -> None:
            if self.selected is row:
                self._view.show_tile(row, None, None, "No Grad-CAM for this tile")
            report_error(self._view, "Grad-CAM failed", exc)

        self._jobs.submit(job, done, failed)

    # --- shutdown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the analysis at its next batch and release the explainer (on the worker)."""
        self._stop.set()
        self._jobs.submit(self._model.close, lambda _: None, lambda exc: None)
        self._jobs.close()
