"""What an evaluation writes: ``metrics.json``, ``predictions.csv``, ``patients.csv``,
``notes.json`` and the plots of an evaluation folder (:class:`histolens.rundir.EvaluationFiles`).

The report (``histolens.report``) is built from these files by whoever orchestrates; evaluation
does not call it. :mod:`histolens.evaluation.evaluate` re-exports these names.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histolens.atomic import atomic_open, atomic_write_text
from histolens.evaluation.metrics import EvalResult, rank_scores
from histolens.evaluation.plot_worker import PlotCall
from histolens.evaluation.results import ReferMetrics
from histolens.inference.predictions_csv import core_columns, core_row, format_flag
from histolens.rundir import EvaluationFiles

__all__ = ["evaluation_plots", "write_evaluation", "write_patients", "write_predictions_csv"]


def write_patients(result: EvalResult, path: Path, pattern=None) -> None:
    """patients.csv (histolens.inference.patients) when the rows carry patient ids (binary)."""
    from histolens.inference.patients import evaluation_patient_rows, write_patients_csv

    rows = evaluation_patient_rows(result, pattern)
    if rows:
        write_patients_csv(rows, path)


def write_predictions_csv(result: EvalResult, path: str | os.PathLike) -> Path:
    """The columns every predictions CSV starts with (histolens.inference.predictions_csv), then the
    image's patient, magnification, true label and whether the prediction is correct."""
    classes = result.classes
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(
            fh, [*core_columns(classes), "patient", "magnification", "label", "correct"]
        )
        w.writeheader()
        for r in result.rows:
            i = result.predicted(r)
            row = core_row(
                classes,
                r.path,
                classes[i],
                r.probs[i],
                dict(zip(classes, r.probs, strict=True)),
                r.prediction_set,
                r.refer,
                r.ood,
                r.ood_reason,
            )
            row["patient"] = r.patient
            row["magnification"] = "" if r.magnification is None else str(r.magnification)
            row["label"] = r.label
            row["correct"] = format_flag(classes[i] == r.label)
            w.writerow(row)
    return Path(path)


def write_evaluation(
    result: EvalResult,
    out_dir: str | os.PathLike,
    logs_dir: str | os.PathLike | None = None,
    notes: Sequence[str] = (),
    images: bool = True,
    plots: bool = True,
) -> Path:
    """metrics.json, predictions.csv, notes.json and the plots in ``out_dir`` (training curves
    from ``logs_dir`` when given; the misclassified images when the rows are ``images``, not
    slides). The report (``histolens.report``) is written from these by whoever orchestrates:
    the CLI, or training. ``plots=False`` leaves the plots to the caller (``evaluation_plots``,
    drawn by a :class:`~histolens.evaluation.plot_worker.PlotWorker`)."""
    from histolens.evaluation.plot_worker import draw_plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = EvaluationFiles(out)
    metrics = result.metrics.to_dict() if result.metrics is not None else {}
    atomic_write_text(files.metrics, json.dumps(metrics, indent=2, default=float))
    write_predictions_csv(result, files.predictions)
    write_patients(result, files.patients)
    # Kept beside the metrics so that `histolens report` later shows the same warnings.
    atomic_write_text(files.notes, json.dumps(list(notes), indent=2))
    if plots:
        draw_plots(evaluation_plots(result, out, logs_dir, images))
    return out


def evaluation_plots(
    result: EvalResult,
    out_dir: str | os.PathLike,
    logs_dir: str | os.PathLike | None = None,
    images: bool = True,
    refer: ReferMetrics | None = None,
) -> list[PlotCall]:
    """The plots of ``write_evaluation``, as calls of ``histolens.evaluation.plots`` (drawn by
    ``draw_plots``, here or in a worker). ``refer``: the metrics' ``refer`` block, for a result
    whose metrics are not computed yet (the risk-coverage curve)."""
    out = Path(out_dir)
    calls: list[PlotCall] = []
    y = np.array([r.target for r in result.rows])
    pred = np.array([result.predicted(r) for r in result.rows])
    calls.append(
        ("plot_confusion_matrix", (y, pred, result.classes, out / "confusion_matrix.png"), {})
    )
    if len(result.classes) == 2:
        p = np.array([r.probs[1] for r in result.rows])
        p_raw = np.array([r.probs_uncalibrated[1] for r in result.rows])
        # Ranked as the metrics rank (rank_scores), marked where each image was decided.
        roc = (y, rank_scores(result.rows), result.threshold, out / "roc_pr.png")
        calls.append(("plot_roc_pr", roc, {"predicted": pred}))
        distribution = (
            y,
            p,
            result.classes,
            result.threshold,
            out / "probability_distribution.png",
        )
        calls.append(("plot_probability_distribution", distribution, {}))
        reliability = (y, p_raw, p, result.temperature, out / "reliability.png")
        calls.append(("plot_reliability", reliability, {}))
    wrong = [
        (
            r.path,
            r.label,
            result.classes[result.predicted(r)],
            max(r.probs)
            if len(result.classes) > 2
            else (r.probs[1] if result.predicted(r) else r.probs[0]),
        )
        for r in result.rows
        if result.predicted(r) != r.target
    ]
    wrong.sort(key=lambda t: -t[3])  # the most confident mistakes first
    if images:
        calls.append(("plot_misclassified", (wrong, out / "misclassified.png"), {}))
    if refer is None and result.metrics is not None:
        refer = result.metrics.refer
    if refer is not None and refer.curve is not None and refer.curve.referred:
        calls.append(("plot_risk_coverage", (refer, out / "risk_coverage.png"), {}))
    if logs_dir is not None:
        calls.append(("plot_training_curves", (logs_dir, out / "training_curves.png"), {}))
    return calls
