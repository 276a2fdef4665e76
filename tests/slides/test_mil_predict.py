"""``histolens predict`` with a MIL checkpoint: slides and feature bags in, the slide's class,
calibrated probability, prediction set and attention heatmap out; mismatches refused."""

from __future__ import annotations

import csv
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from histolens.cli.commands import main

FAST = ["--tile-mpp", "1.0", "--batch-size", "4", "--quiet", "--workers", "0"]


@pytest.fixture(scope="module")
def mil_setup(tmp_path_factory, tiny_checkpoint, small_slides):
    """Bags of the two small slides, and a MIL checkpoint over their features whose decision
    was fitted on made-up out-of-fold logits: (bags folder, MIL checkpoint)."""
    from histolens.training.mil import MilConfig, build_mil_model
    from histolens.training.mil_data import read_bag
    from histolens.training.mil_decision import fit_mil_decision
    from histolens.training.mil_outputs import feature_source
    from histolens.training.mil_run import MIL_SCHEMA, MIL_SCHEMA_VERSION, save_mil

    tmp = tmp_path_factory.mktemp("milpredict")
    out = tmp / "bags"
    args = ["slide", "features", str(tiny_checkpoint), str(small_slides), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, *FAST])
    assert result.exit_code == 0, result.output
    bags = [read_bag(out / "h5" / f"slide{i}.h5") for i in range(2)]
    features = feature_source(bags)
    assert features["checkpoint"] == str(tiny_checkpoint.resolve())
    assert features["tiling"]["tile_mpp"] == pytest.approx(1.0)
    y = np.arange(20) % 2
    logits = np.where(y == 1, 2.0, -2.0) + np.random.default_rng(0).normal(0, 1.5, 20)
    patients = [f"p{i}" for i in range(20)]
    decision = fit_mil_decision(logits, y, patients, ("benign", "malignant"), "youden", 0.2, [])
    config = MilConfig(hidden=8, attention=4)
    meta = {
        "schema": MIL_SCHEMA, "version": MIL_SCHEMA_VERSION,
        "feature_dim": features["feature_dim"], "features": features,
        "class_names": ["benign", "malignant"], "positive_class": "malignant",
        "config": config.to_dict(), "decision": decision.to_dict(),
    }  # fmt: skip
    model = build_mil_model(features["feature_dim"], config)
    return out, save_mil(tmp / "mil.safetensors", model, meta), decision


def _rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_predict_a_slide_with_a_mil_checkpoint(tmp_path, mil_setup, small_slides):
    _, ckpt, decision = mil_setup
    slide = small_slides / "slide0.tiff"
    out = tmp_path / "p.csv"
    args = ["predict", str(ckpt), str(slide), "--out", str(out), "--workers", "1", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (row,) = _rows(out)
    assert row["path"] == str(slide.resolve()) and row["prediction"] in ("benign", "malignant")
    p = float(row["p_malignant"])
    assert row["prediction"] == ("malignant" if p >= decision.threshold else "benign")
    assert row["prediction"] in row["prediction_set"].split(";")
    assert int(row["tiles"]) > 5
    heatmaps = tmp_path / "p" / "heatmaps"
    # the attention heatmap beside the tile-probability heatmap of the same slide
    assert (heatmaps / "slide0.png").is_file() and (heatmaps / "slide0.attention.png").is_file()
    assert row["attention_heatmap"] == str(heatmaps / "slide0.attention.png")
    assert "slide0: " in result.output and "1 slide(s) predicted" in result.output


def test_predict_a_bag_and_refuse_mismatches(tmp_path, mil_setup, tiny_checkpoint):
    bags, ckpt, _ = mil_setup
    bag = bags / "h5" / "slide1.h5"
    out = tmp_path / "b.csv"
    result = CliRunner().invoke(main, ["predict", str(ckpt), str(bag), "--out", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = _rows(out)
    assert row["path"] == str(bag) and 0.0 <= float(row["probability"]) <= 1.0
    # the slide's summary beside the bag names the slide file: the heatmap is drawn
    assert (tmp_path / "b" / "heatmaps" / "slide1.attention.png").is_file()

    # A feature bag given to a tile checkpoint.
    result = CliRunner().invoke(main, ["predict", str(tiny_checkpoint), str(bag)])
    assert result.exit_code == 1
    assert "is a feature bag: predict it with a MIL checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1

    # A bag of another tile checkpoint (its fingerprint differs).
    other = tmp_path / "other.h5"
    shutil.copy(bag, other)
    with h5py.File(other, "r+") as f:
        f.attrs["checkpoint_fingerprint"] = "0" * 64
    result = CliRunner().invoke(main, ["predict", str(ckpt), str(other)])
    assert result.exit_code == 1
    assert "extracted by another tile checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_predict_refuses_another_tile_checkpoint_for_slides(tmp_path, mil_setup, small_slides):
    from histolens.testing import make_checkpoint

    _, ckpt, _ = mil_setup
    other = make_checkpoint(tmp_path / "other.safetensors", seed=7)
    args = ["predict", str(ckpt), str(small_slides / "slide0.tiff"), "--features-from", str(other)]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 1
    assert "is not the tile checkpoint whose features this MIL model was trained on" in (
        result.output
    )
    assert not (tmp_path / "x.csv").exists()
