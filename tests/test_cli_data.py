"""``histolens data`` through the CLI: ``data synth`` writes the practice dataset it says."""

from __future__ import annotations

import csv

from click.testing import CliRunner
from PIL import Image

from histolens.cli.commands import main
from histolens.data.imagefiles import images_under


def test_data_synth_writes_the_dataset_and_logs_plain_lines(tmp_path):
    out = tmp_path / "synth"
    args = ["data", "synth", str(out), "--n", "12", "--seed", "1", "--magnification", "100"]
    result = CliRunner().invoke(main, [*args, "--patients", "4"])
    assert result.exit_code == 0, result.output
    assert f"Wrote 12 images of 4 patients to {out} in " in result.output
    rows = list(csv.DictReader((out / "manifest.csv").open(encoding="utf-8")))
    assert len(rows) == 12 and len({r["patient"] for r in rows}) == 4
    assert {r["magnification"] for r in rows} == {"100"}
    tiles = images_under(out / "100X")
    assert len(tiles) == 12 and Image.open(tiles[0]).size == (700, 460)
    assert len(list((out / "masks").rglob("*.png"))) > 0
    assert Image.open(out / "contact_sheet.png").mode == "RGB"
    # Not a terminal (a log file): plain lines, no carriage-return redraws of a bar.
    assert "\r" not in result.output
    progress = [line for line in result.output.splitlines() if line.startswith("synthesised ")]
    assert progress and progress[-1].startswith("synthesised 12/12 images, ")


def test_data_synth_refuses_too_few_images(tmp_path):
    result = CliRunner().invoke(main, ["data", "synth", str(tmp_path / "s"), "--n", "1"])
    assert result.exit_code == 2 and "1 is not in the range 2<=x<=100000" in result.output
    assert not (tmp_path / "s").exists()
