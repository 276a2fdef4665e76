"""Synthetic slides with planted lesions (data synth --slides), the coverage measure, and slide
prediction through an ONNX export."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from histolens.cli.commands import main
from histolens.slides.synthetic import lesion_coverage


def test_coverage_counts_lesion_and_other_tissue():
    tissue = np.zeros((8, 8), bool)
    tissue[:, :6] = True  # 48 px of tissue
    lesion = np.zeros((8, 8), bool)
    lesion[:4, :4] = True  # 16 px of lesion, 32 px of other tissue
    coords = np.array([[0, 0], [64, 0], [0, 64], [96, 96]])  # level-0, step 16 -> 4-px tiles
    flagged = np.array([True, True, False, False])
    hit, other = lesion_coverage(coords, (64, 64), flagged, tissue, lesion, 16)
    assert hit == 1.0  # the first tile is the lesion
    # The second tile covers columns 4-7 of rows 0-3: columns 4 and 5 are other tissue (8 px).
    assert other == pytest.approx(8 / 32)


def test_data_synth_slides_writes_slides_with_truth(tmp_path):
    r = CliRunner().invoke(
        main, ["data", "synth", str(tmp_path), "--slides", "2", "--slide-size", "1536x1024"]
    )
    assert r.exit_code == 0, r.output
    folder = tmp_path / "slides"
    rows = list(csv.DictReader((folder / "slides.csv").read_text().splitlines()))
    assert [row["slide"] for row in rows] == ["synthetic_000.tiff", "synthetic_001.tiff"]
    lesion = np.asarray(Image.open(folder / "masks" / "synthetic_000.lesion.png")) > 0
    tissue = np.asarray(Image.open(folder / "masks" / "synthetic_000.tissue.png")) > 0
    assert lesion.shape == (64, 96)  # one pixel per 16 level-0 pixels
    assert lesion.any() and not (lesion & ~tissue).any()
    assert float(rows[0]["lesion_mm2"]) > 0
    # 400X default magnification: 0.25 um/px, as the scale table says.
    assert float(rows[0]["mpp"]) == 0.25


def test_coverage_command_on_predicted_synthetic_slides(tmp_path, tiny_checkpoint):
    CliRunner().invoke(
        main,
        [
            "data",
            "synth",
            str(tmp_path),
            "--slides",
            "1",
            "--slide-size",
            "1536x1536",
            "--magnification",
            "200",
        ],
    )
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        [
            "slide",
            "predict",
            str(tiny_checkpoint),
            str(tmp_path / "slides"),
            "--out",
            str(out),
            "--tile-mpp",
            "1.0",
            "--workers",
            "0",
            "--quiet",
            "--threshold",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["slide", "coverage", str(out), str(tmp_path / "slides")])
    assert r.exit_code == 0, r.output
    # Threshold 0 flags every scored tile: the lesion (well inside the tissue) is nearly all
    # covered, and so is the other tissue (tiles of less than half tissue at the edge are not).
    line = r.output.strip().splitlines()[0]
    lesion = float(line.split("lesion covered ")[1].split("%")[0])
    assert lesion > 80


def test_slide_predict_through_an_onnx_export(tmp_path, tiny_checkpoint, small_slides):
    from histolens.testing import unverified_onnx_export

    unverified_onnx_export(tiny_checkpoint, tmp_path / "tiny.onnx")
    outs = {}
    for name, ckpt in (("torch", tiny_checkpoint), ("onnx", tmp_path / "tiny.onnx")):
        outs[name] = tmp_path / name
        r = CliRunner().invoke(
            main,
            [
                "slide",
                "predict",
                str(ckpt),
                str(small_slides / "slide1.tiff"),
                "--out",
                str(outs[name]),
                "--tile-mpp",
                "1.0",
                "--workers",
                "0",
                "--quiet",
            ],
        )
        assert r.exit_code == 0, r.output
    with (
        h5py.File(outs["torch"] / "h5" / "slide1.h5") as a,
        h5py.File(outs["onnx"] / "h5" / "slide1.h5") as b,
    ):
        np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
        # ONNX Runtime and torch kernels differ in float32 rounding only (~1e-6 relative on a
        # tiny net); 1e-4 on a probability leaves room for any x86 kernel choice.
        np.testing.assert_allclose(a["score"][:], b["score"][:], atol=1e-4)
