"""The linear probe: scikit-learn as the oracle for the folded head, patient-grouped inner CV,
and ``train`` with the linear head end to end (estimate, out-of-fold predictions, feature cache,
the shipped model)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from histolens.checkpoint.io import HeadSpec, read_metadata
from histolens.data.imageio import load_rgb
from histolens.data.records import SUBTYPE_CLASSES
from histolens.errors import ConfigError, DataError
from histolens.evaluation.estimate import headline_text
from histolens.inference.predictor import Predictor
from histolens.models.classifier import HistoClassifier
from histolens.models.feature_cache import FeatureCache
from histolens.testing import tiny_config
from histolens.training.probe import fit_linear_probe, group_folds, grouped_scores
from histolens.training.runner import FEATURE_CACHE, train

CS = (0.01, 0.1, 1.0)


def grouped_data(
    n_groups: int = 12, per_group: int = 5, shift: float = 1.0, n_classes: int = 2, seed: int = 0
):
    """Images of patients (one label each) whose first two features carry the class, on
    columns of very different scales and offsets, plus one constant column."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"p{i:02d}" for i in range(n_groups)], per_group)
    y = np.repeat(np.arange(n_groups) % n_classes, per_group)
    x = rng.normal(size=(len(y), 6))
    x[:, 0] += shift * y
    x[:, 1] -= shift * (y == 1)
    x = x * np.array([1.0, 10.0, 0.01, 100.0, 1.0, 0.0]) + np.array([5, -3, 0, 50, 0, 7.0])
    return x, y, groups


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sklearn_probe(x: np.ndarray, y: np.ndarray, C: float):
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=5000)
    return make_pipeline(StandardScaler(), model).fit(x, y)


# ------------------------------------------------------------------------------ fit_linear_probe


def test_folded_head_reproduces_the_scaler_and_logistic_regression():
    x, y, groups = grouped_data()
    fit = fit_linear_probe(x, y, groups, 2, CS, inner_folds=4, seed=0)
    assert fit.C in CS
    assert set(fit.inner_scores) == set(CS)
    assert fit.weight.shape == (1, 6) and fit.bias.shape == (1,)
    reference = sklearn_probe(x, y, fit.C)
    logits = fit.logits(x)
    np.testing.assert_allclose(logits[:, 0], reference.decision_function(x), atol=1e-6)
    np.testing.assert_allclose(sigmoid(logits[:, 0]), reference.predict_proba(x)[:, 1], atol=1e-6)


def test_multiclass_head_reproduces_predict_proba():
    x, y, groups = grouped_data(n_groups=12, n_classes=3, shift=2.0)
    fit = fit_linear_probe(x, y, groups, 3, CS, inner_folds=4, seed=0)
    assert fit.weight.shape == (3, 6) and fit.logits(x).shape == (len(y), 3)
    expected = sklearn_probe(x, y, fit.C).predict_proba(x)
    np.testing.assert_allclose(softmax(fit.logits(x)), expected, atol=1e-6)


def test_c_is_the_best_inner_score_and_its_out_of_fold_logits_give_that_score():
    x, y, groups = grouped_data(shift=0.7, seed=1)
    fit = fit_linear_probe(x, y, groups, 2, CS, inner_folds=4, seed=0)
    best = max(fit.inner_scores.values())
    assert min(c for c, s in fit.inner_scores.items() if s >= best - 1e-9) == fit.C
    assert fit.oof_logits is not None and fit.oof_logits.shape == (len(y), 1)
    assert np.isfinite(fit.oof_logits).all()  # every image scored by a fold that left it out
    assert fit.inner_scores[fit.C] == pytest.approx(roc_auc_score(y, fit.oof_logits[:, 0]))


def test_ties_go_to_the_strongest_regularisation():
    x, y, groups = grouped_data(shift=20.0)  # every C separates the held-out patients perfectly
    fit = fit_linear_probe(x, y, groups, 2, (1.0, 0.01, 0.1), inner_folds=4, seed=0)
    assert set(fit.inner_scores.values()) == {1.0}
    assert fit.C == 0.01


def test_too_few_patients_for_inner_cv_take_the_middle_of_the_grid():
    x, y, groups = grouped_data(n_groups=3)
    fit = fit_linear_probe(x, y, groups, 2, (1.0, 0.01, 0.1), seed=0)
    assert fit.C == 0.1
    assert fit.inner_scores == {} and fit.oof_logits is None


def test_inner_cv_never_scores_a_patient_it_trained_on():
    # The features are a one-hot patient ID: useless for a new patient, but an image-level CV
    # rewards it, since the other images of each test patient sit in the training folds.
    n_groups, per_group = 10, 4
    groups = np.repeat([f"p{i}" for i in range(n_groups)], per_group)
    y = np.repeat(np.arange(n_groups) % 2, per_group)
    x = np.repeat(np.eye(n_groups), per_group, axis=0)

    leaky = np.empty(len(y))
    for tr, te in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
        leaky[te] = sklearn_probe(x[tr], y[tr], 1.0).decision_function(x[te])
    assert roc_auc_score(y, leaky) > 0.95

    fit = fit_linear_probe(x, y, groups, 2, CS, inner_folds=5, seed=0)
    for g in np.unique(groups):
        # A held-out patient's ID column was all zeros in training: every image gets the
        # same logit, so the ID told the probe nothing.
        assert np.ptp(fit.oof_logits[groups == g]) < 1e-9
    for _, te in group_folds(y, groups, 5, 0):
        within = fit.oof_logits[te, 0]
        assert roc_auc_score(y[te], within) == 0.5
    assert max(fit.inner_scores.values()) < 0.95


def test_group_folds_are_patient_disjoint_and_cover_every_image_once():
    x, y, groups = grouped_data(n_groups=12)
    folds = group_folds(y, groups, 5, seed=3)
    assert len(folds) == 5
    seen = np.concatenate([te for _, te in folds])
    assert sorted(seen) == list(range(len(y)))
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        assert len(np.unique(y[te])) == 2  # stratified: both classes in every test fold
    # Three patients of a class: no more than three folds can hold one each.
    _, y6, g6 = grouped_data(n_groups=6)
    assert len(group_folds(y6, g6, 5, seed=0)) == 3


def test_one_patient_group_cannot_be_cross_validated():
    with pytest.raises(DataError, match="at least two patient groups"):
        group_folds(np.array([0, 1, 0, 1]), np.array(["a"] * 4), 5, 0)


def test_multiclass_with_a_class_missing_from_training_keeps_every_logit():
    x, y, groups = grouped_data(n_groups=9, n_classes=3, shift=4.0)
    trained_on = np.flatnonzero(y != 2)  # class 2 never seen in training
    everything = np.arange(len(y))
    out = grouped_scores(x, y, groups, 3, 1.0, [(trained_on, everything)])
    assert out.shape == (len(y), 3) and np.isfinite(out).all()
    # Class 2 never wins; classes 0 and 1 are told apart as a two-class probe would.
    assert (out[y == 2].argmax(axis=1) != 2).all() and (out[:, 2] < -1000).all()
    two = sklearn_probe(x[trained_on], y[trained_on], 1.0).predict_proba(x)
    np.testing.assert_allclose(softmax(out[:, :2]), two, atol=1e-6)
    assert (out[y != 2].argmax(axis=1) == y[y != 2]).all()


def test_multiclass_probe_with_a_class_in_one_patient_returns_all_classes():
    x, y, groups = grouped_data(n_groups=9, n_classes=2, shift=4.0)
    y = y.copy()
    y[groups == "p00"] = 2  # one patient holds class 2: some inner training folds lack it
    fit = fit_linear_probe(x, y, groups, 3, CS, inner_folds=5, seed=0)
    assert fit.weight.shape == (3, 6) and fit.bias.shape == (3,)
    assert fit.logits(x).shape == (len(y), 3)
    assert fit.oof_logits.shape == (len(y), 3) and np.isfinite(fit.oof_logits).all()


def test_one_class_is_refused():
    x, _, groups = grouped_data()
    with pytest.raises(DataError, match="at least two classes"):
        fit_linear_probe(x, np.zeros(len(x), int), groups, 2)


def test_load_into_copies_the_probe_into_a_linear_layer():
    x, y, groups = grouped_data()
    fit = fit_linear_probe(x, y, groups, 2, CS, inner_folds=4, seed=0)
    layer = torch.nn.Linear(6, 1)
    fit.load_into(layer)
    with torch.no_grad():
        out = layer(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(out, fit.logits(x), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"cannot hold a probe of shape \(1, 6\)"):
        fit.load_into(torch.nn.Linear(6, 3))


# ------------------------------------------------------------------------------ train (probe)

PROBE = {
    "model.head": "linear",
    "train.cv_folds": 3,
    "model.input_size": (120, 176),
    "train.probe_cs": (0.01, 0.1),
}


def _manifest(data: Path) -> list[dict[str, str]]:
    with open(data / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _cached_features(run: Path) -> FeatureCache:
    with safe_open(str(run / FEATURE_CACHE), framework="pt") as fh:
        fingerprint = fh.metadata()["fingerprint"]
    cache = FeatureCache.load(run / FEATURE_CACHE, fingerprint)
    assert cache is not None
    return cache


@pytest.fixture(scope="module")
def cv_run(synth_small, tmp_path_factory):
    cfg = tiny_config(synth_small, **PROBE)
    run = tmp_path_factory.mktemp("probe") / "cv"
    result = train(cfg, run, progress=False)
    return run, result, cfg


def test_estimate_counts_every_image_and_patient(cv_run, synth_small):
    run, result, _ = cv_run
    manifest = _manifest(synth_small)
    meta = read_metadata(run)
    est = meta.estimate
    assert est["method"].startswith(
        "3-fold patient-level cross-validation (out-of-fold predictions;"
    )
    assert est["n_images"] == len(manifest) == 32
    groups = {r["group"] for r in manifest}
    assert est["n_patients"] == len(groups) == 8
    per_class = {
        c: len({r["group"] for r in manifest if r["label"] == c}) for c in ("benign", "malignant")
    }
    assert est["patients_per_class"] == per_class
    assert sum(est["patients_per_class"].values()) == 8
    for key in ("roc_auc", "patient_auc", "balanced_accuracy", "sensitivity", "specificity"):
        value = est["metrics"][key]
        lo, hi = est["ci95"][key]
        assert 0.0 <= lo <= value <= hi <= 1.0, key
    # 4 patients per class: the estimate says so.
    assert any(
        w.startswith("Only 4 benign patients support this estimate") for w in est["warnings"]
    )
    assert result.metrics.split == "out-of-fold"
    assert meta.metrics["roc_auc"] == pytest.approx(est["metrics"]["roc_auc"])


def test_estimate_auc_ranks_the_raw_out_of_fold_scores_and_calibrate_keeps_it(cv_run, tmp_path):
    """The AUCs rank the folds' own scores: each fold's threshold shift (per magnification) is
    for the decision only, and choosing another operating point cannot move a ranking."""
    import shutil

    from histolens.stats.metrics import safe_auc
    from histolens.training.recalibrate import recalibrate_checkpoint

    run, _, _ = cv_run
    meta = read_metadata(run)
    ops = meta.decision  # the out-of-fold probabilities, at one temperature, rounded to 6 places
    n_pairs = int((ops.y == 1).sum() * (ops.y == 0).sum())
    # A tie made by the rounding moves the AUC by at most half a pair.
    tie = 0.5 / n_pairs
    assert meta.estimate["metrics"]["roc_auc"] == pytest.approx(safe_auc(ops.y, ops.p), abs=tie)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    again = recalibrate_checkpoint(copy, "sensitivity:0.95").estimate
    assert again is not None
    assert again.metrics["roc_auc"] == pytest.approx(meta.estimate["metrics"]["roc_auc"], abs=tie)


def test_checkpoint_records_the_probe(cv_run):
    run, _, cfg = cv_run
    meta = read_metadata(run)
    assert meta.head == HeadSpec.linear() and meta.head.is_linear
    assert meta.feature_layer is None  # test_resnet has no probe layer: its last layer
    assert meta.probe.C in cfg.train.probe_cs
    assert set(meta.probe.inner_cv) == {"0.01", "0.1"}
    assert 0.0 < meta.threshold < 1.0
    assert 0.05 <= meta.temperature <= 20.0
    assert meta.preprocess.input_size == (120, 176)
    assert json.loads((run / "config.json").read_text())["train"]["cv_folds"] == 3


def test_predictions_are_out_of_fold_for_every_image(cv_run, synth_small):
    run, _, cfg = cv_run
    rows = _predictions(run / "evaluation" / "predictions.csv")
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 32
    expected = {str((synth_small / r["path"]).resolve()) for r in _manifest(synth_small)}
    assert {str(Path(p).resolve()) for p in paths} == expected

    # Recompute the out-of-fold logits: patient-level folds, each fold its own inner CV.
    cache = _cached_features(run)
    x = torch.stack([cache.clean[p] for p in paths]).double().numpy()
    y = np.array([int(r["label"] == "malignant") for r in rows])
    g = np.array([r["patient"] for r in rows])
    mags = [int(r["magnification"]) if r["magnification"] else None for r in rows]
    from histolens.evaluation.referral import fit_calibration
    from histolens.stats.decisions import fit_on_logits
    from histolens.stats.operating_points import OperatingPointRule

    decision = np.full(len(y), np.nan)
    for k, (tr, te) in enumerate(group_folds(y, g, 3, cfg.data.seed)):
        assert not set(g[tr]) & set(g[te])
        fold = fit_linear_probe(x[tr], y[tr], g[tr], 2, cfg.train.probe_cs, 5, cfg.data.seed + k)
        # Each fold's temperature and thresholds (per magnification, every patient counted
        # once) come from its own inner out-of-fold logits.
        t_k, _ = fit_calibration(cfg, fold.oof_logits, y[tr], 2)
        ops = fit_on_logits(
            OperatingPointRule("youden"), fold.oof_logits, y[tr], g[tr], [mags[i] for i in tr], t_k
        )
        thr_k = ops.thresholds_for([mags[i] for i in te])
        decision[te] = fold.logits(x[te])[:, 0] - t_k * np.log(thr_k / (1 - thr_k))
    temperature = read_metadata(run).temperature
    probability = np.array([float(r["p_malignant"]) for r in rows])
    np.testing.assert_allclose(probability, sigmoid(decision), atol=1e-5)

    # ... which are not what the model fitted on every patient says about its own images.
    final = fit_linear_probe(x, y, g, 2, cfg.train.probe_cs, 5, cfg.data.seed)
    in_sample = sigmoid(final.logits(x)[:, 0] / temperature)
    assert np.abs(in_sample - probability).max() > 1e-3


def test_shipped_model_is_the_probe_on_all_patients(cv_run):
    run, _, cfg = cv_run
    cache = _cached_features(run)
    paths = sorted(cache.clean)
    rows = {r["path"]: r for r in _predictions(run / "evaluation" / "predictions.csv")}
    x = torch.stack([cache.clean[p] for p in paths]).double().numpy()
    y = np.array([int(rows[p]["label"] == "malignant") for p in paths])
    g = np.array([rows[p]["patient"] for p in paths])

    predictor = Predictor.from_checkpoint(run)
    kept, logits, skipped = predictor.logits_for_paths(paths)
    assert kept == paths and not skipped
    # The features the cache holds are the shipped model's features of the files ...
    with torch.inference_mode():
        images = torch.stack([predictor.preprocess.resize(load_rgb(q)) for q in paths])
        features = predictor.model.features(predictor.to_input(images))
    np.testing.assert_allclose(features.numpy(), x, atol=1e-4)
    # ... and its head is the probe fitted on every patient.
    final = fit_linear_probe(x, y, g, 2, cfg.train.probe_cs, 5, cfg.data.seed)
    assert read_metadata(run).probe.C == final.C
    np.testing.assert_allclose(logits.double().numpy(), final.logits(x), atol=1e-3)


def test_feature_cache_is_saved_with_its_fingerprint(cv_run):
    run, _, _ = cv_run
    cache = _cached_features(run)
    assert len(cache.clean) == 32
    assert FeatureCache.load(run / FEATURE_CACHE, "another-setting") is None


def test_a_finished_run_directory_refuses_a_second_training(cv_run):
    run, _, cfg = cv_run
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(cfg, run, progress=False)


@pytest.mark.slow
def test_held_out_split_and_a_shared_feature_store(synth_small, tmp_path, monkeypatch):
    cfg = tiny_config(synth_small, **{**PROBE, "train.cv_folds": 0})
    store: dict = {}
    train(cfg, tmp_path / "a", progress=False, feature_store=store)
    est = read_metadata(tmp_path / "a").estimate
    assert est["method"] == "a held-out test split of patients"
    with open(tmp_path / "a" / "split.csv", newline="", encoding="utf-8") as fh:
        test = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    assert test and est["n_images"] == len(test)
    assert est["n_patients"] == len({r["group"] for r in test})
    rows_a = _predictions(tmp_path / "a" / "evaluation" / "predictions.csv")
    assert sorted(r["path"] for r in rows_a) == sorted(r["path"] for r in test)

    calls: list[int] = []
    features = HistoClassifier.features

    def counting(self, x):
        calls.append(len(x))
        return features(self, x)

    monkeypatch.setattr(HistoClassifier, "features", counting)
    train(cfg, tmp_path / "b", progress=False, feature_store=store, write_outputs=False)
    monkeypatch.undo()
    assert calls == []  # every feature came from the store
    rows_b = _predictions(tmp_path / "b" / "predictions.csv")
    assert [r["p_malignant"] for r in rows_b] == [r["p_malignant"] for r in rows_a]

    # The second run's shipped model gives, from the files, what its evaluation says.
    temperature = read_metadata(tmp_path / "b").temperature
    predictor = Predictor.from_checkpoint(tmp_path / "b")
    assert predictor.temperature == temperature
    predictions, _ = predictor.predict_paths([r["path"] for r in rows_b])
    np.testing.assert_allclose(
        [p.scores["malignant"] for p in predictions],
        [float(r["p_malignant"]) for r in rows_b],
        atol=1e-4,
    )


@pytest.mark.slow
def test_subtype_task_trains_a_probe_over_all_subtypes(tmp_path):
    from histolens.data.synth import generate_synthetic

    data = tmp_path / "data"
    generate_synthetic(data, n=48, seed=5, size=(176, 120), n_patients=16)
    cfg = tiny_config(data, **{**PROBE, "data.task": "subtype", "train.cv_folds": 2})
    train(cfg, tmp_path / "run", progress=False)
    meta = read_metadata(tmp_path / "run")
    assert meta.class_names == SUBTYPE_CLASSES
    predictor = Predictor.from_checkpoint(tmp_path / "run")
    assert predictor.model.head.out.out_features == len(SUBTYPE_CLASSES)

    est = meta.estimate
    assert est["task"] == "subtype" and est["n_images"] == 48
    assert est["patients_per_class"] == dict.fromkeys(sorted(SUBTYPE_CLASSES), 2)
    assert 0.0 <= est["metrics"]["balanced_accuracy"] <= 1.0
    assert "n/a" not in headline_text(est)

    rows = _predictions(tmp_path / "run" / "evaluation" / "predictions.csv")
    assert len(rows) == 48
    probs = np.array([[float(r[f"p_{c}"]) for c in SUBTYPE_CLASSES] for r in rows])
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_probe_trains_on_the_mean_of_clean_and_augmented_views(synth_small, tmp_path):
    """train.probe_views: the probe's training features average the clean view with K
    stain-jittered views (computed once, cached); the test images are scored on clean views."""
    views = {"train.probe_views": 2, "augment.enabled": False, "augment.stain": True}
    cfg = tiny_config(synth_small, **{**PROBE, "train.cv_folds": 0, **views})
    store: dict = {}
    train(cfg, tmp_path / "v", progress=False, feature_store=store)
    [cache] = store.values()
    with open(tmp_path / "v" / "split.csv", newline="", encoding="utf-8") as fh:
        split = list(csv.DictReader(fh))
    trained = {r["path"] for r in split if r["split"] in ("train", "val")}
    assert trained and set(cache.views) == trained  # views of the training images only
    some = next(iter(trained))
    assert cache.views[some].shape == (2, *cache.clean[some].shape)
    assert not torch.allclose(cache.views[some][0], cache.clean[some])  # jittered, not a copy
    plain = tiny_config(synth_small, **{**PROBE, "train.cv_folds": 0})
    train(plain, tmp_path / "c", progress=False, feature_store={})
    a = read_metadata(tmp_path / "v").estimate
    b = read_metadata(tmp_path / "c").estimate
    assert a["n_images"] == b["n_images"]  # the same test images, scored on clean views
    w_views = Predictor.from_checkpoint(tmp_path / "v").model.head.out.weight
    w_plain = Predictor.from_checkpoint(tmp_path / "c").model.head.out.weight
    assert not torch.allclose(w_views, w_plain)  # the averaged views trained the probe
    with pytest.raises(ConfigError, match="probe_views must be 0 or more"):
        tiny_config(synth_small, **{"train.probe_views": -1})


def test_patient_weighting_gives_every_patient_of_a_class_the_same_weight():
    from histolens.training.probe import patient_balanced_weights

    x, y, groups = grouped_data(n_groups=8, per_group=3)
    # Uneven patients: the first patient of each class gets 12 more images.
    extra = np.concatenate([np.flatnonzero(groups == "p00"), np.flatnonzero(groups == "p01")])
    x = np.concatenate([x] + [x[extra]] * 4)
    y = np.concatenate([y] + [y[extra]] * 4)
    groups = np.concatenate([groups] + [groups[extra]] * 4)
    w = patient_balanced_weights(y, groups)
    assert w.sum() == pytest.approx(len(y))  # as class_weight="balanced": C means the same
    for c in (0, 1):
        per_patient = [w[groups == g].sum() for g in np.unique(groups[y == c])]
        assert per_patient == pytest.approx([len(y) / 2 / len(per_patient)] * len(per_patient))
    fit = fit_linear_probe(x, y, groups, 2, (0.1,), inner_folds=4, seed=0, weighting="patient")
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    reference.fit(x, y, logisticregression__sample_weight=w)
    np.testing.assert_allclose(fit.logits(x)[:, 0], reference.decision_function(x), atol=1e-6)
    image_weighted = fit_linear_probe(x, y, groups, 2, (0.1,), inner_folds=4, seed=0)
    assert np.abs(image_weighted.logits(x) - fit.logits(x)).max() > 1e-3
    with pytest.raises(ValueError, match="weighting must be one of"):
        fit_linear_probe(x, y, groups, 2, (0.1,), weighting="group")
