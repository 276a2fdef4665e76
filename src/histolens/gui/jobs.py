"""Background jobs for the viewer: run on an executor, answered on the UI thread.

Model work runs through an injectable :class:`concurrent.futures.Executor` (one worker thread in
the app: the Explainer is not safe for concurrent calls). A finished job's callback is queued,
and the UI thread runs it when it calls :meth:`BackgroundJobs.poll` (the Tk window does so from
``after()``), so the view is only ever called on the UI thread.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histolens.errors import HistolensError, ImageLoadError

if TYPE_CHECKING:
    from histolens.gui.display import View

__all__ = ["BackgroundJobs", "ImmediateExecutor", "error_text", "report_error"]

log = logging.getLogger(__name__)


class ImmediateExecutor(Executor):
    """Runs each job at once on the calling thread (tests, scripts, benchmarks)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the future like a real executor
            future.set_exception(exc)
        return future


def error_text(exc: BaseException) -> str:
    """The one line the window shows for ``exc``: the file's name and reason for a bad image."""
    if isinstance(exc, ImageLoadError):
        return f"{Path(exc.path).name}: {exc.reason}"
    if isinstance(exc, HistolensError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def report_error(view: View, title: str, exc: BaseException) -> None:
    """Show ``exc`` in the status line and the error bar; log a traceback if it is a bug."""
    if not isinstance(exc, HistolensError):
        log.error("%s", title, exc_info=exc)
    text = error_text(exc)
    view.show_status(f"{title}: {text}")
    view.show_error(title, text)


class BackgroundJobs:
    """Submits jobs and hands their results to callbacks at the next :meth:`poll`.

    The view shows a busy cursor while any job is queued or running. After :meth:`close`, jobs
    still finish but their callbacks no longer run.
    """

    def __init__(self, view: View, executor: Executor) -> None:
        self._view = view
        self._executor = executor
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._pending = 0
        self.closed = False

    @property
    def busy(self) -> bool:
        """True while a job is queued or running."""
        return self._pending > 0

    def submit(
        self,
        job: Callable[[], Any],
        on_done: Callable[[Any], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        """Run ``job`` on the executor; ``on_done(result)`` or ``on_error(exc)`` at a poll."""

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
            if not self.closed:
                callback(value)
        finally:
            if self._pending == 0:
                self._view.set_busy(False)

    def post(self, message: Callable[[], None]) -> None:
        """From the worker: run ``message`` on the UI thread at the next poll."""
        self._inbox.put(message)

    def poll(self) -> int:
        """Run the callbacks of finished jobs and posted messages; returns how many ran."""
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
                report_error(self._view, "Unexpected error", exc)

    def close(self) -> None:
        """Stop running callbacks; jobs already queued still run (and release what they hold)."""
        self.closed = True
