"""Checkpoints: weights and metadata come back as saved; a damaged file is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from histolens.checkpoint.io import (
    BEST_CHECKPOINT,
    CHECKPOINT_FORMAT,
    SCHEMA_VERSION,
    CheckpointMetadata,
    HeadSpec,
    ProbeChoice,
    SplitPart,
    TrainingData,
    load_checkpoint,
    read_metadata,
    resolve_checkpoint_path,
    save_checkpoint,
    update_metadata,
)
from histolens.errors import CheckpointError
from histolens.evaluation.performance import headline_estimate
from histolens.models.backbones import get_backbone_spec
from histolens.models.classifier import build_model
from histolens.models.transforms import Preprocess

META = {
    "backbone": "test_resnet",
    "class_names": ["benign", "malignant"],
    "threshold": 0.37,
    "preprocess": {"input_size": [64, 96], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "metrics": {"roc_auc": 0.91, "per_magnification": {"40": {"n": 12}}},
}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(get_backbone_spec("test_resnet"), 2, "none")


@pytest.fixture()
def saved(tmp_path, model) -> Path:
    return save_checkpoint(tmp_path / "run" / BEST_CHECKPOINT, model, META)


def test_weights_and_metadata_round_trip(saved, model):
    state, meta = load_checkpoint(saved)
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key
    assert meta.backbone == "test_resnet" and meta.class_names == ("benign", "malignant")
    assert meta.threshold == 0.37 and meta.metrics == META["metrics"]
    assert meta.preprocess == Preprocess((64, 96), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    raw = meta.to_dict()
    assert raw["format"] == CHECKPOINT_FORMAT and raw["format_version"] == SCHEMA_VERSION == 3
    assert {"histolens", "torch", "timm"} <= set(meta.versions)
    assert read_metadata(saved) == meta  # the header alone, without the weights


def test_values_json_cannot_hold_are_stored_as_plain_json(tmp_path, model):
    path = save_checkpoint(
        tmp_path / "c.safetensors",
        model,
        {**META, "reference": Path("/data/ref.png"), "stain_matrix": np.eye(2, dtype=np.float32)},
    )
    meta = read_metadata(path)  # keys this version does not know are kept as they were
    assert meta.extra == {"reference": "/data/ref.png", "stain_matrix": [[1.0, 0.0], [0.0, 1.0]]}
    with pytest.raises(TypeError, match="set is not JSON serialisable"):
        save_checkpoint(tmp_path / "d.safetensors", model, {**META, "classes": {"a", "b"}})
    assert not (tmp_path / "d.safetensors").exists()


def test_a_run_directory_means_its_best_checkpoint(saved):
    assert resolve_checkpoint_path(saved.parent) == saved
    _, meta = load_checkpoint(saved.parent)
    assert meta.threshold == 0.37


def test_update_metadata_keeps_the_weights(saved, model):
    update_metadata(saved, threshold=0.6, temperature=1.4)
    state, meta = load_checkpoint(saved)
    assert (meta.threshold, meta.temperature) == (0.6, 1.4)
    assert list(meta.class_names) == META["class_names"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_an_interrupted_save_leaves_the_old_checkpoint(saved, model, monkeypatch):
    import safetensors.torch

    before = saved.read_bytes()

    def dies_halfway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(saved, model, {**META, "threshold": 0.9})
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [BEST_CHECKPOINT]


def test_a_truncated_file_is_refused_with_its_name(tmp_path, saved):
    damaged = tmp_path / "truncated.safetensors"
    damaged.write_bytes(saved.read_bytes()[:-1000])
    for read in (read_metadata, load_checkpoint):
        with pytest.raises(CheckpointError, match=r"truncated\.safetensors is not a readable"):
            read(damaged)


def test_other_files_are_refused_with_what_to_do(tmp_path, model):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(garbage)

    from safetensors.torch import save_file

    plain = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    with pytest.raises(CheckpointError, match="no histolens metadata.*--pretrained FILE"):
        load_checkpoint(plain)

    bad_json = tmp_path / "bad-json.safetensors"
    save_file({"w": torch.zeros(1)}, str(bad_json), metadata={"histolens": "{not json"})
    with pytest.raises(CheckpointError, match="corrupt histolens metadata"):
        read_metadata(bad_json)

    newer = tmp_path / "newer.safetensors"
    header = json.dumps({"format": CHECKPOINT_FORMAT, "format_version": 99})
    save_file({"w": torch.zeros(1)}, str(newer), metadata={"histolens": header})
    with pytest.raises(CheckpointError, match="newer histolens.*upgrade"):
        read_metadata(newer)


def test_missing_checkpoints_say_where_they_were_looked_for(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.safetensors does not exist"):
        read_metadata(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match=f"folder without {BEST_CHECKPOINT}"):
        load_checkpoint(tmp_path)


# What today's code (schema version 1) writes: training's MLP run, before the head's kind and
# the schema were versioned; the oldest files have no head and no task at all.
V1_MLP = {
    "format": CHECKPOINT_FORMAT,
    "format_version": 1,
    "saved_at": "2024-05-01T10:00:00+00:00",
    "versions": {"histolens": "0.1.0", "torch": "2.3.0", "timm": "1.0.3", "python": "3.11.9"},
    "model_id": "test_resnet-binary-20240501-100000",
    "backbone": "test_resnet",
    "timm_name": "test_resnet.r160_in1k",
    "licence": None,
    "pretrained": "none",
    "task": "binary",
    "class_names": ["benign", "malignant"],
    "head": {"dims": [64], "dropouts": [0.2]},
    "feature_layer": None,
    "preprocess": {
        "input_size": [160, 160],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bicubic",
    },
    "stain": None,
    "stain_reference": None,
    "magnification": "40",
    "threshold": 0.42,
    "temperature": 1.3,
    "config": {"model": {"backbone": "test_resnet", "head": "mlp"}, "recipe": "default"},
    "class_weights": {"benign": 1.5, "malignant": 0.75},
    "data": {
        "path": "/data/breakhis",
        "layout": "breakhis",
        "patient_level_split": True,
        "split": {
            "train": {"images": 60, "groups": 10, "classes": {"benign": 20, "malignant": 40}}
        },
    },
    "epoch": 3,
    "best_val_loss": 0.41,
    "val_auc_at_best": 0.9,
    "threshold_method": "youden",
    "metrics": {"split": "test", "roc_auc": 0.88, "n_images": 40, "n_patients": 6},
}
V1_OLDEST = {
    k: v for k, v in V1_MLP.items() if k not in ("head", "task", "format_version", "magnification")
}


def _raw_checkpoint(path: Path, model: torch.nn.Module, header: dict) -> Path:
    """A checkpoint file with exactly this JSON header, as an older histolens wrote it."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"histolens": json.dumps(header)})
    return path


def _raw_header(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()["histolens"])


def test_every_field_round_trips_through_json():
    meta = CheckpointMetadata(
        backbone="test_resnet",
        class_names=("A", "F", "PT", "TA", "DC"),
        preprocess=Preprocess((120, 176), (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), "bilinear"),
        task="subtype",
        head=HeadSpec.linear(),
        feature_layer="blocks.2,blocks.5",
        threshold=0.5,
        temperature=2.5,
        licence="MIT",
        stain={"method": "macenko", "stain_matrix": [[0.6, 0.7, 0.3], [0.1, 0.9, 0.1]]},
        config={"model": {"head_dims": (512, 256)}},  # tuples are stored as JSON lists
        class_weights={"A": 2.0, "DC": 0.5},
        data=TrainingData("/d", "manifest", False, {"train": SplitPart(50, 9, {"A": 10})}),
        probe=ProbeChoice(0.003, {"0.003": 0.91, "0.1": 0.88}),
        conformal={"alpha": 0.1, "scores": [0.2, 0.4]},
        ood={"format_version": 1, "checks": {}, "features": None},
        adapted_batchnorm={"images": 24},
        export={"format": "onnx", "source_checkpoint": "/runs/a/best.safetensors"},
        extra={"from_the_future": {"kept": True}},
    )
    raw = json.loads(json.dumps(meta.to_dict()))
    assert raw == meta.to_dict()  # JSON-ready as it is
    assert CheckpointMetadata.from_dict(raw) == meta
    assert raw["config"] == {"model": {"head_dims": [512, 256]}}
    assert raw["from_the_future"] == {"kept": True} and "extra" not in raw
    assert meta.export_source == "/runs/a/best.safetensors" and meta.stain_method == "macenko"
    assert not meta.is_binary and meta.positive_class is None and headline_estimate(meta) is None


def test_a_version_1_checkpoint_is_migrated_and_still_loads(tmp_path, model):
    meta = CheckpointMetadata.from_dict(V1_MLP)
    assert meta.head == HeadSpec("mlp", (64,), (0.2,))  # a head without kind was the MLP
    assert (meta.threshold, meta.temperature, meta.magnification) == (0.42, 1.3, "40")
    assert meta.data.split["train"] == SplitPart(60, 10, {"benign": 20, "malignant": 40})
    assert (meta.epoch, meta.best_val_loss, meta.threshold_method) == (3, 0.41, "youden")
    assert meta.run_config.model.head == "mlp"
    assert meta.to_dict()["format_version"] == SCHEMA_VERSION
    kept = set(V1_MLP) - {"head", "format_version"}  # every other field reads back unchanged
    assert {k: meta.to_dict()[k] for k in kept} == {k: V1_MLP[k] for k in kept}

    # The oldest files: no head (the original 512/256 head), no task, no magnification.
    path = _raw_checkpoint(tmp_path / "old.safetensors", model, V1_OLDEST)
    oldest = read_metadata(path)
    assert oldest.head == HeadSpec("mlp", (512, 256), (0.5, 0.3))
    assert (oldest.task, oldest.magnification) == ("binary", "all")
    assert oldest.is_binary and oldest.positive_class == "malignant"
    assert (
        headline_estimate(oldest).description == "a held-out test split of 6 patients (40 images)"
    )

    from histolens.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(path)
    assert predictor.metadata == oldest and predictor.threshold == 0.42
    update_metadata(path, temperature=1.1)  # rewritten in the current schema
    written = _raw_header(path)
    assert written["format_version"] == SCHEMA_VERSION and written["head"]["kind"] == "mlp"


def test_a_newer_schema_is_refused_naming_both_versions(tmp_path, model):
    path = _raw_checkpoint(tmp_path / "future.safetensors", model, {**V1_MLP, "format_version": 4})
    with pytest.raises(
        CheckpointError,
        match=r"future\.safetensors was written by a newer histolens \(checkpoint format "
        r"version 4, while histolens .* reads versions 1 to 3\); upgrade histolens",
    ):
        read_metadata(path)


def test_a_missing_or_invalid_field_is_refused_naming_it(tmp_path, model):
    no_classes = {k: v for k, v in V1_MLP.items() if k != "class_names"}
    path = _raw_checkpoint(tmp_path / "nameless.safetensors", model, no_classes)
    with pytest.raises(
        CheckpointError, match=r"nameless\.safetensors lacks the metadata field 'class_names'\.$"
    ):
        read_metadata(path)
    with pytest.raises(
        CheckpointError, match="^The checkpoint lacks the metadata field 'preprocess'"
    ):
        CheckpointMetadata.from_dict({k: v for k, v in V1_MLP.items() if k != "preprocess"})
    with pytest.raises(
        CheckpointError,
        match=r"^The metadata field 'threshold' of checkpoint x\.safetensors is 1\.7, not between 0 "
        r"and 1\.$",
    ):
        CheckpointMetadata.from_dict({**V1_MLP, "threshold": 1.7}, "x.safetensors")
    bad = {
        "head": {"kind": "transformer"},
        "class_names": ["benign"],
        "task": "grading",
        "temperature": 0,
        "preprocess": {"input_size": [160, 160]},
        "probe": {"C": -1},
        "data": {"split": {"train": {"images": "sixty"}}},
    }
    for name, value in bad.items():
        with pytest.raises(CheckpointError, match=f"field '{name}'"):
            CheckpointMetadata.from_dict({**V1_MLP, name: value})
    # Version 2 writes the head's kind: a head without one is damaged, not old.
    with pytest.raises(CheckpointError, match="field 'head' .* has no 'kind'"):
        CheckpointMetadata.from_dict({**V1_MLP, "format_version": 2})
    with pytest.raises(CheckpointError, match="lacks the metadata field 'backbone'"):
        save_checkpoint(tmp_path / "n.safetensors", model, {"class_names": ["a", "b"]})
    assert not (tmp_path / "n.safetensors").exists()


def test_the_headline_estimate_prefers_the_stored_estimate(estimate):
    meta = CheckpointMetadata.from_dict({**V1_MLP, "estimate": estimate})
    assert headline_estimate(meta).to_dict() == estimate
    assert headline_estimate(CheckpointMetadata.from_dict(V1_MLP)).metrics == {"roc_auc": 0.88}
