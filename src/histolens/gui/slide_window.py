"""The desktop app's slide window: a Tk toplevel over a :class:`SlidePresenter`.

The window shows the slide's thumbnail with the heatmap and tissue-mask layers (each with a
checkbutton), the analysis' progress bar with Analyse and Cancel, the tiles of the region
clicked and the Grad-CAM of the tile chosen. It implements the presenter's ``SlideView``; its
own worker thread runs the model work, and ``after()`` polls the answers, so the window never
freezes. :class:`SlideWindows` opens them from the viewer's File menu or its command line.
"""

from __future__ import annotations

import os
import tkinter as tk
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from tkinter import ttk

from PIL import Image, ImageTk

from histolens.gui.display import RESEARCH_NOTICE
from histolens.gui.error_bar import ErrorBarMixin
from histolens.gui.panels import SELECT_DEBOUNCE_MS
from histolens.gui.slide_analysis import OpenedSlide
from histolens.gui.slide_canvas import SlideCanvas
from histolens.gui.slide_presenter import AnalysisState, SlidePresenter, TileRow
from histolens.gui.widgets import ImagesArea
from histolens.slides.cohort import SLIDE_SUFFIXES
from histolens.slides.overlay import score_legend
from histolens.slides.predict import SlideOptions
from histolens.slides.reader import PLAIN_IMAGE_SUFFIXES

__all__ = ["SlideRequest", "SlideWindow", "SlideWindows", "ask_slide"]

POLL_MS = 40
_SLIDE_TYPES = [
    (
        "Slides and images",
        " ".join(f"*{s} *{s.upper()}" for s in sorted({*SLIDE_SUFFIXES, *PLAIN_IMAGE_SUFFIXES})),
    ),
    ("All files", "*"),
]
_LAYER_TITLES = {"heatmap": "Heatmap", "mask": "Tissue mask"}


class SlideWindow(ErrorBarMixin):
    """One slide's window. Implements :class:`~histolens.gui.slide_presenter.SlideView`.

    Args:
        master: the viewer's root window.
        checkpoint: returns the checkpoint to analyse with, or None.
        options: how slides are tiled and scored.
        cache: where analyses are kept (None: the user's cache).
        executor: where model work runs (default: one worker thread owned by the window).
        on_close: called once the window is closed.
    """

    def __init__(
        self,
        master: tk.Misc,
        checkpoint: Callable[[], str | None],
        options: SlideOptions | None = None,
        cache: str | os.PathLike | None = None,
        executor: Executor | None = None,
        on_close: Callable[[SlideWindow], None] | None = None,
    ) -> None:
        self.top = tk.Toplevel(master)
        self.top.title("histolens — slide (research use only)")
        self.top.minsize(900, 560)
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="histolens-slide")
        self._on_close = on_close
        self.layer_vars = {name: tk.BooleanVar(self.top, value=True) for name in _LAYER_TITLES}
        self._choose_after: str | None = None
        self._build()
        self.presenter = SlidePresenter(
            self, self._executor, checkpoint=checkpoint, options=options, cache=cache
        )
        self.show_analysis(AnalysisState())
        self.top.protocol("WM_DELETE_WINDOW", self.close)
        self._poll_after: str | None = self.top.after(POLL_MS, self._poll)

    # --- construction ---------------------------------------------------------------------------
    def _build(self) -> None:
        top = self.top
        ttk.Label(top, text=f"⚠  {RESEARCH_NOTICE}.", style="Notice.TLabel", anchor="w").pack(
            fill="x", side="top"
        )
        bar = self.toolbar = ttk.Frame(top, style="Toolbar.TFrame", padding=(6, 6, 6, 2))
        bar.pack(fill="x", side="top")
        ttk.Button(bar, text="Open slide…", command=self.ask_slide).pack(side="left")
        self.analyse_button = ttk.Button(bar, text="Analyse", command=self._analyse)
        self.analyse_button.pack(side="left", padx=4)
        self.cancel_button = ttk.Button(bar, text="Cancel", command=self._cancel)
        self.cancel_button.pack(side="left")
        self.progress = ttk.Progressbar(
            bar, length=220, maximum=1.0, style="Score.Horizontal.TProgressbar"
        )
        self.progress.pack(side="left", padx=(10, 6))
        self.progress_text = ttk.Label(bar, width=36, anchor="w")
        self.progress_text.pack(side="left")
        ttk.Separator(bar, orient="vertical").pack(side="left", fill="y", padx=8)
        self.layer_buttons = {}
        for name, title in _LAYER_TITLES.items():
            button = ttk.Checkbutton(
                bar,
                text=title,
                variable=self.layer_vars[name],
                command=lambda n=name: self._layer_toggled(n),
            )
            button.pack(side="left", padx=(0, 8))
            self.layer_buttons[name] = button
            if name == "heatmap":
                self._legend_photo = ImageTk.PhotoImage(score_legend(), master=top)
                ttk.Label(bar, text="0").pack(side="left")
                ttk.Label(bar, image=self._legend_photo).pack(side="left", padx=2)
                ttk.Label(bar, text="1").pack(side="left", padx=(0, 12))
        self._build_error_bar(top)
        self.status_text = ttk.Label(top, style="Status.TLabel", anchor="w")
        self.status_text.pack(fill="x", side="bottom")
        body = ttk.PanedWindow(top, orient="horizontal")
        body.pack(fill="both", expand=True, padx=6, pady=6)
        self.slide_canvas = SlideCanvas(body, self._clicked, self._boxed)
        self.canvas = self.slide_canvas.canvas
        body.add(self.slide_canvas, weight=3)
        body.add(self._build_side(body), weight=2)

    def _build_side(self, body: ttk.PanedWindow) -> ttk.Frame:
        side = ttk.Frame(body, style="Panel.TFrame")
        self.tiles_title = ttk.Label(side, text="TILES", style="PanelTitle.TLabel")
        self.tiles_title.pack(fill="x", padx=8, pady=(6, 2))
        table = ttk.Frame(side, style="Panel.TFrame")
        table.pack(fill="x", padx=8)
        self.tiles = ttk.Treeview(
            table, columns=("x", "y", "score", "flag"), show="headings", height=8
        )
        for col, title, width in (("x", "x", 70), ("y", "y", 70), ("score", "P", 110)):
            self.tiles.heading(col, text=title)
            self.tiles.column(col, width=width, anchor="e", stretch=False)
        self.tiles.heading("flag", text="Flag")
        self.tiles.column("flag", width=120, anchor="w")
        scroll = ttk.Scrollbar(table, orient="vertical", command=self.tiles.yview)
        self.tiles.configure(yscrollcommand=scroll.set)
        self.tiles.pack(side="left", fill="x", expand=True)
        scroll.pack(side="right", fill="y")
        self.tiles.bind("<<TreeviewSelect>>", self._tile_chosen)
        self.tile_images = ImagesArea(side)
        self.tile_images.pack(fill="both", expand=True, pady=(6, 0))
        self.tile_images.image_panel.title.configure(text="TILE")
        return side

    # --- user input -> presenter ----------------------------------------------------------------
    def ask_slide(self) -> None:
        chosen = ask_slide(self.top)
        if chosen is not None:
            self.presenter.open_slide(*chosen)

    def open_slide(self, path: str | os.PathLike, mpp: float | None = None) -> None:
        self.presenter.open_slide(path, mpp)

    def _analyse(self) -> None:
        self.clear_error()
        self.presenter.analyse()

    def _cancel(self) -> None:
        self.presenter.cancel()

    def _layer_toggled(self, name: str) -> None:
        self.presenter.set_layer_visible(name, self.layer_vars[name].get())

    def _clicked(self, x: float, y: float) -> None:
        self.presenter.click(x, y)

    def _boxed(self, x0: float, y0: float, x1: float, y1: float) -> None:
        self.presenter.select_region(x0, y0, x1, y1)

    def _tile_chosen(self, _event=None) -> None:
        # Debounced: arrowing down the list should not queue a Grad-CAM for every row passed.
        if self._choose_after is not None:
            self.top.after_cancel(self._choose_after)
        self._choose_after = self.top.after(SELECT_DEBOUNCE_MS, self._choose)

    def _choose(self) -> None:
        self._choose_after = None
        selection = self.tiles.selection()
        if selection:
            self.presenter.select_tile(int(selection[0]))

    def _poll(self) -> None:
        self.presenter.poll()
        self._poll_after = self.top.after(POLL_MS, self._poll)

    def close(self) -> None:
        """Stop polling and the analysis (at its next batch), and destroy the window."""
        for pending in (self._poll_after, self._choose_after):
            if pending is not None:
                self.top.after_cancel(pending)
        self._poll_after = self._choose_after = None
        self.presenter.close()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self.top.destroy()
        if self._on_close is not None:
            self._on_close(self)

    # --- SlideView: presenter -> widgets --------------------------------------------------------
    def show_slide(self, slide: OpenedSlide | None, note: str) -> None:
        if slide is None:
            self.slide_canvas.show_slide(None, (1, 1), note)
            self.slide_canvas.title.configure(text="SLIDE")
            return
        self.top.title(f"histolens — {slide.path.name} (research use only)")
        self.slide_canvas.title.configure(text=f"SLIDE  ·  {slide.description}")
        self.slide_canvas.show_slide(slide.thumbnail, slide.dimensions)

    def show_layer(self, name: str, image: Image.Image | None) -> None:
        self.slide_canvas.set_layer(name, image)

    def set_layer_visible(self, name: str, visible: bool) -> None:
        self.layer_vars[name].set(visible)
        self.slide_canvas.set_visible(name, visible)

    def show_analysis(self, analysis: AnalysisState) -> None:
        self.progress.configure(value=analysis.fraction)
        self.progress_text.configure(text=analysis.message)
        self.analyse_button.state(["disabled" if analysis.running else "!disabled"])
        running = analysis.state in ("loading", "running")
        self.cancel_button.state(["!disabled" if running else "disabled"])

    def show_tiles(
        self, rows: Sequence[TileRow], box: tuple[int, int, int, int] | None, note: str
    ) -> None:
        self.tiles.delete(*self.tiles.get_children())
        cls = self.presenter.results.score_class if self.presenter.results else ""
        self.tiles.heading("score", text=f"P({cls})" if cls else "P")
        for row in rows:
            values = (f"{row.x:,}", f"{row.y:,}", f"{row.score:.3f}", row.flag)
            self.tiles.insert("", "end", iid=str(row.index), values=values)
        hint = "click the slide, or drag a box over it" if box is None else note
        self.tiles_title.configure(text=f"TILES  ·  {hint}")
        self.slide_canvas.show_region(box, [r.box for r in rows])

    def show_tile(
        self,
        row: TileRow | None,
        tile: Image.Image | None,
        overlay: Image.Image | None,
        caption: str,
    ) -> None:
        name = f"tile at {row.x:,}, {row.y:,}" if row is not None else ""
        panel = self.tile_images.image_panel
        if tile is not None:
            self.tile_images.show_image(name, tile)
            panel.title.configure(
                text=f"TILE  ·  {row.x:,}, {row.y:,}  ·  {tile.width}×{tile.height}"
            )
        else:
            panel.title.configure(text="TILE")
            panel.show(None, name or "Choose a tile in the list to see it and its Grad-CAM")
        self.tile_images.show_heatmap(overlay, caption)
        if row is not None and self.presenter.region is not None:
            rows = [r.box for r in self.presenter.rows]
            self.slide_canvas.show_region(self.presenter.region, rows, row.box)

    def set_busy(self, busy: bool) -> None:
        # The progress bar says what a long analysis is doing; a busy cursor over the whole
        # window would suggest it cannot be used meanwhile.
        pass


def ask_slide(parent: tk.Misc) -> tuple[str, float | None] | None:
    """A slide chosen in a file dialog, with the scale asked for a plain image (else None)."""
    from tkinter import filedialog, simpledialog

    path = filedialog.askopenfilename(parent=parent, title="Open a slide", filetypes=_SLIDE_TYPES)
    if not path:
        return None
    if Path(path).suffix.lower() not in PLAIN_IMAGE_SUFFIXES:
        return path, None
    mpp = simpledialog.askfloat(
        "Scale of the image",
        f"{Path(path).name} records no scale.\nMicrons per pixel (e.g. 0.25 for 40x, 0.5 for 20x):",
        parent=parent,
        minvalue=0.01,
        maxvalue=100.0,
    )
    return (path, mpp) if mpp else None


@dataclass(frozen=True)
class SlideRequest:
    """Slides to open at start (``histolens gui --slide``), their scale and tiling options."""

    paths: tuple[str | os.PathLike, ...] = ()
    mpp: float | None = None
    options: SlideOptions | None = None
    cache: str | os.PathLike | None = None


class SlideWindows:
    """The slide windows of one viewer: File ▸ Open slide…, or ``histolens gui --slide``.

    Args:
        root: the viewer's root window.
        predictor: returns the viewer's loaded Predictor (or None); its checkpoint analyses.
        checkpoint: the checkpoint given at start, used until the viewer has loaded one.
        options: how slides are tiled and scored.
        cache: where analyses are kept (None: the user's cache).
    """

    def __init__(
        self,
        root: tk.Misc,
        predictor: Callable[[], object],
        checkpoint: str | os.PathLike | None = None,
        options: SlideOptions | None = None,
        cache: str | os.PathLike | None = None,
    ) -> None:
        self.root, self._predictor, self._initial = root, predictor, checkpoint
        self.options, self.cache = options, cache
        self.windows: list[SlideWindow] = []

    def checkpoint(self) -> str | None:
        """The checkpoint a new analysis uses: the viewer's model, else the one given at start."""
        loaded = self._predictor()
        source = getattr(loaded, "source", "") if loaded is not None else ""
        if source:
            return str(source)
        return str(self._initial) if self._initial is not None else None

    def ask(self) -> None:
        """File ▸ Open slide…: choose a slide and open it in a new window."""
        chosen = ask_slide(self.root)
        if chosen is not None:
            self.open(*chosen)

    def open(self, path: str | os.PathLike, mpp: float | None = None) -> SlideWindow:
        """Open ``path`` in a new slide window (analysed at once when a model is known)."""
        window = SlideWindow(
            self.root, self.checkpoint, self.options, self.cache, on_close=self.windows.remove
        )
        self.windows.append(window)
        window.open_slide(path, mpp)
        return window

    def open_all(self, request: SlideRequest | None) -> None:
        """Open the slides of ``request`` (its options and cache then apply to every window)."""
        if request is None:
            return
        self.options, self.cache = request.options, request.cache
        for path in request.paths:
            self.open(path, request.mpp)

    def close(self) -> None:
        for window in list(self.windows):
            window.close()
