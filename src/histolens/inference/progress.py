"""The progress of ``histolens predict``: images done, images/s, time left.

A :class:`histolens.progress.LineProgress` (a live tqdm bar on a terminal, otherwise a plain
line every few seconds, so a log gets readable lines rather than carriage returns) that counts
the images a resumed run had already done and says how long is left.
"""

from __future__ import annotations

import time
from typing import IO

from histolens.progress import LineProgress, is_terminal

__all__ = ["ProgressReporter"]


class ProgressReporter(LineProgress):
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
        super().__init__(total, desc, " images", stream, interval, enabled)
        self.verb = verb
        self.initial = self.n = self._printed_at = initial
        self._last = self._start  # the first line comes after ``interval`` seconds
        self._bar = None
        if enabled and is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=self.unit,
                file=self.stream,
                dynamic_ncols=True,
            )

    @property
    def done(self) -> int:
        """Images done, those of the run being resumed included."""
        return self.n

    @property
    def images_per_second(self) -> float:
        elapsed = time.perf_counter() - self._start
        return (self.n - self.initial) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.images_per_second
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        eta = f", about {left:.0f} s left" if left == left and self.n < self.total else ""
        return f"{self.verb} {self.n:,}/{self.total:,} images, {rate:.1f} images/s{eta}"

    def update(self, n: int = 1) -> None:
        if self._bar is None:
            super().update(n)
            return
        self.n += n
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self.enabled = False
        super().close()

    def __enter__(self) -> ProgressReporter:
        return self
