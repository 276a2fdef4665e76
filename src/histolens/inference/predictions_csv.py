"""The predictions CSV: its columns, their order and their encoding, owned here once.

``histolens predict``, a run's or ``histolens evaluate``'s ``predictions.csv`` and the desktop
app's export all start with the same columns, :func:`core_columns`::

    path, prediction, probability, p_<class>..., prediction_set, refer, ood, ood_reason

``probability`` is that of the predicted class, ``p_<class>`` that of each class (calibrated);
``prediction_set`` is the classes not ruled out, joined by ``;`` (empty without a calibration).
Each writer then appends its own columns: a model's prediction adds ``uncertain`` (``histolens
predict``, the desktop export), evaluation adds ``patient, magnification, label, correct`` and
the desktop export ``file, overlay, error``.

Probabilities are written with 6 decimals, flags (``refer``, ``ood``, ``uncertain``,
``correct``) as ``1`` or ``0``: numbers that any spreadsheet, pandas or R sums and averages as
they are (the mean of ``refer`` is the referral rate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = [
    "PredictionLike",
    "core_columns",
    "core_row",
    "format_flag",
    "format_probability",
    "parse_flag",
    "prediction_columns",
    "prediction_row",
]

# What a model's prediction adds to the core (evaluation rows have no such flag).
_PREDICTION_EXTRA = ("uncertain",)
_TRUE, _FALSE = "1", "0"


def format_probability(p: float) -> str:
    """A probability as every predictions CSV writes it: 6 decimals."""
    return f"{float(p):.6f}"


def format_flag(value: bool) -> str:
    """A yes/no column as every predictions CSV writes it: ``1`` or ``0``."""
    return _TRUE if value else _FALSE


def parse_flag(text: str) -> bool:
    """The inverse of :func:`format_flag`; raises ValueError for anything else."""
    if text not in (_TRUE, _FALSE):
        raise ValueError(f"{text!r} is not a flag of the predictions CSV (1 or 0).")
    return text == _TRUE


def core_columns(class_names: Sequence[str]) -> list[str]:
    """The columns every predictions CSV starts with, in this order."""
    return [
        "path",
        "prediction",
        "probability",
        *[f"p_{c}" for c in class_names],
        "prediction_set",
        "refer",
        "ood",
        "ood_reason",
    ]


def core_row(
    class_names: Sequence[str],
    path: str | None,
    prediction: str,
    probability: float,
    scores: Mapping[str, float],
    prediction_set: Sequence[str],
    refer: bool,
    ood: bool,
    ood_reason: str | None,
) -> dict[str, str]:
    """One image's core columns, encoded: ``probability`` that of ``prediction``, ``scores``
    that of each class of ``class_names``."""
    row = {
        "path": "" if path is None else str(path),
        "prediction": prediction,
        "probability": format_probability(probability),
    }
    row.update({f"p_{c}": format_probability(scores[c]) for c in class_names})
    row.update(
        {
            "prediction_set": ";".join(prediction_set),
            "refer": format_flag(refer),
            "ood": format_flag(ood),
            "ood_reason": ood_reason or "",
        }
    )
    return row


class PredictionLike(Protocol):
    """What :func:`prediction_row` reads of a model's prediction (``predictor.Prediction``)."""

    label: str
    probability: float
    scores: dict[str, float]
    uncertain: bool
    path: str | None
    prediction_set: tuple[str, ...]
    refer: bool
    ood: bool
    ood_reason: str | None


def prediction_columns(class_names: Sequence[str]) -> list[str]:
    """The columns of a model's predictions: the core, then ``uncertain``."""
    return [*core_columns(class_names), *_PREDICTION_EXTRA]


def prediction_row(
    pred: PredictionLike, class_names: Sequence[str] | None = None
) -> dict[str, str]:
    """A model's prediction as the columns of :func:`prediction_columns`; ``class_names``
    defaults to the classes of its scores, in their order."""
    names = list(pred.scores) if class_names is None else class_names
    row = core_row(
        names,
        pred.path,
        pred.label,
        pred.probability,
        pred.scores,
        pred.prediction_set,
        pred.refer,
        pred.ood,
        pred.ood_reason,
    )
    row["uncertain"] = format_flag(pred.uncertain)
    return row
