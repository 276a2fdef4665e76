"""PatientBootstrap: every resample at once gives the per-resample loop's figures, to the bit."""

from __future__ import annotations

import numpy as np
import pytest

from histolens.evaluation.metric_blocks import BINARY_CIS, binary_block
from histolens.stats.bootstrap import PatientBootstrap
from histolens.stats.metrics import (
    bootstrap_ci,
    patient_level_auc,
    patient_recognition_rate,
    safe_auc,
)


def _example(seed: int, n: int, n_patients: int, ties: bool, one_negative_patient: bool):
    rng = np.random.default_rng(seed)
    patients = np.array([f"p{rng.integers(n_patients):02d}" for _ in range(n)])
    y = rng.integers(0, 2, n)
    p = rng.random(n)
    if ties:  # tied scores, within and across patients and classes: AUC's half-counts
        p = np.round(p, 1)
    if one_negative_patient:  # many resamples without a negative: NaN figures, dropped
        y[:] = 1
        y[patients == patients[0]] = 0
    return patients, y, p


def _loop_figures(patients, y, p, threshold=0.5) -> dict:
    """Each figure as binary_block computed it before: a statistic of each resample's rows."""
    correct = (p >= threshold).astype(int) == y
    positive = p >= threshold

    def rate(i, cls):
        of_class = y[i] == cls
        return float((positive[i][of_class] == bool(cls)).mean()) if of_class.any() else np.nan

    return {
        "roc_auc": lambda i: safe_auc(y[i], p[i]),
        "accuracy": lambda i: float(correct[i].mean()),
        "balanced_accuracy": lambda i: float(np.mean([rate(i, 1), rate(i, 0)])),
        "sensitivity": lambda i: rate(i, 1),
        "specificity": lambda i: rate(i, 0),
        "patient_recognition_rate": lambda i: patient_recognition_rate(patients[i], correct[i]),
        "patient_auc": lambda i: patient_level_auc(patients[i], y[i], p[i]),
    }


def _resample_rows(patients, n_boot, seed):
    """The resamples as bootstrap_ci draws them: patients with replacement, their rows."""
    uniq = np.unique(patients)
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        chosen = rng.choice(uniq, size=len(uniq), replace=True)
        yield np.concatenate([np.flatnonzero(patients == q) for q in chosen])


EXAMPLES = [
    (0, 120, 8, False, False),
    (1, 400, 25, True, False),
    (2, 60, 5, True, True),
]


@pytest.mark.parametrize("example", EXAMPLES)
def test_each_resample_gives_the_loops_figures_bit_for_bit(example):
    patients, y, p = _example(*example)
    n_boot, seed = 200, 7
    loop = _loop_figures(patients, y, p)
    expected = {k: [] for k in loop}
    for i in _resample_rows(patients, n_boot, seed):
        for k, f in loop.items():
            expected[k].append(f(i))
    boot = PatientBootstrap(patients, n_boot, seed)
    correct = (p >= 0.5).astype(int) == y
    positive = p >= 0.5
    sens, spec = boot.proportion(positive, y == 1), boot.proportion(~positive, y == 0)
    got = {
        "roc_auc": boot.roc_auc(y, p),
        "accuracy": boot.proportion(correct),
        "balanced_accuracy": (sens + spec) / 2,
        "sensitivity": sens,
        "specificity": spec,
        "patient_recognition_rate": boot.recognition_rate(correct),
        "patient_auc": boot.patient_auc(y, p),
    }
    for k in loop:
        # Exact: the same integer and half-integer sums, divided once; the float sums (patient
        # means) are added in the loop's order. NaN (a class missing) where the loop has NaN.
        np.testing.assert_array_equal(got[k], np.array(expected[k]), err_msg=k)


@pytest.mark.parametrize("example", EXAMPLES)
def test_binary_block_cis_equal_bootstrap_ci_of_the_loop(example):
    patients, y, p = _example(*example)
    n_boot, seed = 300, 42
    block = binary_block(y, p, patients, 0.5, n_boot, seed)
    loop = _loop_figures(patients, y, p)
    assert set(block.ci95) == set(BINARY_CIS)
    for k in BINARY_CIS:
        expected = bootstrap_ci(loop[k], patients, n_boot, seed)
        assert block.ci95[k] == pytest.approx(expected, rel=0, abs=0, nan_ok=True), k


def test_a_referral_rate_ci_is_the_loops():
    patients, y, _ = _example(5, 200, 12, False, False)
    refer = (np.random.default_rng(1).random(200) < 0.3).astype(float)
    expected = bootstrap_ci(lambda i: float(refer[i].mean()), patients, 500, 3)
    assert PatientBootstrap(patients, 500, 3).interval_of(refer) == expected
    # Too few finite resamples (one patient: every resample is the same one): as bootstrap_ci.
    one = np.array(["a"] * 5)
    assert np.isnan(PatientBootstrap(one, 50, 0).interval(np.full(50, np.nan))).all()
