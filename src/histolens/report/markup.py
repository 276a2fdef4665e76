"""HTML pieces every section of the report shares: numbers, rows of cards, embedded images."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["card_row", "embedded_image", "fmt"]


def embedded_image(path: Path) -> str:
    """An <img> holding the PNG at ``path`` itself (base64), so the report opens offline."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def fmt(v: Any) -> str:
    """A value for a table cell: floats to 3 decimals ('n/a' for NaN), the rest HTML-escaped."""
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return html.escape(str(v))


def card_row(items: Sequence[tuple[str, str, str]]) -> str:
    """Cards of (name, value, small print under the value), all already HTML-safe."""
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><b>{v}</b>{f"<small>{note}</small>" if note else ""}'
            f"<span>{k}</span></div>"
            for k, v, note in items
        )
        + "</div>"
    )
