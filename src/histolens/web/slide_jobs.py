"""Slide analyses as background jobs, one per slide at a time, cached on disk.

A job runs :class:`histolens.slides.predict.SlideRun` on one slide of the
:class:`~histolens.web.slide_library.SlideLibrary` into
``<cache>/<slide id>/<key>/``, where the key hashes the checkpoint's fingerprint, the slide
file's size and mtime and the tiling options, so a result is reused across restarts exactly
while all of them stay the same. Jobs run one after another on one thread (a slide analysis
uses every core it gets); a request for a slide that is queued or running joins that job.
When the run is done the tile scores are painted into ``overlay.png``, the transparent heatmap
layer that the viewer lays over the slide; that file is written last and marks the result done.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from histolens.errors import HistolensError
from histolens.slides.outputs import SlideOutputs, read_summary
from histolens.slides.predict import SlideOptions, SlideRun
from histolens.web.slide_library import SlideEntry, SlideLibrary, UnknownSlide

__all__ = [
    "OVERLAY_NAME",
    "AnalysisCancelled",
    "JobState",
    "SlideAnalyses",
    "open_viewer",
    "render_overlay",
]

log = logging.getLogger(__name__)

OVERLAY_NAME = "overlay.png"
# The overlay's longer side at most; each tile is at least a few pixels below that.
MAX_OVERLAY_SIDE = 4096


class AnalysisCancelled(HistolensError):
    """The service stopped while the analysis ran; it resumes from its last batch next time."""


@dataclass
class JobState:
    """What a client polls: the state, tiles scored of tiles to score, and the result."""

    slide_id: str
    state: str = "idle"  # idle | queued | running | done | failed
    tiles_done: int = 0
    tiles_total: int | None = None
    message: str | None = None
    summary: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        total = self.tiles_total
        data["progress"] = (
            1.0 if self.state == "done" else (self.tiles_done / total if total else 0.0)
        )
        return data


class SlideAnalyses:
    """Background analyses of a library's slides with one model.

    Args:
        library: the slides.
        load_predictor: returns the model the jobs use (called once, on the job thread).
        fingerprint: the checkpoint's fingerprint (``model_fingerprint``).
        cache: the folder results are kept in.
        options: how slides are tiled and scored.
    """

    def __init__(
        self,
        library: SlideLibrary,
        load_predictor: Callable[[], Any],
        fingerprint: str,
        cache: Path,
        options: SlideOptions,
    ) -> None:
        self.library, self.fingerprint, self.options = library, fingerprint, options
        self.cache = Path(cache)
        self._load_predictor = load_predictor
        self._predictor: Any = None
        self._lock = threading.Lock()
        self._jobs: dict[str, JobState] = {}
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slide-analysis")

    def folder(self, entry: SlideEntry) -> Path:
        """Where the analysis of ``entry`` with this model and these options is kept."""
        key = f"{self.fingerprint}|{entry.version}|{sorted(asdict(self.options).items())}"
        return self.cache / entry.id / hashlib.sha256(key.encode()).hexdigest()[:16]

    def _cached(self, entry: SlideEntry) -> JobState | None:
        folder = self.folder(entry)
        summary = read_summary(SlideOutputs(folder, entry.path.stem).summary)
        if summary is None or not (folder / OVERLAY_NAME).exists():
            return None
        if summary.fingerprint != self.fingerprint:
            return None
        data = _public(summary)
        return JobState(entry.id, "done", data["tiles_scored"], data["tiles_scored"], None, data)

    def status(self, sid: str) -> JobState:
        """The job of slide ``sid``: running, finished, failed, or idle (never asked)."""
        entry = self.library.get(sid)
        with self._lock:
            job = self._jobs.get(sid)
        if job is not None and job.state != "done":
            return job
        return self._cached(entry) or job or JobState(sid)

    def start(self, sid: str) -> tuple[JobState, bool]:
        """Start analysing slide ``sid`` unless it is done or under way: (its job, joined)."""
        entry = self.library.get(sid)
        cached = self._cached(entry)
        if cached is not None:
            return cached, True
        with self._lock:
            job = self._jobs.get(sid)
            if job is not None and job.active:
                return job, True
            if self._stop.is_set():
                raise AnalysisCancelled("The service is stopping.")
            job = self._jobs[sid] = JobState(sid, "queued")
            self._pool.submit(self._run, entry, job)
        return job, False

    def overlay(self, sid: str) -> Path:
        """The finished heatmap overlay of slide ``sid``; :class:`UnknownSlide` until done."""
        entry = self.library.get(sid)
        if self._cached(entry) is None:
            raise UnknownSlide("This slide has no finished analysis yet; POST its analysis.")
        return self.folder(entry) / OVERLAY_NAME

    def close(self) -> None:
        """Stop the running job at its next batch and drop the queued ones (blocks)."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, entry: SlideEntry, job: JobState) -> None:
        job.state = "running"
        try:
            if self._predictor is None:
                self._predictor = self._load_predictor()
            folder = self.folder(entry)

            def progress(done: int, total: int) -> None:  # before the first batch and after each
                if self._stop.is_set():
                    raise AnalysisCancelled("The service is stopping.")
                job.tiles_done, job.tiles_total = done, total

            run = SlideRun(
                self._predictor, folder, self.options, progress=False,
                fingerprint=self.fingerprint, on_progress=progress,
            )  # fmt: skip
            summaries = run.run([entry.path], on_slide=_raise_note)
            outputs = SlideOutputs(folder, entry.path.stem)
            render_overlay(outputs.h5, folder / OVERLAY_NAME)
            summary = summaries[0] if summaries else read_summary(outputs.summary)
            job.summary = _public(summary) if summary is not None else None
            if summary is not None:
                job.tiles_done = job.tiles_total = summary.tiles_scored
            job.state = "done"
        except Exception as exc:  # reported to the client that polls, and logged
            job.state, job.message = "failed", str(exc) or type(exc).__name__
            if not isinstance(exc, (HistolensError, OSError)):
                log.exception("The analysis of slide %s failed.", entry.relative)


def open_viewer(predictor: Any, settings: Any) -> tuple[SlideLibrary, SlideAnalyses]:
    """The slide folder and its analyses for a service of ``predictor`` and ``settings``
    (:class:`~histolens.web.settings.ServiceSettings` with ``slides`` set).

    The analyses use their own copy of the model, loaded from the checkpoint file when the
    first one starts, so a slide's batches never meet the hooks of a heatmap computed at the
    same time on the service's model."""
    from histolens.inference.resume import model_fingerprint

    library = SlideLibrary(settings.slides)
    source = Path(predictor.source) if getattr(predictor, "source", None) else None

    def load() -> Any:
        if source is None or not source.is_file():
            return predictor
        from histolens.web.service import load_predictor

        return load_predictor(source, settings)

    options = SlideOptions(tile_mpp=settings.slide_tile_mpp, workers=settings.slide_workers)
    analyses = SlideAnalyses(
        library, load, model_fingerprint(predictor), settings.slide_cache, options
    )
    return library, analyses


def _public(summary: Any) -> dict[str, Any]:
    """A summary as the client sees it: no server path, and no NaN (JSON has none)."""
    data = {k: v for k, v in asdict(summary).items() if k != "path"}
    return {k: None if isinstance(v, float) and v != v else v for k, v in data.items()}


def _raise_note(summary: Any, path: Path, note: str | None) -> None:
    """``SlideRun.run``'s callback: a slide it could not read is this job's failure."""
    if summary is None and note and note != "already done with this checkpoint":
        raise HistolensError(note)


def render_overlay(h5_path: Path, target: Path) -> Path:
    """Paint the tile scores of a slide's HDF5 file into a transparent RGBA PNG covering the
    whole slide (inferno colours, transparent where no tile was scored), written atomically."""
    import h5py

    from histolens.atomic import atomic_path
    from histolens.slides.overlay import score_overlay

    with h5py.File(h5_path, "r") as f:
        coords, scores = f["coords"][:], f["score"][:]
        size0 = tuple(int(v) for v in f.attrs["patch_size_level0"])
        width, height = (int(v) for v in f.attrs["level_dim"])
    # Four overlay pixels per tile side, unless that makes the image too large.
    per_px = max(size0[0] / 4, max(width, height) / MAX_OVERLAY_SIDE, 1.0)
    ow, oh = max(1, round(width / per_px)), max(1, round(height / per_px))
    overlay = score_overlay(coords, scores, size0, (ow, oh), (1 / per_px, 1 / per_px))
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        overlay.save(tmp, format="PNG")
    return target
