"""What a model's stored figures mean, in one shape for every front end.

Checkpoints written since estimates were stored carry an ``estimate`` (see
:mod:`histolens.evaluation.estimate`). Older checkpoints, and runs of the Lightning head on one held-out
split, carry only a headline of their test split in their ``metrics``.
:func:`estimate_from_metrics` puts those figures into the estimate's shape, labelled as what they
are ("a held-out test split of 7 patients") and with a warning when too few patients stand behind
them, so that the report, the desktop app, the web page and the terminal never show a bare
"patient AUC 1.000".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from histolens.checkpoint.metadata import CheckpointMetadata

from histolens.evaluation.estimate import (
    ESTIMATE_KEYS,
    MIN_PATIENTS_PER_CLASS,
    class_support_warnings,
    estimate_lines,
    headline_text,
)
from histolens.evaluation.results import CI, Estimate, EstimateBlock, as_estimate

__all__ = [
    "checkpoint_estimate",
    "estimate_from_metrics",
    "figure_lines",
    "headline",
    "headline_estimate",
    "is_from_metrics",
    "measured_on",
    "performance_lines",
    "stored_estimate",
    "support_text",
]

# How each split of an older checkpoint's "metrics" was measured, in words.
_SPLIT_METHODS = {
    "test": "a held-out test split of patients",
    "val": "the validation split of patients (it also chose the threshold)",
    "out-of-fold": "patient-level cross-validation (out-of-fold predictions)",
}
_SPLIT_NAMES = {
    "test": "a held-out test split",
    "val": "the validation split",
    "out-of-fold": "the out-of-fold predictions",
}
# Older checkpoints and other tools spell a few keys differently.
_ALIASES = {"auc": "roc_auc", "patient_level_auc": "patient_auc"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _count(value: Any) -> int | None:
    number = _number(value)
    return None if number is None or math.isnan(number) else int(number)


def is_from_metrics(estimate: Estimate | dict[str, Any] | None) -> bool:
    """True for an estimate rebuilt from an older checkpoint's metrics (no per-class support)."""
    estimate = as_estimate(estimate)
    return estimate is not None and estimate.from_metrics


def _flat_metrics(metrics: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The split's name and its flat figures, also from the oldest ``{"test": {..}}`` shape."""
    split = str(metrics.get("split", "test"))
    nested = [k for k, v in metrics.items() if isinstance(v, dict) and k in _SPLIT_METHODS]
    if not any(_number(metrics.get(k)) is not None for k in (*ESTIMATE_KEYS, *_ALIASES)) and nested:
        split = nested[0]  # the oldest shape: {"test": {"roc_auc": ..}}
        metrics = {**metrics[split], "split": split}
    return split, metrics


def _stored_ci95(metrics: dict[str, Any], values: dict[str, float]) -> dict[str, CI]:
    """The well-formed ``(lo, hi)`` pairs of ``metrics["ci95"]`` for the figures in ``values``."""
    ci = metrics.get("ci95") if isinstance(metrics.get("ci95"), dict) else {}
    return {
        k: (float(v[0]), float(v[1]))
        for k, v in ci.items()
        if k in values
        and isinstance(v, list | tuple)
        and len(v) == 2
        and all(_number(x) is not None for x in v)
    }


def _description(split: str, n_images: int | None, n_patients: int | None) -> str:
    """'a held-out test split of 7 patients (40 images)', saying when a count is not stored."""
    name = _SPLIT_NAMES.get(split, f"the {split} split")
    if n_patients is not None:
        description = f"{name} of {n_patients} patients"
        description += "" if n_images is None else f" ({n_images} images)"
    elif n_images is not None:
        description = f"{name} of {n_images} images (number of patients not stored)"
    else:
        description = f"{name} (number of patients not stored)"
    return description


def _support_warnings(
    split: str,
    n_patients: int | None,
    classes: Sequence[str],
    ppc: dict[str, int],
    blocks: dict[str, EstimateBlock],
) -> list[str]:
    """Warnings when too few patients (of each class, where known) stand behind the figures."""
    if ppc:
        warnings = class_support_warnings(ppc, classes or sorted(ppc))
    elif n_patients is None:
        warnings = [
            f"The number of {split} patients is not stored: the figures may not hold for new "
            "patients."
        ]
    elif n_patients < MIN_PATIENTS_PER_CLASS * max(2, len(classes)):
        # Fewer patients than this means that some class has fewer than MIN_PATIENTS_PER_CLASS.
        warnings = [
            f"Measured on only {n_patients} {split} patients: the figures may not hold for new "
            "patients."
        ]
    else:
        warnings = []
    for mag, block in blocks.items():
        if block.patients_per_class:
            warnings += class_support_warnings(block.patients_per_class, classes, mag)
    return warnings


def estimate_from_metrics(
    metrics: dict[str, Any] | None,
    classes: Sequence[str] = (),
    task: str = "binary",
    threshold: float | None = None,
    patients_per_class: dict[str, int] | None = None,
    per_magnification: dict[str, EstimateBlock] | None = None,
) -> Estimate | None:
    """An older checkpoint's (or evaluation's) headline metrics in the shape of an estimate.

    Args:
        metrics: ``{"split": "test", "roc_auc": .., "n_images": .., "n_patients": ..}``; a
            ``ci95`` dict of ``[lo, hi]`` pairs is used when present (evaluation's metrics.json).
        patients_per_class: patients of each class, when known (from predictions.csv); then the
            warnings name the classes with too few patients.
        per_magnification: blocks in the estimate's shape, when known.

    Returns:
        None when ``metrics`` holds no figure at all.
    """
    if not isinstance(metrics, dict):
        return None
    split, metrics = _flat_metrics(metrics)
    values: dict[str, float] = {}
    for key, value in metrics.items():
        key = _ALIASES.get(key, key)
        if key in ESTIMATE_KEYS and _number(value) is not None:
            values[key] = float(value)
    if not values:
        return None
    ci95 = _stored_ci95(metrics, values)
    n_images, n_patients = _count(metrics.get("n_images")), _count(metrics.get("n_patients"))
    description = _description(split, n_images, n_patients)
    ppc = dict(patients_per_class or {})
    blocks = dict(per_magnification or {})
    warnings = _support_warnings(split, n_patients, classes, ppc, blocks)
    return Estimate(
        from_metrics=True,
        split=split,
        method=_SPLIT_METHODS.get(split, f"the {split} split"),
        description=description,
        task=task,
        classes=list(classes),
        threshold=threshold,
        n_images=n_images,
        n_patients=n_patients,
        patients_per_class=ppc,
        metrics=values,
        ci95=ci95,
        per_magnification=blocks,
        warnings=warnings,
    )


def checkpoint_estimate(
    estimate: Estimate | dict[str, Any] | None,
    metrics: dict[str, Any] | None,
    classes: Sequence[str],
    task: str,
    threshold: float | None,
) -> Estimate | None:
    """A checkpoint's figures to quote: its stored estimate (the metadata's JSON, read here),
    or else its older test-split ``metrics`` labelled as such, or None (what
    :func:`headline_estimate` quotes)."""
    if isinstance(estimate, Estimate):
        return estimate
    if isinstance(estimate, dict) and estimate.get("metrics") is not None:
        return Estimate.from_dict(estimate)
    return estimate_from_metrics(metrics, list(classes), task, _number(threshold))


def stored_estimate(meta: CheckpointMetadata | None) -> Estimate | None:
    """The estimate a checkpoint stores (its metadata's ``estimate``), None when it has none."""
    if meta is None or not meta.estimate:
        return None
    return Estimate.from_dict(meta.estimate)


def headline_estimate(meta: CheckpointMetadata | None) -> Estimate | None:
    """The figures to quote for a model, with their 95% CIs: the stored estimate on unseen
    patients, or an older checkpoint's metrics labelled as what they are; None when nothing is
    stored (or there is no metadata)."""
    if meta is None:
        return None
    return checkpoint_estimate(
        meta.estimate, meta.metrics, meta.class_names, meta.task, meta.threshold
    )


def support_text(block: Estimate | EstimateBlock) -> str:
    """'48 images of 8 patients (4 benign, 4 malignant)'; the per-class part only when known."""
    images = block.n_images
    patients = block.n_patients
    text = f"{'?' if patients is None else patients} patients"
    if images is not None:
        text = f"{images} images of {text}"
    per_class = block.patients_per_class
    if per_class:
        text += " (" + ", ".join(f"{n} {c}" for c, n in per_class.items()) + ")"
    return text


def measured_on(estimate: Estimate | dict[str, Any]) -> str:
    """One sentence: how the figures were measured, and on what."""
    estimate = as_estimate(estimate)
    if is_from_metrics(estimate):
        no_ci = "" if estimate.ci95 else "; no confidence interval was stored"
        return f"Measured on {estimate.description}{no_ci}."
    return f"Estimated on unseen patients by {estimate.method}: {estimate.description}."


def performance_lines(estimate: Estimate | dict[str, Any] | None) -> list[str]:
    """The figures as lines of text: what they were measured on, the support, each figure with
    its 95% CI, per magnification, and the warnings last (each prefixed ``warning: ``)."""
    estimate = as_estimate(estimate)
    if not estimate:
        return ["No measured performance is stored with this model."]
    if not is_from_metrics(estimate):
        return estimate_lines(estimate)
    lines = [measured_on(estimate)]
    if estimate.patients_per_class:
        lines.append(f"Support: {support_text(estimate)}.")
    # Per-magnification lines need the patients of each class, which older metrics lack.
    blocks = {m: b for m, b in estimate.per_magnification.items() if b.patients_per_class}
    return lines + figure_lines(replace(estimate, per_magnification=blocks))


def figure_lines(estimate: Estimate | dict[str, Any]) -> list[str]:
    """The figures with their CIs, one line per magnification, then the warnings: the estimate's
    lines without the first two, which say what it was measured on and its support."""
    return estimate_lines(estimate)[2:]


def headline(estimate: Estimate | dict[str, Any] | None) -> str:
    """One line for a model card: the main figure, its CI when stored, and what it rests on."""
    estimate = as_estimate(estimate)
    if not estimate:
        return "No measured performance is stored with this model."
    if not is_from_metrics(estimate):
        return headline_text(estimate)
    values = estimate.metrics
    key = next(k for k in ("roc_auc", "balanced_accuracy", *ESTIMATE_KEYS) if k in values)
    value = values[key]
    text = f"{ESTIMATE_KEYS[key]} {'n/a' if math.isnan(value) else f'{value:.3f}'}"
    ci = estimate.ci95.get(key)
    if ci and not any(math.isnan(v) for v in ci):
        text += f" (95% CI {ci[0]:.2f}-{ci[1]:.2f})"
    elif not ci:
        text += " (no confidence interval stored)"
    return f"{text} on {estimate.description}"
