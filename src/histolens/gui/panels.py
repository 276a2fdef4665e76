"""The viewer's side panels: the results list, the prediction and the model's card.

Each panel is a ttk frame that draws what the presenter gives it; user input leaves a panel only
through the callbacks it was built with.
"""

from __future__ import annotations

import tkinter as tk
from collections.abc import Callable, Sequence
from tkinter import ttk

from histolens.gui import style
from histolens.gui.display import SORT_COLUMNS, PredictionSummary, ResultRow
from histolens.gui.model_info import ModelSummary

__all__ = ["ModelPanel", "PredictionPanel", "ResultsPanel"]

SELECT_DEBOUNCE_MS = 120
COLUMN_TITLES = {"file": "File", "class": "Class", "probability": "Probability", "review": "Flag"}
_COLUMN_WIDTHS = {"file": 230, "class": 84, "probability": 86, "review": 180}


class ResultsPanel(ttk.Frame):
    """The sortable results list, the batch's progress bar and its Stop button.

    Args:
        master: the parent widget.
        on_sort: called with a column name when its heading is clicked.
        on_open: called with a row's path once the selection has rested on it.
        on_stop: called when Stop is pressed.
    """

    def __init__(
        self,
        master: tk.Misc,
        on_sort: Callable[[str], None],
        on_open: Callable[[str], None],
        on_stop: Callable[[], None],
    ) -> None:
        super().__init__(master, style="Panel.TFrame", width=360)
        self._on_open = on_open
        self._row_ids: dict[str, str] = {}
        self._select_after: str | None = None
        ttk.Label(self, text="RESULTS", style="PanelTitle.TLabel").pack(
            fill="x", padx=8, pady=(6, 2)
        )
        table = ttk.Frame(self, style="Panel.TFrame")
        table.pack(fill="both", expand=True, padx=8)
        self.tree = ttk.Treeview(
            table, columns=SORT_COLUMNS, show="headings", selectmode="browse", height=20
        )
        for col in SORT_COLUMNS:
            self.tree.heading(col, text=COLUMN_TITLES[col], command=lambda c=col: on_sort(c))
            self.tree.column(
                col,
                width=_COLUMN_WIDTHS[col],
                stretch=col == "file",
                anchor="e" if col == "probability" else "w",
            )
        self.tree.tag_configure("review", background="#fdf0c8")
        self.tree.tag_configure("unlike", background=style.UNLIKE_ROW_BG)
        self.tree.tag_configure("unreadable", foreground="#8a8f98")
        scroll = ttk.Scrollbar(table, orient="vertical", command=self.tree.yview)
        self.tree.configure(yscrollcommand=scroll.set)
        self.tree.pack(side="left", fill="both", expand=True)
        scroll.pack(side="right", fill="y")
        self.tree.bind("<<TreeviewSelect>>", self._selected)
        footer = ttk.Frame(self, style="Panel.TFrame")
        footer.pack(fill="x", padx=8, pady=8)
        self.progress = ttk.Progressbar(footer, mode="determinate")
        self.progress.pack(side="left", fill="x", expand=True)
        self.progress_text = ttk.Label(footer, style="Muted.TLabel", width=11, anchor="e")
        self.progress_text.pack(side="left", padx=4)
        self.stop_button = ttk.Button(footer, text="Stop", width=6, command=on_stop)
        self.stop_button.pack(side="left")
        self.stop_button.state(["disabled"])

    def show_results(
        self, rows: Sequence[ResultRow], sort_column: str | None, descending: bool
    ) -> None:
        selected = self.tree.selection()
        self.tree.delete(*self.tree.get_children())
        self._row_ids = {}
        self.append_results(rows)
        for col in SORT_COLUMNS:
            arrow = (" ▼" if descending else " ▲") if col == sort_column else ""
            self.tree.heading(col, text=COLUMN_TITLES[col] + arrow)
        keep = [s for s in selected if s in self._row_ids]
        if keep:
            self.tree.selection_set(keep)
            self.tree.see(keep[0])

    def append_results(self, rows: Sequence[ResultRow]) -> None:
        for row in rows:
            tags = _row_tags(row)
            prob = "" if row.probability is None else f"{row.probability:.3f}"
            values = (row.name, row.label or "—", prob, row.review)
            self._row_ids[row.path] = self.tree.insert(
                "", "end", iid=row.path, values=values, tags=tags
            )

    def show_progress(self, done: int, total: int) -> None:
        if total <= 0:
            self.progress.configure(value=0, maximum=1)
            self.progress_text.configure(text="")
            self.stop_button.state(["disabled"])
            return
        self.progress.configure(value=done, maximum=total)
        self.progress_text.configure(text=f"{done} / {total}")
        self.stop_button.state(["!disabled"])

    def select(self, path: str) -> None:
        """Select a row as a click would (``on_open`` follows after the debounce)."""
        self.tree.selection_set(path)
        self.tree.see(path)

    def follow(self, path: str) -> None:
        """Keep the selection in step with the image shown, if that image is a row."""
        # The select event this raises opens nothing: the path is already the one shown.
        if path in self._row_ids and self.tree.selection() != (path,):
            self.select(path)

    def _selected(self, _event=None) -> None:
        selection = self.tree.selection()
        if not selection:
            return
        # Debounced: holding an arrow key should not queue a heatmap for every row passed.
        if self._select_after is not None:
            self.after_cancel(self._select_after)
        self._select_after = self.after(SELECT_DEBOUNCE_MS, self._open, selection[0])

    def _open(self, path: str) -> None:
        self._select_after = None
        self._on_open(path)


def _row_tags(row: ResultRow) -> tuple[str, ...]:
    """A row's colour: grey unreadable, orange unlike the training images, amber to review."""
    if row.error:
        return ("unreadable",)
    if row.ood:
        return ("unlike",)
    return ("review",) if row.flag_rank else ()


class PredictionPanel(ttk.Frame):
    """The predicted class, its calibrated probability and prediction set, the flag (unlike the
    training images, refer, review needed) with its reason, and every class's score."""

    def __init__(self, master: tk.Misc) -> None:
        super().__init__(master, style="Panel.TFrame", padding=(10, 6, 10, 10))
        ttk.Label(self, text="PREDICTION", style="PanelTitle.TLabel").pack(anchor="w")
        self.headline = ttk.Label(self, style="Headline.TLabel")
        self.headline.pack(anchor="w", pady=(4, 0))
        self.probability_text = ttk.Label(self, style="Probability.TLabel")
        self.probability_text.pack(anchor="w")
        self.threshold_text = ttk.Label(self, style="Muted.TLabel")
        self.threshold_text.pack(anchor="w")
        self.set_text = ttk.Label(self, style="Muted.TLabel")
        self.set_text.pack(anchor="w", pady=(0, 6))
        self.review_badge = ttk.Label(self, style="Review.TLabel", wraplength=280)
        self.scores_frame = ttk.Frame(self, style="Panel.TFrame")
        self.scores_frame.pack(fill="x", pady=(6, 0), side="bottom")
        self.scores_frame.columnconfigure(1, weight=1)
        self._score_rows: dict[str, tuple[ttk.Progressbar, ttk.Label]] = {}

    def set_classes(self, class_names: Sequence[str]) -> None:
        """One score bar per class of the loaded model."""
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

    def show(self, summary: PredictionSummary | None) -> None:
        self.review_badge.pack_forget()
        if summary is None:
            self.headline.configure(text="—")
            self.probability_text.configure(text="")
            self.threshold_text.configure(text="")
            self.set_text.configure(text="")
            for bar, value in self._score_rows.values():
                bar.configure(value=0)
                value.configure(text="")
            return
        self.headline.configure(text=summary.label)
        self.probability_text.configure(text=summary.probability_text)
        self.threshold_text.configure(text=summary.threshold_text + "  ·  calibrated")
        self.set_text.configure(text=summary.set_text)
        if summary.flagged:
            self.review_badge.configure(
                text=f"⚑  {summary.review_text}",
                style="Unlike.TLabel" if summary.ood else "Review.TLabel",
            )
            self.review_badge.pack(anchor="w", fill="x", pady=(2, 4), before=self.scores_frame)
        for name, (bar, value) in self._score_rows.items():
            p = summary.scores.get(name, 0.0)
            bar.configure(value=p)
            value.configure(text=f"{p:.3f}")


class ModelPanel(ttk.Frame):
    """The loaded checkpoint: its facts, then its performance figures and their warnings."""

    def __init__(self, master: tk.Misc) -> None:
        super().__init__(master, style="Panel.TFrame", padding=(10, 6, 10, 10))
        ttk.Label(self, text="MODEL", style="PanelTitle.TLabel").pack(anchor="w")
        self.body = ttk.Frame(self, style="Panel.TFrame")
        self.body.pack(fill="both", expand=True, pady=(4, 0))
        self.body.columnconfigure(1, weight=1)
        self.performance_text: tk.Text | None = None  # the model's figures and warnings

    def show(self, info: ModelSummary | None) -> None:
        body = self.body
        for row in range(body.grid_size()[1]):
            body.rowconfigure(row, weight=0)
        for child in body.winfo_children():
            child.destroy()
        self.performance_text = None
        if info is None:
            ttk.Label(
                body,
                text="No checkpoint loaded.\nFile ▸ Open checkpoint… (Ctrl+L)",
                style="Muted.TLabel",
                justify="left",
            ).grid(sticky="w")
            return
        for row, (key, value) in enumerate(info.rows()):
            ttk.Label(body, text=key, style="Key.TLabel").grid(
                row=row, column=0, sticky="nw", padx=(0, 8), pady=1
            )
            ttk.Label(body, text=value, style="Value.TLabel", wraplength=178, justify="left").grid(
                row=row, column=1, sticky="nw", pady=1
            )
        # The figures get their own full-width area: long sentences must not narrow the values
        # above, and a scrollable text keeps every warning readable in a narrow column.
        first = len(info.rows())
        ttk.Label(body, text=info.performance_title, style="PanelTitle.TLabel").grid(
            row=first, column=0, columnspan=2, sticky="w", pady=(10, 2)
        )
        area = ttk.Frame(body, style="Panel.TFrame")
        area.grid(row=first + 1, column=0, columnspan=2, sticky="nsew")
        body.rowconfigure(first + 1, weight=1)
        self.performance_text = _performance_text(area, info)


def _performance_text(area: ttk.Frame, info: ModelSummary) -> tk.Text:
    """A read-only, scrollable text with the model's figures, what they were measured on and
    their warnings."""
    text = tk.Text(
        area,
        wrap="word",
        height=8,
        width=30,
        relief="flat",
        borderwidth=0,
        highlightthickness=0,
        background=style.PANEL,
        foreground=style.TEXT,
        font=(style.FONT, 9),
        padx=0,
        pady=0,
        cursor="arrow",
    )
    scroll = ttk.Scrollbar(area, orient="vertical", command=text.yview)
    text.configure(yscrollcommand=scroll.set)
    text.pack(side="left", fill="both", expand=True)
    scroll.pack(side="right", fill="y")
    text.tag_configure("headline", font=(style.FONT, 11, "bold"), spacing3=2)
    text.tag_configure("about", foreground=style.MUTED, spacing3=3)
    text.tag_configure("figure", lmargin1=0, lmargin2=12, spacing1=1)
    text.tag_configure(
        "warning",
        background=style.WARNING_BG,
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
    return text
