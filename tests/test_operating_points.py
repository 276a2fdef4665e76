"""Operating points per magnification (histolens.stats.decisions), their checkpoint record, the
Predictor's use of them, and ``histolens calibrate``."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from histolens.checkpoint.io import CheckpointMetadata, read_metadata, update_metadata
from histolens.errors import CheckpointError, ConfigError
from histolens.stats.decisions import OperatingPoints
from histolens.stats.operating_points import (
    MIN_PATIENTS_PER_CLASS,
    OperatingPointRule,
    choose_threshold_for,
    parse_operating_point,
)


def _patients(rng, mag: int, n_per_class: int, benign: tuple, malignant: tuple, images: int = 4):
    """Rows (p, y, patient, magnification): each class's probabilities drawn in its band."""
    rows = []
    for y, (lo, hi) in ((0, benign), (1, malignant)):
        for k in range(n_per_class):
            for _ in range(images):
                rows.append((rng.uniform(lo, hi), y, f"{mag}-{y}-{k}", mag))
    return rows


def _known_optimum(extra: list | None = None):
    """100X: benign in [0.05, 0.25], malignant in [0.35, 0.55]; 200X: benign in [0.40, 0.60],
    malignant in [0.75, 0.95]. Youden's J is 1 anywhere in each gap, and no single threshold
    separates both magnifications (0.40-0.55 overlap pooled)."""
    rng = np.random.default_rng(0)
    rows = _patients(rng, 100, 6, (0.05, 0.25), (0.35, 0.55))
    rows += _patients(rng, 200, 6, (0.40, 0.60), (0.75, 0.95))
    rows += extra or []
    p, y, patients, mags = (np.array(c, dtype=object) for c in zip(*rows, strict=True))
    return p.astype(float), y.astype(int), patients.astype(str), list(mags)


def test_the_threshold_of_each_magnification_is_recovered():
    p, y, patients, mags = _known_optimum()
    ops = OperatingPoints.fit("youden", y, p, patients, mags)
    # Each magnification's own threshold falls in its gap (a band of 0.10 and 0.15: far from
    # any rounding), so both are perfectly separated; the pooled one cannot be.
    assert 0.25 < ops.threshold_for(100) < 0.35
    assert 0.60 < ops.threshold_for("200X") < 0.75
    for m in (100, 200):
        at = np.array([v == m for v in mags])
        called = p[at] >= ops.threshold_for(m)
        assert (called == y[at].astype(bool)).all()
    pooled_correct = (p >= ops.pooled) == y.astype(bool)
    assert not pooled_correct.all()
    assert ops.threshold_for(None) == ops.pooled and ops.threshold_for(40) == ops.pooled
    assert ops.notes() == [] and ops.patients == {"100": (6, 6), "200": (6, 6)}


def test_sensitivity_and_specificity_rules_reach_their_targets():
    p, y, patients, mags = _known_optimum()
    for text, rate in (("sensitivity:0.95", "sens"), ("specificity:0.95", "spec")):
        ops = OperatingPoints.fit(text, y, p, patients, mags)
        assert str(ops.rule) == text
        for m in (100, 200):
            at = np.array([v == m for v in mags])
            called = p[at] >= ops.threshold_for(m)
            sens = called[y[at] == 1].mean()
            spec = (~called[y[at] == 0]).mean()
            assert (sens if rate == "sens" else spec) >= 0.95
    # Overlapping classes, N(0.35, 0.08) and N(0.65, 0.08): Youden's optimum is 0.5, the 0.99
    # rules' 0.65 - 2.33 * 0.08 = 0.464 and 0.536, far beyond the sampling error of 4000 draws.
    rng = np.random.default_rng(1)
    yy = np.repeat([0, 1], 4000)
    pp = np.concatenate([rng.normal(0.35, 0.08, 4000), rng.normal(0.65, 0.08, 4000)])
    low = choose_threshold_for(OperatingPointRule("sensitivity", 0.99), yy, pp)
    high = choose_threshold_for(OperatingPointRule("specificity", 0.99), yy, pp)
    assert low < choose_threshold_for(OperatingPointRule("youden"), yy, pp) < high
    assert (pp[yy == 1] >= low).mean() >= 0.99 and (pp[yy == 0] < high).mean() >= 0.99


def test_a_magnification_with_too_few_patients_borrows_the_pooled_threshold_with_a_note():
    rng = np.random.default_rng(2)
    thin = _patients(rng, 400, MIN_PATIENTS_PER_CLASS - 1, (0.6, 0.7), (0.8, 0.9))
    p, y, patients, mags = _known_optimum(thin)
    ops = OperatingPoints.fit("youden", y, p, patients, mags)
    assert "400" not in ops.thresholds and ops.threshold_for(400) == ops.pooled
    n = MIN_PATIENTS_PER_CLASS - 1
    assert ops.borrowed() == {"400": (n, n)}
    (note,) = ops.notes()
    assert "400X" in note and f"needs {MIN_PATIENTS_PER_CLASS} patients of each class" in note
    assert f"there are {n} benign and {n} malignant" in note


@pytest.mark.parametrize("bad", ["sens:0.9", "sensitivity", "sensitivity:1.5", "specificity:0", ""])
def test_a_bad_operating_point_names_the_valid_forms(bad):
    with pytest.raises(ConfigError, match=r"use youden, sensitivity:T or specificity:T"):
        parse_operating_point(bad)


def test_train_refuses_a_bad_operating_point_in_one_line(synth_small):
    from histolens.cli.commands import main

    result = CliRunner().invoke(
        main, ["train", "--data", str(synth_small), "--operating-point", "recall:0.9"]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: Unknown operating point")
    assert "sensitivity:T or specificity:T" in result.output


def _with_operating_points(path, ops: OperatingPoints):
    update_metadata(path, operating_points=ops.to_dict(), threshold=ops.pooled)
    return path


def test_operating_points_round_trip_through_the_checkpoint(tmp_path):
    from histolens.inference.predictor import Predictor
    from histolens.testing import make_checkpoint

    p, y, patients, mags = _known_optimum()
    ops = OperatingPoints.fit("youden", y, p, patients, mags)
    ckpt = _with_operating_points(make_checkpoint(tmp_path / "m.safetensors"), ops)
    back = read_metadata(ckpt).decision
    assert back.thresholds == ops.thresholds and back.pooled == ops.pooled
    assert back.patients == ops.patients and str(back.rule) == "youden"
    # Stored rounded to 6 decimals: the same thresholds come back when chosen again.
    assert back.refit("youden").thresholds == pytest.approx(ops.thresholds, abs=1e-5)
    predictor = Predictor.from_checkpoint(ckpt)
    # 0.45 sits above 100X's threshold (< 0.35) and below 200X's (> 0.60): each image's
    # magnification, from its BreakHis name, decides.
    probs = np.array([[0.55, 0.45], [0.55, 0.45]])
    names = ["SOB_M_DC-14-1-100-001.png", "SOB_M_DC-14-1-200-001.png"]
    a, b = predictor.decide_batch(probs, names)
    assert (a.label, b.label) == ("malignant", "benign")
    assert a.threshold == ops.threshold_for(100) and b.threshold == ops.threshold_for(200)
    # --magnification (given) wins over the name.
    (c,) = predictor.decide_batch(probs[:1], [names[0]], magnifications=[200])
    assert c.label == "benign"


def test_a_checkpoint_without_operating_points_decides_every_image_at_its_threshold(tmp_path):
    from histolens.inference.predictor import Predictor
    from histolens.testing import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "old.safetensors", threshold=0.3)
    raw = read_metadata(ckpt).to_dict()
    old = {k: v for k, v in raw.items() if k != "operating_points"} | {"format_version": 2}
    meta = CheckpointMetadata.from_dict(old)
    assert meta.operating_points is None and meta.decision is None
    predictor = Predictor.from_checkpoint(ckpt)
    assert predictor.operating_points is None
    preds = predictor.decide_batch(np.array([[0.69, 0.31]] * 2), ["a/100X/x.png", "b/200X/y.png"])
    assert [p.label for p in preds] == ["malignant", "malignant"]
    assert {p.threshold for p in preds} == {0.3}


def test_calibrate_rewrites_the_decision_from_the_stored_predictions(tmp_path):
    from histolens.cli.commands import main
    from histolens.testing import make_checkpoint

    rng = np.random.default_rng(3)
    # Overlapping classes at 100X: sensitivity:0.95 must move the threshold down.
    rows = _patients(rng, 100, 6, (0.0, 0.6), (0.3, 1.0), images=8)
    p, y, patients, mags = (np.array(c, dtype=object) for c in zip(*rows, strict=True))
    ops = OperatingPoints.fit("youden", y.astype(int), p.astype(float), patients, list(mags))
    ckpt = _with_operating_points(make_checkpoint(tmp_path / "m.safetensors"), ops)
    result = CliRunner().invoke(
        main, ["calibrate", str(ckpt), "--operating-point", "sensitivity:0.95"]
    )
    assert result.exit_code == 0, result.output
    assert "youden -> sensitivity:0.95" in result.output
    meta = read_metadata(ckpt)
    new = meta.decision
    assert str(new.rule) == "sensitivity:0.95" and meta.threshold_method == "sensitivity:0.95"
    assert new.threshold_for(100) < ops.threshold_for(100)
    at = new.p >= new.threshold_for(100)
    assert at[new.y == 1].mean() >= 0.95
    assert meta.threshold == new.pooled


def test_calibrate_refuses_a_checkpoint_without_stored_predictions(tmp_path):
    from histolens.cli.commands import main
    from histolens.testing import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "old.safetensors")
    result = CliRunner().invoke(main, ["calibrate", str(ckpt), "--operating-point", "youden"])
    assert result.exit_code == 1
    assert "stores no out-of-fold predictions" in result.output
    bad = CliRunner().invoke(main, ["calibrate", str(ckpt), "--operating-point", "best"])
    assert bad.exit_code == 1 and "Unknown operating point 'best'" in bad.output
    with pytest.raises(CheckpointError, match="no out-of-fold predictions"):
        OperatingPoints(OperatingPointRule(), 0.5).refit("youden")


def test_patients_csv_of_a_tiny_run_has_one_decision_per_patient(trained_run):
    import csv

    from histolens.inference.patients import PATIENT_COLUMNS

    run, _ = trained_run
    with open(run / "evaluation" / "predictions.csv", newline="", encoding="utf-8") as fh:
        images = list(csv.DictReader(fh))
    with open(run / "evaluation" / "patients.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == PATIENT_COLUMNS
        patients = list(reader)
    assert sorted(r["patient"] for r in patients) == sorted({r["patient"] for r in images})
    assert sum(int(r["n_images"]) for r in patients) == len(images)
    meta = read_metadata(run)
    decision = meta.decision
    assert decision is not None and decision.patient is not None
    for row in patients:
        mine = [r for r in images if r["patient"] == row["patient"]]
        p = np.mean([float(r["p_malignant"]) for r in mine])
        assert float(row["mean_probability"]) == pytest.approx(p, abs=2e-6)  # 6 decimals
        called = np.mean([r["prediction"] == "malignant" for r in mine])
        assert float(row["share_malignant"]) == pytest.approx(called, abs=2e-6)
        above = float(row["patient_score"]) >= decision.patient.threshold
        assert row["decision"] == ("malignant" if above else "benign")
        assert row["label"] == mine[0]["label"] and row["correct"] in ("0", "1")
        assert row["refer"] in ("0", "1") and (row["refer"] == "1") == bool(row["refer_reason"])
    assert "Decision per patient" in (run / "report.html").read_text(encoding="utf-8")


def test_predict_writes_patients_csv_from_breakhis_names_or_a_pattern(tmp_path, synth_small):
    import csv

    from histolens.cli.commands import main
    from histolens.testing import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "p" / "predictions.csv"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["predict", str(ckpt), str(synth_small), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out.with_name("patients.csv"), newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and sum(int(r["n_images"]) for r in rows) == 32  # synth_small
    # A pattern: the first group of the file name's tumour-type letter, so two "patients".
    out2 = tmp_path / "q" / "predictions.csv"
    out2.parent.mkdir()
    args = ["predict", str(ckpt), str(synth_small), "--out", str(out2)]
    result = CliRunner().invoke(main, [*args, "--patient-from", r"SOB_(\w)_"])
    assert result.exit_code == 0, result.output
    with open(out2.with_name("patients.csv"), newline="", encoding="utf-8") as fh:
        assert sorted(r["patient"] for r in csv.DictReader(fh)) == ["B", "M"]
    bad = CliRunner().invoke(main, [*args, "--patient-from", "(unclosed"])
    assert bad.exit_code == 1 and "is not a regular expression" in bad.output


def test_the_estimate_shows_each_magnifications_decision_with_its_cis():
    from histolens.evaluation.estimate import build_estimate, estimate_lines
    from histolens.evaluation.evaluate import EvalResult, PredictionRow, with_referrals

    p, y, patients, mags = _known_optimum()
    ops = OperatingPoints.fit("youden", y, p, patients, mags)
    classes = ("benign", "malignant")
    rows = [
        PredictionRow(f"i{k}", q, m, classes[t], int(t), (1 - v, v), (1 - v, v))
        for k, (v, t, q, m) in enumerate(zip(p, y, patients, mags, strict=True))
    ]
    ev = EvalResult(rows, classes, "binary", ops.pooled, 1.0, operating_points=ops)
    member = np.ones((len(rows), 2), dtype=bool)
    member[::2] = [True, False]  # every other image referred: a referral rate of 0.5
    with_referrals(ev, member, None, 0.1, "test")
    est = build_estimate(ev, "made-up folds", "test rows", n_boot=50, per_magnification_boot=50)
    assert est.operating_point == "youden"
    for m in ("100X", "200X"):
        block = est.per_magnification[m]
        assert block.threshold == ops.threshold_for(m)
        # Each magnification decided at its own threshold separates its classes perfectly.
        for k in ("sensitivity", "specificity", "balanced_accuracy"):
            assert block.metrics[k] == 1.0 and block.ci95[k] == (1.0, 1.0)
        assert block.metrics["refer_rate"] == 0.5 and "refer_rate" in block.ci95
    lines = estimate_lines(est)
    assert any(line.strip().startswith("100X: ROC AUC") for line in lines)
    assert any("at threshold" in line and "referral rate 0.500" in line for line in lines)
