"""Lazy package attributes (PEP 562), so a package's ``__init__`` can name heavy classes without
importing torch, OpenSlide or h5py until one of them is used.

May import: the standard library only (it sits in the base layer).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``names`` maps an attribute to the submodule
    (relative to ``package``) that defines it; the submodule is imported on first access."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    return __getattr__
