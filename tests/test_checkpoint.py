"""Checkpoints: weights and metadata come back as saved; a damaged file is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from histolens.backbones import get_backbone_spec
from histolens.checkpoint import (
    BEST_CHECKPOINT,
    CHECKPOINT_FORMAT,
    load_checkpoint,
    read_metadata,
    resolve_checkpoint_path,
    save_checkpoint,
    update_metadata,
)
from histolens.errors import CheckpointError
from histolens.model import build_model

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
    assert {k: meta[k] for k in META} == META
    assert meta["format"] == CHECKPOINT_FORMAT and meta["format_version"] == 1
    assert {"histolens", "torch", "timm"} <= set(meta["versions"])
    assert read_metadata(saved) == meta  # the header alone, without the weights


def test_values_json_cannot_hold_are_stored_as_plain_json(tmp_path, model):
    path = save_checkpoint(
        tmp_path / "c.safetensors",
        model,
        {"reference": Path("/data/ref.png"), "stain_matrix": np.eye(2, dtype=np.float32)},
    )
    meta = read_metadata(path)
    assert meta["reference"] == "/data/ref.png"
    assert meta["stain_matrix"] == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(TypeError, match="set is not JSON serialisable"):
        save_checkpoint(tmp_path / "d.safetensors", model, {"classes": {"a", "b"}})
    assert not (tmp_path / "d.safetensors").exists()


def test_a_run_directory_means_its_best_checkpoint(saved):
    assert resolve_checkpoint_path(saved.parent) == saved
    _, meta = load_checkpoint(saved.parent)
    assert meta["threshold"] == 0.37


def test_update_metadata_keeps_the_weights(saved, model):
    update_metadata(saved, threshold=0.6, temperature=1.4)
    state, meta = load_checkpoint(saved)
    assert (meta["threshold"], meta["temperature"]) == (0.6, 1.4)
    assert meta["class_names"] == META["class_names"]
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
