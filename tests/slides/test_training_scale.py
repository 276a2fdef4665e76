"""The training images' scale (``--mpp`` at training): stored in the checkpoint, used by slides."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

from histolens.checkpoint.metadata import CheckpointMetadata
from histolens.config import RunConfig
from histolens.data.records import Dataset, ImageRecord
from histolens.errors import CheckpointError, ConfigError
from histolens.slides.scale import training_scale
from histolens.training.common import image_size


def test_recorded_training_scale_comes_before_the_magnification_table():
    # 1000 x 800 px images at 0.25 um/px cover 250 x 200 um, whatever the magnification says.
    scale = training_scale((294, 448), "40", image_mpp=0.25, image_size=(1000, 800))
    assert scale.field_um == pytest.approx((250.0, 200.0))
    assert "--mpp" in scale.source
    assert scale.level0_size(0.5) == (500, 400)
    # Without a recorded size, the image is taken to be the input itself.
    assert training_scale((224, 224), "all", image_mpp=0.5).field_um == (112.0, 112.0)
    # --tile-mpp still overrides it.
    assert training_scale((224, 224), "40", tile_mpp=1.0, image_mpp=0.25).field_um == (224, 224)


def test_checkpoint_metadata_keeps_the_training_scale_and_old_files_load(tiny_checkpoint):
    from histolens.checkpoint.io import load_checkpoint

    _, meta = load_checkpoint(tiny_checkpoint)
    assert meta.training_mpp is None and meta.training_image_size is None  # an older file
    scaled = dataclasses.replace(meta, training_mpp=0.5, training_image_size=(700, 460))
    back = CheckpointMetadata.from_dict(scaled.to_dict())
    assert back.training_mpp == 0.5 and back.training_image_size == (700, 460)
    legacy = {k: v for k, v in meta.to_dict().items() if not k.startswith("training_")}
    assert CheckpointMetadata.from_dict(legacy).training_mpp is None
    with pytest.raises(CheckpointError, match="training_mpp"):
        CheckpointMetadata.from_dict({**scaled.to_dict(), "training_mpp": -1})
    with pytest.raises(CheckpointError, match="training_image_size"):
        CheckpointMetadata.from_dict({**scaled.to_dict(), "training_image_size": [700]})


def test_slide_run_tiles_at_the_checkpoint_training_scale(tmp_path, tiny_checkpoint):
    from histolens.inference.predictor import Predictor
    from histolens.slides.predict import SlideRun

    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    h, w = predictor.preprocess.input_size
    predictor.metadata = dataclasses.replace(
        predictor.metadata, magnification="400", training_mpp=0.5, training_image_size=(640, 480)
    )
    run = SlideRun(predictor, tmp_path, progress=False)
    assert run.scale.field_um == pytest.approx((320.0, 240.0))
    assert run.scale.input_size == (w, h)


def test_mpp_at_training_is_validated_and_the_image_size_measured(tmp_path):
    assert RunConfig().override({"data.mpp": 0.5}).data.mpp == 0.5
    assert RunConfig().data.mpp is None
    with pytest.raises(ConfigError, match="--mpp"):
        RunConfig().override({"data.mpp": 0})
    records = []
    for i, size in enumerate([(700, 460), (700, 460), (640, 480)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", size).save(path)
        records.append(ImageRecord(str(path), "benign"))
    records.append(ImageRecord(str(tmp_path / "missing.png"), "benign"))
    assert image_size(Dataset(str(tmp_path), "folder", records)) == (700, 460)
    assert image_size(Dataset(str(tmp_path), "folder", records[3:])) is None
