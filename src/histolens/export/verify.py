"""Checking an ONNX export against PyTorch: the images it is checked on, and the comparison.

The run's validation images (or, when every patient trained the model, up to
``MAX_TRAINING_IMAGES_TO_VERIFY`` of its training images) go through the torch model and the
export; :func:`compare_with_torch` gives the largest probability change and both AUCs, which
:func:`histolens.export.onnx.export_onnx` holds to its tolerances before it writes anything. The
same image selection (``run_records``, ``spread_evenly``, ``model_inputs``) picks the int8
calibration images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from histolens.data.records import ImageRecord, target_of
from histolens.errors import DataError, HistolensError
from histolens.inference.predictor import Predictor
from histolens.inference.runtimes import OnnxRunner

__all__ = [
    "MAX_TRAINING_IMAGES_TO_VERIFY",
    "ExportError",
    "compare_with_torch",
    "model_inputs",
    "probability_auc",
    "run_records",
    "spread_evenly",
    "verification_records",
]

# Training images an export is verified on when the run has no validation images.
MAX_TRAINING_IMAGES_TO_VERIFY = 64


class ExportError(HistolensError):
    """An export failed its verification against PyTorch, or could not be verified."""


def spread_evenly(records: Sequence[ImageRecord], n: int) -> list[ImageRecord]:
    """``n`` records spread evenly over the list (split files are sorted by class and patient)."""
    if len(records) <= n:
        return list(records)
    return [records[int(i)] for i in np.linspace(0, len(records) - 1, n).round()]


def run_records(source: Path, side: str) -> tuple[list[ImageRecord], str]:
    """The images of one side ('train', 'val') of the checkpoint's run and where they were
    found; none when the run's split cannot be read."""
    from histolens.evaluation.evaluate import records_for_evaluation

    try:
        _, records, where = records_for_evaluation(source, None, side)
    except DataError:
        return [], ""
    return records, where


def verification_records(source: Path, limit: int) -> tuple[list[ImageRecord], str]:
    """The run's validation images (up to ``limit``), else up to 64 of its training images."""
    records, where = run_records(source, "val")
    if records:
        chosen = spread_evenly(records, limit)
        return chosen, f"{len(chosen)} of the {len(records)} images of the {where}"
    records, where = run_records(source, "train")
    if not records:
        raise ExportError(
            f"{source} cannot be verified: no validation or training images of its run were "
            "found (the run's split.csv, or the data its metadata names)."
        )
    chosen = spread_evenly(records, min(limit, MAX_TRAINING_IMAGES_TO_VERIFY))
    return chosen, f"{len(chosen)} training images ({where})"


def model_inputs(
    predictor: Predictor, records: Sequence[ImageRecord], batch_size: int
) -> Iterator[tuple[list[ImageRecord], torch.Tensor]]:
    """(records, model-input batch) for the readable images of ``records``."""
    by_path = {r.path: r for r in records}
    for paths, batch, _ in predictor.iter_batches([r.path for r in records], batch_size):
        if batch is not None:
            yield [by_path[p] for p in paths], predictor.to_input(batch)


def probability_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC (binary) or macro one-vs-rest AUC over the classes present; NaN with one class."""
    from histolens.stats.metrics import safe_auc

    if probs.shape[1] == 2:
        return safe_auc(y, probs[:, 1])
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    sub = probs[:, present] / probs[:, present].sum(axis=1, keepdims=True)
    if len(present) == 2:
        return float(roc_auc_score(y == present[1], sub[:, 1]))
    return float(roc_auc_score(np.searchsorted(present, y), sub, multi_class="ovr"))


def compare_with_torch(
    predictor: Predictor, runner: OnnxRunner, records: Sequence[ImageRecord], batch_size: int
) -> tuple[int, float, float, float]:
    """Images compared, the largest probability change, and the AUC of torch and of the export."""
    index = {c: i for i, c in enumerate(predictor.class_names)}
    y: list[int] = []
    p_torch: list[np.ndarray] = []
    p_onnx: list[np.ndarray] = []
    for batch_records, x in model_inputs(predictor, records, batch_size):
        p_torch.append(predictor.probabilities(predictor.logits(x)))
        p_onnx.append(predictor.probabilities(runner(x)))
        y += [index.get(target_of(r, predictor.task), -1) for r in batch_records]
    if not p_torch:
        raise ExportError("The export cannot be verified: none of its images was readable.")
    a, b, labels = np.concatenate(p_torch), np.concatenate(p_onnx), np.array(y)
    known = labels >= 0
    change = float(np.abs(a - b).max())
    return (
        len(a),
        change,
        probability_auc(labels[known], a[known]),
        probability_auc(labels[known], b[known]),
    )
