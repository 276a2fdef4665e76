"""What a slide window shows, as plain values: the analysis' state, a tile row, the View.

Nothing here runs a model or touches a widget; the slide presenter builds these values and the
Tk slide window (or a fake view in tests) draws them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from histolens.gui.slide_analysis import OpenedSlide

__all__ = ["LAYERS", "RUNNING", "AnalysisState", "SlideView", "TileRow"]

LAYERS = ("heatmap", "mask")
RUNNING = ("loading", "running", "cancelling")


@dataclass(frozen=True)
class AnalysisState:
    """Where the slide's analysis stands, as the progress bar and its buttons show it."""

    state: str = "idle"  # idle | loading | running | cancelling | cancelled | done | failed
    done: int = 0
    total: int | None = None
    message: str = ""

    @property
    def running(self) -> bool:
        return self.state in RUNNING

    @property
    def fraction(self) -> float:
        if self.state == "done":
            return 1.0
        return self.done / self.total if self.total else 0.0


@dataclass(frozen=True)
class TileRow:
    """One tile of a selected region: its place (level-0 px), score and flags."""

    index: int
    x: int
    y: int
    width: int
    height: int
    score: float
    ood: bool
    refer: bool

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.x + self.width, self.y + self.height)

    @property
    def flag(self) -> str:
        return "unlike training" if self.ood else "refer" if self.refer else ""


class SlideView(Protocol):
    """What the presenter asks of a slide window. Called on the UI thread only."""

    def show_slide(self, slide: OpenedSlide | None, note: str) -> None: ...

    def show_layer(self, name: str, image: Image.Image | None) -> None: ...

    def set_layer_visible(self, name: str, visible: bool) -> None: ...

    def show_analysis(self, analysis: AnalysisState) -> None: ...

    def show_tiles(
        self, rows: Sequence[TileRow], box: tuple[int, int, int, int] | None, note: str
    ) -> None: ...

    def show_tile(
        self,
        row: TileRow | None,
        tile: Image.Image | None,
        overlay: Image.Image | None,
        caption: str,
    ) -> None: ...

    def show_status(self, message: str) -> None: ...

    def show_error(self, title: str, message: str) -> None: ...

    def set_busy(self, busy: bool) -> None: ...
