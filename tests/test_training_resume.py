"""Resuming a Lightning run: after a SIGKILL, refusals, and the per-epoch log without a TTY."""

import csv
import re
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from histolens.cli.commands import main
from histolens.config import RunConfig
from histolens.errors import ConfigError
from histolens.inference.predictor import Predictor
from histolens.testing import make_checkpoint, tiny_config
from histolens.training.runner import EPOCH_LOG, LAST_CHECKPOINT, train

TINY_FLAGS = [
    "--backbone", "test_resnet", "--pretrained", "none", "--head", "mlp", "--cv-folds", "0",
    "--input-size", "pretrained", "--stain-norm", "none", "--no-feature-cache",
    "--patience", "100", "--batch-size", "8",
]  # fmt: skip


def _logged_epochs(run) -> list[int]:
    path = run / EPOCH_LOG
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped(tmp_path, sigkill_when):
    from histolens.data.synth import generate_synthetic

    data, run, epochs = tmp_path / "data", tmp_path / "run", 12
    # Enough images that an epoch takes a noticeable fraction of a second on a CPU.
    generate_synthetic(data, n=48, seed=5, size=(176, 120), n_patients=12)
    cmd = [sys.executable, "-m", "histolens.cli.commands", "train"]
    with open(tmp_path / "first.log", "w") as out:
        proc = subprocess.Popen(
            [*cmd, "--data", str(data), "--out", str(run), "--epochs", str(epochs), *TINY_FLAGS],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        epochs_logged = lambda: len(_logged_epochs(run)) >= 2  # noqa: E731
        sigkill_when(proc, epochs_logged, 90, "no epoch finished in 90 s", 0.05)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    at_kill = _logged_epochs(run)
    assert "\r" not in (tmp_path / "first.log").read_text()  # not a TTY: epoch lines, no bars
    assert (run / LAST_CHECKPOINT).is_file()
    assert not (run / "lightning" / "logs").exists()

    resumed = subprocess.run(
        [*cmd, "--resume", str(run), "--quiet"], capture_output=True, text=True, timeout=120
    )
    print(f"killed after {len(at_kill)} logged epochs; resume output:\n{resumed.stdout}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = int(re.search(r"resumed after epoch (\d+)", resumed.stdout).group(1))
    assert 1 <= after <= len(at_kill)  # at most the epochs since the last write were redone
    assert f"{epochs} epochs in" in resumed.stdout
    assert _logged_epochs(run) == list(range(epochs))  # each epoch once, no gap
    assert not list((run / "logs").glob("version_1"))
    predictor = Predictor.from_checkpoint(run)
    preds, skipped = predictor.predict_paths([str(p) for p in sorted(data.rglob("*.png"))[:3]])
    assert len(preds) == 3 and not skipped


def test_log_without_a_terminal_has_one_line_per_epoch(synth_small, tmp_path):
    """Output to a file (CliRunner's is not a TTY) gets epoch lines, not progress-bar redraws."""
    run = tmp_path / "r"
    result = CliRunner().invoke(
        main,
        ["train", "--data", str(synth_small), "--out", str(run), "--epochs", "2", *TINY_FLAGS],
    )
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "train_loss" in lines[0] and "val_loss" in lines[0]


def test_resume_refuses_a_folder_with_nothing_to_resume(synth_small, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="has no config.json.*histolens train --data DATA"):
        train(RunConfig(), empty, resume=True)

    early = tmp_path / "early"  # killed before its first epoch ended
    early.mkdir()
    (early / "config.json").write_text(tiny_config(synth_small).to_json())
    with pytest.raises(ConfigError, match="before its first epoch ended.*without --resume"):
        train(RunConfig(), early, resume=True)

    probe = tmp_path / "probe"  # a finished linear-probe run: best.safetensors, no lightning/
    probe.mkdir()
    (probe / "config.json").write_text(
        tiny_config(synth_small, **{"model.head": "linear"}).to_json()
    )
    make_checkpoint(probe / "best.safetensors")
    result = CliRunner().invoke(main, ["train", "--resume", str(probe)])
    assert result.exit_code == 1
    assert re.fullmatch(
        r"error: \S+ is a finished linear-probe run, .* nothing to resume .*new --out\.\n",
        result.output,
    )


def test_resume_does_not_check_the_flags_it_ignores(tmp_path):
    """--resume trains on the saved config, so a flag that would be refused on a new run (MixUp
    with the default linear head) only gets the note that it is ignored."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["train", "--resume", str(empty), "--mixup", "0.4"])
    assert result.exit_code == 1
    assert "only --epochs is applied" in result.output
    assert "has no config.json" in result.output and "--head mlp" not in result.output
