"""``report.html`` of a slide-level (attention MIL) run: the tile report's sections, its model card.

A MIL run (``histolens train --slides``) has no tile checkpoint, so this module assembles the
report from what the run wrote: the estimate and model card stored in the MIL checkpoint's
metadata (passed in as its plain JSON), the evaluation folder of the out-of-fold slides, and the
comparison with mean pooling. Each section is rendered by the same code as the tile report.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from histolens.atomic import atomic_write_text
from histolens.evaluation.results import Metrics, as_estimate
from histolens.report.build import _CSS, _note_boxes, _patients_section, _plots_section
from histolens.report.estimate import estimate_section
from histolens.report.markup import fmt
from histolens.report.metrics import metrics_table, refer_section
from histolens.rundir import EvaluationFiles, RunDir

__all__ = ["MODEL_CARD_SECTIONS", "write_mil_report"]

# The model card's paragraphs, in order, as the MIL checkpoint stores them (key, heading).
MODEL_CARD_SECTIONS = (
    ("intended_use", "Intended use"),
    ("model", "Model"),
    ("data", "Data"),
    ("performance", "Performance"),
    ("limitations", "Limitations"),
)


def _baseline_section(slide_auc: dict[str, Any]) -> str:
    """Out-of-fold slide AUC of attention MIL and the mean-pooling baseline, side by side."""
    if not slide_auc:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td><td class=num>{fmt(r['auc'])}</td>"
        f"<td class=num>{fmt(r['ci95'][0])}&ndash;{fmt(r['ci95'][1])}</td></tr>"
        for m, r in slide_auc.items()
    )
    return (
        "<section><h2>Attention MIL against mean pooling</h2><p class=how>Both methods on the "
        "same patient folds: out-of-fold slide probabilities, 95% CI by bootstrap over "
        "patients. Mean pooling averages each slide's tile features into a linear probe.</p>"
        "<table class=fig><tr><th>Method</th><th>Slide ROC AUC</th><th>95% CI</th></tr>"
        f"{rows}</table></section>"
    )


def model_card_html(card: dict[str, str]) -> str:
    """The stored model card's paragraphs as HTML."""
    return "".join(
        f"<p><b>{heading}.</b> {html.escape(card[key])}</p>"
        for key, heading in MODEL_CARD_SECTIONS
        if card.get(key)
    )


def write_mil_report(
    run_dir: str | os.PathLike, metadata: dict[str, Any], notes: list[str] | tuple = ()
) -> Path:
    """Write ``run_dir/report.html`` of a MIL run from its checkpoint ``metadata`` and its
    ``evaluation`` folder."""
    run = RunDir(Path(run_dir))
    ev = run.evaluation
    metrics = json.loads(ev.metrics.read_text()) if ev.metrics.is_file() else {}
    saved = json.loads(ev.notes.read_text()) if ev.notes.is_file() else []
    notes = list(dict.fromkeys([*saved, *notes]))
    estimate = as_estimate(metadata.get("estimate"))
    parts = [
        "<h1>histolens report: slide-level attention MIL</h1><div class=sub>"
        f"saved {html.escape(str(metadata.get('saved_at', '')))}</div>"
        '<div class="warn">Research and education use only. Not for diagnosis.</div>',
        *_note_boxes(notes, estimate),
    ]
    if estimate:
        parts.append(estimate_section("Estimated performance on unseen patients", estimate))
    parts.append(_baseline_section(metadata.get("metrics", {}).get("slide_auc", {})))
    if metrics:
        typed = Metrics.from_dict(metrics)
        parts.append(
            "<section><h2>All metrics of the out-of-fold slides (rows are slides)</h2>"
            f"{metrics_table(typed)}</section>"
        )
        parts.append(refer_section(typed, ev.path))
    parts.append(_plots_section(ev.path))
    parts.append(_patients_section(EvaluationFiles(ev.path).patients))
    card = metadata.get("model_card") or {}
    parts.append(f"<section><h2>Model card</h2>{model_card_html(card)}</section>")
    parts.append(
        "<section><h2>Configuration</h2><pre>"
        f"{html.escape(json.dumps(metadata.get('config', {}), indent=2))}</pre></section>"
    )
    doc = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>histolens MIL report"
        "</title><meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<style>{_CSS}</style></head><body><main>{''.join(parts)}</main></body></html>"
    )
    return atomic_write_text(run.report, doc)
