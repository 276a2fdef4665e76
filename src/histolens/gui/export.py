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
from histolens.data.imageio import load_rgb
from histolens.errors import ImageLoadError
from histolens.gui.display import RESEARCH_NOTICE, ResultRow
from histolens.inference.predictions_csv import format_probability, prediction_columns

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
    """The columns of a model's predictions (histolens.inference.predictions_csv), then the export's own."""
    return [*prediction_columns(class_names), "file", "overlay", "error"]


def _record(row: ResultRow, class_names: Sequence[str]) -> dict[str, Any]:
    """The CSV line of one result, before its overlay is written; blank where unreadable."""
    record: dict[str, Any] = dict.fromkeys(_fields(class_names), "")
    if row.prediction is not None:
        record.update(row.prediction.as_row(class_names))
    record.update({"path": row.path, "file": row.name, "error": row.error or ""})
    return record


def _classes(rows: Sequence[ResultRow], class_names: Sequence[str]) -> tuple[str, ...]:
    """``class_names``, or when none are given the classes the predictions were scored on."""
    if class_names:
        return tuple(class_names)
    return next((tuple(r.prediction.scores) for r in rows if r.prediction is not None), ())


def _threshold_note(rows: Sequence[ResultRow]) -> str:
    """'; threshold 0.420000' for a binary model: what ``prediction`` was decided at."""
    thresholds = {r.prediction.threshold for r in rows if r.prediction is not None}
    thresholds.discard(None)
    if len(thresholds) != 1:
        return ""
    return f"; threshold {format_probability(thresholds.pop())}"


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
    class_names = _classes(rows, class_names)
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
        f"# histolens predictions; model {model_id or '?'}; heatmap {method}"
        f"{_threshold_note(rows)}; {RESEARCH_NOTICE}\n"
    )
    writer = csv.DictWriter(buffer, fieldnames=_fields(class_names), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    csv_path = atomic_write_text(out / "predictions.csv", buffer.getvalue())
    n_overlays = sum(bool(r["overlay"]) for r in records)
    return ExportSummary(csv_path, len(records), n_overlays, failed)
