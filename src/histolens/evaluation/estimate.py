"""The headline estimate: how well a model does on patients it has not seen, and on how many.

Built once from out-of-fold predictions (patient-level cross-validation, the default) or from a
held-out test split, stored in the checkpoint as plain JSON, and rendered by every front end
through :func:`estimate_lines` so that the terminal, report, desktop app and web page all say
the same thing: the figure, its 95% CI by bootstrap over patients, what it was measured on, how
many patients of each class support it, and a warning where that is too few.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from histolens.evaluation.results import Estimate, EstimateBlock, Metrics, as_estimate
from histolens.stats.metrics import HEADLINE_METRICS

__all__ = [
    "DECISION_KEYS",
    "DECISION_NAMES",
    "ESTIMATE_KEYS",
    "MIN_PATIENTS_PER_CLASS",
    "build_estimate",
    "class_support_warnings",
    "estimate_lines",
    "headline_text",
    "per_magnification_lines",
]

# Below this many patients of a class, an estimate's CI rests on too few people to trust.
MIN_PATIENTS_PER_CLASS = 5

# What is shown, in order: binary task, then subtypes (one list for every front end).
ESTIMATE_KEYS: dict[str, str] = dict(HEADLINE_METRICS)
# Stored in each block besides them: the share of images referred to a person.
_BLOCK_KEYS: dict[str, str] = {**ESTIMATE_KEYS, "refer_rate": "referral rate"}
# What each magnification's line shows (binary), beside its AUC.
DECISION_KEYS = ("sensitivity", "specificity", "balanced_accuracy", "refer_rate")
DECISION_NAMES: dict[str, str] = {**ESTIMATE_KEYS, "refer_rate": "referral rate"}


def _patients_per_class(rows) -> dict[str, int]:
    """Patients (groups) per class: each group counted under the label of most of its images."""
    labels: dict[str, Counter] = {}
    for r in rows:
        labels.setdefault(r.patient, Counter())[r.label] += 1
    counts = Counter(c.most_common(1)[0][0] for c in labels.values())
    return dict(sorted(counts.items()))


def class_support_warnings(
    patients_per_class: dict[str, int], classes: Sequence[str], where: str = ""
) -> list[str]:
    """One sentence per class with fewer than MIN_PATIENTS_PER_CLASS patients behind it."""
    out = []
    suffix = f" at {where}" if where else ""
    for c in classes:
        n = int(patients_per_class.get(c, 0))
        if n < MIN_PATIENTS_PER_CLASS:
            people = "patient supports" if n == 1 else "patients support"
            out.append(
                f"Only {n} {c} {people} this estimate{suffix}: its confidence interval rests on "
                "very few people and may not hold for new patients."
            )
    return out


def _block(result, rows, n_boot: int, seed: int, metrics=None) -> EstimateBlock:
    from histolens.evaluation.metrics import EvalResult, compute_metrics
    from histolens.stats.bootstrap import PatientBootstrap
    from histolens.stats.metrics import bootstrap_ci

    sub = EvalResult(
        list(rows),
        result.classes,
        result.task,
        result.threshold,
        result.temperature,
        operating_points=result.operating_points,
    )
    if metrics is None:
        metrics = compute_metrics(sub, n_boot=n_boot, seed=seed)
    img = metrics.image.figures()
    ci = dict(metrics.image.ci95 or {})
    if result.alpha is not None and rows:
        # The share of images a person is asked to decide, with its CI over patients.
        refer = np.array([r.refer for r in rows], dtype=float)
        img["refer_rate"] = float(refer.mean())
        if n_boot:
            groups = np.array([r.patient for r in rows])
            ci["refer_rate"] = PatientBootstrap(groups, n_boot, seed).interval_of(refer)
    if len(result.classes) > 2:
        # The subtype headline (and the probe's choice of C): compute_metrics has no balanced
        # accuracy for subtypes, so it is computed here, with its CI over patients.
        y = np.array([r.target for r in rows])
        correct = np.array([int(np.argmax(r.probs)) == r.target for r in rows])
        patients = np.array([r.patient for r in rows])

        def balanced_accuracy(i: np.ndarray) -> float:
            return float(np.mean([correct[i][y[i] == c].mean() for c in np.unique(y[i])]))

        img["balanced_accuracy"] = balanced_accuracy(np.arange(len(rows)))
        if n_boot:
            ci["balanced_accuracy"] = bootstrap_ci(balanced_accuracy, patients, n_boot, seed)
    return EstimateBlock(
        n_images=metrics.n_images,
        n_patients=metrics.n_patients,
        patients_per_class=_patients_per_class(rows),
        metrics={k: float(img[k]) for k in _BLOCK_KEYS if k in img},
        ci95={k: (float(v[0]), float(v[1])) for k, v in ci.items() if k in _BLOCK_KEYS},
        threshold=float(np.median(sub.thresholds())) if len(result.classes) == 2 else None,
    )


def build_estimate(
    result,
    method: str,
    description: str,
    n_boot: int = 1000,
    seed: int = 0,
    per_magnification_boot: int = 500,
    decision: Any = None,
    metrics: Metrics | None = None,
) -> Estimate:
    """The estimate of an :class:`~histolens.evaluation.metrics.EvalResult`, overall and per magnification.

    Args:
        result: predictions of images whose patients the scoring model never saw.
        decision: the shipped model's operating points (histolens.stats.decisions), when
            ``result``'s rows were decided by other models (cross-validation's folds).
        method: how, e.g. "5-fold patient-level cross-validation (out-of-fold predictions)".
        description: on what, e.g. "735 images of 30 patient groups in breakhis-dev".
        metrics: ``compute_metrics(result, n_boot=n_boot, seed=seed)`` when the caller has
            it already: its image block is the overall one (not computed twice).
    """
    rows = result.rows
    overall = _block(result, rows, n_boot, seed, metrics)
    blocks: dict[str, EstimateBlock] = {}
    mags = sorted({r.magnification for r in rows if r.magnification})
    if len(mags) > 1:
        for m in mags:
            sub = [r for r in rows if r.magnification == m]
            if len({r.target for r in sub}) < 2:
                blocks[f"{m}X"] = EstimateBlock(
                    n_images=len(sub),
                    n_patients=len({r.patient for r in sub}),
                    patients_per_class=_patients_per_class(sub),
                )
                continue
            block = _block(result, sub, per_magnification_boot, seed)
            if decision is not None:  # the shipped model's threshold there
                block = replace(block, threshold=decision.threshold_for(m))
            blocks[f"{m}X"] = block
    warnings = class_support_warnings(overall.patients_per_class, result.classes)
    for m, block in blocks.items():
        warnings += class_support_warnings(block.patients_per_class, result.classes, m)
    op = decision or result.operating_points
    return Estimate(
        method=method,
        description=description,
        task=result.task,
        classes=list(result.classes),
        # Binary: the median of the images' thresholds (per magnification), as the block's.
        threshold=float(result.threshold) if overall.threshold is None else overall.threshold,
        operating_point=None if op is None else str(op.rule),
        magnification_thresholds=(
            None if op is None or not op.thresholds else ("shared" if op.shared else "separate")
        ),
        operating_points=None if op is None else op.table(),
        n_images=overall.n_images,
        n_patients=overall.n_patients,
        patients_per_class=overall.patients_per_class,
        metrics=overall.metrics,
        ci95=overall.ci95,
        per_magnification=blocks,
        warnings=warnings,
    )


def _fmt_metric(block: EstimateBlock | Estimate, key: str) -> str:
    value = block.metrics.get(key)
    if value is None or not np.isfinite(value):
        return "n/a"
    ci = block.ci95.get(key)
    if ci and all(np.isfinite(ci)):
        return f"{value:.3f} (95% CI {ci[0]:.2f}-{ci[1]:.2f})"
    return f"{value:.3f}"


def _support(block: EstimateBlock | Estimate) -> str:
    per_class = ", ".join(f"{n} {c}" for c, n in block.patients_per_class.items())
    detail = f" ({per_class})" if per_class else ""
    return f"{block.n_images} images of {block.n_patients} patients{detail}"


def headline_text(estimate: Estimate | dict[str, Any]) -> str:
    """One line: the main figure with its CI and the support behind it."""
    estimate = as_estimate(estimate)
    key = estimate.main_figure()
    return (
        f"{ESTIMATE_KEYS[key]} on unseen patients {_fmt_metric(estimate, key)}, "
        f"{estimate.method}, {_support(estimate)}"
    )


def thresholds_way_text(way: str | None) -> str:
    """How the magnifications' thresholds were chosen, in words (``way``: an estimate's or
    an ``OperatingPoints``' ``magnification_thresholds`` / ``method``)."""
    if way == "shared":
        return (
            "one choice shared by the magnifications with enough patients, each moved by its offset"
        )
    return "chosen per magnification"


def estimate_lines(
    estimate: Estimate | dict[str, Any] | None, per_magnification: bool = True
) -> list[str]:
    """The estimate as lines of text for a terminal, a label or a page; warnings last."""
    estimate = as_estimate(estimate)
    if not estimate:
        return ["No estimate on unseen patients is stored with this model."]
    lines = [
        f"Estimated on unseen patients by {estimate.method}: {estimate.description}.",
        f"Support: {_support(estimate)}.",
    ]
    if estimate.operating_point:
        lines.append(
            f"Operating point: {estimate.operating_point}, "
            f"{thresholds_way_text(estimate.magnification_thresholds)}."
        )
    for key, name in _BLOCK_KEYS.items():
        if key in estimate.metrics:
            lines.append(f"  {name}: {_fmt_metric(estimate, key)}")
    if per_magnification:
        lines += per_magnification_lines(estimate)
    lines += [f"warning: {w}" for w in estimate.warnings]
    return lines


def per_magnification_lines(estimate: Estimate | dict[str, Any] | None) -> list[str]:
    """Each magnification's AUC and support, then its decision (sensitivity, specificity,
    balanced accuracy, referral rate) at its own threshold, each with its CI."""
    estimate = as_estimate(estimate)
    lines: list[str] = []
    if estimate:
        for m, block in estimate.per_magnification.items():
            key = "roc_auc" if "roc_auc" in block.metrics else "balanced_accuracy"
            value = _fmt_metric(block, key) if block.metrics else "n/a (one class only)"
            lines.append(f"  {m}: {ESTIMATE_KEYS[key]} {value}; {_support(block)}")
            decision = [
                f"{_BLOCK_KEYS[k]} {_fmt_metric(block, k)}"
                for k in DECISION_KEYS
                if k in block.metrics
            ]
            if decision:
                at = f"at threshold {block.threshold:.3f}: " if block.threshold is not None else ""
                lines.append(f"      {at}{'; '.join(decision)}")
    return lines
