"""The two HTML pages, each with the header and research-use notice they share
(``static/header.html``) filled in for that page."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from string import Template

from fastapi.responses import HTMLResponse

__all__ = ["STATIC_DIR", "page_response"]

STATIC_DIR = Path(__file__).parent / "static"
_MARKER = "  <!-- header.html: filled in by histolens.web.pages -->\n"
_MODEL_CHIP = """\
    <div class="model-chip" id="model-chip" title="The model this service runs">
      <span class="dot" id="health-dot"></span><span id="model-chip-text">loading model…</span>
    </div>
"""


@dataclass(frozen=True)
class _Header:
    heading: str
    tagline: str
    subject: str  # what the notice says comes from the model
    status: str = ""  # markup after the brand: the model chip of the single-image page


_HEADERS = {
    "index.html": _Header(
        "histolens",
        "Breast histopathology classifier with calibrated probabilities and heatmaps",
        "Predictions",
        _MODEL_CHIP,
    ),
    "slides.html": _Header(
        "histolens slides",
        'Whole-slide images with the model\'s tile heatmap · <a href="/">single images</a>',
        "Heatmaps",
    ),
}


def render_page(name: str) -> str:
    """The page ``name`` of ``static/`` with its header in place of the marker line."""
    header = Template((STATIC_DIR / "header.html").read_text(encoding="utf-8"))
    page = (STATIC_DIR / name).read_text(encoding="utf-8")
    return page.replace(_MARKER, header.substitute(asdict(_HEADERS[name])), 1)


def page_response(name: str) -> HTMLResponse:
    """The rendered page, never cached by the browser without asking (the model can change)."""
    return HTMLResponse(render_page(name), headers={"Cache-Control": "no-cache"})
