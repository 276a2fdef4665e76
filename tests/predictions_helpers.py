"""Comparing two predictions CSVs of the same images made by other kernels or in other batches.

Two runtimes (or two batchings) of one fp32 model give probabilities a few float32 steps apart,
so a byte comparison holds only while no value sits at a rounding or decision boundary. This
compares numbers within a tolerance and decisions exactly, except on the rows whose probability
lies within that tolerance of a boundary, where either decision is right.
"""

from __future__ import annotations

import csv
import io

import pytest

from histolens.inference.predictor import UNCERTAINTY_MARGIN


def _rows(text: str) -> tuple[list[str], list[dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text))
    return list(reader.fieldnames or []), list(reader)


def assert_predictions_close(
    got: str, want: str, *, atol: float, threshold: float, positive: str = "malignant"
) -> list[str]:
    """Assert that two binary predictions CSVs (their text) agree; return the undecided paths.

    The same columns and paths in the same order; every probability column within ``atol``;
    every other column equal, except on rows whose ``p_<positive>`` in ``want`` lies within
    ``atol`` of the threshold or of the review margin around it (the undecided rows), where
    only the class probabilities are compared.
    """
    got_columns, got_rows = _rows(got)
    want_columns, want_rows = _rows(want)
    assert got_columns == want_columns
    assert want_rows and [r["path"] for r in got_rows] == [r["path"] for r in want_rows]
    boundaries = (threshold, threshold - UNCERTAINTY_MARGIN, threshold + UNCERTAINTY_MARGIN)
    undecided = []
    for a, b in zip(got_rows, want_rows, strict=True):
        p = float(b[f"p_{positive}"])
        decided = all(abs(p - edge) > atol for edge in boundaries)
        if not decided:
            undecided.append(b["path"])
        for key, value in b.items():
            if key.startswith("p_") or (key == "probability" and decided):
                assert float(a[key]) == pytest.approx(float(value), abs=atol), (b["path"], key)
            elif decided and key != "probability":
                assert a[key] == value, (b["path"], key)
    return undecided
