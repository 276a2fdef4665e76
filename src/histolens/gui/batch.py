"""Batches: classify many images in the background, chunk by chunk, into the results list.

A batch lists its images on the worker, then predicts them ``chunk`` at a time, each chunk one
job. A click on a result is queued between chunks, so the window answers within a second or two
while a large folder runs. Every batch has a token; results for an older token (a cancelled or
replaced batch) are dropped when they arrive.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from histolens.data.imagefiles import images_under
from histolens.errors import DataError
from histolens.gui.display import SORT_COLUMNS, ResultRow, View, sort_key
from histolens.gui.jobs import BackgroundJobs, report_error

if TYPE_CHECKING:
    from histolens.data.records import Skipped
    from histolens.inference.predictor import Prediction, Predictor

__all__ = ["BATCH_CHUNK", "BatchRunner", "find_images", "images_in"]

# Images per batch job: small enough that a click on a result (queued behind the running job on
# the single worker) is answered within a second or two, large enough to batch the forward pass.
BATCH_CHUNK = 16


def find_images(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder``, by ``images_under``'s rule (recursive, sorted by path;
    hidden entries and masks/ skipped), so the results list is in ``histolens predict``'s order."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder.")
    return [str(path) for path in images_under(root)]


def images_in(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The files given, and the images under the folders given, in that order (``images_under``).

    A folder without images adds nothing; only when nothing at all is found is that an error.
    """
    return [str(path) for path in images_under(*paths)]


class BatchRunner:
    """The results list and the batch that fills it: start, progress, cancel, sort, summary."""

    def __init__(self, view: View, jobs: BackgroundJobs, chunk: int = BATCH_CHUNK) -> None:
        self._view = view
        self._jobs = jobs
        self._chunk = max(1, int(chunk))
        self._token = 0
        self._predictor: Predictor | None = None
        self._started = 0.0
        self.paths: list[str] = []
        self.root: Path | None = None
        self.results: list[ResultRow] = []
        self.sort_column: str | None = None
        self.sort_descending = False
        self.total = 0
        self.done = 0

    def start(
        self, predictor: Predictor, list_paths: Callable[[], list[str]], root: Path | None
    ) -> None:
        """Clear the results and classify what ``list_paths`` (run on the worker) returns."""
        self._token += 1
        token = self._token
        self._predictor = predictor
        self.root = root
        self.results = []
        self.total = self.done = 0
        self._started = time.perf_counter()
        self._view.show_results([], self.sort_column, self.sort_descending)
        self._view.show_status(f"Looking for images in {root} …")
        self._jobs.submit(
            list_paths,
            lambda paths: self._listed(token, paths),
            lambda exc: self._failed(token, exc),
        )

    def restart(self, predictor: Predictor) -> None:
        """Classify the last batch's images again (with a new model), if there was one."""
        if self.paths:
            self.start(predictor, lambda paths=list(self.paths): paths, self.root)

    def cancel(self) -> None:
        """Stop the running batch after its current chunk; keep the results so far."""
        if self.total and self.done < self.total:
            self._token += 1
            self._view.show_progress(0, 0)
            self._view.show_status(f"Stopped after {self.done} of {self.total} images.")

    def stop(self) -> None:
        """Drop whatever the running batch still sends (the window is closing)."""
        self._token += 1

    def row(self, path: str) -> ResultRow | None:
        return next((r for r in self.results if r.path == path), None)

    def _listed(self, token: int, paths: list[str]) -> None:
        if token != self._token:
            return
        self.paths = list(paths)
        self.total, self.done = len(paths), 0
        self._view.show_progress(0, self.total)
        self._view.show_status(f"Analysing {self.total} images …")
        self._submit_chunk(token, 0)

    def _submit_chunk(self, token: int, start: int) -> None:
        chunk = self.paths[start : start + self._chunk]
        predictor = self._predictor
        self._jobs.submit(
            lambda: predictor.predict_paths(chunk, batch_size=len(chunk)),
            lambda result: self._chunk_done(token, start, chunk, result),
            lambda exc: self._failed(token, exc),
        )

    def _row_name(self, path: str) -> str:
        if self.root is not None:
            try:
                return Path(path).relative_to(self.root).as_posix()
            except ValueError:
                pass
        return Path(path).name

    def _rows(
        self, chunk: list[str], result: tuple[list[Prediction], list[Skipped]]
    ) -> list[ResultRow]:
        """One row per path of ``chunk``, in its order: a prediction or the reason it failed."""
        predictions, skipped = result
        by_path: dict[str, ResultRow] = {}
        for pred in predictions:
            path = str(pred.path)
            by_path[path] = ResultRow(path, self._row_name(path), prediction=pred)
        for skip in skipped:
            path = str(skip.path)
            by_path[path] = ResultRow(path, self._row_name(path), error=skip.reason)
        return [by_path[p] for p in chunk if p in by_path]

    def _chunk_done(self, token: int, start: int, chunk: list[str], result: tuple) -> None:
        if token != self._token:
            return
        rows = self._rows(chunk, result)
        self.results += rows
        self._view.append_results(rows)
        self.done = min(self.total, start + len(chunk))
        self._view.show_progress(self.done, self.total)
        if self.done < self.total:
            self._submit_chunk(token, start + len(chunk))
            return
        self._token += 1  # finished: nothing stale can arrive
        if self.sort_column:
            self.results.sort(key=sort_key(self.sort_column), reverse=self.sort_descending)
            self._view.show_results(self.results, self.sort_column, self.sort_descending)
        self._view.show_progress(0, 0)
        self._view.show_status(self.summary(time.perf_counter() - self._started))

    def _failed(self, token: int, exc: BaseException) -> None:
        if token != self._token:
            return
        self._token += 1
        self._view.show_progress(0, 0)
        report_error(self._view, "Batch stopped", exc)

    def summary(self, seconds: float | None = None) -> str:
        """One line: how many images, how many per class, how many need review or were unread."""
        counts: dict[str, int] = {}
        for r in self.results:
            if r.prediction:
                counts[r.label] = counts.get(r.label, 0) + 1
        parts = [f"{n} {label}" for label, n in sorted(counts.items())]
        review = sum(r.error is None and r.flag_rank > 0 for r in self.results)
        unlike = sum(r.ood for r in self.results)
        unreadable = sum(r.error is not None for r in self.results)
        text = f"Analysed {len(self.results)} images: " + (", ".join(parts) or "none classified")
        text += f"; {review} review needed"
        if unlike:
            text += f" ({unlike} not like the training images)"
        if unreadable:
            text += f"; {unreadable} unreadable"
        if seconds is not None:
            text += f" ({seconds:.1f} s)"
        return text

    def sort(self, column: str) -> None:
        """Sort the results list by a column; the same column again reverses the order."""
        if column not in SORT_COLUMNS:
            raise ValueError(f"Unknown column '{column}'; choose one of {', '.join(SORT_COLUMNS)}.")
        if column == self.sort_column:
            self.sort_descending = not self.sort_descending
        else:
            # Most useful first: highest probability, review-needed rows on top.
            self.sort_column, self.sort_descending = column, column in ("probability", "review")
        self.results.sort(key=sort_key(column), reverse=self.sort_descending)
        self._view.show_results(self.results, self.sort_column, self.sort_descending)
