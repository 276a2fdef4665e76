"""Prediction sets that know when not to answer: the patient-weighted conformal quantile, its
coverage on new patients, the sets and referrals the predictor, the CSV and the report show."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from histolens.checkpoint.io import read_metadata
from histolens.errors import CheckpointError, ConfigError
from histolens.inference.predictor import Predictor
from histolens.stats.conformal import ConformalCalibration, centred_probabilities
from histolens.stats.conformal_metrics import (
    coverage,
    leave_one_patient_out_sets,
    patient_referrals,
    risk_coverage,
)
from histolens.stats.decisions import OperatingPoints
from histolens.testing import make_checkpoint, stratified_calibration, tiny_config
from histolens.training.runner import train

CLASSES = ("benign", "malignant")


def binary_probs(p_positive) -> np.ndarray:
    p = np.asarray(p_positive, dtype=float)
    return np.stack([1 - p, p], axis=1)


# ----------------------------------------------------------------------------- the quantile


def test_quantile_is_the_split_conformal_rank_with_one_image_per_patient():
    # 19 patients, one image each, scores 0.01..0.19: the ceil((1 - 0.1) * 20) = 18th smallest.
    scores = np.arange(1, 20) / 100
    cal = ConformalCalibration(scores, np.zeros(19, int), np.arange(19), CLASSES, 0.1)
    assert cal.quantile() == pytest.approx(0.18)
    assert cal.quantile(0.5) == pytest.approx(0.10)  # ceil(0.5 * 20) = 10th


def test_every_patient_weighs_the_same_however_many_images_it_has():
    # 19 patients with one low score each, and one patient with 100 high scores: counted per
    # image the high scores would set the quantile; counted per patient they are one of 20.
    scores = np.concatenate([np.linspace(0.01, 0.19, 19), np.full(100, 0.9)])
    patients = np.concatenate([np.arange(19), np.full(100, 19)])
    cal = ConformalCalibration(scores, np.zeros(119, int), patients, CLASSES, 0.2)
    # ceil((1 - 0.2) * 21) = 17 patients' worth of weight: the 17th lowest patient score.
    assert cal.quantile() == pytest.approx(np.linspace(0.01, 0.19, 19)[16])
    assert np.quantile(scores, 0.8) == pytest.approx(0.9)  # what an image-level quantile gives


def test_too_few_patients_for_alpha_refer_everything():
    cal = ConformalCalibration(np.full(8, 0.1), np.zeros(8, int), np.arange(8), CLASSES, 0.1)
    assert cal.min_alpha == pytest.approx(1 / 9)
    assert math.isinf(cal.quantile())
    assert cal.prediction_sets(binary_probs([0.99, 0.01])).all()
    assert np.isfinite(cal.quantile(0.2))


def test_coverage_on_new_patients_is_at_least_one_minus_alpha():
    """Simulated patients with their own shift of every image's score (images of one patient
    are alike): calibrated on 40 patients, tested on 40 new ones, 300 times."""
    rng = np.random.default_rng(0)
    alpha = 0.1

    def patients(n):
        sizes = rng.integers(1, 30, n)
        shift = rng.normal(0, 1.5, n)
        pid = np.repeat(np.arange(n), sizes)
        y = np.repeat(rng.integers(0, 2, n), sizes)
        z = (2 * y - 1) * (1.0 + np.repeat(shift, sizes)) + rng.normal(0, 1, len(y))
        return binary_probs(1 / (1 + np.exp(-z))), y, pid

    covered = []
    for _ in range(300):
        cal = ConformalCalibration.fit(*patients(40), CLASSES, alpha)
        p, y, pid = patients(40)
        covered.append(coverage(cal.prediction_sets(p), y, pid)["patients"])
    assert np.mean(covered) >= 1 - alpha - 0.005
    assert np.mean(covered) <= 1 - alpha + 0.04  # valid without being trivially conservative


def test_leave_one_patient_out_ignores_the_patients_own_scores():
    rng = np.random.default_rng(1)
    pid = np.repeat(np.arange(12), 4)
    y = np.repeat(np.arange(12) % 2, 4)
    p = binary_probs(rng.uniform(0, 1, len(y)))
    changed = p.copy()
    changed[pid == 0] = binary_probs(1 - p[pid == 0, 1])  # patient 0's scores reversed
    a = leave_one_patient_out_sets(p, y, pid, 0.2)
    b = leave_one_patient_out_sets(changed, y, pid, 0.2)
    # Patient 0's own sets use only the others' scores: the same threshold before and after.
    cal = ConformalCalibration.fit(p[pid != 0], y[pid != 0], pid[pid != 0], CLASSES, 0.2)
    np.testing.assert_array_equal(b[pid == 0], cal.prediction_sets(changed[pid == 0]))
    assert not np.array_equal(a[pid == 0], b[pid == 0])


# ------------------------------------------------------------------------------- the sets


def test_sets_hold_the_thresholded_label_and_refer_when_both_are_plausible():
    cal = ConformalCalibration(
        np.linspace(0.05, 0.7, 20), np.zeros(20, int), np.arange(20), CLASSES, 0.2
    )
    q = cal.quantile()
    assert 0.55 < q < 0.65
    # Threshold 0.3: p = 0.32 is malignant, and centring keeps the label in the set.
    probs = centred_probabilities(binary_probs([0.32, 0.99, 0.01]), 0.3)
    assert probs[0, 1] > 0.5
    member = cal.prediction_sets(probs)
    assert member[0].all()  # near the threshold: both plausible, refer
    assert member[1].tolist() == [False, True]
    assert member[2].tolist() == [True, False]


def test_a_set_is_never_empty():
    cal = ConformalCalibration(np.full(30, 0.01), np.zeros(30, int), np.arange(30), CLASSES, 0.3)
    member = cal.prediction_sets(binary_probs([0.5, 0.6, 0.9]), predicted=[1, 1, 1])
    assert member.sum(1).tolist() == [1, 1, 1] and member[:, 1].all()


def test_calibration_round_trips_through_json_and_rejects_damage():
    rng = np.random.default_rng(2)
    cal = ConformalCalibration.fit(
        binary_probs(rng.uniform(size=30)), rng.integers(0, 2, 30), rng.integers(0, 9, 30), CLASSES
    )
    back = ConformalCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_allclose(back.scores, cal.scores, atol=1e-6)
    assert back.quantile(0.3) == pytest.approx(cal.quantile(0.3), abs=1e-6)
    assert back.classes == CLASSES and back.n_patients == cal.n_patients
    with pytest.raises(CheckpointError, match="conformal calibration is damaged"):
        ConformalCalibration.from_dict({"scores": [0.1], "labels": [0]})
    with pytest.raises(ConfigError, match="alpha must be between 0 and 1"):
        cal.quantile(1.5)
    with pytest.raises(ConfigError, match="Unknown nonconformity score 'probabilty'"):
        ConformalCalibration.fit(binary_probs([0.5]), [0], ["a"], CLASSES, score="probabilty")


def test_disagreement_across_views_raises_the_score():
    views = np.array([[[0.2, 0.8], [0.2, 0.8]], [[0.4, 0.6], [0.0, 1.0]]])  # (2 images, 2 views)
    cal = ConformalCalibration.fit(views, [1, 1], ["a", "b"], CLASSES, score="tta")
    # Both have mean 0.8 for malignant; the second's views disagree (sd 0.2).
    np.testing.assert_allclose(cal.scores, [0.2, 0.4])


# --------------------------------------------------------------- curve and patient decision


def _two_magnifications():
    """20 patients at 200X whose true-class scores are low (an easy source) and 20 at 100X whose
    scores are high: one pooled quantile sits between them."""
    s200 = np.linspace(0.01, 0.10, 20)
    s100 = np.linspace(0.30, 0.60, 20)
    scores = np.concatenate([s200, s100])
    patients = np.arange(40)
    mags = np.array([200] * 20 + [100] * 20, dtype=object)
    probs = binary_probs(1 - scores)  # true class 1: score = 1 - p(class 1)
    return probs, np.ones(40, int), patients, mags, s100, s200


def test_each_magnification_is_judged_by_its_own_quantile():
    probs, y, patients, mags, s100, s200 = _two_magnifications()
    pooled = ConformalCalibration.fit(probs, y, patients, CLASSES, 0.2)
    mondrian = ConformalCalibration.fit(probs, y, patients, CLASSES, 0.2, magnifications=mags)
    # ceil(0.8 * 21) = 17th of 20 per magnification; the pooled quantile is the 33rd of 40.
    q = mondrian.stratum_quantiles()
    assert q["100"] == pytest.approx(s100[16]) and q["200"] == pytest.approx(s200[16])
    assert pooled.quantile() < q["100"]
    # A new 100X image whose class-0 score lies between the pooled and the 100X quantile: the
    # pooled calibration rules class 0 out, the per-magnification one keeps it (refer).
    p0 = 1 - (pooled.quantile() + q["100"]) / 2  # probability of class 0
    new = binary_probs([1 - p0])
    assert pooled.prediction_sets(new, predicted=[1]).tolist() == [[False, True]]
    assert mondrian.prediction_sets(new, predicted=[1], magnifications=[100]).tolist() == [
        [True, True]
    ]
    # At 200X the same image is decided; unknown magnification gets the most cautious quantile.
    assert mondrian.prediction_sets(new, predicted=[1], magnifications=["200X"]).tolist() == [
        [False, True]
    ]
    assert mondrian.prediction_sets(new, predicted=[1], magnifications=[None]).tolist() == [
        [True, True]
    ]


def test_a_magnification_with_too_few_patients_gets_the_most_cautious_quantile():
    probs, y, patients, mags, s100, _ = _two_magnifications()
    mags = mags.copy()
    mags[:5] = 40  # five patients at 40X: too few for alpha 0.1 (nine needed)
    cal = ConformalCalibration.fit(probs, y, patients, CLASSES, 0.1, magnifications=mags)
    q = cal.stratum_quantiles()
    assert math.isinf(q["40"]) and cal.stratum_patients()["40"] == 5
    scores = cal.class_scores(binary_probs([0.5]))
    fallback = max(q["100"], q["200"], cal.quantile())
    within = scores[0, 0] <= fallback
    assert cal.prediction_sets(binary_probs([0.5]), magnifications=[40])[0, 0] == within
    notes: list[str] = []
    from histolens.evaluation.referral import fit_prediction_sets

    fit_prediction_sets(probs, y, patients.astype(str), CLASSES, 0.1, notes, list(mags))
    assert any("40X (5 patients)" in n for n in notes), notes


def test_stratified_calibration_round_trips_and_older_ones_stay_pooled():
    probs, y, patients, mags, _, _ = _two_magnifications()
    cal = ConformalCalibration.fit(probs, y, patients, CLASSES, 0.2, magnifications=mags)
    d = json.loads(json.dumps(cal.to_dict()))
    assert d["stratum_patients"] == {"100": 20, "200": 20}
    back = ConformalCalibration.from_dict(d)
    assert back.stratum_quantiles() == pytest.approx(cal.stratum_quantiles(), abs=1e-6)
    new = binary_probs(np.linspace(0.3, 0.9, 7))
    assert (
        back.prediction_sets(new, magnifications=[100] * 7)
        == cal.prediction_sets(new, magnifications=[100] * 7)
    ).all()
    older = {k: v for k, v in d.items() if k not in ("strata", "stratum_patients")}
    older["format_version"] = 1
    pooled = ConformalCalibration.from_dict(older)
    assert pooled.strata is None and pooled.stratum_quantiles() == {}
    assert pooled.quantile() == pytest.approx(
        ConformalCalibration.fit(probs, y, patients, CLASSES, 0.2).quantile()
    )


def test_leave_one_patient_out_is_per_magnification_when_asked():
    probs, y, patients, mags, _, _ = _two_magnifications()
    pooled = leave_one_patient_out_sets(probs, y, patients, 0.2)
    mondrian = leave_one_patient_out_sets(probs, y, patients, 0.2, magnifications=mags)
    at100 = mags == 100
    # The pooled calibration covers the hard 100X patients worse than their own does.
    assert (
        coverage(mondrian[at100], y[at100], patients[at100])["patients"]
        > coverage(pooled[at100], y[at100], patients[at100])["patients"]
    )


def test_magnification_is_read_from_breakhis_names_and_folders():
    from histolens.data.records import magnification_from_path

    assert magnification_from_path("x/SOB_B_TA-14-3411F-100-001.png") == 100
    assert magnification_from_path("data/400X/benign/tile.png") == 400
    assert magnification_from_path("data/200X-224px/DC_10926_000.png") == 200
    assert magnification_from_path("holiday/cat.jpg") is None
    assert magnification_from_path(None) is None


def test_risk_coverage_refers_the_least_confident_first():
    correct = np.array([True, True, False, True])
    confidence = np.array([0.9, 0.8, 0.6, 0.7])
    curve = risk_coverage(correct, confidence)
    np.testing.assert_allclose(curve["referred"], [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(curve["accuracy"], [0.75, 1.0, 1.0, 1.0])
    assert curve["aurc"] == pytest.approx(0.25 / 4)
    # A tie between an error and a correct image keeps the error longest (pessimistic).
    tied = risk_coverage(np.array([True, False]), np.array([0.5, 0.5]))
    np.testing.assert_allclose(tied["accuracy"], [0.5, 0.0])


def test_a_patient_is_referred_when_half_its_images_are():
    decided = patient_referrals(
        [True, True, False, False, True, False, False, False],
        ["a", "a", "a", "a", "b", "b", "b", "b"],
    )
    assert decided == {"a": True, "b": False}


# -------------------------------------------------- trained model: predictor, CLI, report

PROBE = {
    "model.head": "linear",
    "train.cv_folds": 3,
    "model.input_size": (120, 176),
    "train.probe_cs": (0.01,),
    "train.alpha": 0.2,
}


@pytest.fixture(scope="module")
def refer_run(synth_small, tmp_path_factory):
    run = tmp_path_factory.mktemp("refer") / "run"
    result = train(tiny_config(synth_small, **PROBE), run, progress=False)
    return run, result


def test_training_stores_the_calibration_of_every_patient(refer_run, synth_small):
    run, _ = refer_run
    meta = read_metadata(run)
    cal = meta.conformal
    assert cal["alpha"] == 0.2 and cal["score"] == "probability"
    assert cal["n_images"] == 32 and cal["n_patients"] == 8
    assert len(cal["scores"]) == len(cal["patients"]) == 32
    assert all(0 <= s <= 1 for s in cal["scores"])


def test_out_of_fold_coverage_is_reported_and_written(refer_run):
    run, result = refer_run
    refer = result.metrics.refer
    assert refer.alpha == 0.2 and refer.target_coverage == pytest.approx(0.8)
    assert 0 <= refer.coverage <= 1 and 0 <= refer.refer_rate <= 1
    assert "leave-one-patient-out" in refer.method
    assert refer.n_patients == 8
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert metrics["refer"]["coverage"] == pytest.approx(refer.coverage)
    with open(run / "evaluation" / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert {"prediction_set", "refer", "ood", "ood_reason", "probability"} <= set(rows[0])
    referred = sum(r["refer"] == "1" for r in rows)
    assert referred / len(rows) == pytest.approx(
        (refer.refer_rate * (len(rows) - refer.n_ood) + refer.n_ood) / len(rows)
    )
    for r in rows:
        assert r["prediction"] in r["prediction_set"].split(";")
    assert (run / "evaluation" / "risk_coverage.png").stat().st_size > 1000
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "Knowing when not to answer" in html and "Coverage on held-out patients" in html


def test_predictor_sets_follow_alpha(refer_run, synth_small):
    run, _ = refer_run
    predictor = Predictor.from_checkpoint(run)
    assert predictor.refer_alpha == 0.2
    paths = sorted(synth_small.glob("*X/*/*.png"))
    wide = []
    for alpha in (0.5, 0.2, 0.15):
        predictor.alpha = alpha
        preds, _ = predictor.predict_paths(paths)
        wide.append(sum(len(p.prediction_set) for p in preds))
        for p in preds:
            assert p.label in p.prediction_set and p.alpha == alpha
            assert p.uncertain == p.refer
            assert p.refer == (len(p.prediction_set) > 1 or p.ood)
    assert wide[0] <= wide[1] <= wide[2]  # a smaller error level never gives smaller sets
    predictor.alpha = 0.0
    with pytest.raises(ConfigError, match="alpha must be between 0 and 1"):
        predictor.predict_paths(paths[:1])


def test_predict_command_writes_sets_and_takes_alpha(refer_run, synth_small, tmp_path):
    from histolens.cli.commands import main

    run, _ = refer_run
    out = tmp_path / "p.csv"
    folder = synth_small / "400X" / "benign"
    res = CliRunner().invoke(
        main, ["predict", str(run), str(folder), "--out", str(out), "--alpha", "0.5", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {"prediction_set", "refer", "ood", "ood_reason", "uncertain"} <= set(rows[0])
    for r in rows:
        assert r["prediction"] in r["prediction_set"].split(";")
    bad = CliRunner().invoke(main, ["predict", str(run), str(folder), "--alpha", "1.5"])
    assert bad.exit_code != 0 and "alpha" in bad.output


def test_checkpoints_without_calibration_keep_the_old_review_rule(tmp_path):
    from histolens.testing import make_tissue_image

    predictor = Predictor.from_checkpoint(make_checkpoint(tmp_path / "old.safetensors"))
    assert predictor.conformal is None and predictor.guard is None
    pred = predictor.predict_image(make_tissue_image())
    assert pred.prediction_set == () and pred.refer is False and pred.ood is False
    margin = abs(pred.positive_probability - pred.threshold) < 0.1
    assert pred.uncertain == margin


def test_predictor_judges_each_image_by_its_magnification(tmp_path):
    # 100X patients were hard (every score 0.99: both classes always plausible), 200X easy (0.01).
    cal = stratified_calibration("100", "200")
    predictor = Predictor.from_checkpoint(
        make_checkpoint(tmp_path / "m.safetensors", conformal=cal)
    )
    probs = np.array([0.3, 0.7])
    at100 = predictor.decide(probs, path="slides/SOB_M_DC-14-2523-100-001.png")
    at200 = predictor.decide(probs, path="slides/200X/tile.png")
    unknown = predictor.decide(probs, path="slides/tile.png")
    told = predictor.decide(probs, path="slides/tile.png", magnification=200)
    assert at100.refer and set(at100.prediction_set) == set(CLASSES)
    assert not at200.refer and at200.prediction_set == ("malignant",)
    assert unknown.refer  # unknown magnification: the most cautious quantile
    assert at100.refer_reason.endswith("(calibrated on 100X images)")
    assert "magnification unknown: the most cautious calibration" in unknown.refer_reason
    assert not told.refer
    [batch100, batch_unknown] = predictor.decide_batch(
        np.stack([probs, probs]), [None, None], None, [100, None]
    )
    assert batch100.refer and batch_unknown.refer


def test_magnifications_are_read_leniently_and_unknowns_stay_pooled():
    from histolens.stats.conformal import stratum_of

    assert [stratum_of(v) for v in (100, "100X", " 100x ", 200.0, np.int64(400))] == [
        "100",
        "100",
        "100",
        "200",
        "400",
    ]
    assert [stratum_of(v) for v in (None, "", 0, "0", -40, 12.5, "cat", float("nan"))] == [""] * 8
    probs, y, patients, _, _, _ = _two_magnifications()
    # No magnification known anywhere: one pooled calibration, and no clause in the reasons.
    cal = ConformalCalibration.fit(probs, y, patients, CLASSES, 0.2, magnifications=[None] * 40)
    assert cal.strata is None and cal.basis(100) == ""
    assert "per magnification" not in cal.to_dict()["method"]


def test_a_magnification_without_calibration_patients_is_named(tmp_path):
    probs, y, patients, mags, _, _ = _two_magnifications()
    cal = ConformalCalibration.fit(probs, y, patients, CLASSES, 0.2, magnifications=mags)
    assert cal.basis(400) == " (no 400X calibration patients: the most cautious calibration)"
    assert cal.basis("100X") == " (calibrated on 100X images)"
    predictor = Predictor.from_checkpoint(
        make_checkpoint(tmp_path / "m.safetensors", conformal=cal)
    )
    two = np.array([[0.3, 0.7], [0.3, 0.7]])
    # numpy magnifications work, and an explicit magnification beats the path's.
    a, b = predictor.decide_batch(two, ["x/100X/a.png", None], None, np.array([200, 100]))
    assert a.prediction_set == predictor.decide(two[0], magnification=200).prediction_set
    assert b.prediction_set == predictor.decide(two[1], path="x/100X/b.png").prediction_set


def test_subtypes_get_sets_of_subtypes_per_magnification():
    from histolens.data.records import SUBTYPE_CLASSES

    rng = np.random.default_rng(3)
    n, c = 240, len(SUBTYPE_CLASSES)
    y = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), y] += 2.0  # the true subtype usually, not always, on top
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    patients = np.arange(n) // 4  # 60 patients of 4 images
    mags = np.where(patients % 2 == 0, 100, 400)
    cal = ConformalCalibration.fit(probs, y, patients, SUBTYPE_CLASSES, 0.1, magnifications=mags)
    assert set(cal.stratum_patients()) == {"100", "400"}
    member = cal.prediction_sets(probs, predicted=probs.argmax(1), magnifications=mags)
    assert member.shape == (n, c)
    assert member[np.arange(n), probs.argmax(1)].all()  # the predicted subtype is always in
    sizes = member.sum(1)
    assert sizes.min() >= 1 and (sizes > 1).any() and (sizes < c).any()  # sets, not all or one
    assert member[np.arange(n), y].mean() >= 0.85  # in-sample coverage near 1 - alpha


@pytest.mark.parametrize(
    ("read", "subject", "was", "its"),
    [
        (ConformalCalibration.from_dict, "conformal calibration", "was", "is"),
        (OperatingPoints.from_dict, "operating points", "were", "are"),
    ],
)
def test_stored_parts_refuse_a_newer_format_and_name_damage(read, subject, was, its):
    newer = rf"^The checkpoint's {subject} {was} written by a newer histolens; upgrade\.$"
    with pytest.raises(CheckpointError, match=newer):
        read({"format_version": 99})
    with pytest.raises(CheckpointError, match=rf"^The checkpoint's {subject} {its} damaged \("):
        read({"format_version": "two"})
