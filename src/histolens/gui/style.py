"""The viewer's look: one palette and the ttk styles the widgets name."""

from __future__ import annotations

import tkinter as tk
from tkinter import ttk

__all__ = ["apply_style"]

# A sober palette: dark chrome around the images, neutral panels, amber for "review needed" and
# "refer", orange for "not like the training images", red only for the research notice and errors.
BG = "#eef0f3"
PANEL = "#ffffff"
CANVAS = "#23262b"
TEXT = "#1d2330"
MUTED = "#5b6473"
ACCENT = "#2f5d8a"
NOTICE = "#8b1e1e"
REVIEW_BG = "#f6c344"
UNLIKE_BG = "#e8893a"
UNLIKE_ROW_BG = "#fbdcc0"
WARNING_BG = "#fff4e0"
ERROR_BG = "#fde2e1"
ERROR_FG = "#8b1e1e"
FONT = "DejaVu Sans"


def apply_style(root: tk.Tk) -> None:
    """Configure the ttk styles used by the viewer's widgets (``Panel.TFrame``, ...)."""
    root.configure(background=BG)
    style = ttk.Style(root)
    if "clam" in style.theme_names():
        style.theme_use("clam")
    small = (FONT, 9)
    style.configure(".", font=(FONT, 10), background=BG, foreground=TEXT)
    style.configure("Panel.TFrame", background=PANEL)
    style.configure("Panel.TLabel", background=PANEL)
    style.configure("PanelTitle.TLabel", background=PANEL, foreground=MUTED, font=(FONT, 9, "bold"))
    style.configure("Muted.TLabel", background=PANEL, foreground=MUTED, font=small)
    style.configure("Key.TLabel", background=PANEL, foreground=MUTED, font=small)
    style.configure("Value.TLabel", background=PANEL, font=small)
    style.configure("Headline.TLabel", background=PANEL, foreground=ACCENT, font=(FONT, 22, "bold"))
    style.configure("Probability.TLabel", background=PANEL, font=(FONT, 13))
    _badge(style, "Review.TLabel", REVIEW_BG, "#3d2c00")
    _badge(style, "Unlike.TLabel", UNLIKE_BG, "#2e1500")
    style.configure(
        "Clear.TLabel", background=PANEL, foreground="#2e6b3a", font=(FONT, 10), padding=(0, 4)
    )
    _badge(style, "Notice.TLabel", NOTICE, "white", padding=(10, 5))
    style.configure("Error.TFrame", background=ERROR_BG)
    style.configure("Error.TLabel", background=ERROR_BG, foreground=ERROR_FG, font=(FONT, 10))
    style.configure("Status.TLabel", background="#dfe3e8", foreground=TEXT, padding=(8, 3))
    style.configure("Toolbar.TFrame", background=BG)
    style.configure("Treeview", rowheight=22, font=small)
    style.configure("Treeview.Heading", font=(FONT, 9, "bold"))
    style.configure(
        "Score.Horizontal.TProgressbar", troughcolor="#e3e6ea", background=ACCENT, thickness=10
    )


def _badge(style: ttk.Style, name: str, background: str, foreground: str, padding=(8, 4)) -> None:
    """A label style drawn as a coloured badge of bold text."""
    style.configure(
        name, background=background, foreground=foreground, font=(FONT, 10, "bold"), padding=padding
    )
