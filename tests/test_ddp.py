"""Data-parallel training on two CPU processes (Lightning's DDP launcher, gloo backend).

Each test trains one tiny run with ``--devices 2 --strategy ddp`` and the same run in one
process, then compares them: the same files, checkpoint metadata and cached features, and only
rank 0 wrote anything (an audit hook in every process records its writes under the run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from histolens.checkpoint.io import read_metadata
from histolens.cli.commands import main
from histolens.inference.predictor import Predictor

pytestmark = pytest.mark.slow

COMMON = [
    "--backbone", "test_resnet", "--pretrained", "none", "--cv-folds", "0",
    "--input-size", "pretrained", "--batch-size", "8", "--quiet",
]  # fmt: skip
HEADS = {
    "linear": ["--stain-norm", "none", "--test-fraction", "0.25"],
    "mlp": ["--head", "mlp", "--stain-norm", "macenko", "--epochs", "2", "--cache-views", "2"],
}

# Imported by every Python process started with this folder on PYTHONPATH (the launcher's
# rank-1 process too): it lists what the process opens for writing, renames or creates under
# the run folder, in a file named after the process's LOCAL_RANK at start (rank 0 has none).
AUDIT = """
import os, sys
_root = os.environ.get("AUDIT_ROOT")
if _root:
    _log = os.path.join(os.environ["AUDIT_LOG"], "rank" + os.environ.get("LOCAL_RANK", "0"))
    _writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else flags & _writes
            paths = [path] if writing else []
        elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove"):
            paths = [args[0]]
        else:
            return
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)) and os.fsdecode(p).startswith(_root):
                with open(_log, "a") as fh:
                    fh.write(event + " " + os.fsdecode(p) + "\\n")

    sys.addaudithook(_hook)
"""


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> Path:
    from histolens.data.synth import generate_synthetic

    out = tmp_path_factory.mktemp("ddp") / "data"
    generate_synthetic(out, n=40, seed=11, size=(96, 96), n_patients=10)
    return out


def _files(run: Path) -> list[str]:
    names = []
    for p in sorted(run.rglob("*")):
        if p.is_file():
            rel = p.relative_to(run).as_posix()
            names.append("tensorboard/events" if "tfevents" in rel else rel)
    return sorted(names)


def _two_processes(data: Path, run: Path, flags: list[str], tmp: Path) -> str:
    hooks, audit = tmp / "hooks", tmp / "audit"
    hooks.mkdir()
    audit.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
        "AUDIT_ROOT": str(run),
        "AUDIT_LOG": str(audit),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "histolens", "train", "--data", str(data), "--out", str(run)]
    ddp = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    proc = subprocess.run(
        [*cmd, *flags, *ddp], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLOBAL_RANK" not in proc.stderr  # Lightning's banners are kept quiet
    assert sorted(p.name for p in audit.iterdir()) == ["rank0"]  # rank 1 wrote nothing
    written = (audit / "rank0").read_text()
    assert "best.safetensors" in written and "split.csv" in written
    return proc.stdout


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_two_cpu_processes_train_the_run_one_process_would(ddp_data, tmp_path, head):
    flags = COMMON + HEADS[head]
    stdout = _two_processes(ddp_data, tmp_path / "ddp", flags, tmp_path)
    assert stdout.count("Run: ") == 1  # one summary, from rank 0
    single = CliRunner().invoke(
        main, ["train", "--data", str(ddp_data), "--out", str(tmp_path / "one"), *flags]
    )
    assert single.exit_code == 0, single.output

    ddp, one = tmp_path / "ddp", tmp_path / "one"
    assert _files(ddp) == _files(one)  # no duplicate, partial or temp files
    meta, meta_one = read_metadata(ddp).to_dict(), read_metadata(one).to_dict()
    assert sorted(meta) == sorted(meta_one)
    assert meta["config"]["train"]["devices"] == "2"
    assert meta["config"]["train"]["strategy"] == "ddp"
    assert meta["data"]["split"] == meta_one["data"]["split"]

    # The shared-out feature extraction gathered every image's own features.
    from safetensors import safe_open

    with (
        safe_open(ddp / "features.safetensors", "pt") as a,
        safe_open(one / "features.safetensors", "pt") as b,
    ):
        assert a.metadata() == b.metadata()  # same images, in the same order
        for key in a.keys():  # noqa: SIM118 (a safetensors file is no dict)
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), atol=1e-4, rtol=1e-4)

    predictor = Predictor.from_checkpoint(ddp)
    images = sorted(str(p) for p in ddp_data.rglob("*.png") if "masks" not in p.parts)[:4]
    preds, skipped = predictor.predict_paths(images)
    assert len(preds) == 4 and not skipped
    if head == "linear":  # fitted by rank 0 on the same features: the same model
        reference = Predictor.from_checkpoint(one).predict_paths(images)[0]
        got = [p.scores["malignant"] for p in preds]
        want = [p.scores["malignant"] for p in reference]
        assert got == pytest.approx(want, abs=1e-4)
