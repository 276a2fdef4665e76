"""``histolens gui``: the desktop viewer. Tk and torch are imported only when it runs."""

from __future__ import annotations

from pathlib import Path

import click

from histolens.cli.options import engine_option, microns_option

__all__ = ["gui_command"]


@click.command("gui")
@click.option(
    "--checkpoint",
    "-c",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Checkpoint file or run folder to load at start (File > Open checkpoint changes it).",
)
@click.option(
    "--slide",
    "slides",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="Whole-slide image (SVS, NDPI, MRXS, tiled TIFF, ...; or a PNG/JPEG with --mpp) to "
    "open in a slide window; analysed at once when a checkpoint is given. Repeatable.",
)
@microns_option(
    "--mpp", "Microns per level-0 pixel of the --slide files, where they lack it or it is wrong."
)
@microns_option(
    "--tile-mpp",
    "Microns per pixel of the tiles a slide analysis scores (default: the checkpoint's).",
)
@click.option(
    "--score-class",
    default=None,
    help="Class whose probability a slide heatmap shows (needed for a multi-class checkpoint).",
)
@click.argument(
    "paths",
    nargs=-1,
    metavar="[IMAGE_OR_FOLDER]...",
    type=click.Path(exists=True, path_type=Path),
)
@engine_option()
def gui_command(
    checkpoint: Path | None,
    slides: tuple[Path, ...],
    mpp: float | None,
    tile_mpp: float | None,
    score_class: str | None,
    paths: tuple[Path, ...],
    engine: str | None,
) -> None:
    """Open the desktop viewer: images, folders, slides, predictions and heatmaps.

    Images and folders given are opened at start: one image is shown, a folder or several
    paths are classified into the results list. Each --slide opens in a slide window with its
    tile heatmap and tissue mask (File > Open slide... opens more).

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
    from histolens.gui.slide_window import SlideRequest
    from histolens.slides.predict import SlideOptions

    options = SlideOptions(tile_mpp=tile_mpp, score_class=score_class)
    # The options apply to slides opened later from the menu too.
    run_app(checkpoint, root, paths, SlideRequest(slides, mpp, options), engine=engine)
