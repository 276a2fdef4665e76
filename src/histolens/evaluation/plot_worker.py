"""The evaluation's plots drawn by a second Python process, started early, while the run goes on.

A run's last steps are single-threaded Python: the metrics, the estimate, the checkpoint, then
six matplotlib figures (about 1.7 s on breakhis-dev, 0.7 s of it importing matplotlib). A worker
started with the run imports matplotlib while the main process still builds its model (one core
is idle then), and draws the figures while the main process computes the metrics and writes the
other files. The worker calls the same functions of :mod:`histolens.evaluation.plots` with the
same arguments, so the files are the same; if it cannot start or fails, the main process draws
them itself, as it always did.

Protocol: the worker reads pickled lists of plot calls from stdin and answers each with a
pickled ``None`` (done) or an error message; it exits at end of input.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["PlotCall", "PlotWorker", "draw_plots"]

log = logging.getLogger("histolens")

# (name of a function of histolens.evaluation.plots, positional arguments, keyword arguments)
PlotCall = tuple[str, tuple, dict]

_SERVE = "from histolens.evaluation.plot_worker import _serve; _serve()"

# The longest wait for the worker's answer: the six figures take a few seconds; a worker that
# has not answered in this time is killed and the plots are drawn here.
_ANSWER_TIMEOUT_S = 600.0


def draw_plots(calls: Sequence[PlotCall]) -> None:
    """Draw ``calls`` in this process."""
    from histolens.evaluation import plots

    for name, args, kwargs in calls:
        getattr(plots, name)(*args, **kwargs)


class PlotWorker:
    """A worker process for an evaluation's plots; ``submit`` once, then ``wait``.

    Start it early (its import of matplotlib then overlaps the run); ``close`` ends it. A
    worker that is not used costs one idle process until ``close``.
    """

    def __init__(self) -> None:
        self._calls: list[PlotCall] | None = None
        self._proc: subprocess.Popen | None = None
        if getattr(sys, "frozen", False):  # a bundled app: sys.executable is the app itself
            return
        # The worker imports the modules this process imports (the same histolens and plots).
        path = os.pathsep.join(p for p in sys.path if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _SERVE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": path},
            )
        except OSError as exc:
            log.debug("No plot worker (%s): plots are drawn in this process.", exc)

    @property
    def running(self) -> bool:
        """Whether a worker process is there to draw (False: ``wait`` draws here)."""
        return self._proc is not None

    def submit(self, calls: Sequence[PlotCall]) -> None:
        """Hand ``calls`` to the worker (or keep them for ``wait`` to draw here)."""
        self._calls = list(calls)
        if self._proc is None:
            return
        try:
            assert self._proc.stdin is not None
            pickle.dump(self._calls, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
        except Exception as exc:  # any failure to hand over: the plots are drawn here
            log.debug("The plot worker did not take the plots (%s).", exc)
            self.close()

    def wait(self) -> None:
        """Return once the submitted plots are written: by the worker, or here if it failed."""
        calls, self._calls = self._calls, None
        if calls is None:
            return
        answer: Any = "no worker"
        if self._proc is not None:
            try:
                assert self._proc.stdout is not None
                ready, _, _ = select.select([self._proc.stdout], [], [], _ANSWER_TIMEOUT_S)
                if not ready:
                    raise TimeoutError(f"no answer in {_ANSWER_TIMEOUT_S:.0f} s")
                answer = pickle.load(self._proc.stdout)
            except Exception as exc:  # ended, hung or garbled: the plots are drawn here
                answer = f"the worker failed ({exc or type(exc).__name__})"
        if answer is not None:  # the worker failed: the same calls here (and their errors)
            log.debug("Plots drawn in this process: %s.", answer)
            self.close(kill=True)
            draw_plots(calls)

    def close(self, kill: bool = False) -> None:
        """End the worker: it exits at the end of its input, or at once with ``kill`` (one
        that failed or hung)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def __enter__(self) -> PlotWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _warm_up() -> None:
    """Import what the plots import (matplotlib, scikit-learn's curves, the image reader) and
    draw one small throw-away figure (fonts, text layout): about 1 s the real plots then skip."""
    import io

    import sklearn.metrics  # noqa: F401  (what plot_roc_pr imports on its first call)

    import histolens.data.imageio  # noqa: F401  (plot_misclassified's)
    from histolens.evaluation import plots

    plt = plots._plt()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(np.zeros((4, 4, 3)))
    ax.plot([0, 1], [0, 1], label="warm-up")
    ax.set(title="warm-up", xlabel="x", ylabel="y")
    ax.legend()
    fig.suptitle("warm-up")
    fig.savefig(io.BytesIO(), format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _serve() -> None:
    """The worker's process: quiet on Ctrl-C (the parent handles it) and on any failure (the
    parent then draws the plots itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve_loop()
    except Exception:
        sys.exit(1)


def _serve_loop() -> None:
    """Import matplotlib now, then draw each list of calls read from stdin. The answers go to
    a private copy of stdout, and stdout itself to stderr, so nothing printed while drawing can
    corrupt the answer stream."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _warm_up()
    stdin, stdout = sys.stdin.buffer, answers
    while True:
        try:
            calls = pickle.load(stdin)
        except EOFError:
            return
        try:
            draw_plots(calls)
            answer: str | None = None
        except Exception as exc:  # reported; the main process draws them again and raises
            answer = f"{type(exc).__name__}: {exc}"
        pickle.dump(answer, stdout)
        stdout.flush()
