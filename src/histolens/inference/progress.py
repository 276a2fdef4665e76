"""The progress of ``histolens predict`` (and ``data synth``): images done, images/s, time left.

On a terminal it is a live tqdm bar; otherwise (output going to a log file) a plain line every few
seconds, so the log gets readable lines rather than carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import IO

__all__ = ["ProgressReporter"]


class ProgressReporter:
    """Images done of the total and images/s: a live bar on a terminal, and a plain line every
    ``interval`` seconds otherwise (log files get readable lines, not carriage returns)."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        stream: IO[str] | None = None,
        interval: float = 10.0,
        enabled: bool = True,
        *,
        desc: str = "Predicting",
        verb: str = "predicted",
    ) -> None:
        self.verb = verb
        self.total = total
        self.done = initial
        self.initial = initial
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.enabled = enabled
        self._start = time.perf_counter()
        self._last_line = self._start
        self._bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=" images",
                file=self.stream,
                dynamic_ncols=True,
            )

    @property
    def images_per_second(self) -> float:
        elapsed = time.perf_counter() - self._start
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.images_per_second
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = f", about {left:.0f} s left" if left == left and self.done < self.total else ""
        return f"{self.verb} {self.done:,}/{self.total:,} images, {rate:.1f} images/s{eta}"

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.perf_counter() - self._last_line >= self.interval:
            self._last_line = time.perf_counter()
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.done > self.initial:
            print(self.line(), file=self.stream, flush=True)
        self.enabled = False

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
