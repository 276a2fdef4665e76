"""Predictor: rebuilt from a run, predicts files (skipping unreadable ones), decides at the
stored threshold with the stored temperature."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from histolens.checkpoint.io import BEST_CHECKPOINT, load_checkpoint, save_checkpoint
from histolens.errors import CheckpointError
from histolens.inference.predictor import Predictor, probabilities_from_logits
from histolens.testing import make_checkpoint, make_tissue_image

THRESHOLD, TEMPERATURE = 0.3, 2.0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding a tiny checkpoint with a non-default threshold and temperature."""
    root = tmp_path_factory.mktemp("predictor")
    ckpt = make_checkpoint(root / "c.safetensors", threshold=THRESHOLD, temperature=TEMPERATURE)
    run = root / "run"
    run.mkdir()
    shutil.copy(ckpt, run / BEST_CHECKPOINT)
    return run


@pytest.fixture(scope="module")
def predictor(run_dir) -> Predictor:
    return Predictor.from_checkpoint(run_dir)


def test_from_checkpoint_rebuilds_the_run(predictor, run_dir):
    assert predictor.class_names == ("benign", "malignant")
    assert (predictor.threshold, predictor.temperature) == (THRESHOLD, TEMPERATURE)
    assert predictor.source == str(run_dir / BEST_CHECKPOINT)
    assert predictor.backbone_name == "test_resnet" and predictor.positive_class == "malignant"
    assert not predictor.model.training
    state, meta = load_checkpoint(run_dir)
    assert predictor.metadata == meta and predictor.preprocess == meta.preprocess
    head = next(k for k in state if k.startswith("head."))
    assert torch.equal(predictor.model.state_dict()[head], state[head])


def test_a_checkpoint_of_another_model_is_refused(tmp_path, run_dir):
    state, meta = load_checkpoint(run_dir)
    del state[next(k for k in state if k.startswith("head.") and k.endswith(".weight"))]
    short = save_checkpoint(tmp_path / "short.safetensors", state, meta)
    with pytest.raises(CheckpointError, match=r"does not fit a test_resnet model \(1 missing"):
        Predictor.from_checkpoint(short)
    from safetensors.torch import save_file

    nameless = tmp_path / "nameless.safetensors"
    header = {k: v for k, v in meta.to_dict().items() if k != "class_names"}
    save_file(state, str(nameless), metadata={"histolens": json.dumps(header)})
    with pytest.raises(CheckpointError, match="nameless.safetensors lacks the metadata field 'cl"):
        Predictor.from_checkpoint(nameless)


def test_predict_paths_predicts_good_files_and_skips_bad_ones(predictor, tmp_path):
    good = []
    for i in range(3):
        good.append(tmp_path / f"good{i}.png")
        make_tissue_image((120, 80), seed=i, dark=i == 1).save(good[-1])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = tmp_path / "missing.png"
    paths = [good[0], corrupt, good[1], missing, good[2]]
    predictions, skipped = predictor.predict_paths(paths, batch_size=2)
    assert [p.path for p in predictions] == [str(g) for g in good]
    assert {s.path for s in skipped} == {str(corrupt), str(missing)}
    assert all(s.reason for s in skipped)
    for p in predictions:
        assert set(p.scores) == {"benign", "malignant"}
        assert sum(p.scores.values()) == pytest.approx(1.0)
        assert p.probability == p.scores[p.label]
        assert p.label == ("malignant" if p.positive_probability >= THRESHOLD else "benign")
    # Batched file prediction and in-memory prediction of the same images agree.
    from histolens.data.imageio import load_rgb

    in_memory = predictor.predict_images([load_rgb(g) for g in good])
    for a, b in zip(predictions, in_memory, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-5)


def test_decide_applies_the_threshold_inclusively(predictor):
    at = predictor.decide(np.array([1 - THRESHOLD, THRESHOLD]))
    below = predictor.decide(np.array([1 - THRESHOLD + 1e-3, THRESHOLD - 1e-3]))
    assert (at.label, below.label) == ("malignant", "benign")
    assert at.probability == pytest.approx(THRESHOLD)
    assert below.probability == pytest.approx(1 - THRESHOLD + 1e-3)
    assert at.threshold == THRESHOLD and at.positive_probability == pytest.approx(THRESHOLD)
    far = predictor.decide(np.array([0.05, 0.95]))
    assert far.label == "malignant"
    # No conformal calibration in this checkpoint: "review" means close to the threshold.
    assert at.uncertain and below.uncertain and not far.uncertain


def test_probabilities_use_the_stored_temperature(predictor):
    logits = torch.tensor([[2.0], [-1.0]])
    probs = predictor.probabilities(logits)
    expected = torch.sigmoid(logits[:, 0] / TEMPERATURE).numpy()
    np.testing.assert_allclose(probs[:, 1], expected, rtol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    softmax = probabilities_from_logits(torch.tensor([[1.0, 3.0, 0.0]]), 2.0)
    np.testing.assert_allclose(softmax[0], torch.softmax(torch.tensor([0.5, 1.5, 0.0]), 0))


def test_a_multiclass_decision_is_the_most_probable_class(tmp_path):
    classes = ("adenosis", "fibroadenoma", "ductal_carcinoma")
    p = Predictor.from_checkpoint(make_checkpoint(tmp_path / "m.safetensors", class_names=classes))
    clear = p.decide(np.array([0.1, 0.7, 0.2]))
    assert (clear.label, clear.threshold, clear.positive_probability) == (
        "fibroadenoma",
        None,
        None,
    )
    close = p.decide(np.array([0.45, 0.1, 0.45 + 1e-3]))
    assert close.label == "ductal_carcinoma"
    assert close.uncertain and not clear.uncertain
