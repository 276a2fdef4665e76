"""Stain normalisation inside training and prediction: one reference, applied everywhere."""

import torch

from histolens.checkpoint.io import read_metadata
from histolens.data.imageio import load_rgb
from histolens.inference.predictor import Predictor
from histolens.stain.normalize import StainNormalizer
from histolens.testing import tiny_config
from histolens.training.runner import train


def test_reference_saved_in_checkpoint_is_applied_by_predictor(synth_small, tmp_path):
    cfg = tiny_config(
        synth_small, **{"stain.method": "macenko", "train.epochs": 1, "augment.stain": True}
    )
    result = train(cfg, tmp_path / "run", progress=False, write_outputs=False)
    meta = read_metadata(tmp_path / "run")
    assert meta.stain_method == "macenko"
    assert meta.stain_reference.startswith("median of ")
    train_paths = [
        line.split(",")[1]
        for line in (tmp_path / "run" / "split.csv").read_text().splitlines()[1:]
        if line.startswith("train,")
    ]
    predictor = Predictor.from_checkpoint(tmp_path / "run")
    assert predictor.stain is not None
    assert predictor.stain.to_dict() == meta.stain
    # The reference is the median stain of the training images: refitting reproduces it.
    refit = StainNormalizer("macenko").fit_median(
        [predictor.preprocess.resize(load_rgb(p)) for p in train_paths]
    )
    torch.testing.assert_close(refit.stain_matrix, predictor.stain.stain_matrix)
    ref_path = train_paths[0]
    # The predictor's input is the normalised image: compare with normalising by hand.
    img = predictor.preprocess.resize(load_rgb(ref_path)).unsqueeze(0)
    by_hand, _ = StainNormalizer.from_dict(meta.stain)(img.float() / 255)
    expected = predictor.preprocess.normalize(by_hand)
    torch.testing.assert_close(predictor.to_input(img), expected)
    assert any("fell back" in n for n in result.notes)


def test_white_tile_prediction_falls_back_without_nan(synth_small, tmp_path):
    from PIL import Image

    cfg = tiny_config(synth_small, **{"stain.method": "reinhard", "train.epochs": 1})
    train(cfg, tmp_path / "run", progress=False, write_outputs=False)
    predictor = Predictor.from_checkpoint(tmp_path / "run")
    pred = predictor.predict_image(Image.new("RGB", (300, 200), (250, 250, 250)))
    assert 0.0 <= pred.probability <= 1.0
    assert predictor.stain.fallbacks >= 1
