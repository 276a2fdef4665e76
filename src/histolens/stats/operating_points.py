"""Operating points per magnification: where a binary model turns a probability into a decision.

This module holds the rule and the choice of one threshold; :mod:`histolens.stats.decisions`
holds the chosen thresholds per magnification and per patient (``OperatingPoints``).

One threshold for all magnifications is set where the most common magnification's images sit
(on breakhis-dev, the resized 200X images), and another magnification's probabilities may sit
elsewhere: a pooled Youden threshold called half of breakhis-dev's 100X cancers benign. So the
threshold is chosen per magnification from the out-of-fold predictions, exactly as the
prediction sets are calibrated per magnification (Mondrian, :mod:`histolens.stats.conformal`), with
the same stratum keys (:func:`histolens.stats.conformal.stratum_of`). A magnification with fewer than
:data:`MIN_PATIENTS_PER_CLASS` patients of either class borrows the pooled choice, and says how
many it would need. An image of an unknown magnification gets the pooled choice.

Magnification moves both classes' scores alike, so by default the magnifications with enough
patients share one choice (:data:`MAGNIFICATION_THRESHOLDS`, "shared"): each one's logit offset
(:func:`magnification_offsets`) is taken out, the rule chooses one threshold on all of them,
and each threshold is that one moved back by its offset. A magnification's threshold then rests
on all its patients and on the other magnifications', not on its rarer class alone; "separate"
chooses each on its own images.

The rule (:class:`OperatingPointRule`) is what the user asks for: ``youden`` (sensitivity +
specificity - 1 at its largest), ``sensitivity:0.95`` (the highest threshold whose sensitivity
reaches 0.95: screening) or ``specificity:0.95`` (the lowest whose specificity reaches 0.95:
confirmation). The rates a threshold is chosen by count every patient once
(:func:`patient_weights`), not every image: images per patient vary from 1 to 76 at one
magnification. The out-of-fold predictions the choice was made on are stored with it, so that
``histolens calibrate`` can choose again under another rule without retraining.

Used by both heads: the linear probe (out-of-fold predictions of cross-validation, and each
fold's own choice on its inner out-of-fold predictions) and the MLP head (validation patients).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from histolens.errors import ConfigError

__all__ = [
    "DEFAULT_MAGNIFICATION_THRESHOLDS",
    "MAGNIFICATION_THRESHOLDS",
    "MIN_PATIENTS_PER_CLASS",
    "OPERATING_POINT_FORMS",
    "OperatingPointRule",
    "check_magnification_thresholds",
    "choose_threshold_for",
    "magnification_offsets",
    "parse_operating_point",
    "patient_weights",
    "rule_from_train_config",
    "stratum_sort_key",
]

# A magnification chooses its own threshold only with at least this many patients of each class
# there. Images of one patient are alike, so the choice is set by the boundary between the
# classes' patients: with 3 of each, a choice still rests on 2 patients of each class when any
# one patient is held out (as cross-validation and a new patient do), never on a single patient.
# Below it, one atypical patient would set the threshold for everyone at that magnification.
MIN_PATIENTS_PER_CLASS = 3

# How the magnifications with enough patients get their thresholds:
# - "shared": one choice for all of them, on probabilities with each magnification's offset taken
#   out (:func:`magnification_offsets`), moved back by that offset; every patient of every such
#   magnification takes part in the choice, and each magnification's position rests on its
#   patients of both classes;
# - "separate": each magnification chooses on its own images alone.
# On breakhis-dev a training fold has 4 benign patients at 100X: a separate Youden threshold there
# moved by 0.54-1.31 in logit (median 0.64) when the fold's training patients were drawn again,
# a shared one by 0.32-0.77 (median 0.51), smaller in all 15 folds of the protocol
# (benchmarks/generalisation.py; docs/operating-points.md).
MAGNIFICATION_THRESHOLDS = ("shared", "separate")
DEFAULT_MAGNIFICATION_THRESHOLDS = "shared"

OPERATING_POINT_FORMS = "youden, sensitivity:T or specificity:T (T in (0, 1], e.g. 0.95)"
_FORMAT_VERSION = 1
_RULE_RE = re.compile(r"^(sensitivity|specificity)\s*:\s*([0-9]*\.?[0-9]+)$")


@dataclass(frozen=True)
class OperatingPointRule:
    """How a threshold is chosen: ``kind`` youden, sensitivity, specificity (or fixed, 0.5: the
    old ``threshold_method``), with ``target`` the rate a sensitivity/specificity rule reaches."""

    kind: str = "youden"
    target: float | None = None

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}:{self.target:g}"

    @property
    def describes(self) -> str:
        """The rule in words, for reports."""
        if self.kind == "youden":
            return "Youden's J (sensitivity + specificity - 1 at its largest)"
        if self.kind == "fixed":
            return "a fixed 0.5"
        return f"{self.kind} at least {self.target:g}"


def parse_operating_point(text: str | OperatingPointRule) -> OperatingPointRule:
    """``youden``, ``sensitivity:0.95`` or ``specificity:0.95`` as a rule; a ConfigError naming
    the valid forms for anything else."""
    if isinstance(text, OperatingPointRule):
        return text
    s = str(text).strip().lower()
    if s in ("youden", "fixed"):
        return OperatingPointRule(s)
    m = _RULE_RE.match(s)
    if m is not None:
        target = float(m[2])
        if 0.0 < target <= 1.0:  # 1: every out-of-fold case kept (as --target-sensitivity 1)
            return OperatingPointRule(m[1], target)
    raise ConfigError(f"Unknown operating point '{text}'; use {OPERATING_POINT_FORMS}.")


def rule_from_train_config(train: Any) -> OperatingPointRule:
    """The rule a TrainConfig asks for: ``operating_point`` when set, else the older
    ``threshold_method`` (``sensitivity`` at ``target_sensitivity``)."""
    chosen = getattr(train, "operating_point", None)
    if chosen:
        return parse_operating_point(chosen)
    method = getattr(train, "threshold_method", "youden")
    if method == "sensitivity":
        return OperatingPointRule("sensitivity", float(train.target_sensitivity))
    return parse_operating_point(method)


def check_magnification_thresholds(method: str) -> str:
    """``method`` if it is one of :data:`MAGNIFICATION_THRESHOLDS`, else a ConfigError."""
    if method not in MAGNIFICATION_THRESHOLDS:
        raise ConfigError(
            f"Unknown way to choose thresholds per magnification '{method}'; use "
            f"{' or '.join(MAGNIFICATION_THRESHOLDS)}."
        )
    return method


def magnification_offsets(
    z: np.ndarray, y: np.ndarray, patients: np.ndarray, strata: np.ndarray
) -> dict[str, float]:
    """How far each magnification's logits sit from the first one's, the same for both classes.

    Each (patient, magnification) cell's mean logit ``u`` is modelled as a class level plus a
    magnification offset, ``u = a[class] + b[magnification]`` (``b`` of the first magnification
    in sorted order is 0), fitted by least squares with every cell counting once. Magnification
    moves both classes' logits alike (on breakhis-dev's 15 protocol folds the training patients'
    100X logits sat below 200X by a median of 1.31 for benign and 1.21 for malignant patients:
    benchmarks/results/generalisation-binary.txt, run 15), so an offset rests on all of a
    magnification's patients, not only on the few of its rarer class. Every stratum in ``strata`` needs patients of both
    classes or of a class also seen elsewhere; the caller passes only magnifications that have
    :data:`MIN_PATIENTS_PER_CLASS` of each.
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y).astype(int)
    patients = np.asarray(patients)
    strata = np.asarray(strata, dtype=object)
    keys = sorted(set(strata.tolist()), key=stratum_sort_key)
    if len(keys) < 2:
        return {k: 0.0 for k in keys}
    col = {k: i for i, k in enumerate(keys)}
    cells: dict[tuple[Any, str, int], list[float]] = {}
    for zi, yi, q, s in zip(z, y, patients, strata, strict=True):
        cells.setdefault((q, s, int(yi)), []).append(float(zi))
    design = np.zeros((len(cells), 2 + len(keys) - 1))
    u = np.empty(len(cells))
    for r, ((_, s, c), values) in enumerate(cells.items()):
        design[r, c] = 1.0
        if col[s] > 0:
            design[r, 1 + col[s]] = 1.0
        u[r] = float(np.mean(values))
    coef, *_ = np.linalg.lstsq(design, u, rcond=None)
    return {k: (0.0 if col[k] == 0 else float(coef[1 + col[k]])) for k in keys}


def stratum_sort_key(key: str) -> tuple[float, str]:
    """Magnification strata in order: numeric ones by value ("40" before "100"), others after,
    by name."""
    try:
        return (float(key), key)
    except ValueError:
        return (float("inf"), key)


def patient_weights(patients: Sequence[Any] | np.ndarray) -> np.ndarray:
    """One weight per image, 1 / (images of its patient): every patient counts once.

    BreakHis patients have 1 to 76 images at one magnification; weighted by image, the one
    benign patient with 76 of the 111 benign 100X images of breakhis-dev would set the
    specificity a threshold is chosen by, and the estimate and its CIs are about patients.
    """
    _, inverse, counts = np.unique(np.asarray(patients), return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].astype(np.float64)


def choose_threshold_for(
    rule: OperatingPointRule, y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """The threshold ``rule`` chooses on labels ``y`` (0/1) and positive-class probabilities
    ``p``, its rates weighted by ``weights`` (None: every image alike, e.g. patient_weights);
    0.5 when one class is absent."""
    from sklearn.metrics import roc_curve

    from histolens.stats.calibration import choose_threshold

    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    if rule.kind in ("youden", "fixed"):
        return choose_threshold(y, p, rule.kind, weights=weights)
    if rule.kind == "sensitivity":
        return choose_threshold(y, p, "sensitivity", float(rule.target), weights)
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p, sample_weight=weights)
    finite = np.isfinite(thr)
    fpr, thr = fpr[finite], thr[finite]
    # The lowest threshold (largest sensitivity) whose specificity reaches the target.
    ok = np.flatnonzero(1.0 - fpr >= float(rule.target))
    return float(thr[ok[-1]]) if len(ok) else float(thr[0])
