"""A decision per patient (case): pathologists decide per case, not per field of view.

Each patient's images are aggregated: the mean calibrated probability, the share of images
called malignant (each at its magnification's threshold), and the patient score, the mean of
the images' probabilities *centred* on their magnification's threshold (``p`` moved so that its
threshold sits at 0.5, :func:`histolens.stats.conformal.centred_probabilities`): images of different
magnifications then count on one scale. The patient's decision is that score at a patient-level
operating point chosen by the same rule, on the out-of-fold predictions' patients
(:class:`histolens.stats.decisions.PatientDecision`). A patient is referred when its images disagree (the smaller of the
shares called malignant and benign) beyond the limit that the out-of-fold patients decided
correctly stay within, in :data:`histolens.stats.decisions.AGREEMENT_QUANTILE` of cases.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histolens.errors import ConfigError
from histolens.stats.decisions import PatientDecision, aggregate_patients

__all__ = [
    "PATIENT_COLUMNS",
    "PatientRow",
    "patient_from",
    "patient_rows",
    "write_patients_csv",
]

PATIENT_COLUMNS = (
    "patient",
    "n_images",
    "magnifications",
    "mean_probability",
    "share_malignant",
    "patient_score",
    "decision",
    "refer",
    "refer_reason",
    "label",
    "correct",
)


def patient_from(path: str | os.PathLike, pattern: str | re.Pattern | None = None) -> str | None:
    """An image's patient id: the regex's ``patient`` group (or first group, or whole match) on
    the path, else the BreakHis file name's patient; None when neither says."""
    from histolens.data.records import parse_breakhis_name

    text = str(path)
    if pattern is not None:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        m = rx.search(text)
        if m is None:
            return None
        if "patient" in rx.groupindex:
            return m["patient"]
        return m[1] if rx.groups else m[0]
    parsed = parse_breakhis_name(Path(text).name)
    return parsed.patient if parsed is not None else None


def check_patient_pattern(pattern: str | None) -> re.Pattern | None:
    """``--patient-from REGEX`` compiled, or a ConfigError saying why it cannot be."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"--patient-from '{pattern}' is not a regular expression ({exc})."
        ) from None


@dataclass(frozen=True)
class PatientRow:
    """One patient's line of patients.csv."""

    patient: str
    n_images: int
    magnifications: str
    mean_probability: float
    share_malignant: float
    patient_score: float
    decision: str
    refer: bool
    refer_reason: str
    label: str = ""
    correct: bool | None = None


def patient_rows(
    p: Sequence[float],
    thresholds: Sequence[float],
    patients: Sequence[str],
    magnifications: Sequence[Any],
    classes: Sequence[str],
    decision: PatientDecision,
    labels: Sequence[str] | None = None,
) -> list[PatientRow]:
    """The patients of images with calibrated positive probabilities ``p`` decided at
    ``thresholds``; images without a patient id (None or '') are left out."""
    keep = [i for i, q in enumerate(patients) if q]
    if not keep:
        return []
    p_arr = np.asarray(p, dtype=np.float64)[keep]
    thr = np.asarray(thresholds, dtype=np.float64)[keep]
    ids_in = np.array([str(patients[i]) for i in keep])
    score, share, _, (ids, rows) = aggregate_patients(p_arr, thr, ids_in)
    out = []
    for q, s, sh, idx in zip(ids, score, share, rows, strict=True):
        called = classes[1] if s >= decision.threshold else classes[0]
        disagreement = min(sh, 1 - sh)
        refer = disagreement > decision.disagreement_limit
        reason = (
            f"{sh:.0%} of its images called {classes[1]}: they disagree more than "
            f"{decision.disagreement_limit:.0%} (the limit of the patients decided correctly)"
            if refer
            else ""
        )
        mags = sorted({f"{magnifications[keep[i]]}X" for i in idx if magnifications[keep[i]]})
        label = ""
        correct = None
        if labels is not None:
            mine = [labels[keep[i]] for i in idx]
            label = max(set(mine), key=mine.count)
            correct = label == called
        out.append(
            PatientRow(
                str(q),
                len(idx),
                ";".join(mags),
                float(p_arr[idx].mean()),
                float(sh),
                float(s),
                called,
                bool(refer),
                reason,
                label,
                correct,
            )
        )
    return out


def write_patients_csv(rows: Sequence[PatientRow], path: str | os.PathLike) -> Path:
    """patients.csv, atomically: one line per patient (columns :data:`PATIENT_COLUMNS`)."""
    import csv

    from histolens.atomic import atomic_open
    from histolens.inference.predictions_csv import format_flag, format_probability

    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(PATIENT_COLUMNS)
        for r in rows:
            w.writerow(
                [
                    r.patient,
                    r.n_images,
                    r.magnifications,
                    format_probability(r.mean_probability),
                    format_probability(r.share_malignant),
                    format_probability(r.patient_score),
                    r.decision,
                    format_flag(r.refer),
                    r.refer_reason,
                    r.label,
                    "" if r.correct is None else format_flag(r.correct),
                ]
            )
    return Path(path)


def decision_of(operating_points: Any) -> PatientDecision:
    """The checkpoint's patient decision (``OperatingPoints.patient``), else the plain one:
    the mean centred probability at 0.5, never referred for disagreement."""
    stored = getattr(operating_points, "patient", None)
    return stored if stored is not None else PatientDecision()


def evaluation_patient_rows(result: Any, pattern: re.Pattern | None = None) -> list[PatientRow]:
    """The patients of an evaluation's rows (binary), each image at its own threshold; a row
    whose patient is its own path (no patient id) is left out. ``pattern``: ``--patient-from``."""
    if len(result.classes) != 2 or not result.rows:
        return []
    ids = []
    for r in result.rows:
        pid = patient_from(r.path, pattern) if pattern is not None else r.patient
        ids.append(pid if pid and pid != r.path else None)
    return patient_rows(
        [r.probs[1] for r in result.rows],
        result.thresholds(),
        ids,
        [r.magnification for r in result.rows],
        result.classes,
        decision_of(result.operating_points),
        [r.label for r in result.rows],
    )


def prediction_patient_rows(
    predictions_csv: str | os.PathLike,
    predictor: Any,
    magnification: int | None,
    pattern: re.Pattern | None = None,
) -> list[PatientRow]:
    """The patients of a ``histolens predict`` output (binary): ids from ``pattern`` or the
    BreakHis names, magnifications as prediction sets take them (given, else the path's)."""
    import csv

    from histolens.data.records import magnification_from_path

    if not predictor.is_binary:
        return []
    positive = predictor.class_names[1]
    paths, p = [], []
    with open(predictions_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            paths.append(row["path"])
            p.append(float(row[f"p_{positive}"]))
    mags = [magnification or magnification_from_path(q) for q in paths]
    return patient_rows(
        p,
        [predictor.threshold_for(m) for m in mags],
        [patient_from(q, pattern) for q in paths],
        mags,
        predictor.class_names,
        decision_of(predictor.operating_points),
    )
