"""Grouped cross-validated scoring of one audit attribute: out-of-fold lifts, AUC, value tells.

Pure functions over aligned arrays (values, labels, folds); :func:`evaluate_attribute` turns the
scores into the finding the audit report shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# A single value (a folder, an image size) is a "tell" when it holds at least this share of the
# images and the odds of the class differ at least this much between it and the rest, both in the
# data and as predicted for held-out groups. AUC alone misses such a value when it covers most
# images of a skewed dataset: its AUC is (sensitivity + specificity) / 2 whatever its odds ratio.
TELL_MIN_SHARE = 0.05
TELL_MIN_ODDS_RATIO = 3.0
# Numeric attributes with at most this many distinct values are also read value by value.
DISCRETE_MAX_VALUES = 12

_CAUSE = "a model may learn how the images were made instead of the tissue"
_CAUSE_COLOUR = "may be stain/scanner differences, or may be the tissue"

Folds = Sequence[tuple[Sequence[int], Sequence[int]]]


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-3, 1 - 1e-3)
    return np.log(p / (1 - p))


def numeric_oof_scores(
    values: np.ndarray, y: np.ndarray, folds: Folds, seed: int = 0
) -> np.ndarray:
    """Out-of-fold lift from a depth-2 tree on one numeric feature, fitted on the training folds.

    A lift is the predicted log-odds minus the training folds' base log-odds. Raw probabilities
    would carry each fold's base rate, which is anti-correlated with its test fold's (a fold rich
    in one class leaves its training folds poor in it), and pooled AUC would then be pessimistic.
    """
    from sklearn.tree import DecisionTreeClassifier

    x = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    y = np.asarray(y, dtype=np.int64)
    scores = np.zeros(len(y))
    for train, test in folds:
        train, test = np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)
        if len(test) == 0 or len(np.unique(y[train])) < 2:
            continue
        tree = DecisionTreeClassifier(
            max_depth=2, min_samples_leaf=max(2, len(train) // 50), random_state=seed
        )
        tree.fit(x[train], y[train])
        scores[test] = _logit(tree.predict_proba(x[test])[:, 1]) - _logit(y[train].mean())
    return scores


def categorical_oof_scores(
    values: Sequence[object], y: np.ndarray, folds: Folds, prior_weight: float = 2.0
) -> np.ndarray:
    """Out-of-fold lift of each image's value: its training-fold rate over the training base rate.

    Rates are shrunk towards the base rate by ``prior_weight`` pseudo-images, so a value seen in
    a handful of training images (or none: lift 0) cannot claim a certain class.
    """
    y = np.asarray(y, dtype=np.float64)
    values = list(values)
    scores = np.zeros(len(y))
    for train, test in folds:
        if len(train) == 0:
            continue
        base = float(np.mean(y[np.asarray(train, dtype=np.int64)]))
        sums: dict[object, list[float]] = {}
        for i in train:
            acc = sums.setdefault(values[i], [0.0, 0.0])
            acc[0] += y[i]
            acc[1] += 1
        for i in test:
            pos, n = sums.get(values[i], (0.0, 0.0))
            rate = (pos + prior_weight * base) / (n + prior_weight)
            scores[i] = _logit(rate) - _logit(base)
    return scores


@dataclass(frozen=True)
class ValueTell:
    """A value whose images have clearly different class odds from the rest."""

    value: object
    share: float
    rate: float
    rest_rate: float
    log_odds_ratio: float


def value_tells(
    values: Sequence[object],
    y: np.ndarray,
    oof_scores: np.ndarray,
    min_share: float = TELL_MIN_SHARE,
    min_odds_ratio: float = TELL_MIN_ODDS_RATIO,
) -> list[ValueTell]:
    """Values whose class odds differ from the rest by ``min_odds_ratio`` (either way).

    The difference must hold in the labels and in the out-of-fold lifts (log-odds, as from
    ``categorical_oof_scores``), i.e. as learnt from other patient groups, so a value seen in one
    patient only (lift 0 when that patient is held out) is never a tell. Values enriched in the
    class come first, then the rest, each by share times log odds ratio.
    """
    y = np.asarray(y, dtype=np.float64)
    arr = np.asarray([str(v) for v in values])
    originals = {str(v): v for v in values}
    tells = []
    for key in np.unique(arr):
        mask = arr == key
        share = float(mask.mean())
        if share < min_share or share > 1 - min_share:
            continue
        pos, n = y[mask].sum(), mask.sum()
        rest_pos, rest_n = y[~mask].sum(), (~mask).sum()
        # Haldane's +0.5 keeps a pure value's odds finite.
        realised = float(_logit((pos + 0.5) / (n + 1)) - _logit((rest_pos + 0.5) / (rest_n + 1)))
        predicted = float(oof_scores[mask].mean() - oof_scores[~mask].mean())
        if realised * predicted > 0 and min(abs(realised), abs(predicted)) >= np.log(
            min_odds_ratio
        ):
            tells.append(ValueTell(originals[key], share, pos / n, rest_pos / rest_n, realised))
    # A value enriched in the class, covering many images, reads best ("224 is 82% malignant").
    return sorted(tells, key=lambda t: (t.log_odds_ratio < 0, -t.share * abs(t.log_odds_ratio)))


@dataclass(frozen=True)
class AttributeFinding:
    """How well one attribute predicts the label across patient groups."""

    name: str
    kind: str
    auc: float | None
    n_values: int
    flagged: bool
    message: str
    detail: str = ""


def evaluate_attribute(
    attr_name: str,
    kind: str,
    values: Sequence[object],
    y: np.ndarray,
    folds: Folds,
    positive: str,
    threshold: float = 0.70,
    tissue_signal: bool = False,
    fmt: Callable[[object], str] = str,
    seed: int = 0,
    unit: str = "patient groups",
) -> AttributeFinding:
    """Score one attribute: grouped out-of-fold AUC, value tells, and the finding's message.

    ``values`` may hold None (attribute missing for that image); those rows are left out.
    ``y`` is 1 for ``positive``; ``folds`` are (train, test) indices over all rows; ``unit``
    names what the folds keep together, for the message.
    """
    present = np.array([v is not None and v == v for v in values], dtype=bool)
    kept = [v for v, p in zip(values, present, strict=True) if p]
    n_values = len(set(kept))
    if n_values == 0:
        return AttributeFinding(attr_name, kind, None, 0, False, "", "missing for every image")
    if n_values == 1:
        return AttributeFinding(attr_name, kind, None, 1, False, "", f"constant ({fmt(kept[0])})")
    y_kept = np.asarray(y)[np.flatnonzero(present)]
    if len(np.unique(y_kept)) < 2:
        return AttributeFinding(attr_name, kind, None, n_values, False, "", "one class only")
    discrete = kind == "categorical" or n_values <= DISCRETE_MAX_VALUES
    auc, tells = _score_attribute(kind, kept, y_kept, _folds_over(present, folds), discrete, seed)
    by_auc = auc is not None and auc >= threshold
    if not tells and not by_auc:
        return AttributeFinding(attr_name, kind, auc, n_values, False, "", "")
    coverage = "" if len(kept) == len(values) else f" ({len(kept)} of {len(values)} images)"
    auc_text = f"AUC {auc:.2f} over {unit}" if auc is not None else "no AUC"
    cause = _CAUSE_COLOUR if tissue_signal else _CAUSE
    if tells:
        tell = tells[0]
        detail = f"{fmt(tell.value)} is {tell.rate:.0%} {positive} (others {tell.rest_rate:.0%})"
        message = (
            f"{attr_name} {detail}, {tell.share:.0%} of the images ({auc_text}{coverage}): {cause}."
        )
    elif kind == "numeric":
        x = np.asarray(kept, dtype=np.float64)
        higher = x[y_kept == 1].mean() > x[y_kept == 0].mean()
        detail = f"{'higher' if higher else 'lower'} values go with '{positive}'"
        message = f"{attr_name} predicts '{positive}' ({auc_text}{coverage}; {detail}): {cause}."
    else:
        detail = ""
        message = f"{attr_name} predicts '{positive}' ({auc_text}{coverage}): {cause}."
    return AttributeFinding(attr_name, kind, auc, n_values, True, message, detail)


def _folds_over(present: np.ndarray, folds: Folds) -> list[tuple[np.ndarray, np.ndarray]]:
    """The folds restricted to the rows where ``present`` is True, re-indexed over those rows."""
    index = np.flatnonzero(present)
    remap = np.full(len(present), -1)
    remap[index] = np.arange(len(index))
    sub_folds = [
        (remap[np.asarray(tr, dtype=np.int64)], remap[np.asarray(te, dtype=np.int64)])
        for tr, te in folds
    ]
    return [(tr[tr >= 0], te[te >= 0]) for tr, te in sub_folds]


def _score_attribute(
    kind: str,
    values: Sequence[object],
    y: np.ndarray,
    folds: Folds,
    discrete: bool,
    seed: int,
) -> tuple[float | None, list[ValueTell]]:
    """Pooled out-of-fold AUC (None when undefined) and, for ``discrete`` values, their tells."""
    from histolens.stats.metrics import safe_auc

    if kind == "numeric":
        scores = numeric_oof_scores(np.asarray(values, dtype=np.float64), y, folds, seed)
    else:
        scores = categorical_oof_scores(values, y, folds)
    auc = safe_auc(y, scores)
    auc = None if auc != auc else auc
    return auc, value_tells(values, y, scores) if discrete else []
