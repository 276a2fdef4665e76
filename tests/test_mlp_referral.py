"""The MLP head (Lightning path) stores prediction sets and the feature guard, as the probe does."""

import csv

import pytest
from PIL import Image
from safetensors import safe_open

from histolens.checkpoint.io import read_metadata
from histolens.inference.predictor import Predictor
from histolens.testing import tiny_config
from histolens.training.runner import train


def _split(run):
    """{split name: [(path, group)]} of a run's split.csv."""
    parts: dict[str, list[tuple[str, str]]] = {}
    with open(run / "split.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            parts.setdefault(row["split"], []).append((row["path"], row["group"]))
    return parts


@pytest.fixture(scope="module")
def uncached_run(synth_small, tmp_path_factory):
    """A tiny MLP run whose guard features come from the model (feature cache off)."""
    run = tmp_path_factory.mktemp("mlp-refer") / "run"
    cfg = tiny_config(synth_small, **{"train.alpha": 0.5, "train.feature_cache": False})
    return run, train(cfg, run, progress=False)


def test_mlp_run_stores_the_validation_patients_calibration_and_guard(uncached_run):
    run, result = uncached_run
    parts = _split(run)
    assert parts["val"] and parts["test"]  # tiny_config holds validation patients out
    predictor = Predictor.from_checkpoint(run)
    assert predictor.conformal is not None and predictor.guard is not None
    assert predictor.conformal.alpha == 0.5 and predictor.refer_alpha == 0.5
    assert len(predictor.conformal.scores) == len(parts["val"])
    assert predictor.conformal.n_patients == len({g for _, g in parts["val"]})
    features = predictor.guard.features
    assert features is not None and features.threshold > 0
    assert features.n_images == len(parts["train"]) + len(parts["val"])
    dim = predictor.model.feature_dim
    with safe_open(str(run / "best.safetensors"), framework="pt") as fh:
        assert tuple(fh.get_tensor("ood.precision").shape) == (dim, dim)
    assert not any("No validation images" in n for n in result.notes)


def test_mlp_predictions_have_sets_and_a_white_tile_is_flagged(uncached_run):
    run, _ = uncached_run
    predictor = Predictor.from_checkpoint(run)
    tile = Image.open(_split(run)["train"][0][0]).convert("RGB")
    real, white = predictor.predict_images([tile, Image.new("RGB", tile.size, "white")])
    assert real.prediction_set and real.label in real.prediction_set
    assert real.alpha == 0.5 and not real.ood
    assert white.ood and white.refer and "nearly uniform" in white.ood_reason
    assert white.refer_reason.startswith("not like the training images: ")


def test_mlp_evaluation_reports_test_coverage(uncached_run):
    run, result = uncached_run
    refer = result.metrics.refer
    assert refer.alpha == 0.5 and "validation patients" in refer.method
    assert 0 <= refer.coverage <= 1
    with open(run / "evaluation" / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(_split(run)["test"])
    assert all(r["prediction"] in r["prediction_set"].split(";") for r in rows)


def test_cached_mlp_run_stores_both_and_notes_an_unreachable_alpha(trained_run):
    run, result = trained_run  # feature cache on, the default alpha 0.1
    meta = read_metadata(run)
    assert meta.conformal["alpha"] == 0.1 and meta.ood["features"]["threshold"] > 0
    assert meta.conformal["n_patients"] < 9  # too few for alpha 0.1: 1 / (P + 1) > 0.1
    assert any("cannot guarantee alpha 0.1" in n for n in result.notes)


def test_mlp_run_without_validation_patients_keeps_the_cheap_checks(synth_small, tmp_path):
    run = tmp_path / "run"
    result = train(tiny_config(synth_small, **{"data.val_fraction": 0.0}), run, progress=False)
    predictor = Predictor.from_checkpoint(run)
    assert predictor.conformal is None
    assert predictor.guard is not None and predictor.guard.features is None
    assert any("No validation images to calibrate on" in n for n in result.notes)
    white = predictor.predict_image(Image.new("RGB", (176, 120), "white"))
    assert white.ood and white.prediction_set == ()
