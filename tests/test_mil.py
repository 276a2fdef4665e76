"""Attention MIL on tiny synthetic feature bags: the model, the folds, LABELS.csv and the run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from histolens.errors import DataError
from histolens.training.mil import MilConfig, build_mil_model, predict_mil
from histolens.training.mil_cv import cross_validate_mil
from histolens.training.mil_data import read_bag, read_slide_labels, write_bag
from histolens.training.mil_fit import fit_mil
from histolens.training.mil_folds import patient_folds
from histolens.training.mil_synthetic import synthetic_bags

FAST = MilConfig(hidden=16, attention=8, epochs=15, lr=2e-3, seed=0)


@pytest.fixture(scope="module")
def tiny_bags():
    # 24 slides of 12 patients, 60 tiles of 8 features; lesions of 10-30% lie 6 units from the
    # benign mean (6 noise standard deviations), far from any decision boundary.
    return synthetic_bags(
        n_slides=24, tiles=60, dim=8, lesion_range=(0.1, 0.3), lesion_distance=6.0, seed=1
    )


def test_attention_sums_to_one_per_bag():
    import torch

    torch.manual_seed(0)
    model = build_mil_model(5, FAST)
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, 5)).astype(np.float32) for n in (1, 7, 300)]
    _, weights = predict_mil(model, bags)
    for bag, w in zip(bags, weights, strict=True):
        assert w.shape == (len(bag),) and (w >= 0).all()
        # a float32 softmax over n terms sums to 1 within ~n float32 eps
        assert abs(w.sum() - 1.0) <= len(bag) * 1.2e-7 + 1e-6


def test_mil_learns_a_planted_signal(tiny_bags):
    cv = cross_validate_mil(
        [b.features for b in tiny_bags],
        [b.target for b in tiny_bags],
        [b.patient for b in tiny_bags],
        FAST,
        n_splits=3,
    )
    auc = cv.table()["attention MIL"][0]
    assert auc >= 0.85, auc  # chance is 0.5; the lesion cluster is 6 sd away
    assert set(cv.fold) == {0, 1, 2}
    positives = [i for i, b in enumerate(tiny_bags) if b.target]
    hits = [tiny_bags[i].lesion[int(np.argmax(cv.attention[i]))] for i in positives]
    assert np.mean(hits) >= 0.7


def test_training_is_repeatable(tiny_bags):
    bags = [b.features for b in tiny_bags[:8]]
    y = [b.target for b in tiny_bags[:8]]
    a = fit_mil(bags, y, FAST)
    b = fit_mil(bags, y, FAST)
    assert a.losses == b.losses


def test_folds_are_patient_disjoint_and_stratified():
    patients = [f"p{i // 3}" for i in range(30)]
    y = [int(i // 3 % 2) for i in range(30)]
    folds = patient_folds(y, patients, n_splits=5, seed=3)
    seen = []
    for train, test in folds:
        assert not {patients[i] for i in train} & {patients[i] for i in test}
        assert {y[i] for i in test} == {0, 1}
        seen += list(test)
    assert sorted(seen) == list(range(30))
    with pytest.raises(DataError, match="at least 5 patients"):
        patient_folds(y[:9], patients[:9], n_splits=5)


def test_bag_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(11, 4)).astype(np.float32)
    coords = rng.integers(0, 10_000, size=(11, 2))
    path = write_bag(tmp_path / "s.h5", features, coords, {"lesion": np.arange(11) < 3})
    bag = read_bag(path)
    assert bag.name == "s" and len(bag) == 11
    np.testing.assert_array_equal(bag.features, features)
    np.testing.assert_array_equal(bag.coords, coords)
    import h5py

    with h5py.File(tmp_path / "nofeat.h5", "w") as f:
        f.create_dataset("coords", data=coords)
    with pytest.raises(DataError, match="has no 'features'"):
        read_bag(tmp_path / "nofeat.h5")


def _write_csv(path, rows, header=("slide", "label", "patient")):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.mark.parametrize(
    ("header", "rows", "match"),
    [
        (("slide", "patient"), [["a.h5", "p"]], "missing label"),
        (("slide", "label"), [], "no slides"),
        (("slide", "label"), [["missing.h5", "1"]], "does not exist"),
        (("slide", "label"), [["a.svs", "1"]], "not a feature bag"),
        (("slide", "label"), [["a.h5", "1"], ["a.h5", "0"]], "listed twice"),
        (("slide", "label"), [["a.h5", "1"], ["b.h5", "1"]], "exactly two slide labels"),
        (("slide", "label"), [["a.h5", ""]], "must not be empty"),
    ],
)
def test_labels_csv_errors(tmp_path, header, rows, match):
    for name in ("a", "b"):
        write_bag(tmp_path / f"{name}.h5", np.ones((2, 3)), np.zeros((2, 2)))
    path = _write_csv(tmp_path / "labels.csv", rows, header)
    with pytest.raises(DataError, match=match):
        read_slide_labels(path)


def test_labels_csv_reads_classes_and_patients(tmp_path):
    for name in ("a", "b", "c"):
        write_bag(tmp_path / f"{name}.h5", np.ones((2, 3)), np.zeros((2, 2)))
    rows = [["a.h5", "tumour", "p1"], ["b.h5", "normal", "p1"], ["c.h5", "tumour", ""]]
    labels = read_slide_labels(_write_csv(tmp_path / "labels.csv", rows))
    assert labels.class_names == ("normal", "tumour")
    assert labels.targets.tolist() == [1, 0, 1]
    assert labels.patients == ("p1", "p1", "slide:c") and not labels.patients_given


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_bags):
    """A ``train --slides`` run on the tiny bags (3 folds, 10 epochs): (run dir, CLI output)."""
    from histolens.cli.commands import main

    tmp = tmp_path_factory.mktemp("mil")
    rows = []
    for b in tiny_bags:
        write_bag(tmp / f"{b.name}.h5", b.features, b.coords)
        rows.append([f"{b.name}.h5", str(b.target), b.patient])
    labels = _write_csv(tmp / "labels.csv", rows)
    out = tmp / "run"
    args = ["train", "--slides", str(labels), "--out", str(out), "--cv-folds", "3"]
    result = CliRunner().invoke(main, [*args, "--epochs", "10", "--seed", "0", "--alpha", "0.2"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_train_slides_command(tmp_path, tiny_bags, trained_run):
    from histolens.cli.commands import main
    from histolens.training.mil_run import load_mil

    out, output = trained_run
    assert "attention MIL" in output and "mean pooling + linear probe" in output
    for name in ("mil.safetensors", "mil.json", "metrics.json", "oof_predictions.csv"):
        assert (out / name).is_file()
    model, meta = load_mil(out)
    assert meta["schema"] == "histolens.mil" and meta["feature_dim"] == 8
    probs, weights = predict_mil(model, [tiny_bags[0].features])
    assert 0.0 <= probs[0] <= 1.0 and len(weights[0]) == 60
    bad = _write_csv(tmp_path / "bad.csv", [["x.h5", "1"]], ("slide", "label"))
    result = CliRunner().invoke(main, ["train", "--slides", str(bad)])
    assert result.exit_code == 1 and "does not exist" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_run_stores_the_honest_outputs(trained_run, tiny_bags):
    """Calibration, operating point, prediction sets, estimate and model card in the checkpoint;
    the evaluation (one row per slide) and the report beside it."""
    from histolens.stats.calibration import MAX_TEMPERATURE, MIN_TEMPERATURE
    from histolens.training.mil_decision import MilDecision
    from histolens.training.mil_run import load_mil

    out, output = trained_run
    _, meta = load_mil(out)
    assert meta["version"] == 2
    decision = MilDecision.from_dict(meta["decision"])
    assert MIN_TEMPERATURE <= decision.temperature <= MAX_TEMPERATURE
    assert 0.0 < decision.threshold < 1.0 and str(decision.operating_points.rule) == "youden"
    assert decision.conformal.alpha == 0.2 and decision.conformal.n_patients == 12
    estimate = meta["estimate"]
    assert estimate["n_images"] == 24 and estimate["n_patients"] == 12
    assert "cross-validation of attention MIL" in estimate["method"]
    lo, hi = estimate["ci95"]["roc_auc"]
    assert lo <= estimate["metrics"]["roc_auc"] <= hi
    assert "refer_rate" in estimate["metrics"]  # prediction sets were measured
    card = meta["model_card"]
    assert set(card) == {"intended_use", "model", "data", "performance", "limitations"}
    assert "Not for diagnosis" in card["intended_use"] and "mean pooling" in card["performance"]
    rows = (out / "evaluation" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 25 and rows[0].startswith("path,prediction,probability")
    report = (out / "report.html").read_text()
    for heading in ("Estimated performance on unseen patients", "Model card", "mean pooling"):
        assert heading in report
    assert "Report:" in output and "threshold" in output
    # 3 folds of 8 training patients (4 of each label) are too few for an inner split; all 12
    # patients (6 of each) are enough: the final model holds out a fifth of them (2 or 3).
    training = json.loads((out / "metrics.json").read_text())["training"]
    assert [f["epochs"] for f in training["folds"]] == [10, 10, 10]
    assert not any(f["early_stopping"] for f in training["folds"])
    final = training["final"]
    assert final["early_stopping"] and final["val_patients"] in (2, 3)
    assert final["val_slides"] == 2 * final["val_patients"]  # 2 slides a patient
    assert final["best_epoch"] <= final["epochs"] <= 10
    assert output.count("note: No early stopping for fold 1, fold 2, fold 3 (") == 1
    assert "final model: best epoch" in output
    # Every slide's predicted class is in its set, and the set is one class unless referred.
    calls = decision.decide(np.array([-3.0, 0.0, 3.0]))
    for call in calls:
        assert call.label in call.prediction_set
        assert call.refer == (len(call.prediction_set) == 2)
    assert [c.probability for c in calls] == sorted(c.probability for c in calls)


def test_cross_fitted_estimate_is_not_tuned_on_its_own_slides():
    """On logits without signal, a Youden threshold chosen on the slides it is measured on
    flatters balanced accuracy; the cross-fitted estimate does not get that bonus."""
    from histolens.stats.operating_points import choose_threshold_for, parse_operating_point
    from histolens.training.mil_cv import MilCrossValidation
    from histolens.training.mil_decision import cross_fitted_evaluation, fit_mil_decision

    n, rule, classes = 200, parse_operating_point("youden"), ("0", "1")
    y = np.arange(n) % 2
    patients = tuple(f"p{i // 2}" for i in range(n))
    fold = np.arange(n) // 2 % 5  # by patient: a patient never straddles two folds
    in_sample, crossed = [], []
    for seed in range(30):
        z = np.random.default_rng(seed).normal(size=n)
        cv = MilCrossValidation(y, patients, fold, z, z, [np.ones(1)] * n, z)
        decision = fit_mil_decision(z, y, patients, classes, rule, 0.1, [])
        names = [f"s{i}" for i in range(n)]
        _, est = cross_fitted_evaluation(cv, names, classes, decision, rule, "noise", n_boot=0)
        crossed.append(est["metrics"]["balanced_accuracy"])
        p = 1 / (1 + np.exp(-z))
        t = choose_threshold_for(rule, y, p)
        in_sample.append(np.mean([((p >= t) == y)[y == c].mean() for c in (0, 1)]))
    # Balanced accuracy of one noise run has sd ~0.035, so a mean of 30 ~0.0065; the in-sample
    # bonus is ~0.04 (measured over 40 seeds), its mean's sd ~0.0035.
    assert abs(np.mean(crossed) - 0.5) < 0.025, np.mean(crossed)
    assert np.mean(in_sample) - np.mean(crossed) > 0.02, (np.mean(in_sample), np.mean(crossed))
