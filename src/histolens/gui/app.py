"""The Tk window of the desktop viewer: panels wired to a :class:`Presenter`, which makes every
decision; this module builds the window (menu, toolbar, error bar, status line), turns input
into presenter calls and implements its ``View``. Model work runs on one worker thread, polled
with ``after()``, so the window never freezes."""

from __future__ import annotations

import functools
import os
import tkinter as tk
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from tkinter import filedialog, ttk

from PIL import Image

from histolens.data.imageio import IMAGE_SUFFIXES
from histolens.gui.display import (
    DEFAULT_OPACITY,
    RESEARCH_NOTICE,
    PredictionSummary,
    ResultRow,
    method_label,
)
from histolens.gui.error_bar import ErrorBarMixin
from histolens.gui.model_info import ModelSummary
from histolens.gui.panels import ModelPanel, PredictionPanel, ResultsPanel
from histolens.gui.presenter import Presenter, open_predictor
from histolens.gui.slide_window import SlideRequest, SlideWindows
from histolens.gui.style import apply_style
from histolens.gui.widgets import ImagesArea

__all__ = ["ViewerApp", "run_app"]

POLL_MS = 30
_IMAGE_TYPES = [
    ("Images", " ".join(f"*{s} *{s.upper()}" for s in sorted(IMAGE_SUFFIXES))),
    ("All files", "*"),
]
_CHECKPOINT_TYPES = [
    ("histolens checkpoints", "*.safetensors *.onnx"),
    ("All files", "*"),
]


class ViewerApp(ErrorBarMixin):
    """The viewer window. Implements the presenter's :class:`~histolens.gui.display.View`.

    Args:
        root: the Tk root to build the window in.
        checkpoint: a checkpoint file or run folder to load at start.
        executor: where model work runs (default: one worker thread owned by the window).
        paths: images or folders to open at start (as ``histolens gui PATH...``).
        engine: what computes a checkpoint's backbone features (``--engine``; None: default).
    """

    def __init__(
        self,
        root: tk.Tk,
        checkpoint: str | os.PathLike | None = None,
        executor: Executor | None = None,
        paths: Sequence[str | os.PathLike] = (),
        engine: str | None = None,
    ) -> None:
        self.root = root
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="histolens-worker")
        self._method_keys: dict[str, str] = {}
        self._poll_after: str | None = None
        root.title("histolens — breast histopathology viewer (research use only)")
        root.minsize(1000, 640)
        apply_style(root)
        self._build_menu()
        self._build_layout()
        self._bind_keys()
        load = functools.partial(open_predictor, engine=engine)
        self.presenter = Presenter(self, self._executor, load_predictor=load)
        self.slides = SlideWindows(root, lambda: self.presenter.predictor, checkpoint)
        self.show_model(None)
        self.show_methods((), "")
        self.show_prediction(None)
        self.image_panel.show(None, "Open an image (Ctrl+O) or a folder (Ctrl+Shift+O)")
        self.heatmap_panel.show(None, "")
        self.show_status("Ready. Open a checkpoint (Ctrl+L), then an image or a folder.")
        root.protocol("WM_DELETE_WINDOW", self.close)
        self._poll_after = root.after(POLL_MS, self._poll)
        if checkpoint is not None:
            self.presenter.open_checkpoint(checkpoint)
        if paths:
            self.presenter.open_paths(paths)  # waits for the checkpoint, if one is loading

    # --- construction ---------------------------------------------------------------------------
    def _build_menu(self) -> None:
        menu = tk.Menu(self.root)
        file_menu = tk.Menu(menu, tearoff=False)
        file_menu.add_command(label="Open image(s)…", accelerator="Ctrl+O", command=self.ask_images)
        file_menu.add_command(
            label="Open folder…", accelerator="Ctrl+Shift+O", command=self.ask_folder
        )
        file_menu.add_command(label="Open slide…", command=lambda: self.slides.ask())
        file_menu.add_separator()
        file_menu.add_command(
            label="Open checkpoint…", accelerator="Ctrl+L", command=self.ask_checkpoint
        )
        file_menu.add_command(label="Open run folder…", command=self.ask_run_folder)
        file_menu.add_separator()
        file_menu.add_command(
            label="Export results…", accelerator="Ctrl+E", command=self.ask_export
        )
        file_menu.add_separator()
        file_menu.add_command(label="Quit", accelerator="Ctrl+Q", command=self.close)
        menu.add_cascade(label="File", menu=file_menu, underline=0)
        view_menu = tk.Menu(menu, tearoff=False)
        self.heatmap_var = tk.BooleanVar(self.root, value=True)
        view_menu.add_checkbutton(
            label="Show heatmap",
            accelerator="Ctrl+H",
            variable=self.heatmap_var,
            command=self._heatmap_toggled,
        )
        view_menu.add_command(
            label="Stop batch", accelerator="Esc", command=lambda: self.presenter.cancel_batch()
        )
        menu.add_cascade(label="View", menu=view_menu, underline=0)
        help_menu = tk.Menu(menu, tearoff=False)
        help_menu.add_command(label="About histolens", command=self._about)
        menu.add_cascade(label="Help", menu=help_menu, underline=0)
        self.root.configure(menu=menu)

    def _build_layout(self) -> None:
        root = self.root
        ttk.Label(
            root,
            text=f"⚠  {RESEARCH_NOTICE}.  Predictions and heatmaps come from a "
            "machine-learning model and must be checked by a pathologist.",
            style="Notice.TLabel",
            anchor="w",
        ).pack(fill="x", side="top")
        self._build_toolbar()
        self._build_error_bar(root, wraplength=1100)
        status = ttk.Frame(root)
        status.pack(fill="x", side="bottom")
        self.status_text = ttk.Label(status, style="Status.TLabel", anchor="w")
        self.status_text.pack(side="left", fill="x", expand=True)
        self.busy_bar = ttk.Progressbar(status, mode="indeterminate", length=90)

        body = ttk.PanedWindow(root, orient="horizontal")
        body.pack(fill="both", expand=True, padx=6, pady=6)
        self.results_panel = ResultsPanel(
            body,
            on_sort=lambda column: self.presenter.sort_results(column),
            on_open=self._open_selected,
            on_stop=lambda: self.presenter.cancel_batch(),
        )
        self.images = ImagesArea(body)
        side = ttk.Frame(body, width=330, height=200)
        side.pack_propagate(False)  # a fixed-width column; long values wrap instead
        self.prediction_panel = PredictionPanel(side)
        self.prediction_panel.pack(fill="x")
        self.model_panel = ModelPanel(side)
        self.model_panel.pack(fill="both", expand=True, pady=(6, 0))
        body.add(self.results_panel, weight=0)
        body.add(self.images, weight=1)
        body.add(side, weight=0)
        # The parts scripts and tests look at, by their familiar names.
        self.tree, self.progress = self.results_panel.tree, self.results_panel.progress
        self.image_panel, self.heatmap_panel = self.images.image_panel, self.images.heatmap_panel
        self.headline, self.review_badge = (
            self.prediction_panel.headline,
            self.prediction_panel.review_badge,
        )

    def _build_toolbar(self) -> None:
        bar = self.toolbar = ttk.Frame(self.root, style="Toolbar.TFrame", padding=(6, 6, 6, 2))
        bar.pack(fill="x", side="top")
        ttk.Button(bar, text="Open image…", command=self.ask_images).pack(side="left")
        ttk.Button(bar, text="Open folder…", command=self.ask_folder).pack(side="left", padx=4)
        ttk.Button(bar, text="Checkpoint…", command=self.ask_checkpoint).pack(side="left")
        ttk.Button(bar, text="Export…", command=self.ask_export).pack(side="left", padx=4)
        ttk.Separator(bar, orient="vertical").pack(side="left", fill="y", padx=10)
        ttk.Label(bar, text="Heatmap").pack(side="left")
        self.method_var = tk.StringVar(self.root)
        self.method_box = ttk.Combobox(
            bar, textvariable=self.method_var, state="readonly", width=14
        )
        self.method_box.pack(side="left", padx=(6, 12))
        self.method_box.bind("<<ComboboxSelected>>", self._method_chosen)
        ttk.Label(bar, text="Opacity").pack(side="left")
        self.opacity_var = tk.DoubleVar(self.root, value=DEFAULT_OPACITY * 100)
        self.opacity_scale = ttk.Scale(
            bar, from_=0, to=100, variable=self.opacity_var, length=160, command=self._opacity_moved
        )
        self.opacity_scale.pack(side="left", padx=6)
        self.opacity_text = ttk.Label(bar, text=f"{DEFAULT_OPACITY:.0%}", width=5)
        self.opacity_text.pack(side="left")
        ttk.Checkbutton(
            bar, text="Show heatmap", variable=self.heatmap_var, command=self._heatmap_toggled
        ).pack(side="left", padx=(10, 0))

    def _bind_keys(self) -> None:
        bindings = {
            "<Control-o>": self.ask_images,
            "<Control-O>": self.ask_folder,  # Ctrl+Shift+O
            "<Control-l>": self.ask_checkpoint,
            "<Control-e>": self.ask_export,
            "<Control-q>": self.close,
            "<Control-h>": self._toggle_heatmap_key,
            "<Escape>": lambda: self.presenter.cancel_batch(),
        }
        for sequence, action in bindings.items():
            self.root.bind_all(sequence, lambda _e, a=action: (a(), "break")[1])

    # --- user input -> presenter ----------------------------------------------------------------
    def ask_images(self) -> None:
        paths = filedialog.askopenfilenames(
            parent=self.root, title="Open image(s)", filetypes=_IMAGE_TYPES
        )
        if paths:
            self.presenter.open_paths(list(self.root.tk.splitlist(paths)))

    def ask_folder(self) -> None:
        folder = filedialog.askdirectory(
            parent=self.root, title="Open a folder of images", mustexist=True
        )
        if folder:
            self.presenter.open_folder(folder)

    def ask_checkpoint(self) -> None:
        path = filedialog.askopenfilename(
            parent=self.root, title="Open a histolens checkpoint", filetypes=_CHECKPOINT_TYPES
        )
        if path:
            self.presenter.open_checkpoint(path)

    def ask_run_folder(self) -> None:
        folder = filedialog.askdirectory(
            parent=self.root, title="Open a training run folder", mustexist=True
        )
        if folder:
            self.presenter.open_checkpoint(folder)

    def ask_export(self) -> None:
        if not self.presenter.results:
            self.presenter.export("")  # the presenter explains why there is nothing to export
            return
        folder = filedialog.askdirectory(parent=self.root, title="Export results into folder")
        if folder:
            self.presenter.export(folder)

    def _method_chosen(self, _event=None) -> None:
        key = self._method_keys.get(self.method_var.get())
        if key:
            self.presenter.set_method(key)

    def _opacity_moved(self, value: str) -> None:
        opacity = float(value) / 100
        self.opacity_text.configure(text=f"{opacity:.0%}")
        self.presenter.set_opacity(opacity)

    def _heatmap_toggled(self) -> None:
        self.presenter.set_heatmap_visible(self.heatmap_var.get())

    def _toggle_heatmap_key(self) -> None:
        self.heatmap_var.set(not self.heatmap_var.get())
        self._heatmap_toggled()

    def _open_selected(self, path: str) -> None:
        if path != self.presenter.current_path:
            self.presenter.select_result(path)

    def _poll(self) -> None:
        self.presenter.poll()
        self._poll_after = self.root.after(POLL_MS, self._poll)

    def _about(self) -> None:
        from tkinter import messagebox

        messagebox.showinfo(
            "About histolens",
            f"histolens: breast histopathology classification with heatmaps.\n\n{RESEARCH_NOTICE}.",
            parent=self.root,
        )

    # --- convenience for scripts and tests (no dialogs) -----------------------------------------
    def open_checkpoint(self, path: str | os.PathLike) -> None:
        self.presenter.open_checkpoint(path)

    def open_image(self, path: str | os.PathLike) -> None:
        self.presenter.open_image(path)

    def open_folder(self, path: str | os.PathLike) -> None:
        self.presenter.open_folder(path)

    def select_row(self, path: str) -> None:
        """Select a row as a click would (the heatmap follows after the debounce)."""
        self.results_panel.select(path)

    @property
    def performance_text(self) -> tk.Text | None:
        """The model panel's figures and warnings (None while no model is loaded)."""
        return self.model_panel.performance_text

    def close(self) -> None:
        """Stop polling, release the explainer and the worker, and destroy the window."""
        if self._poll_after is not None:
            self.root.after_cancel(self._poll_after)
            self._poll_after = None
        self.slides.close()
        self.presenter.close()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=False)
        self.root.destroy()

    # --- View protocol: presenter -> widgets ----------------------------------------------------
    def show_model(self, info: ModelSummary | None) -> None:
        self.model_panel.show(info)
        self.prediction_panel.set_classes(info.class_names if info else ())

    def show_methods(self, methods: Sequence[str], current: str) -> None:
        self._method_keys = {method_label(m): m for m in methods}
        self.method_box.configure(values=list(self._method_keys))
        if methods:
            self.method_box.state(["!disabled", "readonly"])
            self.method_var.set(method_label(current))
        else:  # no model loaded yet
            self.method_box.state(["disabled"])
            self.method_var.set("unavailable")

    def show_image(self, path: str, image: Image.Image | None) -> None:
        self.images.show_image(path, image)
        if image is not None:
            self.results_panel.follow(path)

    def show_prediction(self, summary: PredictionSummary | None) -> None:
        self.prediction_panel.show(summary)

    def show_heatmap(self, overlay: Image.Image | None, caption: str) -> None:
        self.images.show_heatmap(overlay, caption)

    def show_results(
        self, rows: Sequence[ResultRow], sort_column: str | None, descending: bool
    ) -> None:
        self.results_panel.show_results(rows, sort_column, descending)

    def append_results(self, rows: Sequence[ResultRow]) -> None:
        self.results_panel.append_results(rows)

    def show_progress(self, done: int, total: int) -> None:
        self.results_panel.show_progress(done, total)

    def set_busy(self, busy: bool) -> None:
        if busy:
            self.busy_bar.pack(side="right", padx=8)
            self.busy_bar.start(12)
            self.root.configure(cursor="watch")
        else:
            self.busy_bar.stop()
            self.busy_bar.pack_forget()
            self.root.configure(cursor="")


def run_app(
    checkpoint: str | os.PathLike | None = None,
    root: tk.Tk | None = None,
    paths: Sequence[str | os.PathLike] = (),
    slides: SlideRequest | None = None,
    engine: str | None = None,
) -> None:
    """Open the viewer window (checkpoint, images, slides, feature ``engine`` if given)."""
    root = root or tk.Tk(className="histolens")
    # Leave room for the menu bar and the desktop's panels.
    width = min(1440, root.winfo_screenwidth() - 40)
    height = min(900, root.winfo_screenheight() - 80)
    root.geometry(f"{width}x{height}")
    ViewerApp(root, checkpoint, paths=paths, engine=engine).slides.open_all(slides)
    root.mainloop()
