"""One self-contained HTML report per run: images embedded, opens offline.

This module assembles the document; the sections of figures are rendered by
:mod:`histolens.report.estimate` (what the report leads with) and :mod:`histolens.report.metrics`.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histolens.atomic import atomic_write_text
from histolens.evaluation.estimate import per_magnification_lines
from histolens.evaluation.performance import headline, headline_estimate, stored_estimate
from histolens.evaluation.results import Estimate, Metrics
from histolens.report.estimate import estimate_section, lead_estimate
from histolens.report.markup import embedded_image, fmt
from histolens.report.metrics import headline_cards, metrics_table, refer_section
from histolens.rundir import EvaluationFiles, ExplanationFiles, RunDir

if TYPE_CHECKING:
    from histolens.checkpoint.io import CheckpointMetadata, TrainingData

__all__ = ["write_report"]

_PLOTS = [
    ("roc_pr.png", "ROC and precision-recall curves"),
    ("confusion_matrix.png", "Confusion matrix"),
    ("probability_distribution.png", "Probability distribution"),
    ("reliability.png", "Calibration: reliability diagram"),
    ("training_curves.png", "Training curves"),
    ("misclassified.png", "Misclassified images"),
]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;
background:#f5f6f8}main{max-width:1100px;margin:auto;padding:24px}h1{margin:0 0 4px}
.sub{color:#5b6575;margin-bottom:18px}section{background:#fff;border-radius:10px;padding:18px 22px;
margin:16px 0;box-shadow:0 1px 3px rgba(0,0,0,.08)}h2{margin-top:0;font-size:1.25em}
table{border-collapse:collapse;width:100%;font-size:.93em}th,td{padding:6px 9px;
border-bottom:1px solid #e6e8ec;text-align:left}th{background:#f0f2f5}td.num{text-align:right;
font-variant-numeric:tabular-nums}.cards{display:flex;flex-wrap:wrap;gap:12px}.card{flex:1 1 150px;
background:#f0f4fa;border-radius:8px;padding:10px 14px}.card b{display:block;font-size:1.6em}
.card span{color:#5b6575;font-size:.85em}img{max-width:100%;border-radius:6px}
.warn{background:#fff4e5;border-left:4px solid #f0a030;padding:8px 12px;margin:8px 0}
.warn ul{margin:4px 0 0;padding-left:20px}.card small{display:block;color:#3d4757;font-size:.8em}
.how{color:#3d4757}.how b{color:#1d2430}table.fig{width:auto;min-width:60%}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:12px}
.gallery figure{margin:0}.gallery figcaption{font-size:.8em;color:#5b6575}
pre{background:#f0f2f5;padding:10px;border-radius:6px;overflow:auto;font-size:.82em;max-height:360px}
"""


def _weights_text(weights: dict) -> str:
    """``benign 1.101, malignant 0.916``: the loss weights, rounded for reading."""
    return ", ".join(f"{k} {float(v):.3f}" for k, v in weights.items()) or "none"


def _split_table(data: TrainingData) -> str:
    split = data.split
    if not split:
        return ""
    classes = sorted({c for part in split.values() for c in part.classes})
    head = (
        "<tr><th>Split</th><th>Images</th><th>Patient groups</th>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in classes)
        + "</tr>"
    )
    body = "".join(
        f"<tr><td>{name}</td><td class=num>{p.images}</td><td class=num>{p.groups}</td>"
        + "".join(f"<td class=num>{p.classes.get(c, 0)}</td>" for c in classes)
        + "</tr>"
        for name, p in split.items()
        if p.images or name == "train"  # cross-validated runs have no val/test parts
    )
    return f"<table>{head}{body}</table>"


def _head_text(meta: CheckpointMetadata) -> str:
    if not meta.head.is_linear:
        return "the original project's head"
    layer = meta.feature_layer or "the last layer"
    C = meta.probe.C if meta.probe is not None else None
    return f"a linear probe (C={C:g}) on the pooled features of {layer}" if C else "a linear probe"


def _thresholds_text(meta: CheckpointMetadata) -> str:
    """The pooled threshold, and each magnification's own (its operating point)."""
    ops = meta.decision
    if ops is None:
        return f"{meta.threshold:.3f}"
    own = ", ".join(f"{m}X {t:.3f}" for m, t in ops.thresholds.items())
    way = "one shared choice moved by each one's offset" if ops.shared else "each on its own"
    where = f" ({html.escape(str(ops.rule))} per magnification, {way}: {own})" if own else ""
    return f"{ops.pooled:.3f} pooled{where}"


def _threshold_source(meta: CheckpointMetadata) -> str:
    stored = stored_estimate(meta)
    if stored is not None and "cross-validation" in stored.method:
        return "the out-of-fold predictions of every training patient"
    if meta.head.is_linear:
        return "the inner out-of-fold predictions of the training patients"
    return "the validation split"


def _licence_paragraph(meta: CheckpointMetadata) -> str:
    """The backbone weights' licence (a hub foundation model's terms bind the model made from
    them, e.g. CC-BY-NC-ND-4.0: no commercial use); empty when the checkpoint names none."""
    licence = meta.licence
    if not licence:
        return ""
    return (
        f"<p><b>Licence.</b> The {html.escape(meta.backbone)} weights are licensed "
        f"{html.escape(str(licence))}; their terms apply to this model too.</p>"
    )


def _model_card(meta: CheckpointMetadata, estimate: Estimate | None = None) -> str:
    data = meta.data
    shown = estimate if estimate else headline_estimate(meta)
    performance = html.escape(headline(shown))
    # Never a pooled figure without each magnification's beside it (issue 26).
    mag_lines = per_magnification_lines(shown)
    per_mag = (
        "<p><b>Per magnification.</b><br>"
        + "<br>".join(html.escape(line.strip()) for line in mag_lines)
        + "</p>"
        if mag_lines
        else ""
    )
    return f"""
<p><b>Intended use.</b> Research and education in computational pathology: studying how a
classifier of H&amp;E breast histopathology images behaves, comparing backbones and training
recipes, teaching. <b>Not for diagnosis</b> and not a medical device; a pathologist's reading
of the slide is the reference.</p>
<p><b>Model.</b> {html.escape(meta.backbone)} backbone (weights:
{html.escape(str(meta.pretrained))}) with {_head_text(meta)}; task
{html.escape(meta.task)}; classes {html.escape(", ".join(meta.class_names))};
decision threshold {_thresholds_text(meta)} chosen on {_threshold_source(meta)};
temperature {meta.temperature:.3f}; stain normalisation {html.escape(meta.stain_method)}.</p>
{_licence_paragraph(meta)}
<p><b>Data.</b> {html.escape(data.path or "")} ({html.escape(data.layout or "")}),
magnification {html.escape(meta.magnification)}; split by
{"image (no patient ids: optimistic)" if data.patient_level_split is False else "patient group"}.</p>
<p><b>Performance.</b> {performance}.</p>{per_mag}
<p><b>Limitations.</b> Trained on few patients: confidence intervals are wide and performance on
other labs, scanners, stains and magnifications is unknown. Image-level metrics count correlated
images of one patient many times; read the patient-level figures. Heatmaps show what the model
used, not where the tumour is, and can be unfaithful; check their faithfulness scores.</p>
"""


def write_report(
    run_dir: str | os.PathLike,
    evaluation_dir: str | os.PathLike | None = None,
    notes: Sequence[str] = (),
    checkpoint: str | os.PathLike | None = None,
) -> Path:
    """Write ``report.html`` into ``run_dir`` from its checkpoint, evaluation and explanations."""
    from histolens.checkpoint.io import BEST_CHECKPOINT, read_metadata

    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    ev = Path(evaluation_dir) if evaluation_dir else run.evaluation.path
    ckpt = Path(checkpoint) if checkpoint else run_dir / BEST_CHECKPOINT
    meta = read_metadata(ckpt) if ckpt.exists() else None
    stored = _read_json(EvaluationFiles(ev).metrics, {})
    metrics = Metrics.from_dict(stored) if stored else None
    notes = list(dict.fromkeys([*_read_json(EvaluationFiles(ev).notes, []), *notes]))  # saved first
    own = evaluation_dir is None or ev.resolve() == run.evaluation.path.resolve()
    title, estimate = lead_estimate(meta, metrics, ev, own)
    parts = [_title(meta), *_note_boxes(notes, estimate)]
    parts += _results_sections(title, estimate, metrics, ev)
    if meta is not None and meta.data.known:
        parts.append(_data_section(meta))
    parts.append(_plots_section(ev))
    parts.append(_patients_section(EvaluationFiles(ev).patients))
    parts.append(_gallery_section(run.explanations.path))
    faith = run.explanations.faithfulness
    if faith.is_file():
        parts.append(_faithfulness_section(json.loads(faith.read_text())))
    if meta is not None:
        parts += _model_sections(meta, estimate if own else headline_estimate(meta))
    doc = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>histolens report</title>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{_CSS}</style>"
        f"</head><body><main>{''.join(parts)}</main></body></html>"
    )
    return atomic_write_text(run.report, doc)


def _patients_section(patients_csv: Path, limit: int = 200) -> str:
    """The decision per patient (patients.csv, histolens.inference.patients); empty without one."""
    import csv

    if not patients_csv.is_file():
        return ""
    with open(patients_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return ""
    cols = ("patient", "n_images", "magnifications", "mean_probability", "share_malignant")
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(r[c])}</td>" for c in cols)
        + f"<td>{html.escape(r['decision'])}</td>"
        + f"<td>{'refer: ' + html.escape(r['refer_reason']) if r['refer'] == '1' else ''}</td>"
        + f"<td>{html.escape(r['label'])}</td></tr>"
        for r in rows[:limit]
    )
    more = f"<p class=how>First {limit} of {len(rows)} patients: see patients.csv.</p>"
    return (
        "<section><h2>Decision per patient</h2><p class=how>Each patient's images aggregated "
        "(docs/operating-points.md): the mean calibrated probability, the share of images "
        "called malignant at their magnification's threshold, and the decision at the "
        "patient-level operating point; referred where the images disagree beyond the "
        "calibrated limit.</p><table class=fig><tr><th>Patient</th><th>Images</th>"
        "<th>Magnifications</th><th>Mean probability</th><th>Share malignant</th>"
        f"<th>Decision</th><th>Refer</th><th>Label</th></tr>{body}</table>"
        + (more if len(rows) > limit else "")
        + "</section>"
    )


def _read_json(path: Path, default: Any) -> Any:
    """The JSON in ``path``, or ``default`` when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else default


def _title(meta: CheckpointMetadata | None) -> str:
    """The heading with the model's id and save time, and the not-for-diagnosis warning."""
    model_id, saved_at = (meta.model_id, meta.saved_at) if meta is not None else (None, None)
    return (
        f"<h1>histolens report</h1><div class=sub>{html.escape(model_id or '')}"
        f" &middot; saved {html.escape(saved_at or '')}</div>"
        '<div class="warn">Research and education use only. Not for diagnosis.</div>'
    )


def _note_boxes(notes: Sequence[str], estimate: Estimate | None) -> list[str]:
    """A warning box per note, but for the estimate's own warnings (shown with it, below)."""
    shown = set(estimate.warnings) if estimate else set()
    return [f'<div class="warn">{html.escape(n)}</div>' for n in notes if n not in shown]


def _results_sections(
    title: str, estimate: Estimate | None, metrics: Metrics | None, ev: Path
) -> list[str]:
    """The estimate (or, without one, the headline cards), then every metric and the referrals."""
    parts = []
    if estimate:
        parts.append(estimate_section(title, estimate))
    elif metrics:
        parts.append(
            f"<section><h2>Headline ({html.escape(metrics.split or 'test')} "
            f"split)</h2>{headline_cards(metrics)}</section>"
        )
    if metrics:
        split = html.escape(metrics.split or "test")
        parts.append(
            f"<section><h2>All metrics of these predictions ({split})</h2>"
            f"{metrics_table(metrics)}</section>"
        )
        parts.append(refer_section(metrics, ev))
    return parts


def _data_section(meta: CheckpointMetadata) -> str:
    """The training data's path and layout, the class weights and the split's sizes."""
    data = meta.data
    return (
        f"<section><h2>Data and split</h2><p>{html.escape(str(data.path))} "
        f"&middot; layout: {html.escape(str(data.layout))} &middot; "
        f"class weights: {html.escape(_weights_text(meta.class_weights))}</p>"
        f"{_split_table(data)}</section>"
    )


def _plots_section(ev: Path) -> str:
    """The evaluation's plots that exist, embedded; empty when there are none."""
    figures = [(ev / f, t) for f, t in _PLOTS if (ev / f).is_file()]
    if not figures:
        return ""
    return (
        "<section><h2>Plots</h2>"
        + "".join(f"<h3>{t}</h3>{embedded_image(p)}" for p, t in figures)
        + "</section>"
    )


def _gallery_section(explanations: Path) -> str:
    """Up to 12 of explain's heatmap panels with their captions; empty when there are none."""
    gallery = sorted(explanations.glob("*_panel.png"))[:12]
    if not gallery:
        return ""
    captions = _gallery_captions(ExplanationFiles(explanations).index)
    return (
        "<section><h2>Example heatmaps</h2><div class=gallery>"
        + "".join(
            f"<figure>{embedded_image(p)}<figcaption>"
            f"{html.escape(captions.get(p.name, p.stem.replace('_panel', '')))}"
            "</figcaption></figure>"
            for p in gallery
        )
        + "</div></section>"
    )


def _model_sections(meta: CheckpointMetadata, card_estimate: Estimate | None) -> list[str]:
    """The model card (its performance line from ``card_estimate``), then the resolved
    configuration and package versions the model was trained with."""
    return [
        f"<section><h2>Model card</h2>{_model_card(meta, card_estimate)}</section>",
        "<section><h2>Resolved configuration</h2><pre>"
        f"{html.escape(json.dumps(meta.config, indent=2))}</pre>"
        f"<p>Package versions: {html.escape(json.dumps(meta.versions))}"
        "</p></section>",
    ]


def _gallery_captions(index_csv: Path) -> dict[str, str]:
    """Panel file name -> "file: predicted class (P = 0.91), method" from explain's index.csv."""
    import csv

    if not index_csv.is_file():
        return {}
    captions = {}
    with index_csv.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("status") != "ok" or not row.get("panel"):
                continue
            try:
                prob = f" (P = {float(row['probability']):.2f})"
            except (KeyError, ValueError):
                prob = ""
            flag = ", review" if row.get("uncertain") == "True" else ""
            captions[Path(row["panel"]).name] = (
                f"{Path(row['path']).name}: {row.get('prediction', '?')}{prob}{flag}, "
                f"{row.get('method', '')}"
            )
    return captions


_FAITH_COLUMNS = {
    "deletion_auc": "Deletion AUC (lower is better)",
    "insertion_auc": "Insertion AUC",
    "road": "ROAD",
    "pointing_game": "Pointing game",
    "iou": "Lesion IoU",
    "n": "Images",
    "n_masks": "With lesion masks",
}


def _faithfulness_section(table: dict[str, Any]) -> str:
    rows = table.get("rows", [])
    if not rows:
        return ""
    # Only the columns that were measured (ROAD can be skipped; masks exist on synthetic data).
    cols = [c for c in _FAITH_COLUMNS if any(r.get(c) is not None for r in rows)]
    head = "<tr><th>Method</th>" + "".join(f"<th>{_FAITH_COLUMNS[c]}</th>" for c in cols) + "</tr>"
    body = "".join(
        "<tr><td>"
        + html.escape(str(r["method"]))
        + "</td>"
        + "".join(f"<td class=num>{'-' if r.get(c) is None else fmt(r.get(c))}</td>" for c in cols)
        + "</tr>"
        for r in rows
    )
    return (
        "<section><h2>Explanation faithfulness</h2><p>Each heatmap's most important pixels are "
        "deleted (or revealed) first while the explained class's probability is followed: a "
        "faithful map gives a low deletion and a high insertion AUC. ROAD (higher is better) "
        "repeats this with noisy linear imputation. On synthetic data the pointing game (is the "
        "map's maximum inside the lesion?) and the lesion IoU test localisation. The last row is "
        "a smooth random map: the bar every method must clear.</p>"
        f"<table>{head}{body}</table></section>"
    )
