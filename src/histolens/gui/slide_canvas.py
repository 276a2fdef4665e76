"""The slide window's canvas: the thumbnail, its layers, and region selection by mouse.

Every layer is one canvas image item tagged with its name (``slide``, ``mask``, ``heatmap``,
bottom to top, so the heatmap's colours are never tinted), hidden or shown by its item state,
so a toggle never redraws anything. The selected region and its tiles are rectangles
tagged ``region``, ``tile`` and ``selected``. Clicks and drags are reported in level-0 pixels.
"""

from __future__ import annotations

import tkinter as tk
from collections.abc import Callable, Sequence
from tkinter import ttk

from PIL import Image, ImageTk

from histolens.gui import style

__all__ = ["SlideCanvas"]

_STACK = ("slide", "mask", "heatmap")  # bottom to top
_CLICK_PX = 4  # a press and release closer than this is a click, not a drag
_MAX_OUTLINES = 300  # tile outlines drawn for a region (all are listed)


class SlideCanvas(ttk.Frame):
    """A titled canvas showing a slide's thumbnail and layers, fitted to its size.

    Args:
        master: the parent widget.
        on_click: called with a level-0 point (x, y) when the slide is clicked.
        on_box: called with a level-0 box (x0, y0, x1, y1) when a region is dragged out.
    """

    def __init__(
        self,
        master: tk.Misc,
        on_click: Callable[[float, float], None],
        on_box: Callable[[float, float, float, float], None],
    ) -> None:
        super().__init__(master, style="Panel.TFrame")
        self.title = ttk.Label(self, text="SLIDE", style="PanelTitle.TLabel")
        self.title.pack(fill="x", padx=8, pady=(6, 2))
        self.canvas = tk.Canvas(
            self, background=style.CANVAS, highlightthickness=0, width=480, height=480
        )
        self.canvas.pack(fill="both", expand=True, padx=8, pady=(0, 8))
        self._on_click, self._on_box = on_click, on_box
        self._images: dict[str, Image.Image | None] = dict.fromkeys(_STACK)
        self._visible = {name: True for name in _STACK}
        self._photos: dict[str, ImageTk.PhotoImage] = {}
        self._dimensions = (1, 1)
        self._note = ""
        self._fit = (1.0, 0.0, 0.0)  # canvas px per thumbnail px, left, top
        self._region: tuple[Sequence[int], list[Sequence[int]], Sequence[int] | None] | None = None
        self._press: tuple[int, int] | None = None
        self.canvas.bind("<Configure>", lambda _e: self._render())
        self.canvas.bind("<ButtonPress-1>", self._pressed)
        self.canvas.bind("<B1-Motion>", self._dragged)
        self.canvas.bind("<ButtonRelease-1>", self._released)

    # --- what is shown ------------------------------------------------------------------------
    def show_slide(
        self, thumbnail: Image.Image | None, dimensions: tuple[int, int], note: str = ""
    ) -> None:
        """A new thumbnail (its layers and region cleared), or a note when None."""
        self._images = dict.fromkeys(_STACK)
        self._images["slide"] = thumbnail
        self._dimensions, self._note, self._region = dimensions, note, None
        self._render()

    def set_layer(self, name: str, image: Image.Image | None) -> None:
        """An RGBA layer the thumbnail's size (or None to remove it)."""
        self._images[name] = image
        self._render()

    def set_visible(self, name: str, visible: bool) -> None:
        self._visible[name] = visible
        self.canvas.itemconfigure(name, state="normal" if visible else "hidden")

    def show_region(
        self,
        box: Sequence[int] | None,
        tiles: list[Sequence[int]],
        selected: Sequence[int] | None = None,
    ) -> None:
        """Outline a level-0 box, the tiles in it and the selected tile (level-0 boxes)."""
        self._region = None if box is None else (box, tiles[:_MAX_OUTLINES], selected)
        self._draw_region()

    # --- drawing ------------------------------------------------------------------------------
    def _render(self) -> None:
        c = self.canvas
        c.delete("all")
        self._photos = {}
        w, h = max(1, c.winfo_width()), max(1, c.winfo_height())
        thumb = self._images["slide"]
        if thumb is None:
            if self._note:
                c.create_text(
                    w // 2, h // 2, text=self._note, fill="#c9ced6", font=(style.FONT, 11)
                )
            return
        scale = min((w - 8) / thumb.width, (h - 8) / thumb.height, 2.0)
        size = (max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale)))
        left, top = (w - size[0]) // 2, (h - size[1]) // 2
        self._fit = (size[0] / thumb.width, left, top)
        for name in _STACK:
            image = self._images[name]
            if image is None:
                continue
            shown = image.resize(
                size, Image.Resampling.LANCZOS if name == "slide" else Image.Resampling.NEAREST
            )
            self._photos[name] = ImageTk.PhotoImage(shown, master=c)
            c.create_image(
                left,
                top,
                image=self._photos[name],
                anchor="nw",
                tags=(name, "layer"),
                state="normal" if self._visible[name] or name == "slide" else "hidden",
            )
        self._draw_region()

    def to_canvas(self, x: float, y: float) -> tuple[float, float]:
        """Canvas pixels of a level-0 point."""
        f, left, top = self._fit
        thumb = self._images["slide"]
        sx = thumb.width / self._dimensions[0] if thumb is not None else 1.0
        sy = thumb.height / self._dimensions[1] if thumb is not None else 1.0
        return left + x * sx * f, top + y * sy * f

    def to_level0(self, cx: float, cy: float) -> tuple[float, float]:
        """Level-0 pixels of a canvas point."""
        f, left, top = self._fit
        thumb = self._images["slide"]
        if thumb is None:
            return (0.0, 0.0)
        return (
            (cx - left) / f * self._dimensions[0] / thumb.width,
            (cy - top) / f * self._dimensions[1] / thumb.height,
        )

    def _rect(self, box: Sequence[int], **options) -> None:
        x0, y0 = self.to_canvas(box[0], box[1])
        x1, y1 = self.to_canvas(box[2], box[3])
        self.canvas.create_rectangle(x0, y0, x1, y1, **options)

    def _draw_region(self) -> None:
        c = self.canvas
        c.delete("region", "tile", "selected")
        if self._region is None or self._images["slide"] is None:
            return
        box, tiles, selected = self._region
        for tile in tiles:
            self._rect(tile, outline="#e8eef5", width=1, tags=("tile",))
        self._rect(box, outline="#4fc3f7", width=2, dash=(6, 3), tags=("region",))
        if selected is not None:
            self._rect(selected, outline="#7CFC00", width=3, tags=("selected",))

    # --- the mouse ----------------------------------------------------------------------------
    def _pressed(self, event: tk.Event) -> None:
        self._press = (event.x, event.y)

    def _dragged(self, event: tk.Event) -> None:
        if self._press is None:
            return
        self.canvas.delete("drag")
        x0, y0 = self._press
        self.canvas.create_rectangle(
            x0, y0, event.x, event.y, outline="#4fc3f7", width=1, dash=(3, 3), tags=("drag",)
        )

    def _released(self, event: tk.Event) -> None:
        self.canvas.delete("drag")
        if self._press is None or self._images["slide"] is None:
            return
        (x0, y0), self._press = self._press, None
        if abs(event.x - x0) < _CLICK_PX and abs(event.y - y0) < _CLICK_PX:
            self._on_click(*self.to_level0(event.x, event.y))
        else:
            self._on_box(*self.to_level0(x0, y0), *self.to_level0(event.x, event.y))
