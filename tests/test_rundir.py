"""RunDir names each file of a run once; the modules that write them use its names."""

from __future__ import annotations

from pathlib import Path

from histolens.checkpoint.io import BEST_CHECKPOINT
from histolens.rundir import EvaluationFiles, RunDir
from histolens.training.runner import (
    CONFIG_FILE,
    EPOCH_LOG,
    FEATURE_CACHE,
    LAST_CHECKPOINT,
    SPLIT_FILE,
)


def test_the_modules_spell_the_run_files_as_rundir_does():
    assert BEST_CHECKPOINT == RunDir.CHECKPOINT
    assert (CONFIG_FILE, SPLIT_FILE, FEATURE_CACHE) == (
        RunDir.CONFIG,
        RunDir.SPLIT,
        RunDir.FEATURE_CACHE,
    )
    assert (LAST_CHECKPOINT, EPOCH_LOG) == (RunDir.LAST_CHECKPOINT, RunDir.EPOCH_LOG)


def test_paths_are_inside_the_run(tmp_path):
    run = RunDir(str(tmp_path))
    assert run.path == tmp_path and run.checkpoint == tmp_path / "best.safetensors"
    assert run.evaluation == EvaluationFiles(tmp_path / "evaluation")
    assert run.evaluation.metrics == tmp_path / "evaluation" / "metrics.json"
    assert run.explanations.faithfulness == tmp_path / "explanations" / "faithfulness.json"
    assert run.last_checkpoint == tmp_path / "lightning" / "last.ckpt"


def test_a_checkpoint_file_belongs_to_its_folder(tmp_path):
    ckpt = tmp_path / "best.safetensors"
    ckpt.write_bytes(b"")
    assert RunDir.of_checkpoint(ckpt).path == tmp_path
    assert RunDir.of_checkpoint(tmp_path).path == tmp_path
    assert RunDir.of_checkpoint(Path("elsewhere") / "model.safetensors").path == Path("elsewhere")
