"""The viewer's image widgets: a canvas that fits one image, and the image + heatmap pair."""

from __future__ import annotations

import functools
import tkinter as tk
from pathlib import Path
from tkinter import ttk

import numpy as np
from PIL import Image, ImageTk

from histolens.gui import style

__all__ = ["ImagePanel", "ImagesArea", "colour_scale"]


@functools.lru_cache(maxsize=1)
def colour_scale(width: int = 120, height: int = 10) -> Image.Image:
    """The heatmap's colour map as a low-to-high strip, drawn by the same overlay function."""
    from histolens.explain import overlay_heatmap

    ramp = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))
    return overlay_heatmap(Image.new("RGB", (width, height)), ramp, 1.0)


class ImagePanel(ttk.Frame):
    """A titled canvas that shows one PIL image scaled to fit, or a centred note."""

    def __init__(self, master: tk.Misc, title: str) -> None:
        super().__init__(master, style="Panel.TFrame")
        header = ttk.Frame(self, style="Panel.TFrame")
        header.pack(fill="x", padx=8, pady=(6, 2))
        self.title = ttk.Label(header, text=title, style="PanelTitle.TLabel")
        self.title.pack(side="left")
        self.legend = ttk.Frame(header, style="Panel.TFrame")
        self._legend_photo: ImageTk.PhotoImage | None = None
        self.canvas = tk.Canvas(
            self, background=style.CANVAS, highlightthickness=0, width=240, height=160
        )
        self.canvas.pack(fill="both", expand=True, padx=8, pady=(0, 8))
        self._image: Image.Image | None = None
        self._note = ""
        self._photo: ImageTk.PhotoImage | None = None
        self.canvas.bind("<Configure>", lambda _e: self._render())

    @property
    def image(self) -> Image.Image | None:
        """The image shown (at its own size), or None while a note is shown."""
        return self._image

    def show(self, image: Image.Image | None, note: str = "") -> None:
        self._image, self._note = image, note
        self._render()

    def show_legend(self, scale: Image.Image | None) -> None:
        """A colour scale (low to high) at the title's right, or none."""
        if scale is None:
            self.legend.pack_forget()
            return
        if self._legend_photo is None:
            self._legend_photo = ImageTk.PhotoImage(scale, master=self)
            ttk.Label(self.legend, text="low", style="Muted.TLabel").pack(side="left")
            ttk.Label(self.legend, image=self._legend_photo, style="Panel.TLabel").pack(
                side="left", padx=4
            )
            ttk.Label(self.legend, text="high", style="Muted.TLabel").pack(side="left")
        self.legend.pack(side="right")

    def _render(self) -> None:
        c = self.canvas
        c.delete("all")
        w, h = max(1, c.winfo_width()), max(1, c.winfo_height())
        if self._image is None:
            self._photo = None
            if self._note:
                c.create_text(
                    w // 2,
                    h // 2,
                    text=self._note,
                    fill="#c9ced6",
                    font=(style.FONT, 11),
                    width=max(100, w - 40),
                )
            return
        iw, ih = self._image.size
        # Small tiles are enlarged (up to 4x) so tissue detail is readable; large ones shrunk.
        scale = min((w - 8) / iw, (h - 8) / ih, 4.0)
        size = (max(1, round(iw * scale)), max(1, round(ih * scale)))
        shown = (
            self._image
            if size == self._image.size
            else self._image.resize(
                size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
            )
        )
        self._photo = ImageTk.PhotoImage(shown, master=c)
        c.create_image(w // 2, h // 2, image=self._photo, anchor="center")


class ImagesArea(ttk.Frame):
    """The image and its heatmap, side by side or stacked, whichever shows them larger."""

    def __init__(self, master: tk.Misc) -> None:
        super().__init__(master)
        self.image_panel = ImagePanel(self, "IMAGE")
        self.heatmap_panel = ImagePanel(self, "HEATMAP")
        self._stacked: bool | None = None
        self.bind("<Configure>", lambda _e: self.arrange())
        self.arrange()

    def show_image(self, path: str, image: Image.Image | None) -> None:
        name = Path(path).name
        if image is None:
            self.image_panel.title.configure(text=f"IMAGE  ·  {name}")
            self.image_panel.show(None, f"Cannot display {name}")
            return
        self.image_panel.title.configure(
            text=f"IMAGE  ·  {name}  ·  {image.width}×{image.height} px"
        )
        self.image_panel.show(image)
        self.arrange()

    def show_heatmap(self, overlay: Image.Image | None, caption: str) -> None:
        self.heatmap_panel.title.configure(text=f"HEATMAP  ·  {caption}" if overlay else "HEATMAP")
        self.heatmap_panel.show(overlay, "" if overlay else caption)
        self.heatmap_panel.show_legend(colour_scale() if overlay else None)

    def arrange(self) -> None:
        """Lay the two panels out for the area's shape and the image's aspect ratio."""
        w, h = max(2, self.winfo_width()), max(2, self.winfo_height())
        image = self.image_panel.image
        iw, ih = image.size if image is not None else (700, 460)  # BreakHis tiles
        stacked = min(w / iw, h / 2 / ih) > min(w / 2 / iw, h / ih)
        if stacked == self._stacked:
            return
        self._stacked = stacked
        for i in range(2):
            self.columnconfigure(i, weight=0, uniform="")
            self.rowconfigure(i, weight=0, uniform="")
        if stacked:
            self.columnconfigure(0, weight=1)
            for i in range(2):
                self.rowconfigure(i, weight=1, uniform="img")
            self.image_panel.grid(row=0, column=0, sticky="nsew", pady=(0, 3), padx=0)
            self.heatmap_panel.grid(row=1, column=0, sticky="nsew", pady=(3, 0), padx=0)
        else:
            self.rowconfigure(0, weight=1)
            for i in range(2):
                self.columnconfigure(i, weight=1, uniform="img")
            self.image_panel.grid(row=0, column=0, sticky="nsew", padx=(0, 3), pady=0)
            self.heatmap_panel.grid(row=0, column=1, sticky="nsew", padx=(3, 0), pady=0)
