"""``histolens train`` through the CLI: the options a user types reach the run, and a mistyped
one is one clear error."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from histolens.checkpoint.io import read_metadata
from histolens.cli.commands import main
from histolens.data.splits import load_split_csv
from histolens.inference.predictor import Predictor

# The MLP head on a held-out split (its threshold is chosen on the val patients), one epoch.
FAST = [
    "--backbone", "test_resnet", "--pretrained", "none", "--cv-folds", "0", "--head", "mlp",
    "--epochs", "1", "--batch-size", "8", "--stain-norm", "none", "--quiet",
    "--val-fraction", "0.25", "--test-fraction", "0.25",
]  # fmt: skip


def _train(synth_small, run, *flags: str):
    result = CliRunner().invoke(
        main, ["train", "--data", str(synth_small), "--out", str(run), *FAST, *flags]
    )
    assert result.exit_code == 0, result.output
    return read_metadata(run)


def test_input_size_and_a_fixed_threshold_reach_the_checkpoint(synth_small, tmp_path):
    meta = _train(
        synth_small, tmp_path / "run", "--input-size", "64x96", "--threshold-method", "fixed"
    )
    assert meta.preprocess.input_size == (64, 96)
    assert Predictor.from_checkpoint(tmp_path / "run").preprocess.input_size == (64, 96)
    assert (meta.threshold_method, meta.threshold) == ("fixed", 0.5)


def test_a_target_sensitivity_threshold_keeps_every_val_malignant_image(synth_small, tmp_path):
    run = tmp_path / "run"
    meta = _train(
        synth_small, run, "--input-size", "64x96", "--threshold-method", "sensitivity",
        "--target-sensitivity", "1.0",
    )  # fmt: skip
    assert meta.threshold_method == "sensitivity"
    assert meta.config["train"]["target_sensitivity"] == 1.0
    val = [r for r in load_split_csv(run / "split.csv").val if r.label == "malignant"]
    assert val
    preds, _ = Predictor.from_checkpoint(run).predict_paths([r.path for r in val])
    # Sensitivity 1 on the val patients: the highest such threshold is their lowest
    # probability (recomputed here in other batches: float32 rounding, far below 1e-5).
    assert meta.threshold == pytest.approx(min(p.positive_probability for p in preds), abs=1e-5)


@pytest.mark.parametrize("size", ["294", "294x448x3", "wide"])
def test_an_input_size_that_is_not_height_x_width_is_refused(synth_small, tmp_path, size):
    result = CliRunner().invoke(
        main,
        ["train", "--data", str(synth_small), "--out", str(tmp_path / "r"), "--input-size", size],
    )
    assert result.exit_code == 2
    assert f"'{size}' is not HEIGHTxWIDTH (e.g. 294x448) or 'pretrained'" in result.output
    assert not (tmp_path / "r").exists()


def test_an_input_size_out_of_range_is_one_line(synth_small, tmp_path):
    result = CliRunner().invoke(
        main,
        ["train", "--data", str(synth_small), "--out", str(tmp_path / "r"), "--input-size", "8x8"],
    )
    assert result.exit_code == 1
    assert result.output.startswith("error: input_size must be (height, width) between 32")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_train_needs_data_or_a_run_to_resume(tmp_path):
    result = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "give --data PATH (or --resume RUN_DIR)." in result.output
    assert not (tmp_path / "r").exists()


def test_ctrl_c_stops_training_with_130_and_says_how_to_resume(synth_small, tmp_path, monkeypatch):
    import histolens.training.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(histolens.training.runner, "train", interrupted)
    result = CliRunner().invoke(main, ["train", "--data", str(synth_small), "--out", str(tmp_path)])
    assert result.exit_code == 130
    assert result.output.strip() == (
        "interrupted; the last good checkpoint is intact (train --resume RUN_DIR continues)."
    )
