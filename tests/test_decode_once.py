"""``histolens train`` decodes each image once: the stain reference's images are held for the
feature pass, the input checks read statistics taken there, and the engine gets NCHW inputs."""

from __future__ import annotations

import csv
from collections import Counter

import torch
from PIL import Image

from histolens.models.transforms import Preprocess
from histolens.testing import make_tissue_image, tiny_config

PRE = Preprocess((32, 48), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_resize_gives_contiguous_channels_first_pixels():
    import numpy as np

    image = make_tissue_image(seed=1)
    x = PRE.resize(image)
    assert x.shape == (3, 32, 48) and x.dtype == torch.uint8 and x.is_contiguous()
    expected = np.asarray(image.resize((48, 32), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert torch.equal(x, torch.from_numpy(expected.copy()))


def test_a_held_image_is_used_once_instead_of_decoding(tmp_path, monkeypatch):
    import histolens.models.pipeline as pipeline

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        make_tissue_image(seed=i).save(paths[-1])
    decoded = []
    real = pipeline._decode
    monkeypatch.setattr(pipeline, "_decode", lambda pre, p: decoded.append(p) or real(pre, p))
    stream = pipeline.ImageStream(PRE)
    marker = torch.full((3, 32, 48), 7, dtype=torch.uint8)  # not what the file holds
    stream.hold({paths[1]: marker})
    first = torch.cat([b for _, b in stream.batches(paths, 2)])
    assert decoded == [paths[0], paths[2]]
    assert torch.equal(first[1], marker)
    second = torch.cat([b for _, b in stream.batches(paths, 2)])  # held once: decoded now
    assert decoded[2:] == paths and not torch.equal(second[1], marker)
    stream.hold({paths[0]: marker})
    stream.hold({})  # dropped: the file is read
    assert not torch.equal(stream.each(paths[:1])[0], marker)


def test_engine_inputs_are_nchw_and_equal_to_the_channels_last_ones():
    from histolens.models.pipeline import InputPipeline

    images = torch.stack([PRE.resize(make_tissue_image(seed=i)) for i in range(2)])
    torch_inputs = InputPipeline(PRE).eval_inputs(images)
    engine_inputs = InputPipeline(PRE, channels_last=False).eval_inputs(images)
    assert torch_inputs.is_contiguous(memory_format=torch.channels_last)
    assert engine_inputs.is_contiguous()
    assert torch.equal(engine_inputs, torch_inputs)  # the same numbers, only the layout differs


def test_training_decodes_each_image_once_and_still_flags_a_blank_one(
    synth_small, tmp_path, monkeypatch
):
    import shutil

    import histolens.models.pipeline as pipeline
    from histolens.training.runner import train

    data = tmp_path / "data"
    shutil.copytree(synth_small, data, ignore=shutil.ignore_patterns("masks", "contact_sheet*"))
    benign = sorted(data.glob("*X/benign/*.png"))[0]
    blank = benign.with_name(benign.stem[:-3] + "099.png")  # a slide of the same patient
    Image.new("RGB", (176, 120), (250, 250, 250)).save(blank)
    counts: Counter = Counter()
    decode, image = pipeline._decode, pipeline.ImageStream.image
    monkeypatch.setattr(pipeline, "_decode", lambda pre, p: counts.update([p]) or decode(pre, p))
    monkeypatch.setattr(
        pipeline.ImageStream, "image", lambda self, p: counts.update([p]) or image(self, p)
    )
    cfg = tiny_config(
        data,
        **{
            "model.head": "linear",
            "train.cv_folds": 3,
            "model.input_size": (120, 176),
            "train.probe_cs": (0.01,),
            "stain.method": "macenko",
        },
    )
    train(cfg, tmp_path / "run", progress=False)
    n_images = len(list(data.glob("*X/*/*.png")))
    assert len(counts) == n_images and set(counts.values()) == {1}
    with open(tmp_path / "run" / "evaluation" / "predictions.csv", newline="") as fh:
        reasons = {r["path"]: r["ood_reason"] for r in csv.DictReader(fh)}
    assert "nearly uniform" in reasons[str(blank)]
    assert sum(bool(r) for r in reasons.values()) < n_images  # the tissue is not all flagged
