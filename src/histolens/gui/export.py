"""Export of the results list: ``predictions.csv`` and one heatmap overlay PNG per prediction."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histolens.atomic import atomic_path, atomic_write_text
from histolens.errors import ImageLoadError
from histolens.gui.display import RESEARCH_NOTICE, ResultRow
from histolens.imageio import load_rgb

if TYPE_CHECKING:
    from histolens.explain import Explainer

__all__ = ["ExportSummary", "export_results"]

log = logging.getLogger(__name__)


@dataclass
class ExportSummary:
    """What an export wrote."""

    csv_path: Path
    n_rows: int
    n_overlays: int
    failed: list[tuple[str, str]] = field(default_factory=list)


def _overlay_name(row: ResultRow, method: str, used: set[str]) -> str:
    stem = Path(row.name).with_suffix("").as_posix().replace("/", "__")
    name = f"{stem}_{method}.png"
    n = 2
    while name in used:
        name = f"{stem}-{n}_{method}.png"
        n += 1
    used.add(name)
    return name


def _fields(class_names: Sequence[str]) -> list[str]:
    return [
        "file",
        "path",
        "prediction",
        "probability",
        "positive_probability",
        "threshold",
        "review_needed",
        "prediction_set",
        "refer",
        "ood",
        "ood_reason",
        *[f"p_{c}" for c in class_names],
        "overlay",
        "error",
    ]


def _record(row: ResultRow, class_names: Sequence[str]) -> dict[str, Any]:
    """The CSV line of one result, before its overlay is written."""
    pred = row.prediction
    record: dict[str, Any] = {
        "file": row.name,
        "path": row.path,
        "prediction": row.label,
        "probability": "" if pred is None else f"{pred.probability:.6f}",
        "positive_probability": ""
        if pred is None or pred.positive_probability is None
        else f"{pred.positive_probability:.6f}",
        "threshold": "" if pred is None or pred.threshold is None else f"{pred.threshold:.6f}",
        "review_needed": "" if pred is None else str(bool(pred.uncertain)).lower(),
        # As the predictions CSV of ``histolens predict``: the set's classes joined by ';'.
        "prediction_set": "" if pred is None else ";".join(pred.prediction_set),
        "refer": "" if pred is None else str(bool(pred.refer)).lower(),
        "ood": "" if pred is None else str(bool(pred.ood)).lower(),
        "ood_reason": "" if pred is None else pred.ood_reason or "",
        "overlay": "",
        "error": row.error or "",
    }
    for c in class_names:
        record[f"p_{c}"] = "" if pred is None else f"{pred.scores.get(c, float('nan')):.6f}"
    return record


def export_results(
    rows: Sequence[ResultRow],
    folder: str | os.PathLike,
    explainer: Explainer,
    method: str,
    opacity: float,
    class_names: Sequence[str] = (),
    model_id: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> ExportSummary:
    """Write ``predictions.csv`` and one heatmap overlay PNG per prediction into ``folder``.

    Every file is written atomically. Images that fail to load or explain are listed in the
    CSV's ``error`` column, not raised.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    failed: list[tuple[str, str]] = []
    records: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        record = _record(row, class_names)
        if row.prediction is not None:
            try:
                explanation = explainer.explain(load_rgb(row.path), method=method)
                name = _overlay_name(row, method, used)
                with atomic_path(out / "overlays" / name) as tmp:
                    explanation.overlay(opacity).save(tmp, format="PNG")
                record["overlay"] = f"overlays/{name}"
            except ImageLoadError as exc:
                record["error"] = exc.reason
                failed.append((row.path, exc.reason))
            except Exception as exc:  # one bad image must not lose the whole export
                log.exception("heatmap export failed for %s", row.path)
                record["error"] = f"heatmap failed: {exc}"
                failed.append((row.path, str(exc)))
        records.append(record)
        if progress:
            progress(i + 1, len(rows))
    buffer = io.StringIO()
    buffer.write(
        f"# histolens predictions; model {model_id or '?'}; heatmap {method}; {RESEARCH_NOTICE}\n"
    )
    writer = csv.DictWriter(buffer, fieldnames=_fields(class_names), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    csv_path = atomic_write_text(out / "predictions.csv", buffer.getvalue())
    n_overlays = sum(bool(r["overlay"]) for r in records)
    return ExportSummary(csv_path, len(records), n_overlays, failed)
