"""The histolens web service: a FastAPI app (``create_app``) and its browser page.

Importing this package is cheap; FastAPI and torch load only when ``create_app`` is first used.
May import: everything below the front ends (base .. explain); not ``histolens.gui`` or
``histolens.cli``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from histolens.web.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from histolens.web.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
