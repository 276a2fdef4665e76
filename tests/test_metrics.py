import numpy as np
import pytest
import torch

from histolens.stats.calibration import choose_threshold, fit_temperature
from histolens.stats.metrics import (
    binary_metrics,
    bootstrap_ci,
    expected_calibration_error,
    multiclass_metrics,
    patient_level_auc,
    patient_recognition_rate,
    safe_auc,
)


def test_perfect_and_shuffled_predictors():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    perfect = binary_metrics(y, y.astype(float))
    assert perfect["roc_auc"] == 1.0 and perfect["accuracy"] == 1.0
    assert perfect["sensitivity"] == perfect["specificity"] == 1.0
    shuffled = binary_metrics(rng.permutation(y), y.astype(float) * 0.8 + 0.1)
    assert abs(shuffled["roc_auc"] - 0.5) < 0.05


def test_confusion_counts_and_rates():
    y = np.array([1, 1, 1, 0, 0])
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.1])
    m = binary_metrics(y, p, threshold=0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))


def test_patient_recognition_rate_averages_patients_not_images():
    patients = ["a"] * 8 + ["b"] * 2
    correct = np.array([1] * 8 + [0] * 2)
    assert patient_recognition_rate(patients, correct) == 0.5  # image accuracy would be 0.8
    y = np.array([1] * 8 + [0] * 2)
    p = np.array([0.9] * 8 + [0.2] * 2)
    assert patient_level_auc(patients, y, p) == 1.0
    assert np.isnan(patient_level_auc(["a", "a"], np.array([1, 1]), np.array([0.2, 0.3])))


def test_bootstrap_ci_over_patients_is_wider_than_over_images():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(10), 30)
    patient_effect = rng.normal(0, 1, 10)[patients]
    correct = (patient_effect + rng.normal(0, 0.3, 300)) > 0
    lo, hi = bootstrap_ci(lambda i: correct[i].mean(), patients, n_boot=300)
    lo_i, hi_i = bootstrap_ci(lambda i: correct[i].mean(), np.arange(300), n_boot=300)
    assert lo <= correct.mean() <= hi
    assert (hi - lo) > 1.5 * (hi_i - lo_i)


def test_ece_zero_when_calibrated_and_high_when_not():
    y = np.array([0, 1] * 500)
    assert expected_calibration_error(y, np.full(1000, 0.5)) == pytest.approx(0.0)
    assert expected_calibration_error(y, np.where(y == 1, 0.55, 0.45)) == pytest.approx(0.45)


def test_multiclass_metrics():
    y = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 2, 1]] * 0.9 + 0.1 / 3
    m = multiclass_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == 0.75
    assert m["per_class"]["c"]["recall"] == 0.5
    assert m["per_class"]["b"]["precision"] == 0.5
    assert 0 < m["macro_f1"] < 1


def test_temperature_scaling_fixes_overconfidence():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 4000)
    true_logit = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.5, 4000)
    logits = torch.tensor(true_logit * 4.0, dtype=torch.float32).unsqueeze(1)  # overconfident
    t = fit_temperature(logits, torch.tensor(y))
    assert 2.5 < t < 6
    before = expected_calibration_error(y, torch.sigmoid(logits[:, 0]).numpy())
    after = expected_calibration_error(y, torch.sigmoid(logits[:, 0] / t).numpy())
    assert after < before / 2


def test_threshold_choice():
    y = np.array([0] * 50 + [1] * 50)
    p = np.concatenate([np.linspace(0.0, 0.6, 50), np.linspace(0.4, 1.0, 50)])
    t = choose_threshold(y, p, "youden")
    assert 0.4 < t < 0.62
    t_sens = choose_threshold(y, p, "sensitivity", target_sensitivity=1.0)
    assert t_sens <= 0.4
    assert binary_metrics(y, p, t_sens)["sensitivity"] == 1.0
    assert choose_threshold(np.ones(5), np.ones(5)) == 0.5


def test_separable_validation_sharpens_to_the_bound_not_back_to_one():
    logits = torch.tensor([[-0.2], [-0.1], [0.1], [0.2]])
    t = fit_temperature(logits, torch.tensor([0, 0, 1, 1]))
    assert t == pytest.approx(0.05)


@pytest.mark.parametrize("ties", [False, True])
def test_safe_auc_equals_scikit_learn(ties):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    for n in (2, 7, 300):
        y = np.r_[0, 1, rng.integers(0, 2, n - 2)]
        score = rng.normal(size=n) + y
        if ties:  # few distinct values: many tied pairs, within and across classes
            score = np.round(score * 2) / 2
        assert safe_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    # Ties across the classes count a half: all scores equal is 0.5, not 0 or 1.
    assert safe_auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == 0.5
    assert safe_auc([0, 0, 1], [0.2, 0.5, 0.5]) == pytest.approx(0.75)
    assert safe_auc([True, False], [0.1, 0.9]) == 0.0  # boolean labels, reversed scores


def test_safe_auc_is_nan_for_one_class():
    assert np.isnan(safe_auc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert np.isnan(safe_auc([0, 0], [0.1, 0.5]))
    assert np.isnan(safe_auc([], []))
