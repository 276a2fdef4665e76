"""The ``histolens`` command line: every command, and the options they share.

Owns ``commands`` (the ``histolens`` group: predict, evaluate, report, export), ``train``,
``data``, ``explain``, ``gui``, ``web`` (their commands) and ``options``. The top layer: may
import any package. Importing this package is cheap; ``histolens.cli:main`` is the entry point.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # ``histolens.cli:main`` (the console script of older installs) and ``python -m histolens.cli``.
    if name == "main":
        from histolens.cli.commands import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
