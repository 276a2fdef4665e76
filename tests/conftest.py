"""Shared fixtures: tiny synthetic datasets built in tmp_path, real data when present."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Tests train many tiny random-weight models: PyTorch computes their features unless a test asks
# for an engine (tests/test_engine.py checks the exported engines against PyTorch), and nothing is
# exported into the user's own cache.
os.environ.setdefault("HISTOLENS_ENGINE", "torch")
# Under pytest-xdist (`make test` runs two workers), the workers share the cores: each computes on
# its share of them (and so do the processes its tests start), instead of every worker starting
# one thread per core and the OpenMP pools of both spinning on the same cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)
if "HISTOLENS_CACHE" not in os.environ:
    import tempfile

    os.environ["HISTOLENS_CACHE"] = tempfile.mkdtemp(prefix="histolens-test-cache-")

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "breakhis-dev"


def _modules_after_help(args: Sequence[str], modules: Sequence[str]) -> tuple[list[str], str]:
    code = (
        "import json, sys; from click.testing import CliRunner; "
        "from histolens.cli.commands import main; "
        f"r = CliRunner().invoke(main, {list(args)!r}); assert r.exit_code == 0, r.output; "
        f"print(json.dumps([[m for m in {list(modules)!r} if m in sys.modules], r.output]))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    loaded, output = json.loads(out.stdout)
    return loaded, output


@pytest.fixture
def modules_after_help() -> Callable[[Sequence[str], Sequence[str]], tuple[list[str], str]]:
    """modules_after_help(args, modules): run `histolens ARGS` (a --help) in a fresh Python and
    return which of ``modules`` it imported, and the help text; --help must stay instant."""
    return _modules_after_help


def _sigkill_when(
    proc: subprocess.Popen, ready: Callable[[], bool], seconds: float, too_slow: str, poll: float
) -> None:
    deadline = time.monotonic() + seconds
    while proc.poll() is None and not ready():
        assert time.monotonic() < deadline, too_slow
        time.sleep(poll)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
def sigkill_when() -> Callable[..., None]:
    """sigkill_when(proc, ready, seconds, too_slow, poll): SIGKILL ``proc`` as soon as
    ``ready()`` holds (or it has ended), checking every ``poll`` seconds; the assertion
    ``too_slow`` fails when ``seconds`` pass first."""
    return _sigkill_when


@pytest.fixture(scope="session")
def real_data() -> Path:
    """../shared/data/breakhis-dev, or skip with the reason."""
    if not (REAL_DATA / "manifest.csv").is_file():
        pytest.skip(f"real BreakHis images not found at {REAL_DATA} (only on developer machines)")
    return REAL_DATA


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A small synthetic dataset (32 images of 8 patients, 176x120), made once per session."""
    from histolens.data.synth import generate_synthetic

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
    from histolens.training.runner import train

    run = tmp_path_factory.mktemp("run") / "r"
    from histolens.testing import tiny_config

    result = train(tiny_config(synth_small), run, progress=False)
    return run, result


@pytest.fixture(scope="session")
def estimate() -> dict:
    """A real estimate (build_estimate over made-up out-of-fold predictions): 11 patients, 8
    malignant and 3 benign, at 100X and 400X, so that it carries class-support warnings."""
    import numpy as np

    from histolens.evaluation.estimate import build_estimate
    from histolens.evaluation.evaluate import EvalResult, PredictionRow

    rng = np.random.default_rng(0)
    rows = []
    for i in range(11):
        label = "benign" if i < 3 else "malignant"
        for mag in (100, 400):
            for j in range(3):
                p = float(np.clip(rng.normal(0.3 if label == "benign" else 0.7, 0.2), 0.01, 0.99))
                rows.append(
                    PredictionRow(
                        f"/data/p{i}-{mag}-{j}.png",
                        f"p{i}",
                        mag,
                        label,
                        int(label == "malignant"),
                        (1 - p, p),
                        (1 - p, p),
                    )
                )
    result = EvalResult(rows, ("benign", "malignant"), "binary", 0.5, 1.0)
    return build_estimate(
        result,
        "5-fold patient-level cross-validation (out-of-fold predictions)",
        "66 images of 11 patient groups in manifest.csv (magnification all)",
        n_boot=100,
        per_magnification_boot=50,
    ).to_dict()  # as a checkpoint's metadata stores it
