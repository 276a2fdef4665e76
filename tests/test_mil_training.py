"""The Lightning loop of attention MIL: data-parallel processes and early stopping.

Two CPU processes (Lightning's DDP launcher, gloo) each taking one bag per step must make the
same optimiser steps as one process accumulating two bags per step on the same bag order; on
bags whose labels are noise, early stopping must keep an early epoch's weights.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from histolens.training.mil import MilConfig
from histolens.training.mil_fit import MilProcesses, fit_mil
from histolens.training.mil_folds import inner_patient_split
from histolens.training.mil_synthetic import synthetic_bags

ONE = MilProcesses(accelerator="cpu", devices="1")
# No dropout: each process would draw its own masks, which one process cannot reproduce.
DDP_CONFIG = dict(hidden=16, attention=8, dropout=0.0, epochs=3, lr=2e-3, seed=5)

SCRIPT = """
import sys

import numpy as np
import torch

from histolens.training.mil import MilConfig
from histolens.training.mil_fit import MilProcesses, fit_mil

data = np.load(sys.argv[1])
bags = [data[f"bag{i}"] for i in range(int(data["n"]))]
config = MilConfig(**{CONFIG})
fit = fit_mil(bags, data["y"], config, processes=MilProcesses("cpu", "2", "ddp"))
if fit.global_rank == 0:
    torch.save(fit.model.state_dict(), sys.argv[2])
"""


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for k, v in sorted(state.items())])


@pytest.mark.slow
def test_two_processes_step_as_one_process_accumulating_two_bags(tmp_path):
    # 16 bags (even: no rank gets a padded repeat), 40 tiles of 6 features.
    bags = synthetic_bags(16, 2, 40, 6, lesion_range=(0.1, 0.3), seed=4)
    x, y = [b.features for b in bags], np.array([b.target for b in bags])
    np.savez(tmp_path / "bags.npz", n=len(x), y=y, **{f"bag{i}": b for i, b in enumerate(x)})
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT.replace("{CONFIG}", repr(DDP_CONFIG)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "ddp.pt"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "bags.npz"), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = _flat(torch.load(out))

    accumulated = fit_mil(x, y, MilConfig(**DDP_CONFIG, accumulate=2), processes=ONE)
    one_by_one = fit_mil(x, y, MilConfig(**DDP_CONFIG), processes=ONE)
    initial = _flat(_initial_state(x))
    moved = float(torch.linalg.vector_norm(_flat(accumulated.model.state_dict()) - initial))
    gap = float(torch.linalg.vector_norm(ddp - _flat(accumulated.model.state_dict())))
    other = float(torch.linalg.vector_norm(_flat(one_by_one.model.state_dict()) - ddp))
    assert moved > 0
    # DDP averages the two ranks' gradients, (g0 + g1) / 2; accumulation halves each loss and
    # sums, g0 / 2 + g1 / 2: equal in float32 (halving is exact, a sum of two is commutative),
    # and bit-equal on this machine. What may differ is each gradient's own rounding where a
    # kernel splits its sums by thread count (one thread in the launched processes), ~1e-6
    # relative, which Adam's normalised steps pass on about 1:1 over 24 steps; a coordinate
    # whose gradient cancels to within rounding can step up to 2 x lr apart, so the bound is 1%
    # of how far the weights moved. The wrong schedule (one bag a step) lands ~50% away.
    assert gap <= 1e-2 * moved, (gap, moved)
    assert other > 10 * 1e-2 * moved, (other, moved)


def _initial_state(x) -> dict:
    """The weights every fit with DDP_CONFIG starts from (seeded; standardised on ``x``)."""
    import lightning as L

    from histolens.training.mil import build_mil_model, feature_standardisation

    L.seed_everything(DDP_CONFIG["seed"], verbose=False)
    model = build_mil_model(x[0].shape[1], MilConfig(**DDP_CONFIG))
    mean, std = feature_standardisation(x)
    model.mean.copy_(torch.from_numpy(mean))
    model.std.copy_(torch.from_numpy(std))
    return model.state_dict()


def test_early_stopping_keeps_an_early_epoch_on_noise_labels():
    # 40 slides of 20 patients; the labels are the patients' coin flips, not the lesions: the
    # model can only memorise its training slides, so the held-out loss rises after a few epochs.
    bags = synthetic_bags(40, 2, 30, 8, seed=2)
    rng = np.random.default_rng(7)
    patient_label = {p: int(v) for p, v in zip(sorted({b.patient for b in bags}),
                                                rng.permutation([0, 1] * 10), strict=True)}  # fmt: skip
    x = [b.features for b in bags]
    y = np.array([patient_label[b.patient] for b in bags])
    patients = [b.patient for b in bags]
    config = MilConfig(hidden=32, attention=8, dropout=0.0, lr=5e-3, patience=5, seed=0)
    fit = fit_mil(x, y, config, patients, ONE)

    assert fit.best_epoch is not None and fit.val_slides == 8 and fit.val_patients == 4
    assert fit.epochs == fit.best_epoch + config.patience < config.max_epochs
    assert fit.best_epoch <= 10, fit.val_losses
    best = fit.val_losses[fit.best_epoch - 1]
    assert best == min(fit.val_losses)
    # The kept weights are the best epoch's: their held-out loss is the best one recorded (fp32
    # sums over 8 bags of 30 tiles, ~1e-6 relative), clearly below the last epoch's.
    split = inner_patient_split(y, patients, config.seed)
    assert len(split.val) == 8
    loss = _val_loss(fit.model, [x[i] for i in split.val], y[split.val], y[split.train])
    assert loss == pytest.approx(best, rel=1e-5)
    assert fit.val_losses[-1] > best * (1 + 1e-3)


def _val_loss(model, bags, y, train_y) -> float:
    """Mean class-balanced BCE of ``bags``, as the loop measures it."""
    positives = float(train_y.sum())
    weight = torch.tensor((len(train_y) - positives) / positives)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=weight)
    with torch.inference_mode():
        losses = [
            loss_fn(model(torch.from_numpy(b))[0].reshape(1), torch.tensor([float(t)]))
            for b, t in zip(bags, y, strict=True)
        ]
    return float(torch.stack(losses).mean())


def test_too_few_patients_trains_fixed_epochs():
    bags = synthetic_bags(12, 2, 20, 4, seed=3)  # 6 patients: 3 of each label
    x, y = [b.features for b in bags], [b.target for b in bags]
    fit = fit_mil(x, y, MilConfig(hidden=8, attention=4, epochs=4), [b.patient for b in bags], ONE)
    assert fit.epochs == 4 and fit.best_epoch is None and fit.val_slides == 0
    assert "needs 5 patients of each label" in fit.no_split


@pytest.mark.slow
def test_train_slides_on_two_processes(tmp_path):
    """``histolens train --slides --devices 2 --strategy ddp``: one summary, rank 0 writes."""
    from histolens.training.mil_data import write_bag
    from histolens.training.mil_run import load_mil

    bags = synthetic_bags(20, 2, 30, 6, lesion_range=(0.1, 0.3), lesion_distance=6.0, seed=6)
    rows = ["slide,label,patient"]
    for b in bags:
        write_bag(tmp_path / f"{b.name}.h5", b.features, b.coords)
        rows.append(f"{b.name}.h5,{b.target},{b.patient}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "histolens", "train", "--slides", str(tmp_path / "labels.csv")]
    flags = ["--out", str(run), "--cv-folds", "2", "--epochs", "2", "--seed", "1"]
    ddp = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*cmd, *flags, *ddp], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Run: ") == 1  # one summary, from rank 0
    assert "GLOBAL_RANK" not in proc.stderr  # Lightning's banners are kept quiet
    # Not a terminal: one line per epoch, from rank 0 only (2 folds and the final model).
    assert proc.stderr.count("epoch 1/2:") == 3, proc.stderr[-2000:]
    _, meta = load_mil(run)
    assert meta["estimate"]["n_images"] == 20
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_no_finite_validation_loss_is_one_clear_error_not_an_untrained_model():
    # A NaN feature (an in-memory bag; bag files are checked when read) makes every loss NaN:
    # EarlyStopping stops at once and no epoch is "best", which must not pass for a fit.
    from histolens.errors import DataError

    bags = synthetic_bags(40, 2, 30, 8, seed=2)
    x, y = [b.features.copy() for b in bags], np.array([b.target for b in bags])
    x[0][0, 0] = np.nan
    config = MilConfig(hidden=8, attention=4, patience=2, seed=0)
    with pytest.raises(DataError, match="no finite validation loss"):
        fit_mil(x, y, config, [b.patient for b in bags], ONE)
