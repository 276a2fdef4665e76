"""Shared fixtures: tiny synthetic datasets built in tmp_path, real data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "breakhis-dev"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """../shared/data/breakhis-dev, or skip with the reason."""
    if not (REAL_DATA / "manifest.csv").is_file():
        pytest.skip(f"real BreakHis images not found at {REAL_DATA} (only on developer machines)")
    return REAL_DATA


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A small synthetic dataset (32 images of 8 patients, 176x120), made once per session."""
    from histolens.synth import generate_synthetic

    out = tmp_path_factory.mktemp("synth") / "data"
    generate_synthetic(out, n=32, seed=3, size=(176, 120), n_patients=8)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from histolens.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def trained_run(synth_small, tmp_path_factory):
    """A finished 2-epoch run on the small synthetic set: (run_dir, TrainResult)."""
    from histolens.training import train

    run = tmp_path_factory.mktemp("run") / "r"
    from histolens.testing import tiny_config

    result = train(tiny_config(synth_small), run, progress=False)
    return run, result
