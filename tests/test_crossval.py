"""Patient-level k-fold cross-validation of a training config (the linear probe: seconds)."""

from __future__ import annotations

import statistics

import pytest

from histolens.stats.metrics import HEADLINE_METRICS
from histolens.testing import tiny_config
from histolens.training.crossval import cross_validate

PROBE = {
    "model.head": "linear",
    "model.input_size": (120, 176),
    "train.probe_cs": (0.01, 0.1),
}


def test_every_patient_is_held_out_once_and_each_fold_is_reported(synth_small, tmp_path, capsys):
    cfg = tiny_config(synth_small, **PROBE)
    result = cross_validate(cfg, n_splits=3, work_dir=tmp_path, progress=True)

    assert len(result.folds) == 3
    # 32 images of 8 patients: each held out by exactly one fold.
    assert sum(f["n_test_images"] for f in result.folds) == 32
    assert sum(f["n_test_patients"] for f in result.folds) == 8
    for fold in result.folds:
        assert fold["best_epoch"] == 1  # the probe has no epochs: reported as the first
        assert 0.0 <= fold["roc_auc"] <= 1.0
        assert set(fold) - {"n_test_images", "n_test_patients", "best_epoch"} <= set(
            HEADLINE_METRICS
        )
    aucs = [f["roc_auc"] for f in result.folds]
    assert result.mean_std("roc_auc") == pytest.approx(
        (statistics.mean(aucs), statistics.stdev(aucs))
    )
    assert result.summary()["roc_auc"] == result.mean_std("roc_auc")
    printed = capsys.readouterr().out
    assert [line.split(":")[0].strip() for line in printed.splitlines() if "fold" in line] == [
        "fold 1/3",
        "fold 2/3",
        "fold 3/3",
    ]
    assert list(tmp_path.iterdir()) == []  # the folds' runs live in a removed temporary folder
