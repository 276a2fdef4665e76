"""The report's sections of metrics: the headline cards, the table of every metric, and the
referrals (prediction sets, images unlike the training images)."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from histolens.evaluation.results import ClassMetrics, ImageMetrics, Metrics, ReferMetrics
from histolens.report.markup import card_row, embedded_image, fmt

__all__ = ["headline_cards", "metrics_table", "refer_section"]


def _ci(ci: dict, key: str) -> str:
    """A metric's stored 95% CI as 'lo - hi'; empty when there is none."""
    lo, hi = ci.get(key, (float("nan"), float("nan")))
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return ""
    return f"{lo:.3f} - {hi:.3f}"


# The rows of the metrics table, in order: (figure of the image block, label); absent ones skipped.
_METRIC_NAMES = [
    ("roc_auc", "ROC AUC (image)"),
    ("pr_auc", "PR AUC"),
    ("accuracy", "Accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("sensitivity", "Sensitivity (recall)"),
    ("specificity", "Specificity"),
    ("precision", "Precision"),
    ("f1", "F1"),
    ("brier", "Brier score"),
    ("ece", "Expected calibration error"),
    ("patient_recognition_rate", "Patient recognition rate"),
    ("patient_auc", "Patient-level AUC"),
    ("macro_f1", "Macro F1"),
    ("weighted_f1", "Weighted F1"),
    ("roc_auc_ovr", "ROC AUC (one-vs-rest)"),
]


def metrics_table(metrics: Metrics) -> str:
    """Every image-level metric with its CI and its value at threshold 0.5, then the per-class
    and per-magnification tables when the metrics have them."""
    img = metrics.image or ImageMetrics()
    table = _overall_table(metrics)
    per_class = img.per_class
    if per_class:
        table += _per_class_table(per_class)
    per_mag = metrics.per_magnification
    if per_mag:
        table += _per_magnification_table(per_mag)
    return table


def _overall_table(metrics: Metrics) -> str:
    """One row per metric: value at the chosen threshold, bootstrap CI, value at 0.5."""
    img = metrics.image or ImageMetrics()
    ci = img.ci95 or {}
    rows = []
    at05 = metrics.image_at_05 or ImageMetrics()
    for key, label in _METRIC_NAMES:
        value = img.figure(key)
        if value is None:
            continue
        at = at05.figure(key)
        rows.append(
            f"<tr><td>{label}</td><td class=num>{fmt(value)}</td>"
            f"<td class=num>{_ci(ci, key)}</td>"
            f"<td class=num>{fmt(at) if at is not None else ''}</td></tr>"
        )
    threshold = 0.5 if metrics.threshold is None else metrics.threshold
    head = (
        "<tr><th>Metric</th><th>Value (chosen threshold "
        f"{threshold:.3f})</th><th>95% CI (bootstrap over patients)</th>"
        "<th>At threshold 0.5</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _per_class_table(per_class: dict[str, ClassMetrics]) -> str:
    """Precision, recall, F1 and images of each class (multi-class tasks)."""
    return _sub_table(
        "Per class",
        ("Class", "Precision", "Recall", "F1", "Images"),
        (
            (html.escape(c), f"{v.precision:.3f}", f"{v.recall:.3f}", f"{v.f1:.3f}", f"{v.support}")
            for c, v in per_class.items()
        ),
    )


def _per_magnification_table(per_mag: dict[str, ImageMetrics]) -> str:
    """Images, patients, ROC AUC, accuracy and patient recognition rate at each magnification."""
    return _sub_table(
        "Per magnification",
        ("Magnification", "Images", "Patients", "ROC AUC", "Accuracy", "Patient recognition rate"),
        (
            (
                m,
                f"{v.n}",
                f"{v.n_patients}",
                fmt(v.roc_auc),
                fmt(v.accuracy),
                fmt(v.patient_recognition_rate),
            )
            for m, v in per_mag.items()
        ),
    )


def _sub_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A titled table: a header of ``columns``, then each row's name and its numbers (markup)."""
    body = "".join(
        f"<tr><td>{name}</td>" + "".join(f"<td class=num>{x}</td>" for x in rest) + "</tr>"
        for name, *rest in rows
    )
    head = "".join(f"<th>{c}</th>" for c in columns)
    return f"<h3>{title}</h3><table><tr>{head}</tr>{body}</table>"


def refer_section(metrics: Metrics, ev: Path) -> str:
    """Prediction sets, referrals and images unlike the training images (``metrics.refer``)."""
    refer = metrics.refer
    if refer is None:
        return ""
    parts = _prediction_set_parts(refer) if refer.alpha is not None else []
    n_ood = int(refer.n_ood)
    reasons = "; ".join(f"{html.escape(k)}: {v}" for k, v in refer.ood_reasons.items())
    parts.append(
        f"<p class=how><b>Not like the training images:</b> {n_ood} image(s)"
        + (f" ({reasons})" if reasons else "")
        + ", counted apart: they are referred, and left out of the coverage and accuracy "
        "figures above (the headline metrics include them).</p>"
    )
    plot = ev / "risk_coverage.png"
    if plot.is_file():
        parts.append(
            "<h3>Risk-coverage: accuracy of the images kept against the fraction referred</h3>"
            + embedded_image(plot)
        )
    return "<section id=refer><h2>Knowing when not to answer</h2>" + "".join(parts) + "</section>"


def _prediction_set_parts(refer: ReferMetrics) -> list[str]:
    """Cards, explanation and referred patients of the prediction sets (``refer`` has alpha)."""
    alpha = float(refer.alpha)  # type: ignore[arg-type]
    parts = [
        card_row(
            [
                (
                    "Coverage on held-out patients",
                    fmt(refer.coverage),
                    f"target {1 - alpha:.2f} (alpha {alpha:g})",
                ),
                ("Images referred", fmt(refer.refer_rate), "set of several classes"),
                ("Accuracy of the images kept", fmt(refer.accuracy_kept), ""),
                (
                    "Patients referred",
                    f"{len(refer.patients_referred)} / {refer.n_patients}",
                    "half or more of their images referred",
                ),
            ]
        ),
        f"<p class=how>Each image gets the set of classes its calibrated probability does not "
        f"rule out at error level alpha = {alpha:g}; a set of several classes means "
        "<b>refer</b> to a person. Calibration: "
        f"{html.escape(refer.method or '')}; every patient weighs the same, so "
        "coverage is a guarantee about new patients (averaged over patients: "
        f"{fmt(refer.coverage)}; over images: {fmt(refer.coverage_images)}). "
        f"Mean set size {fmt(refer.mean_set_size)}; accuracy of the referred images "
        f"{fmt(refer.accuracy_referred)}; patient-level accuracy of the patients not "
        f"referred (majority of their kept images) {fmt(refer.patient_accuracy_kept)}.</p>",
    ]
    if refer.patients_referred:
        names = ", ".join(html.escape(str(p)) for p in refer.patients_referred)
        parts.append(f"<p class=how><b>Patients referred:</b> {names}.</p>")
    return parts


def headline_cards(metrics: Metrics) -> str:
    """Cards of the main figures, for an evaluation without an estimate to lead with."""
    img = metrics.image or ImageMetrics()
    items = [
        ("ROC AUC", img.roc_auc if img.roc_auc is not None else img.roc_auc_ovr),
        ("Patient recognition rate", img.patient_recognition_rate),
        ("Patient-level AUC", img.patient_auc),
        (
            "Balanced accuracy",
            img.balanced_accuracy if img.balanced_accuracy is not None else img.accuracy,
        ),
        ("Images / patients", f"{metrics.n_images} / {metrics.n_patients}"),
    ]
    return card_row([(k, fmt(v), "") for k, v in items if v is not None])
