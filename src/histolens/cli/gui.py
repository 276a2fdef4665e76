"""``histolens gui``: the desktop viewer. Tk and torch are imported only when it runs."""

from __future__ import annotations

from pathlib import Path

import click

from histolens.cli.options import engine_option

__all__ = ["gui_command"]


@click.command("gui")
@click.option(
    "--checkpoint",
    "-c",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Checkpoint file or run folder to load at start (File > Open checkpoint changes it).",
)
@click.argument(
    "paths",
    nargs=-1,
    metavar="[IMAGE_OR_FOLDER]...",
    type=click.Path(exists=True, path_type=Path),
)
@engine_option()
def gui_command(checkpoint: Path | None, paths: tuple[Path, ...], engine: str | None) -> None:
    """Open the desktop viewer: images, folders, predictions and heatmaps.

    Images and folders given are opened at start: one image is shown, a folder or several
    paths are classified into the results list.

    Research use only; not for diagnosis.
    """
    try:
        import tkinter
    except ImportError:
        raise click.ClickException(
            "the desktop viewer needs Python's tkinter, which this Python lacks (Debian/Ubuntu: "
            "apt install python3-tk; pyenv: install tk-dev and rebuild Python)."
        ) from None
    try:
        root = tkinter.Tk(className="histolens")
    except tkinter.TclError as exc:
        raise click.ClickException(
            f"no display available ({exc}); run it on a desktop, or under xvfb-run."
        ) from None
    from histolens.gui.app import run_app

    run_app(checkpoint, root, paths, engine=engine)
