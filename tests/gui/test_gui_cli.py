"""``histolens gui``: instant help, and one clear line when there is no display."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from histolens.gui.cli import gui_command


def test_help_is_instant_and_says_research_use_only():
    result = CliRunner().invoke(gui_command, ["--help"])
    assert result.exit_code == 0
    assert "--checkpoint" in result.output and "not for diagnosis" in result.output
    # --help must not pull in Tk, torch or the presenter.
    code = (
        "import sys; from click.testing import CliRunner; from histolens.gui.cli import "
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
