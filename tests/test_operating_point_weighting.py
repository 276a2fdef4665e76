"""Operating points chosen with every patient counted once (histolens.stats.operating_points
patient_weights), and AUCs that rank the models' own scores, not threshold-shifted ones
(histolens.evaluation.metrics rank_score)."""

from __future__ import annotations

import numpy as np
import pytest

from histolens.stats.decisions import OperatingPoints
from histolens.stats.metrics import safe_auc
from histolens.stats.operating_points import (
    OperatingPointRule,
    choose_threshold_for,
    patient_weights,
)


def _one_patient_dominates():
    """100X rows (p, y, patient): benign patient A has 40 images scoring in [0.55, 0.65], benign
    B-D 2 images each in [0.05, 0.15]; malignant E-F 2 images each in [0.40, 0.50], G-J 2 each
    in [0.85, 0.95].

    Per image, Youden's J is 0.67 above A's images (sens 8/12, spec 1) against 0.13 below every
    malignant image (spec 6/46): the threshold lands in (0.65, 0.85). Per patient it is 0.75
    below every malignant patient (sens 1, spec 3/4) against 0.67: it lands in (0.15, 0.40).
    Every band is 0.10 wide or more, far from any rounding.
    """
    rng = np.random.default_rng(0)
    spec = [("A", 0, 40, 0.55, 0.65)] + [(q, 0, 2, 0.05, 0.15) for q in "BCD"]
    spec += [(q, 1, 2, 0.40, 0.50) for q in "EF"] + [(q, 1, 2, 0.85, 0.95) for q in "GHIJ"]
    rows = [(rng.uniform(lo, hi), y, q) for q, y, n, lo, hi in spec for _ in range(n)]
    p, y, patients = (np.array(c) for c in zip(*rows, strict=True))
    return p.astype(float), y.astype(int), patients.astype(str)


def test_patient_weights_count_every_patient_once():
    w = patient_weights(["a", "a", "b", "c", "c", "c"])
    np.testing.assert_allclose(w, [0.5, 0.5, 1.0, 1 / 3, 1 / 3, 1 / 3])
    assert w.sum() == pytest.approx(3.0)  # three patients


def test_one_patient_with_many_images_does_not_set_the_threshold():
    p, y, patients = _one_patient_dominates()
    youden = OperatingPointRule("youden")
    assert 0.65 < choose_threshold_for(youden, y, p) < 0.85  # per image
    assert 0.15 < choose_threshold_for(youden, y, p, patient_weights(patients)) < 0.40
    # The operating points weigh each magnification's patients (and the pooled choice) alike.
    ops = OperatingPoints.fit("youden", y, p, patients, [100] * len(y))
    assert 0.15 < ops.threshold_for(100) < 0.40 and 0.15 < ops.pooled < 0.40
    assert ops.patients == {"100": (4, 6)}


def test_sensitivity_rule_counts_malignant_patients_not_images():
    # Malignant patient K has 40 images in [0.80, 0.95]; E, F, G one image each at 0.30, 0.40,
    # 0.50; benign B, C, D one image each at 0.88, 0.82, 0.60 and one at 0.10 (so that the ROC
    # curve turns inside K's band). Per image, 39 of 43 malignant images (0.907) are reached
    # inside K's band; per patient, 0.9 of 4 patients needs all 4: 0.30.
    rng = np.random.default_rng(2)
    p = np.concatenate(
        [rng.uniform(0.80, 0.95, 40), [0.30, 0.40, 0.50], [0.88, 0.10, 0.82, 0.10, 0.60, 0.10]]
    )
    y = np.array([1] * 43 + [0] * 6)
    patients = np.array(["K"] * 40 + ["E", "F", "G"] + ["B", "B", "C", "C", "D", "D"])
    rule = OperatingPointRule("sensitivity", 0.9)
    assert choose_threshold_for(rule, y, p) > 0.75
    assert choose_threshold_for(rule, y, p, patient_weights(patients)) == pytest.approx(0.30)


def _rows(p, y, patients, mags, rank=None):
    from histolens.evaluation.metrics import PredictionRow

    classes = ("benign", "malignant")
    return [
        PredictionRow(
            f"i{k}",
            q,
            m,
            classes[t],
            int(t),
            (1 - v, v),
            (1 - v, v),
            rank_score=None if rank is None else float(rank[k]),
        )
        for k, (v, t, q, m) in enumerate(zip(p, y, patients, mags, strict=True))
    ]


def test_aucs_rank_the_rank_scores_not_the_shifted_probabilities():
    from histolens.evaluation.metrics import EvalResult, compute_metrics

    rng = np.random.default_rng(1)
    n = 200
    y = np.repeat([0, 1], n // 2)
    raw = np.clip(rng.normal(0.4 + 0.2 * y, 0.15), 0.01, 0.99)
    mags = np.tile([100, 200], n // 2)
    patients = np.array([f"p{k % 20}-{t}" for k, t in enumerate(y)])
    # Decision probabilities moved by a different amount per magnification (as out-of-fold rows
    # centred on each fold's threshold there): 200X's benign images now outrank 100X's malignant.
    shifted = np.clip(raw + np.where(mags == 200, 0.3, -0.3), 0.0, 1.0)
    ev = EvalResult(
        _rows(shifted, y, patients, mags, raw), ("benign", "malignant"), "binary", 0.5, 1.0
    )
    m = compute_metrics(ev, n_boot=20)
    assert m.image.roc_auc == pytest.approx(safe_auc(y, raw), abs=1e-12)
    assert abs(safe_auc(y, shifted) - safe_auc(y, raw)) > 0.05  # the shift does reorder
    assert m.image_at_05.roc_auc == m.image.roc_auc
    for mag in (100, 200):
        at = mags == mag
        block = m.per_magnification[f"{mag}X"]
        assert block.roc_auc == pytest.approx(safe_auc(y[at], raw[at]), abs=1e-12)
    # The decision still uses the (shifted) probabilities.
    assert m.image.sensitivity == pytest.approx((shifted[y == 1] >= 0.5).mean())
    # Rows without a rank score rank their probabilities, as before.
    plain = EvalResult(
        _rows(shifted, y, patients, mags), ("benign", "malignant"), "binary", 0.5, 1.0
    )
    assert compute_metrics(plain, n_boot=0).image.roc_auc == pytest.approx(
        safe_auc(y, shifted), abs=1e-12
    )
