"""``histolens gui``: instant help, one clear line when there is no display, paths opened."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner
from gui_helpers import pump

from histolens.cli.gui import gui_command


def test_help_is_instant_and_says_research_use_only():
    result = CliRunner().invoke(gui_command, ["--help"])
    assert result.exit_code == 0
    assert "--checkpoint" in result.output and "not for diagnosis" in result.output
    assert "[IMAGE_OR_FOLDER]..." in result.output
    # --help must not pull in Tk, torch or the presenter.
    code = (
        "import sys; from click.testing import CliRunner; from histolens.cli.gui import "
        "gui_command; CliRunner().invoke(gui_command, ['--help']); "
        "print(sorted(m for m in ('torch', 'tkinter', 'histolens.gui.app') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_display_is_one_line_and_nonzero_exit(checkpoint):
    result = CliRunner().invoke(
        gui_command,
        ["--checkpoint", str(checkpoint)],
        env={"DISPLAY": None, "WAYLAND_DISPLAY": None},
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: no display available (")
    assert "xvfb-run" in lines[0]


def test_missing_checkpoint_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(gui_command, ["--checkpoint", str(tmp_path / "nope.safetensors")])
    assert result.exit_code == 2
    assert "does not exist" in result.output


@pytest.mark.gui
def test_images_and_folders_given_are_opened_at_start(
    xvfb_display, checkpoint, image_folder, image_path, monkeypatch
):
    """`histolens gui -c CKPT FOLDER IMAGE`: the window opens with both analysed as one batch."""
    import tkinter

    import histolens.gui.app as gui_app

    opened: list[gui_app.ViewerApp] = []

    class RecordedApp(gui_app.ViewerApp):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    def mainloop(root, n=0) -> None:  # runs until the batch is done instead of until closed
        presenter = opened[-1].presenter
        pump(root, lambda: len(presenter.results) == 7 and not presenter.busy, "the batch")

    monkeypatch.setattr(gui_app, "ViewerApp", RecordedApp)
    monkeypatch.setattr(tkinter.Tk, "mainloop", mainloop)
    result = CliRunner().invoke(
        gui_command, ["--checkpoint", str(checkpoint), str(image_folder), str(image_path)]
    )
    assert result.exit_code == 0, result.output
    [app] = opened
    try:
        assert app.presenter.model_info.backbone == "test_resnet"
        rows = {
            app.tree.set(iid, "file"): app.tree.set(iid, "review")
            for iid in app.tree.get_children()
        }
        assert set(rows) == {
            image_path.name,
            "slides/broken.png",
            *(f"slides/tile_{i}.png" for i in range(4)),
            "slides/patient_b/tile_9.png",
        }
        assert rows["slides/broken.png"] == "unreadable"
        assert str(app.status_text.cget("text")).startswith("Analysed 7 images:")
    finally:
        app.close()


def test_help_names_the_slide_options():
    result = CliRunner().invoke(gui_command, ["--help"])
    assert result.exit_code == 0
    for option in ("--slide PATH", "--mpp FLOAT", "--tile-mpp FLOAT", "--score-class TEXT"):
        assert option in result.output


def test_a_slide_that_does_not_exist_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(gui_command, ["--slide", str(tmp_path / "nope.svs")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
