"""The inline error bar and status line that the viewer's main and slide windows share."""

from __future__ import annotations

import tkinter as tk
from tkinter import ttk
from typing import Any

__all__ = ["ErrorBarMixin"]


class ErrorBarMixin:
    """show_status / show_error / clear_error for a window with a toolbar, an error bar and a
    status line; the window builds the bar with ``_build_error_bar`` and the status line itself."""

    toolbar: ttk.Frame
    status_text: ttk.Label
    error_bar: ttk.Frame
    error_text: ttk.Label

    def _build_error_bar(self, parent: tk.Misc, **label: Any) -> None:
        """The (hidden) error bar under ``parent``: its text, then a Dismiss button."""
        self.error_bar = ttk.Frame(parent, style="Error.TFrame")
        self.error_text = ttk.Label(self.error_bar, style="Error.TLabel", anchor="w", **label)
        self.error_text.pack(side="left", fill="x", expand=True, padx=10, pady=5)
        ttk.Button(self.error_bar, text="Dismiss", command=self.clear_error).pack(
            side="right", padx=8, pady=3
        )

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
