"""The desktop app's slide work, toolkit-free: open a slide for display, analyse it, read back.

Everything here runs on the slide window's worker thread. A slide is opened as a display
thumbnail (at most ``DISPLAY_SIDE`` pixels a side) and the tissue mask that ``slide predict``
computes; an analysis is :class:`histolens.slides.predict.SlideRun` into a cache folder keyed by
the checkpoint, the slide file and the tiling options, so a finished analysis opens at once and
a cancelled one resumes from its last batch (its partial HDF5 file).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histolens.errors import HistolensError
from histolens.slides.outputs import SlideOutputs, SlideSummary, read_summary
from histolens.slides.overlay import mask_overlay, score_overlay
from histolens.slides.predict import SlideOptions, SlideRun

__all__ = [
    "DISPLAY_SIDE",
    "AnalysisCancelled",
    "AnalysisOutcome",
    "OpenedSlide",
    "SlideResults",
    "analysis_folder",
    "desktop_cache_dir",
    "open_for_display",
    "run_analysis",
]

DISPLAY_SIDE = 1600  # longest side, in pixels, of the thumbnail the window shows


class AnalysisCancelled(HistolensError):
    """The user pressed Cancel; the analysis stopped between two tile batches."""


def desktop_cache_dir() -> Path:
    """Where the desktop app keeps analyses: ``$HISTOLENS_CACHE/desktop-slides``, else the
    user's cache (``$XDG_CACHE_HOME/histolens/desktop-slides``, ``~/.cache/...``)."""
    root = os.environ.get("HISTOLENS_CACHE", "").strip()
    if root:
        return Path(root).expanduser() / "desktop-slides"
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "histolens" / "desktop-slides"


def analysis_folder(cache: Path, slide: Path, fingerprint: str, options: SlideOptions) -> Path:
    """The folder of one analysis: the checkpoint's fingerprint, the slide file (path, size,
    modification time) and the tiling options hashed, so any change gets a new analysis."""
    stat = Path(slide).stat()
    key = (
        f"{fingerprint}|{Path(slide).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|"
        f"{sorted(asdict(options).items())}"
    )
    return Path(cache) / hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class OpenedSlide:
    """A slide as the window shows it, before any analysis."""

    path: Path
    dimensions: tuple[int, int]
    mpp: float
    mpp_given: float | None
    description: str
    thumbnail: Image.Image = field(repr=False)
    mask: np.ndarray = field(repr=False)
    mask_layer: Image.Image = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def scale(self) -> tuple[float, float]:
        """Thumbnail pixels per level-0 pixel, (x, y)."""
        return (
            self.thumbnail.width / self.dimensions[0],
            self.thumbnail.height / self.dimensions[1],
        )


def open_for_display(
    path: str | os.PathLike, mpp: float | None = None, side: int = DISPLAY_SIDE
) -> OpenedSlide:
    """Read a slide's display thumbnail and its tissue mask (the one ``slide predict`` uses)."""
    from histolens.slides.reader import open_slide
    from histolens.slides.tissue import MASK_MPP, tissue_mask

    path = Path(path)
    with open_slide(path, mpp) as reader:
        w, h = reader.dimensions
        thumbnail = reader.thumbnail(reader.mpp * max(w, h) / side).convert("RGB")
        small = reader.thumbnail(MASK_MPP)
        mask = tissue_mask(small, reader.mpp * w / small.size[0])
        return OpenedSlide(
            path,
            (w, h),
            float(reader.mpp),
            mpp,
            reader.describe(),
            thumbnail,
            mask,
            mask_overlay(mask, thumbnail.size),
        )


@dataclass(frozen=True)
class SlideResults:
    """A slide's tile scores as ``slide predict`` stored them (all, or those done so far)."""

    coords: np.ndarray  # (N, 2) level-0 top-left corners
    scores: np.ndarray  # (N,) probability of the score class
    ood: np.ndarray  # (N,) tile unlike the training images
    refer: np.ndarray  # (N,) prediction set of more than one class
    tile_size: tuple[int, int]  # level-0 (width, height)
    score_class: str
    summary: SlideSummary | None = None

    def __len__(self) -> int:
        return len(self.coords)

    @classmethod
    def read(cls, h5: Path, summary: SlideSummary | None = None) -> SlideResults:
        """The finished file, or a partial one's tiles done so far (its ``done`` attribute)."""
        import h5py

        with h5py.File(h5, "r") as f:
            n = int(f.attrs.get("done", f["coords"].shape[0]))
            return cls(
                f["coords"][:n],
                f["score"][:n],
                f["ood"][:n],
                f["refer"][:n],
                tuple(int(v) for v in f.attrs["patch_size_level0"]),
                str(f.attrs["score_class"]),
                summary,
            )

    def tiles_in(self, box: tuple[float, float, float, float]) -> np.ndarray:
        """Indices of the tiles whose centre lies in the level-0 ``box`` (x0, y0, x1, y1), or,
        for a box that holds no tile's centre, those it overlaps; highest score first (ties by
        position). Centres, so a box drawn along tile edges takes no slivers of its neighbours."""
        x0, y0, x1, y1 = box
        tw, th = self.tile_size
        x, y = self.coords[:, 0], self.coords[:, 1]
        cx, cy = x + tw / 2, y + th / 2
        hit = np.flatnonzero((cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1))
        if not len(hit):
            hit = np.flatnonzero((x < x1) & (x + tw > x0) & (y < y1) & (y + th > y0))
        order = np.lexsort((y[hit], x[hit], -np.nan_to_num(self.scores[hit], nan=-1.0)))
        return hit[order]

    def layer(self, slide: OpenedSlide, alpha: int = 170) -> Image.Image:
        """The heatmap layer over ``slide``'s thumbnail (the web viewer's colours)."""
        return score_overlay(
            self.coords, self.scores, self.tile_size, slide.thumbnail.size, slide.scale, alpha
        )


@dataclass(frozen=True)
class AnalysisOutcome:
    """What an analysis job returns: the results (partial if cancelled) and their layer."""

    results: SlideResults | None
    layer: Image.Image | None
    cancelled: bool
    done: int
    total: int
    folder: Path


# Tile readers must not be forked from a process running Tk (a forked child inherits the
# toolkit's state and its threads' locks, and may die): they start from a clean server process.
WORKER_START = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else None


def run_analysis(
    predictor: Any,
    slide: OpenedSlide,
    options: SlideOptions,
    cache: Path,
    fingerprint: str,
    on_progress: Callable[[int, int], None],
    stop: threading.Event,
) -> AnalysisOutcome:
    """Analyse ``slide`` with ``predictor`` (or read its finished analysis); ``on_progress``
    gets (tiles scored, tiles in all) after each batch; setting ``stop`` ends the run after the
    batch under way, with the tiles scored so far as partial results."""
    options = replace(options, slide_mpp=slide.mpp_given)
    folder = analysis_folder(cache, slide.path, fingerprint, options)
    outputs = SlideOutputs(folder, slide.name)
    counts = [0, 0]

    def progress(done: int, total: int) -> None:
        counts[:] = [done, total]
        on_progress(done, total)
        if stop.is_set():
            raise AnalysisCancelled("The analysis was cancelled.")

    run = SlideRun(
        predictor, folder, options, progress=False, fingerprint=fingerprint,
        on_progress=progress, worker_start=WORKER_START,
    )  # fmt: skip
    try:
        if stop.is_set():
            raise AnalysisCancelled("The analysis was cancelled.")
        if not run.is_done(slide.path):
            run.predict_slide(slide.path)
    except AnalysisCancelled:
        partial = None
        if outputs.partial_h5.exists() and counts[0] > 0:
            partial = SlideResults.read(outputs.partial_h5)
        layer = partial.layer(slide) if partial is not None else None
        return AnalysisOutcome(partial, layer, True, counts[0], counts[1], folder)
    results = SlideResults.read(outputs.h5, read_summary(outputs.summary))
    return AnalysisOutcome(results, results.layer(slide), False, len(results), len(results), folder)
