"""Progress of a long step, shared by every command: a live tqdm bar on a terminal, plain lines
otherwise.

A bar redraws itself with carriage returns, which a log file keeps as hundreds of partial lines;
when the stream is not a terminal, ``progress_bar`` prints one whole line per step instead
('Synthesising: 120/240 img (50%), 12.3 img/s'), at most one every ``interval`` seconds, and a
last one when the work is done.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

__all__ = ["LineProgress", "is_terminal", "progress_bar"]


def is_terminal(stream: IO[str] | None) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, closed streams)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """tqdm's interface (``update``, ``n``, ``write``, ``close``, a context manager) printing
    whole lines: one per ``update`` at most every ``interval`` seconds, and one at the end."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        stream: IO[str] | None = None,
        interval: float = 5.0,
        enabled: bool = True,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.enabled = enabled
        self.n = 0
        self._start = time.perf_counter()
        self._last: float | None = None
        self._printed_at = -1  # ``n`` when the last line was printed

    def line(self) -> str:
        """'DESC: N/TOTAL UNIT (P%), R UNIT/s'."""
        elapsed = time.perf_counter() - self._start
        rate = f", {self.n / elapsed:.1f} {self.unit}/s" if elapsed > 0 and self.n else ""
        if self.total:
            share = f" ({100 * self.n / self.total:.0f}%)"
            return f"{self.desc}: {self.n}/{self.total} {self.unit}{share}{rate}"
        return f"{self.desc}: {self.n} {self.unit}{rate}"

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        now = time.perf_counter()
        finished = self.total is not None and self.n >= self.total
        if finished or self._last is None or now - self._last >= self.interval:
            self._last = now
            self._printed_at = self.n
            self._print(self.line())

    def write(self, text: str, file: IO[str] | None = None) -> None:
        """A message line (as ``tqdm.write``)."""
        if self.enabled:
            print(text, file=file if file is not None else self.stream, flush=True)

    def set_postfix_str(self, *_: Any, **__: Any) -> None:
        """Accepted for tqdm compatibility; lines carry no postfix."""

    def close(self) -> None:
        if self.enabled and self.n and self._printed_at != self.n:
            self._print(self.line())
        self.enabled = False

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(
    total: int | None,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
    leave: bool = True,
    stream: IO[str] | None = None,
    interval: float = 5.0,
) -> Any:
    """A tqdm bar on a terminal, else a :class:`LineProgress` on ``stream`` (default stderr);
    ``enabled=False``: silent (either way, ``update`` still counts)."""
    stream = stream if stream is not None else sys.stderr
    if enabled and is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=stream)
    return LineProgress(total, desc, unit, stream, interval, enabled)
