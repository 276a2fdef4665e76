"""The figures the report leads with: the estimate a reader should quote, its CIs, the patients
behind it, per magnification, and its warnings in words."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING

from histolens.evaluation.estimate import DECISION_KEYS, DECISION_NAMES, ESTIMATE_KEYS
from histolens.evaluation.performance import (
    estimate_from_metrics,
    headline_estimate,
    is_from_metrics,
    measured_on,
    stored_estimate,
    support_text,
)
from histolens.evaluation.results import Estimate, EstimateBlock, Metrics
from histolens.report.markup import card_row, fmt
from histolens.rundir import EvaluationFiles

if TYPE_CHECKING:
    from histolens.checkpoint.io import CheckpointMetadata

__all__ = ["estimate_section", "lead_estimate"]


def _ci_text(estimate: Estimate | EstimateBlock, key: str) -> str:
    ci = estimate.ci95.get(key)
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return ""
    return f"95% CI {ci[0]:.2f}&ndash;{ci[1]:.2f}"


def _estimate_cards(estimate: Estimate) -> str:
    """The estimate's main figures with their CIs, and the patients behind them."""
    values = estimate.metrics
    keys = (
        ("roc_auc", "patient_auc", "balanced_accuracy")
        if "roc_auc" in values
        else ("balanced_accuracy", "macro_f1", "patient_recognition_rate")
    )
    items = [
        (
            f"{ESTIMATE_KEYS[k][0].upper()}{ESTIMATE_KEYS[k][1:]}",
            fmt(values[k]),
            _ci_text(estimate, k),
        )
        for k in keys
        if k in values
    ]
    per_class = estimate.patients_per_class
    patients = html.escape(str(estimate.n_patients))
    note = ", ".join(f"{n} {html.escape(str(c))}" for c, n in per_class.items())
    items.append(("Patients", patients, note))
    if estimate.n_images is not None:
        items.append(("Images", html.escape(str(estimate.n_images)), ""))
    return card_row(items)


def _figure_with_ci(block: EstimateBlock, key: str) -> str:
    value = block.metrics.get(key)
    if value is None:
        return "n/a"
    ci = _ci_text(block, key).replace("95% CI ", "")
    return f"{fmt(value)}{f' ({ci})' if ci else ''}"


def _thresholds_about(estimate: Estimate) -> str:
    """A paragraph saying how each magnification's threshold was chosen ('' without a rule)."""
    rule = estimate.operating_point
    if not rule:
        return ""
    chosen = (
        "one choice on the out-of-fold predictions, shared by the magnifications with enough "
        "patients and moved to each by its offset"
        if estimate.magnification_thresholds == "shared"
        else "chosen on its out-of-fold predictions"
    )
    return (
        f"<p class=how>Each magnification is decided at its own threshold ({html.escape(rule)}"
        f", {chosen}; a magnification with too few patients takes the pooled one).</p>"
    )


def estimate_section(title: str, estimate: Estimate) -> str:
    """The figures a reader should quote: value, 95% CI, what they were measured on, the
    patients of each class behind them, per magnification, and the warnings in words."""
    values = estimate.metrics
    if is_from_metrics(estimate):
        how = f"<p class=how>{html.escape(measured_on(estimate))}</p>"
    else:
        how = (
            f"<p class=how><b>Method:</b> {html.escape(str(estimate.method))}.<br>"
            f"<b>Data:</b> {html.escape(str(estimate.description))}.</p>"
        )
    support = (
        f"<p class=how><b>Patients behind these figures:</b> "
        f"{html.escape(support_text(estimate))}.</p>"
    )
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class=num>{fmt(values[k])}</td>"
        f"<td class=num>{_ci_text(estimate, k).replace('95% CI ', '') or 'not stored'}</td></tr>"
        for k, name in ESTIMATE_KEYS.items()
        if k in values
    )
    table = (
        "<table class=fig><tr><th>Metric</th><th>Value</th><th>95% CI (bootstrap over patients)</th></tr>"
        f"{rows}</table>"
    )
    per_mag = estimate.per_magnification
    if per_mag:
        key = estimate.main_figure()
        shown_keys = {k for b in per_mag.values() for k in b.metrics}
        decision_keys = [k for k in DECISION_KEYS if k in shown_keys] if key == "roc_auc" else []
        body = ""
        for mag, block in per_mag.items():
            per_class = block.patients_per_class
            classes = ", ".join(f"{n} {html.escape(str(c))}" for c, n in per_class.items())
            value = block.metrics.get(key)
            ci = _ci_text(block, key)
            shown = "n/a (one class only)" if value is None else fmt(value)
            threshold = block.threshold
            decision = "".join(
                f"<td class=num>{_figure_with_ci(block, k)}</td>" for k in decision_keys
            )
            body += (
                f"<tr><td>{html.escape(str(mag))}</td><td class=num>{block.n_images}"
                f"</td><td class=num>{block.n_patients}</td><td>{classes or '?'}</td>"
                f"<td class=num>{shown}{f' ({ci})' if ci else ''}</td>"
                + (
                    f"<td class=num>{'' if threshold is None else fmt(threshold)}</td>{decision}"
                    if decision_keys
                    else ""
                )
                + "</tr>"
            )
        heads = "".join(f"<th>{DECISION_NAMES[k]} (95% CI)</th>" for k in decision_keys)
        table += (
            "<h3>Per magnification</h3>"
            + _thresholds_about(estimate)
            + "<table class=fig><tr><th>Magnification</th>"
            f"<th>Images</th><th>Patients</th><th>Patients per class</th>"
            f"<th>{ESTIMATE_KEYS[key]}</th>"
            + (f"<th>Threshold</th>{heads}" if decision_keys else "")
            + f"</tr>{body}</table>"
        )
    warnings = estimate.warnings
    box = ""
    if warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
        box = f'<div class="warn"><b>Read these figures with care</b><ul>{items}</ul></div>'
    return (
        f"<section id=estimate><h2>{html.escape(title)}</h2>{_estimate_cards(estimate)}"
        f"{how}{support}{box}{table}</section>"
    )


def lead_estimate(
    meta: CheckpointMetadata | None, metrics: Metrics | None, ev: Path, own_evaluation: bool
) -> tuple[str, Estimate | None]:
    """The figures this report leads with, and their section's title.

    An evaluation of new images ('histolens evaluate') stores its own estimate in metrics.json;
    a run's own evaluation is what the checkpoint's estimate was made from; evaluations without
    an estimate (older runs, the Lightning head's test split) are labelled by their split.
    """
    unseen = "Estimated performance on unseen patients"
    metrics = metrics if metrics is not None else Metrics()
    if metrics.estimate is not None:
        return "Performance on the evaluated images", metrics.estimate
    if own_evaluation and (stored := stored_estimate(meta)) is not None:
        return unseen, stored
    if metrics.image is not None:
        classes = list(meta.class_names) if meta is not None else []
        overall, per_mag_classes = _patients_per_class(EvaluationFiles(ev).predictions)
        blocks = {
            mag: EstimateBlock(
                n_images=block.n,
                n_patients=block.n_patients,
                patients_per_class=per_mag_classes.get(mag, {}),
                metrics={k: v for k in ESTIMATE_KEYS if (v := block.figure(k)) is not None},
            )
            for mag, block in (metrics.per_magnification or {}).items()
        }
        # The headline in the flat shape of an older checkpoint's metrics.
        headline = {
            **metrics.image.to_dict(),
            "split": metrics.split or "test",
            "n_images": metrics.n_images,
            "n_patients": metrics.n_patients,
        }
        estimate = estimate_from_metrics(
            headline,
            classes or sorted(overall),
            meta.task if meta is not None else "binary",
            metrics.threshold,
            patients_per_class=overall,
            per_magnification=blocks,
        )
    else:
        estimate = headline_estimate(meta)
    # Figures of patients held out from training (a test split, out-of-fold predictions) are an
    # estimate on unseen patients; a validation split chose the threshold, so it is not.
    held_out = estimate is not None and (
        not is_from_metrics(estimate) or estimate.split in ("test", "out-of-fold")
    )
    return (unseen if held_out else "Performance"), estimate


def _patients_per_class(
    predictions_csv: Path,
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Patients of each class in an evaluation's predictions.csv, overall and per magnification
    ('100X'); each patient counted under the label of most of their images."""
    import csv
    from collections import Counter

    if not predictions_csv.is_file():
        return {}, {}
    # (magnification or "" for all, patient) -> label counts of that patient's images
    labels: dict[tuple[str, str], Counter] = {}
    with predictions_csv.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            labels.setdefault(("", row["patient"]), Counter())[row["label"]] += 1
            if row.get("magnification"):
                mag = (f"{row['magnification']}X", row["patient"])
                labels.setdefault(mag, Counter())[row["label"]] += 1
    per_mag: dict[str, Counter] = {}
    for (mag, _), counts in labels.items():
        per_mag.setdefault(mag, Counter())[counts.most_common(1)[0][0]] += 1
    overall = per_mag.pop("", Counter())
    return dict(sorted(overall.items())), {m: dict(sorted(c.items())) for m, c in per_mag.items()}
