"""How magnifications get their thresholds (histolens.stats.operating_points and .decisions):
``shared`` (one choice with each magnification's logit offset taken out, the default) against
``separate`` (each magnification on its own images)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.special import expit, logit

from histolens.checkpoint.io import read_metadata, update_metadata
from histolens.errors import ConfigError
from histolens.stats.decisions import OperatingPoints
from histolens.stats.operating_points import (
    DEFAULT_MAGNIFICATION_THRESHOLDS,
    check_magnification_thresholds,
    magnification_offsets,
)

A_BENIGN, A_MALIGNANT = -1.0, 1.5  # class levels (logit)
B = {"100": -1.5, "200": 0.0, "400": 0.7}  # magnification offsets (logit)


def _exact_rows(counts: dict[str, tuple[int, int]], images: int = 4):
    """Logits whose (patient, magnification) means are exactly class level + offset: each
    patient's images spread symmetrically about that mean (+/-0.3, +/-0.1), so least squares
    has an exact answer."""
    rows = []
    for mag, (n_benign, n_malignant) in counts.items():
        for y, n, level in ((0, n_benign, A_BENIGN), (1, n_malignant, A_MALIGNANT)):
            for k in range(n):
                mean = level + B[mag]
                half = [(-0.3, 0.3), (-0.1, 0.1)][: images // 2]
                for lo, hi in half:
                    rows += [(mean + lo, y, f"{mag}-{y}-{k}", mag)]
                    rows += [(mean + hi, y, f"{mag}-{y}-{k}", mag)]
    z, y, patients, mags = (np.array(c, dtype=object) for c in zip(*rows, strict=True))
    return z.astype(float), y.astype(int), patients.astype(str), mags.astype(str)


def _sampled(rng, counts: dict[str, tuple[int, int]], patient_sd: float, image_sd: float):
    """Rows (logit, label, patient, magnification) of a location-shift population: each
    patient's level is its class level + its magnification's offset + N(0, patient_sd), and
    its 3 images scatter about it by N(0, image_sd)."""
    rows = []
    for mag, (n_benign, n_malignant) in counts.items():
        for y, n in ((0, n_benign), (1, n_malignant)):
            for k in range(n):
                c = (A_MALIGNANT if y else A_BENIGN) + B[mag] + rng.normal(0, patient_sd)
                rows += [(c + rng.normal(0, image_sd), y, f"{mag}-{y}-{k}", mag) for _ in range(3)]
    return rows


def _arrays(rows):
    """Rows as (probabilities, labels, patients, magnifications) arrays."""
    z, y, q, m = (np.array(c, dtype=object) for c in zip(*rows, strict=True))
    return expit(z.astype(float)), y.astype(int), q.astype(str), m.astype(str)


def test_offsets_are_recovered_from_unbalanced_classes_and_magnifications():
    z, y, patients, mags = _exact_rows({"100": (4, 10), "200": (5, 17), "400": (3, 3)})
    off = magnification_offsets(z, y, patients, mags)
    # Exact data: least squares returns the offsets to float64 rounding (coefficients of order
    # 1 from a well-conditioned design of ~50 rows: errors ~1e-15, tolerance 1e-9).
    assert off["100"] == 0.0
    assert off["200"] == pytest.approx(B["200"] - B["100"], abs=1e-9)
    assert off["400"] == pytest.approx(B["400"] - B["100"], abs=1e-9)
    assert magnification_offsets(
        z[mags == "200"], y[mags == "200"], patients[mags == "200"], mags[mags == "200"]
    ) == {"200": 0.0}


def test_shared_thresholds_sit_one_offset_apart_and_separate_ones_need_not():
    rng = np.random.default_rng(0)
    rows = []
    # 200X: 8 patients of each class; 100X: the same populations moved down by 1.5 logit, but
    # only 3 benign patients, one of them atypical (scores like malignant ones).
    for mag, n_benign in (("200", 8), ("100", 3)):
        for y, n in ((0, n_benign), (1, 8)):
            for k in range(n):
                centre = (A_MALIGNANT if y else A_BENIGN) + rng.normal(0, 0.6)
                if mag == "100" and y == 0 and k == 0:
                    centre = A_MALIGNANT + 0.5  # the atypical benign patient
                for _ in range(5):
                    rows.append((centre + B[mag] + rng.normal(0, 0.3), y, f"{mag}-{y}-{k}", mag))
    z, y, patients, mags = (np.array(c, dtype=object) for c in zip(*rows, strict=True))
    p = expit(z.astype(float))
    shared = OperatingPoints.fit("youden", y.astype(int), p, patients.astype(str), list(mags))
    separate = OperatingPoints.fit(
        "youden", y.astype(int), p, patients.astype(str), list(mags), method="separate"
    )
    assert shared.method == "shared" and separate.method == "separate"
    gap = logit(shared.threshold_for(200)) - logit(shared.threshold_for(100))
    assert gap == pytest.approx(shared.offsets["200"] - shared.offsets["100"], abs=1e-9)
    # The offset rests on every patient at 100X, the separate 100X choice on 3 benign patients
    # one of them atypical: in this sample the shared thresholds sit nearer the true 1.5 apart
    # (1.52 against 2.19; the spread over samples is the next tests' matter).
    apart = logit(separate.threshold_for(200)) - logit(separate.threshold_for(100))
    assert abs(gap - 1.5) < abs(apart - 1.5)
    assert shared.table()[0]["basis"].startswith("shared, offset")
    assert separate.table()[0]["basis"] == "own"


def test_adding_a_patient_at_another_magnification_moves_a_shared_threshold_only():
    rng = np.random.default_rng(1)
    base = _sampled(rng, {"100": (4, 4), "200": (4, 4)}, 0.8, 0.3)
    # One more benign patient at 200X, scoring high: it takes part in the shared choice.
    extra = [(A_MALIGNANT + 0.4 + 0.01 * i, 0, "200-0-extra", "200") for i in range(3)]

    def fit(rows, method):
        p, y, q, m = _arrays(rows)
        return OperatingPoints.fit("youden", y, p, q, list(m), method=method)

    assert fit(base, "separate").threshold_for(100) == fit(base + extra, "separate").threshold_for(
        100
    )
    # Moved far beyond float rounding (~1e-16): by 0.036 in this sample.
    moved = fit(base, "shared").threshold_for(100) - fit(base + extra, "shared").threshold_for(100)
    assert abs(moved) > 1e-6


def test_a_shared_threshold_varies_less_over_samples_of_few_patients():
    """The reason for the default: 400 samples from one location-shift population, 3 benign
    patients at 100X and 12 at 200X; the 100X threshold's spread (logit) is smaller shared."""
    rng = np.random.default_rng(2)
    chosen = {"shared": [], "separate": []}
    for _ in range(400):
        p, y, q, m = _arrays(_sampled(rng, {"100": (3, 10), "200": (12, 20)}, 1.0, 0.4))
        for method in chosen:
            ops = OperatingPoints.fit(
                "youden", y, p, q, list(m), keep_predictions=False, method=method
            )
            chosen[method].append(logit(ops.threshold_for(100)))
    sd = {k: float(np.std(v)) for k, v in chosen.items()}
    # Each sd is estimated from 400 samples (relative standard error ~3.5%, so ~5% for their
    # ratio); the ratio is about 0.74 with this population (seeds 2-5 gave 0.73-0.745), and
    # the bound asked, 0.85, lies about 3 standard errors from both it and equality.
    assert sd["shared"] < 0.85 * sd["separate"], sd


def test_one_magnification_with_enough_patients_chooses_alike_either_way():
    z, y, patients, mags = _exact_rows({"100": (4, 6), "400": (2, 2)})
    p = expit(z)
    shared = OperatingPoints.fit("youden", y, p, patients, list(mags))
    separate = OperatingPoints.fit("youden", y, p, patients, list(mags), method="separate")
    assert shared.thresholds == separate.thresholds and list(shared.thresholds) == ["100"]
    assert shared.offsets == {} and not shared.shared  # nothing was shared


def test_a_fixed_rule_stays_at_one_half_everywhere():
    z, y, patients, mags = _exact_rows({"100": (4, 6), "200": (4, 6)})
    ops = OperatingPoints.fit("fixed", y, expit(z), patients, list(mags))
    assert set(ops.thresholds.values()) == {0.5} and ops.offsets == {}


def test_the_way_and_offsets_travel_through_the_checkpoint_and_calibrate(tmp_path):
    from histolens.cli.commands import main
    from histolens.testing import make_checkpoint

    z, y, patients, mags = _exact_rows({"100": (4, 10), "200": (5, 12)})
    ops = OperatingPoints.fit("youden", y, expit(z), patients, list(mags))
    assert ops.method == DEFAULT_MAGNIFICATION_THRESHOLDS == "shared"
    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    update_metadata(ckpt, operating_points=ops.to_dict(), threshold=ops.pooled)
    back = read_metadata(ckpt).decision
    assert back.method == "shared" and back.offsets == pytest.approx(ops.offsets)
    # Calibrate keeps the stored way unless asked (the saved config: the next test).
    runner = CliRunner()
    result = runner.invoke(main, ["calibrate", str(ckpt), "--operating-point", "sensitivity:0.9"])
    assert result.exit_code == 0, result.output
    assert read_metadata(ckpt).decision.method == "shared"
    assert "shared, offset" in result.output
    asked = ["calibrate", str(ckpt), "--operating-point", "youden", "--magnification-thresholds"]
    result = runner.invoke(main, [*asked, "separate"])
    assert result.exit_code == 0, result.output
    meta = read_metadata(ckpt)
    assert meta.decision.method == "separate" and meta.decision.offsets == {}
    assert "(own;" in result.output
    bad = runner.invoke(main, [*asked, "pooled"])
    assert bad.exit_code == 2 and "'pooled' is not one of" in bad.output


def test_operating_points_stored_before_the_shared_way_read_as_separate():
    z, y, patients, mags = _exact_rows({"100": (4, 10), "200": (5, 12)})
    d = OperatingPoints.fit(
        "youden", y, expit(z), patients, list(mags), method="separate"
    ).to_dict()
    old = {k: v for k, v in d.items() if k not in ("method", "offsets")}
    back = OperatingPoints.from_dict(old)
    assert back.method == "separate" and back.offsets == {}
    assert back.refit("youden").thresholds == back.thresholds


def test_an_unknown_way_is_refused_in_one_sentence(synth_small):
    from histolens.cli.commands import main
    from histolens.cli.options import MAGNIFICATION_THRESHOLD_WAYS
    from histolens.config import RunConfig
    from histolens.stats.operating_points import MAGNIFICATION_THRESHOLDS

    assert MAGNIFICATION_THRESHOLD_WAYS == MAGNIFICATION_THRESHOLDS  # the CLI offers them all
    with pytest.raises(ConfigError, match="use shared or separate"):
        check_magnification_thresholds("pooled")
    with pytest.raises(ConfigError, match="use shared or separate"):
        RunConfig().override({"train.magnification_thresholds": "pooled"})
    result = CliRunner().invoke(
        main, ["train", "--data", str(synth_small), "--magnification-thresholds", "pooled"]
    )
    assert result.exit_code == 2 and "'pooled' is not one of" in result.output


def test_thresholds_come_back_exactly_from_the_checkpoints_predictions():
    """calibrate chooses on the stored predictions (6 decimals): under the same rule it gets
    back the training thresholds exactly, shared, pooled and per patient, with probabilities
    at rounding half-points (where numpy's and Python's rounding could part), at 0 and 1, and
    beyond 6 decimals of them."""
    z, y, patients, mags = _exact_rows({"100": (4, 10), "200": (5, 12), "400": (3, 3)})
    rng = np.random.default_rng(5)
    p = expit(z * 3 + rng.normal(0, 2, len(z)))
    edge = [2.5e-6, 3.5e-6, 0.9999985, 0.0, 1.0, 1e-9, 1 - 1e-9, 0.5000005]
    p[: len(edge)] = edge  # benign 100X images
    p[-len(edge) :] = edge[::-1]  # malignant 400X images
    for rule in ("youden", "sensitivity:0.95", "specificity:0.9"):
        ops = OperatingPoints.fit(rule, y, p, patients, list(mags))
        back = OperatingPoints.from_dict(ops.to_dict()).refit(rule)
        assert set(ops.thresholds) == {"100", "200", "400"} and back.method == "shared"
        assert back.thresholds == ops.thresholds and back.offsets == ops.offsets
        assert back.pooled == ops.pooled and back.patient == ops.patient


def test_sensitivity_rules_and_a_thin_magnification_under_the_shared_choice():
    rng = np.random.default_rng(6)
    p, y, q, m = _arrays(_sampled(rng, {"100": (4, 10), "200": (6, 14), "400": (2, 3)}, 0.8, 0.3))
    ops = OperatingPoints.fit("sensitivity:0.95", y, p, q, list(m))
    # 400X has 2 benign patients: it borrows the pooled threshold and takes no part in the
    # shared choice (no offset of its own).
    assert set(ops.thresholds) == {"100", "200"} and set(ops.offsets) == {"100", "200"}
    assert ops.threshold_for(400) == ops.pooled and "400X" in ops.notes()[0]
    # The target holds over the two magnifications taken together, each patient once, on the
    # probabilities with their offsets taken out: what the rule promises under this way.
    at = np.isin(m.astype(str), ["100", "200"])
    called = p >= ops.thresholds_for(m)
    weights = (
        1.0 / np.unique(q[at], return_counts=True)[1][np.unique(q[at], return_inverse=True)[1]]
    )
    malignant = y[at] == 1
    assert (weights[malignant] * called[at][malignant]).sum() / weights[malignant].sum() >= 0.95


def test_nan_predictions_are_left_out_of_the_shared_choice():
    z, y, patients, mags = _exact_rows({"100": (4, 10), "200": (5, 12)})
    p = expit(z)
    with_nan = np.concatenate([p, [np.nan, np.nan]])
    ops = OperatingPoints.fit(
        "youden",
        np.concatenate([y, [0, 1]]),
        with_nan,
        np.concatenate([patients, ["x", "y"]]),
        [*mags, "100", "200"],
    )
    assert ops.thresholds == OperatingPoints.fit("youden", y, p, patients, list(mags)).thresholds


def test_cross_fitted_thresholds_follow_the_way_asked():
    from histolens.stats.operating_points import parse_operating_point
    from histolens.training.recalibrate import cross_fitted_thresholds

    rng = np.random.default_rng(7)
    p, y, q, m = _arrays(_sampled(rng, {"100": (8, 8), "200": (8, 8)}, 1.0, 0.3))
    ops = OperatingPoints.fit("youden", y, p, q, list(m), method="separate")
    rule = parse_operating_point("youden")
    # Without a way asked, the stored one (separate here, not the default).
    separate = cross_fitted_thresholds(ops, rule)
    assert np.array_equal(separate, cross_fitted_thresholds(ops, rule, method="separate"))
    shared = cross_fitted_thresholds(ops, rule, method="shared")
    assert np.abs(shared - separate).max() > 1e-6  # by 0.02-0.2 here: far beyond rounding


def test_the_configured_way_reaches_the_checkpoint_through_both_heads(synth_small, tmp_path):
    from histolens.cli.commands import main
    from histolens.config import RunConfig
    from histolens.testing import tiny_config
    from histolens.training.runner import train

    probe = {
        "model.head": "linear",
        "train.cv_folds": 3,
        "model.input_size": (120, 176),
        "train.probe_cs": (0.01,),
    }
    for name, over in (("probe", probe), ("mlp", {})):
        cfg = tiny_config(synth_small, **over, **{"train.magnification_thresholds": "separate"})
        train(cfg, tmp_path / name, progress=False)
        meta = read_metadata(tmp_path / name)
        assert meta.decision.method == "separate", name
        # The saved config itself (a config without the key would also read as separate).
        assert meta.config["train"]["magnification_thresholds"] == "separate", name
    # calibrate switches the way and records it in the saved config.
    result = CliRunner().invoke(
        main,
        [
            "calibrate",
            str(tmp_path / "probe"),
            "--operating-point",
            "youden",
            "--magnification-thresholds",
            "shared",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "thresholds per magnification separate -> shared" in result.output
    meta = read_metadata(tmp_path / "probe")
    assert meta.decision.method == "shared"
    assert meta.run_config.train.magnification_thresholds == "shared"
    # Calibrated twice, the estimate names only the latest choice.
    again = CliRunner().invoke(
        main, ["calibrate", str(tmp_path / "probe"), "--operating-point", "sensitivity:0.9"]
    )
    assert again.exit_code == 0, again.output
    method = read_metadata(tmp_path / "probe").estimate["method"]
    assert method.count("chosen again by histolens calibrate") == 1
    assert "operating point sensitivity:0.9 chosen again" in method
    # A run config saved before the shared choice existed reads as separate (resume and the
    # checkpoint's run_config); a new one defaults to shared.
    saved = RunConfig().to_dict()
    del saved["train"]["magnification_thresholds"]
    assert RunConfig.from_dict(saved).train.magnification_thresholds == "separate"
    assert RunConfig().train.magnification_thresholds == "shared"


def test_the_estimate_the_report_and_the_terminal_say_which_way():
    from histolens.evaluation.estimate import build_estimate, estimate_lines
    from histolens.evaluation.evaluate import EvalResult, PredictionRow
    from histolens.report.estimate import estimate_section

    z, y, patients, mags = _exact_rows({"100": (4, 10), "200": (5, 12)})
    p = expit(z)
    rows = [
        PredictionRow(
            f"/d/{q}-{i}.png", q, int(m), ("benign", "malignant")[t], int(t), (1 - v, v), (1 - v, v)
        )
        for i, (v, t, q, m) in enumerate(zip(p, y, patients, mags, strict=True))
    ]
    result = EvalResult(rows, ("benign", "malignant"), "binary", 0.5, 1.0)
    for way, words in (("shared", "offset"), ("separate", "chosen per magnification")):
        ops = OperatingPoints.fit("youden", y, p, patients, list(mags), method=way)
        est = build_estimate(
            result,
            "5-fold patient-level cross-validation",
            "made up",
            n_boot=20,
            per_magnification_boot=10,
            decision=ops,
        )
        assert est.magnification_thresholds == way
        assert words in "\n".join(estimate_lines(est))
        html = estimate_section("Estimate", est)
        assert ("moved to each by its offset" in html) == (way == "shared")
        assert "<b>Method:</b> 5-fold patient-level cross-validation." in html
    # Asked to share, but only 100X has enough patients: nothing was shared, and the estimate
    # says so.
    at = mags == "100"
    alone = OperatingPoints.fit("youden", y[at], p[at], patients[at], list(mags[at]))
    assert alone.method == "shared" and not alone.shared
    est = build_estimate(
        EvalResult(
            [r for r, a in zip(rows, at, strict=True) if a], result.classes, "binary", 0.5, 1.0
        ),
        "5-fold patient-level cross-validation",
        "made up",
        n_boot=20,
        per_magnification_boot=10,
        decision=alone,
    )
    assert est.magnification_thresholds == "separate"
    assert "offset" not in "\n".join(estimate_lines(est))
