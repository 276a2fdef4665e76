"""Training on a tiny synthetic set with a tiny backbone (no download, a few seconds each)."""

import csv
import json

import numpy as np
import pytest
import torch

from histolens.checkpoint.io import HeadSpec, read_metadata
from histolens.config import RunConfig
from histolens.errors import CheckpointError, ConfigError
from histolens.inference.predictor import Predictor
from histolens.testing import tiny_config
from histolens.training.runner import train


def _cfg(data, **over):
    return tiny_config(data, **over)


def test_run_directory_is_complete(trained_run):
    run, result = trained_run
    for name in (
        "best.safetensors",
        "config.json",
        "split.csv",
        "features.safetensors",
        "lightning/last.ckpt",
        "report.html",
        "evaluation/predictions.csv",
        "evaluation/metrics.json",
        "evaluation/roc_pr.png",
        "evaluation/confusion_matrix.png",
        "evaluation/reliability.png",
        "evaluation/training_curves.png",
        "logs/version_0/metrics.csv",
    ):
        assert (run / name).exists(), name
    assert result.epochs_run == 2
    meta = read_metadata(run)
    assert meta.backbone == "test_resnet" and meta.task == "binary"
    assert meta.class_names == ("benign", "malignant")
    assert 0 < meta.threshold < 1 and meta.temperature > 0
    assert "roc_auc" in meta.metrics
    assert meta.run_config.train.epochs == 2
    assert meta.preprocess.input_size == (160, 160)
    assert meta.head == HeadSpec("mlp", (512, 256), (0.5, 0.3))  # the original head
    with open(run / "split.csv") as fh:
        rows = list(csv.DictReader(fh))
    sides = {}
    for r in rows:
        sides.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in sides.values())  # patient-disjoint


def test_checkpoint_reloads_with_identical_predictions(trained_run):
    run, _ = trained_run
    predictor = Predictor.from_checkpoint(run)
    with open(run / "evaluation" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    preds, skipped = predictor.predict_paths([r["path"] for r in rows])
    assert not skipped
    got = np.array([p.scores["malignant"] for p in preds])
    want = np.array([float(r["p_malignant"]) for r in rows])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [p.label for p in preds] == [r["prediction"] for r in rows]


def test_class_weights_are_balanced_and_applied(trained_run, synth_small):
    from histolens.training.runner import ClassifierModule

    run, _ = trained_run
    meta = read_metadata(run)
    w = meta.class_weights
    counts = meta.data.split["train"].classes
    n = sum(counts.values())
    assert w["benign"] == pytest.approx(n / (2 * counts["benign"]))
    predictor = Predictor.from_checkpoint(run)
    module = ClassifierModule(predictor.model, _cfg(synth_small), [3.0, 1.0], None, True)
    logits, y = torch.zeros(4, 1), torch.tensor([0, 0, 1, 1])
    weighted = module._loss(logits, y, weighted=True)
    plain = module._loss(logits, y, weighted=False)
    assert float(weighted) == pytest.approx(float(plain) * 2.0)  # mean of (3,3,1,1) weights


def test_resume_continues_from_saved_epoch(synth_small, tmp_path):
    run = tmp_path / "r"
    train(_cfg(synth_small, **{"train.epochs": 1}), run, progress=False, evaluate=False)
    first = read_metadata(run)
    result = train(RunConfig(), run, resume=True, epochs=3, progress=False, evaluate=False)
    assert result.epochs_run == 3
    assert result.first_epoch == 1  # the resumed run did epochs 2 and 3 only
    with open(run / "logs" / "version_0" / "metrics.csv") as fh:
        epochs = [int(r["epoch"]) for r in csv.DictReader(fh)]
    assert epochs == [0, 1, 2]  # one log, continued: the first epoch's row is kept
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 3
    assert first.backbone == "test_resnet"
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(_cfg(synth_small), run, progress=False)


def test_cached_views_are_the_views_live_training_sees(synth_small):
    """The feature cache holds exactly what an uncached epoch would feed the head."""
    from histolens.config import AugmentConfig
    from histolens.data.records import discover
    from histolens.models.backbones import get_backbone_spec
    from histolens.models.classifier import build_model
    from histolens.models.feature_cache import FeatureCache
    from histolens.models.pipeline import ImageBank, InputPipeline
    from histolens.models.transforms import Augmenter, resolve_preprocess

    model = build_model(get_backbone_spec("test_resnet"), 2, "none").eval()
    pre = resolve_preprocess(model.backbone)
    paths = [r.path for r in discover(synth_small).records[:6]]
    bank = ImageBank(paths, pre, progress=False)
    pipe = InputPipeline(pre, Augmenter(AugmentConfig()), None, seed=5)
    cache = FeatureCache.build(
        model, bank, pipe, paths, paths, 3, "fp", batch_size=4, progress=False
    )
    for view in range(3):
        order = list(reversed(paths))  # a different batch order must not matter
        with torch.no_grad():
            live = model.features(pipe.train_inputs(bank.stack(order), order, view))
        for p, f in zip(order, live, strict=True):
            torch.testing.assert_close(cache.views[p][view], f, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(cache.views[paths[0]][0], cache.views[paths[0]][1])


def test_uncached_training_runs(synth_small, tmp_path):
    result = train(
        _cfg(synth_small, **{"train.feature_cache": False, "train.epochs": 1}),
        tmp_path / "u",
        progress=False,
    )
    assert (tmp_path / "u" / "best.safetensors").exists()
    assert not (tmp_path / "u" / "features.safetensors").exists()
    assert result.metrics.image.n > 0


def test_unfreeze_trains_only_the_last_stages(synth_small, tmp_path):
    import lightning as L

    from histolens.checkpoint.io import load_checkpoint
    from histolens.models.backbones import get_backbone_spec
    from histolens.models.classifier import build_model

    cfg = _cfg(synth_small, **{"model.unfreeze": 1, "train.epochs": 1})
    train(cfg, tmp_path / "f", progress=False, evaluate=False)
    state, _ = load_checkpoint(tmp_path / "f")
    L.seed_everything(cfg.train.seed, verbose=False)  # train() initialises from this seed
    initial = build_model(get_backbone_spec("test_resnet"), 2, "none")
    trained = build_model(get_backbone_spec("test_resnet"), 2, "none")
    trained.load_state_dict(state)
    first_i, last_i = initial.backbone_stages()[0], initial.backbone_stages()[-1]
    first_t, last_t = trained.backbone_stages()[0], trained.backbone_stages()[-1]
    assert all(torch.equal(a, b) for a, b in zip(first_i, first_t, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(last_i, last_t, strict=True))


def test_corrupt_or_foreign_checkpoint(tmp_path, tiny_checkpoint):
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 50)
    with pytest.raises(CheckpointError, match="not a readable histolens checkpoint"):
        Predictor.from_checkpoint(tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not a histolens checkpoint"):
        Predictor.from_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="without best.safetensors"):
        Predictor.from_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "over",
    [
        {"model.head": "linear", "data.val_fraction": 0.0},  # streamed through the backbone
        {"model.unfreeze": 1, "train.epochs": 1},  # fine-tuning: images read every epoch
    ],
    ids=["probe", "fine-tune"],
)
def test_unreadable_images_are_skipped_and_listed(synth_small, tmp_path, over):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_small, data, ignore=shutil.ignore_patterns("manifest.csv"))
    broken = sorted((data / "400X" / "benign").glob("*.png"))[0]
    broken.write_bytes(b"\x89PNG truncated")
    run = tmp_path / "run"
    result = train(_cfg(data, **over), run, progress=False, write_outputs=False)
    with open(run / "skipped.csv") as fh:
        reasons = {r["path"]: r["reason"] for r in csv.DictReader(fh)}
    assert reasons[str(broken)]  # with the files discovery left out (the contact sheet)
    assert any("1 unreadable image(s) skipped" in n for n in result.notes)
    parts = read_metadata(run).to_dict()["data"]["split"].values()
    assert sum(part["images"] for part in parts) == 31  # of 32: the model never saw it
    assert Predictor.from_checkpoint(run).class_names == ("benign", "malignant")
