"""The Tk window of the desktop viewer: thin widgets over :class:`Presenter`.

Every decision lives in the presenter; this module lays out widgets, turns user input into
presenter calls and draws what the presenter asks for. Model work runs on one worker thread;
``after()`` polls its results, so the window never freezes.
"""

from __future__ import annotations

import functools
import os
import tkinter as tk
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from tkinter import filedialog, ttk

import numpy as np
from PIL import Image, ImageTk

from histolens.gui.presenter import (
    DEFAULT_OPACITY,
    RESEARCH_NOTICE,
    SORT_COLUMNS,
    ModelInfo,
    PredictionSummary,
    Presenter,
    ResultRow,
    method_label,
)
from histolens.imageio import IMAGE_SUFFIXES

__all__ = ["ViewerApp", "run_app"]

POLL_MS = 30
SELECT_DEBOUNCE_MS = 120
_IMAGE_TYPES = [
    ("Images", " ".join(f"*{s} *{s.upper()}" for s in sorted(IMAGE_SUFFIXES))),
    ("All files", "*"),
]
_CHECKPOINT_TYPES = [("histolens checkpoints", "*.safetensors"), ("All files", "*")]

# A sober palette: dark chrome around the images, neutral panels, amber for "review needed",
# red only for the research notice and errors.
_BG = "#eef0f3"
_PANEL = "#ffffff"
_CANVAS = "#23262b"
_TEXT = "#1d2330"
_MUTED = "#5b6473"
_ACCENT = "#2f5d8a"
_NOTICE = "#8b1e1e"
_REVIEW_BG = "#f6c344"
_WARNING_BG = "#fff4e0"
_ERROR_BG = "#fde2e1"
_ERROR_FG = "#8b1e1e"
_COLUMN_TITLES = {"file": "File", "class": "Class", "probability": "Probability", "review": "Flag"}


@functools.lru_cache(maxsize=1)
def _colour_scale(width: int = 120, height: int = 10) -> Image.Image | None:
    """The heatmap's colour map as a low-to-high strip, drawn by the same overlay function."""
    try:
        from histolens.explain import overlay_heatmap
    except ImportError:
        return None
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
            self, background=_CANVAS, highlightthickness=0, width=240, height=160
        )
        self.canvas.pack(fill="both", expand=True, padx=8, pady=(0, 8))
        self._image: Image.Image | None = None
        self._note = ""
        self._photo: ImageTk.PhotoImage | None = None
        self.canvas.bind("<Configure>", lambda _e: self._render())

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
                    font=("DejaVu Sans", 11),
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


class ViewerApp:
    """The viewer window. Implements the presenter's :class:`~histolens.gui.presenter.View`."""

    def __init__(
        self,
        root: tk.Tk,
        checkpoint: str | os.PathLike | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.root = root
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="histolens-worker")
        self._row_ids: dict[str, str] = {}
        self._select_after: str | None = None
        self._poll_after: str | None = None
        self._method_keys: dict[str, str] = {}
        self._score_rows: dict[str, tuple[ttk.Progressbar, ttk.Label]] = {}
        self.performance_text: tk.Text | None = None  # the model's figures and warnings
        self._setup_root()
        self._build_menu()
        self._build_layout()
        self._bind_keys()
        self.presenter = Presenter(self, self._executor)
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

    # --- construction ---------------------------------------------------------------------------
    def _setup_root(self) -> None:
        root = self.root
        root.title("histolens — breast histopathology viewer (research use only)")
        root.configure(background=_BG)
        root.minsize(1000, 640)
        style = ttk.Style(root)
        if "clam" in style.theme_names():
            style.theme_use("clam")
        base = ("DejaVu Sans", 10)
        style.configure(".", font=base, background=_BG, foreground=_TEXT)
        style.configure("Panel.TFrame", background=_PANEL)
        style.configure("Panel.TLabel", background=_PANEL)
        style.configure(
            "PanelTitle.TLabel",
            background=_PANEL,
            foreground=_MUTED,
            font=("DejaVu Sans", 9, "bold"),
        )
        style.configure(
            "Muted.TLabel", background=_PANEL, foreground=_MUTED, font=("DejaVu Sans", 9)
        )
        style.configure("Key.TLabel", background=_PANEL, foreground=_MUTED, font=("DejaVu Sans", 9))
        style.configure("Value.TLabel", background=_PANEL, font=("DejaVu Sans", 9))
        style.configure(
            "Headline.TLabel",
            background=_PANEL,
            foreground=_ACCENT,
            font=("DejaVu Sans", 22, "bold"),
        )
        style.configure("Probability.TLabel", background=_PANEL, font=("DejaVu Sans", 13))
        style.configure(
            "Review.TLabel",
            background=_REVIEW_BG,
            foreground="#3d2c00",
            font=("DejaVu Sans", 10, "bold"),
            padding=(8, 4),
        )
        style.configure(
            "Clear.TLabel",
            background=_PANEL,
            foreground="#2e6b3a",
            font=("DejaVu Sans", 10),
            padding=(0, 4),
        )
        style.configure(
            "Notice.TLabel",
            background=_NOTICE,
            foreground="white",
            font=("DejaVu Sans", 10, "bold"),
            padding=(10, 5),
        )
        style.configure("Error.TFrame", background=_ERROR_BG)
        style.configure(
            "Error.TLabel", background=_ERROR_BG, foreground=_ERROR_FG, font=("DejaVu Sans", 10)
        )
        style.configure("Status.TLabel", background="#dfe3e8", foreground=_TEXT, padding=(8, 3))
        style.configure("Toolbar.TFrame", background=_BG)
        style.configure("Treeview", rowheight=22, font=("DejaVu Sans", 9))
        style.configure("Treeview.Heading", font=("DejaVu Sans", 9, "bold"))
        style.configure(
            "Score.Horizontal.TProgressbar", troughcolor="#e3e6ea", background=_ACCENT, thickness=10
        )

    def _build_menu(self) -> None:
        menu = tk.Menu(self.root)
        file_menu = tk.Menu(menu, tearoff=False)
        file_menu.add_command(label="Open image(s)…", accelerator="Ctrl+O", command=self.ask_images)
        file_menu.add_command(
            label="Open folder…", accelerator="Ctrl+Shift+O", command=self.ask_folder
        )
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
        self.error_bar = ttk.Frame(root, style="Error.TFrame")
        self.error_text = ttk.Label(
            self.error_bar, style="Error.TLabel", anchor="w", wraplength=1100
        )
        self.error_text.pack(side="left", fill="x", expand=True, padx=10, pady=5)
        ttk.Button(self.error_bar, text="Dismiss", command=self.clear_error).pack(
            side="right", padx=8, pady=3
        )

        status = ttk.Frame(root)
        status.pack(fill="x", side="bottom")
        self.status_text = ttk.Label(status, style="Status.TLabel", anchor="w")
        self.status_text.pack(side="left", fill="x", expand=True)
        self.busy_bar = ttk.Progressbar(status, mode="indeterminate", length=90)

        self.body = ttk.PanedWindow(root, orient="horizontal")
        self.body.pack(fill="both", expand=True, padx=6, pady=6)
        self.body.add(self._build_results(self.body), weight=0)
        self.body.add(self._build_images(self.body), weight=1)
        self.body.add(self._build_side(self.body), weight=0)

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

    def _build_results(self, master: tk.Misc) -> ttk.Frame:
        frame = ttk.Frame(master, style="Panel.TFrame", width=360)
        ttk.Label(frame, text="RESULTS", style="PanelTitle.TLabel").pack(
            fill="x", padx=8, pady=(6, 2)
        )
        table = ttk.Frame(frame, style="Panel.TFrame")
        table.pack(fill="both", expand=True, padx=8)
        self.tree = ttk.Treeview(
            table, columns=SORT_COLUMNS, show="headings", selectmode="browse", height=20
        )
        widths = {"file": 230, "class": 84, "probability": 86, "review": 104}
        for col in SORT_COLUMNS:
            self.tree.heading(
                col, text=_COLUMN_TITLES[col], command=lambda c=col: self.presenter.sort_results(c)
            )
            self.tree.column(
                col,
                width=widths[col],
                stretch=col == "file",
                anchor="e" if col == "probability" else "w",
            )
        self.tree.tag_configure("review", background="#fdf0c8")
        self.tree.tag_configure("unreadable", foreground="#8a8f98")
        scroll = ttk.Scrollbar(table, orient="vertical", command=self.tree.yview)
        self.tree.configure(yscrollcommand=scroll.set)
        self.tree.pack(side="left", fill="both", expand=True)
        scroll.pack(side="right", fill="y")
        self.tree.bind("<<TreeviewSelect>>", self._row_selected)
        footer = ttk.Frame(frame, style="Panel.TFrame")
        footer.pack(fill="x", padx=8, pady=8)
        self.progress = ttk.Progressbar(footer, mode="determinate")
        self.progress.pack(side="left", fill="x", expand=True)
        self.progress_text = ttk.Label(footer, style="Muted.TLabel", width=11, anchor="e")
        self.progress_text.pack(side="left", padx=4)
        self.stop_button = ttk.Button(
            footer, text="Stop", width=6, command=lambda: self.presenter.cancel_batch()
        )
        self.stop_button.pack(side="left")
        self.stop_button.state(["disabled"])
        return frame

    def _build_images(self, master: tk.Misc) -> ttk.Frame:
        frame = self.images_frame = ttk.Frame(master)
        self.image_panel = ImagePanel(frame, "IMAGE")
        self.heatmap_panel = ImagePanel(frame, "HEATMAP")
        self._images_stacked: bool | None = None
        frame.bind("<Configure>", lambda _e: self._arrange_images())
        self._arrange_images()
        return frame

    def _arrange_images(self) -> None:
        """Image and heatmap side by side or one above the other, whichever shows them larger."""
        frame = self.images_frame
        w, h = max(2, frame.winfo_width()), max(2, frame.winfo_height())
        image = self.image_panel._image
        iw, ih = image.size if image is not None else (700, 460)  # BreakHis tiles
        stacked = min(w / iw, h / 2 / ih) > min(w / 2 / iw, h / ih)
        if stacked == self._images_stacked:
            return
        self._images_stacked = stacked
        for i in range(2):
            frame.columnconfigure(i, weight=0, uniform="")
            frame.rowconfigure(i, weight=0, uniform="")
        if stacked:
            frame.columnconfigure(0, weight=1)
            for i in range(2):
                frame.rowconfigure(i, weight=1, uniform="img")
            self.image_panel.grid(row=0, column=0, sticky="nsew", pady=(0, 3), padx=0)
            self.heatmap_panel.grid(row=1, column=0, sticky="nsew", pady=(3, 0), padx=0)
        else:
            frame.rowconfigure(0, weight=1)
            for i in range(2):
                frame.columnconfigure(i, weight=1, uniform="img")
            self.image_panel.grid(row=0, column=0, sticky="nsew", padx=(0, 3), pady=0)
            self.heatmap_panel.grid(row=0, column=1, sticky="nsew", padx=(3, 0), pady=0)

    def _build_side(self, master: tk.Misc) -> ttk.Frame:
        side = ttk.Frame(master, width=330, height=200)
        side.pack_propagate(False)  # a fixed-width column; long values wrap instead
        pred = ttk.Frame(side, style="Panel.TFrame", padding=(10, 6, 10, 10))
        pred.pack(fill="x")
        ttk.Label(pred, text="PREDICTION", style="PanelTitle.TLabel").pack(anchor="w")
        self.headline = ttk.Label(pred, style="Headline.TLabel")
        self.headline.pack(anchor="w", pady=(4, 0))
        self.probability_text = ttk.Label(pred, style="Probability.TLabel")
        self.probability_text.pack(anchor="w")
        self.threshold_text = ttk.Label(pred, style="Muted.TLabel")
        self.threshold_text.pack(anchor="w", pady=(0, 6))
        self.review_badge = ttk.Label(pred, style="Review.TLabel", wraplength=250)
        self.scores_frame = ttk.Frame(pred, style="Panel.TFrame")
        self.scores_frame.pack(fill="x", pady=(6, 0), side="bottom")
        self.scores_frame.columnconfigure(1, weight=1)

        model = ttk.Frame(side, style="Panel.TFrame", padding=(10, 6, 10, 10))
        model.pack(fill="both", expand=True, pady=(6, 0))
        ttk.Label(model, text="MODEL", style="PanelTitle.TLabel").pack(anchor="w")
        self.model_frame = ttk.Frame(model, style="Panel.TFrame")
        self.model_frame.pack(fill="both", expand=True, pady=(4, 0))
        self.model_frame.columnconfigure(1, weight=1)
        return side

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
            self.presenter.open_images(list(self.root.tk.splitlist(paths)))

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

    def _row_selected(self, _event=None) -> None:
        selection = self.tree.selection()
        if not selection:
            return
        # Debounced: holding an arrow key should not queue a heatmap for every row passed.
        if self._select_after is not None:
            self.root.after_cancel(self._select_after)
        path = selection[0]
        self._select_after = self.root.after(SELECT_DEBOUNCE_MS, self._open_selected, path)

    def _open_selected(self, path: str) -> None:
        self._select_after = None
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
        self.tree.selection_set(path)
        self.tree.see(path)

    def close(self) -> None:
        """Stop polling, release the explainer and the worker, and destroy the window."""
        if self._poll_after is not None:
            self.root.after_cancel(self._poll_after)
            self._poll_after = None
        self.presenter.close()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=False)
        self.root.destroy()

    # --- View protocol: presenter -> widgets ----------------------------------------------------
    def show_model(self, info: ModelInfo | None) -> None:
        for row in range(self.model_frame.grid_size()[1]):
            self.model_frame.rowconfigure(row, weight=0)
        for child in self.model_frame.winfo_children():
            child.destroy()
        self.performance_text = None
        if info is None:
            ttk.Label(
                self.model_frame,
                text="No checkpoint loaded.\nFile ▸ Open checkpoint… (Ctrl+L)",
                style="Muted.TLabel",
                justify="left",
            ).grid(sticky="w")
            self._build_scores(())
            return
        for row, (key, value) in enumerate(info.rows()):
            ttk.Label(self.model_frame, text=key, style="Key.TLabel").grid(
                row=row, column=0, sticky="nw", padx=(0, 8), pady=1
            )
            ttk.Label(
                self.model_frame, text=value, style="Value.TLabel", wraplength=178, justify="left"
            ).grid(row=row, column=1, sticky="nw", pady=1)
        # The figures get their own full-width area: long sentences must not narrow the values
        # above, and a scrollable text keeps every warning readable in a narrow column.
        first = len(info.rows())
        ttk.Label(self.model_frame, text=info.performance_title, style="PanelTitle.TLabel").grid(
            row=first, column=0, columnspan=2, sticky="w", pady=(10, 2)
        )
        area = ttk.Frame(self.model_frame, style="Panel.TFrame")
        area.grid(row=first + 1, column=0, columnspan=2, sticky="nsew")
        self.model_frame.rowconfigure(first + 1, weight=1)
        text = self.performance_text = tk.Text(
            area,
            wrap="word",
            height=8,
            width=30,
            relief="flat",
            borderwidth=0,
            highlightthickness=0,
            background=_PANEL,
            foreground=_TEXT,
            font=("DejaVu Sans", 9),
            padx=0,
            pady=0,
            cursor="arrow",
        )
        scroll = ttk.Scrollbar(area, orient="vertical", command=text.yview)
        text.configure(yscrollcommand=scroll.set)
        text.pack(side="left", fill="both", expand=True)
        scroll.pack(side="right", fill="y")
        text.tag_configure("headline", font=("DejaVu Sans", 11, "bold"), spacing3=2)
        text.tag_configure("about", foreground=_MUTED, spacing3=3)
        text.tag_configure("figure", lmargin1=0, lmargin2=12, spacing1=1)
        text.tag_configure(
            "warning",
            background=_WARNING_BG,
            foreground="#5c3d00",
            lmargin1=4,
            lmargin2=4,
            rmargin=2,
            spacing1=4,
            spacing3=2,
        )
        # What must be seen without scrolling comes first: the main figure, what it was measured
        # on, the patients behind it and the warnings; then the other figures.
        figures = info.performance_figures
        if figures:
            text.insert("end", figures[0] + "\n", "headline")
        for line in info.performance_about:
            text.insert("end", line + "\n", "about")
        for warning in info.performance_warnings:
            text.insert("end", f"\u26a0 {warning}\n", "warning")
        for line in figures[1:]:
            text.insert("end", line + "\n", "figure")
        text.configure(state="disabled")
        self._build_scores(info.class_names)

    def _build_scores(self, class_names: Sequence[str]) -> None:
        for child in self.scores_frame.winfo_children():
            child.destroy()
        self._score_rows = {}
        for i, name in enumerate(class_names):
            ttk.Label(self.scores_frame, text=name, style="Key.TLabel").grid(
                row=i, column=0, sticky="w", padx=(0, 6)
            )
            bar = ttk.Progressbar(
                self.scores_frame, maximum=1.0, length=120, style="Score.Horizontal.TProgressbar"
            )
            bar.grid(row=i, column=1, sticky="ew", pady=2)
            value = ttk.Label(self.scores_frame, text="", style="Value.TLabel", width=6, anchor="e")
            value.grid(row=i, column=2, sticky="e")
            self._score_rows[name] = (bar, value)

    def show_methods(self, methods: Sequence[str], current: str) -> None:
        self._method_keys = {method_label(m): m for m in methods}
        self.method_box.configure(values=list(self._method_keys))
        if methods:
            self.method_box.state(["!disabled", "readonly"])
            self.method_var.set(method_label(current))
        else:
            self.method_box.state(["disabled"])
            self.method_var.set("unavailable")

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
        self._arrange_images()
        if path in self._row_ids and self.tree.selection() != (path,):
            # Keeps the list in step with the image; the select event it raises is a no-op
            # because the path is already the presenter's current one.
            self.tree.selection_set(path)
            self.tree.see(path)

    def show_prediction(self, summary: PredictionSummary | None) -> None:
        self.review_badge.pack_forget()
        if summary is None:
            self.headline.configure(text="—")
            self.probability_text.configure(text="")
            self.threshold_text.configure(text="")
            for bar, value in self._score_rows.values():
                bar.configure(value=0)
                value.configure(text="")
            return
        self.headline.configure(text=summary.label)
        self.probability_text.configure(text=summary.probability_text)
        self.threshold_text.configure(text=summary.threshold_text + "  ·  calibrated")
        if summary.uncertain:
            self.review_badge.configure(text=f"⚑  {summary.review_text}")
            self.review_badge.pack(anchor="w", fill="x", pady=(2, 4), before=self.scores_frame)
        for name, (bar, value) in self._score_rows.items():
            p = summary.scores.get(name, 0.0)
            bar.configure(value=p)
            value.configure(text=f"{p:.3f}")

    def show_heatmap(self, overlay: Image.Image | None, caption: str) -> None:
        self.heatmap_panel.title.configure(text=f"HEATMAP  ·  {caption}" if overlay else "HEATMAP")
        self.heatmap_panel.show(overlay, "" if overlay else caption)
        self.heatmap_panel.show_legend(_colour_scale() if overlay else None)

    def _row_values(self, row: ResultRow) -> tuple[str, str, str, str]:
        prob = "" if row.probability is None else f"{row.probability:.3f}"
        return row.name, row.label or "—", prob, row.review

    def _insert_rows(self, rows: Sequence[ResultRow]) -> None:
        for row in rows:
            tags = ("unreadable",) if row.error else ("review",) if row.uncertain else ()
            self._row_ids[row.path] = self.tree.insert(
                "", "end", iid=row.path, values=self._row_values(row), tags=tags
            )

    def show_results(
        self, rows: Sequence[ResultRow], sort_column: str | None, descending: bool
    ) -> None:
        selected = self.tree.selection()
        self.tree.delete(*self.tree.get_children())
        self._row_ids = {}
        self._insert_rows(rows)
        for col in SORT_COLUMNS:
            arrow = (" ▼" if descending else " ▲") if col == sort_column else ""
            self.tree.heading(col, text=_COLUMN_TITLES[col] + arrow)
        keep = [s for s in selected if s in self._row_ids]
        if keep:
            self.tree.selection_set(keep)
            self.tree.see(keep[0])

    def append_results(self, rows: Sequence[ResultRow]) -> None:
        self._insert_rows(rows)

    def show_progress(self, done: int, total: int) -> None:
        if total <= 0:
            self.progress.configure(value=0, maximum=1)
            self.progress_text.configure(text="")
            self.stop_button.state(["disabled"])
            return
        self.progress.configure(value=done, maximum=total)
        self.progress_text.configure(text=f"{done} / {total}")
        self.stop_button.state(["!disabled"])

    def show_status(self, message: str) -> None:
        self.status_text.configure(text=message)

    def show_error(self, title: str, message: str) -> None:
        # Inline, not a modal dialog: the pathologist keeps working, and nothing blocks.
        self.error_text.configure(text=f"{title}: {message}")
        if not self.error_bar.winfo_ismapped():
            self.error_bar.pack(fill="x", side="top", after=self.toolbar)

    def clear_error(self) -> None:
        self.error_bar.pack_forget()

    @property
    def error_message(self) -> str:
        """The error bar's text, '' while it is hidden."""
        return str(self.error_text.cget("text")) if self.error_bar.winfo_ismapped() else ""

    def set_busy(self, busy: bool) -> None:
        if busy:
            self.busy_bar.pack(side="right", padx=8)
            self.busy_bar.start(12)
            self.root.configure(cursor="watch")
        else:
            self.busy_bar.stop()
            self.busy_bar.pack_forget()
            self.root.configure(cursor="")


def run_app(checkpoint: str | os.PathLike | None = None, root: tk.Tk | None = None) -> None:
    """Open the viewer window and run until it is closed (needs a display)."""
    root = root or tk.Tk(className="histolens")
    # Leave room for the menu bar and the desktop's panels.
    width = min(1440, root.winfo_screenwidth() - 40)
    height = min(900, root.winfo_screenheight() - 80)
    root.geometry(f"{width}x{height}")
    ViewerApp(root, checkpoint)
    root.mainloop()
