"""One self-contained HTML report per run: images embedded, opens offline."""

# Over 400 lines: one HTML document; its sections are small renderers sharing the same formatting
# helpers.

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histolens.atomic import atomic_write_text
from histolens.estimate import ESTIMATE_KEYS
from histolens.performance import (
    estimate_from_metrics,
    headline,
    is_from_metrics,
    measured_on,
    support_text,
)

if TYPE_CHECKING:
    from histolens.checkpoint import CheckpointMetadata, TrainingData

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


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return html.escape(str(v))


def _ci(ci: dict, key: str) -> str:
    lo, hi = ci.get(key, (float("nan"), float("nan")))
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return ""
    return f"{lo:.3f} - {hi:.3f}"


def _metrics_table(metrics: dict[str, Any]) -> str:
    img = metrics.get("image", {})
    ci = img.get("ci95", {})
    names = [
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
    rows = []
    at05 = metrics.get("image_at_0.5", {})
    for key, label in names:
        if key not in img:
            continue
        rows.append(
            f"<tr><td>{label}</td><td class=num>{_fmt(img[key])}</td>"
            f"<td class=num>{_ci(ci, key)}</td>"
            f"<td class=num>{_fmt(at05[key]) if key in at05 else ''}</td></tr>"
        )
    head = (
        "<tr><th>Metric</th><th>Value (chosen threshold "
        f"{metrics.get('threshold', 0.5):.3f})</th><th>95% CI (bootstrap over patients)</th>"
        "<th>At threshold 0.5</th></tr>"
    )
    table = f"<table>{head}{''.join(rows)}</table>"
    per_class = img.get("per_class")
    if per_class:
        pc = "".join(
            f"<tr><td>{html.escape(c)}</td><td class=num>{v['precision']:.3f}</td>"
            f"<td class=num>{v['recall']:.3f}</td><td class=num>{v['f1']:.3f}</td>"
            f"<td class=num>{v['support']}</td></tr>"
            for c, v in per_class.items()
        )
        table += (
            "<h3>Per class</h3><table><tr><th>Class</th><th>Precision</th><th>Recall</th>"
            f"<th>F1</th><th>Images</th></tr>{pc}</table>"
        )
    per_mag = metrics.get("per_magnification")
    if per_mag:
        pm = "".join(
            f"<tr><td>{m}</td><td class=num>{v['n']}</td><td class=num>{v['n_patients']}</td>"
            f"<td class=num>{_fmt(v['roc_auc'])}</td><td class=num>{_fmt(v['accuracy'])}</td>"
            f"<td class=num>{_fmt(v['patient_recognition_rate'])}</td></tr>"
            for m, v in per_mag.items()
        )
        table += (
            "<h3>Per magnification</h3><table><tr><th>Magnification</th><th>Images</th>"
            "<th>Patients</th><th>ROC AUC</th><th>Accuracy</th>"
            f"<th>Patient recognition rate</th></tr>{pm}</table>"
        )
    return table


def _refer_section(metrics: dict[str, Any], ev: Path) -> str:
    """Prediction sets, referrals and images unlike the training images (metrics["refer"])."""
    refer = metrics.get("refer")
    if not refer:
        return ""
    parts = []
    if refer.get("alpha") is not None:
        alpha = float(refer["alpha"])
        parts.append(
            _card_row(
                [
                    (
                        "Coverage on held-out patients",
                        _fmt(refer["coverage"]),
                        f"target {1 - alpha:.2f} (alpha {alpha:g})",
                    ),
                    ("Images referred", _fmt(refer["refer_rate"]), "set of several classes"),
                    ("Accuracy of the images kept", _fmt(refer["accuracy_kept"]), ""),
                    (
                        "Patients referred",
                        f"{len(refer['patients_referred'])} / {refer['n_patients']}",
                        "half or more of their images referred",
                    ),
                ]
            )
        )
        parts.append(
            f"<p class=how>Each image gets the set of classes its calibrated probability does not "
            f"rule out at error level alpha = {alpha:g}; a set of several classes means "
            "<b>refer</b> to a person. Calibration: "
            f"{html.escape(str(refer.get('method', '')))}; every patient weighs the same, so "
            "coverage is a guarantee about new patients (averaged over patients: "
            f"{_fmt(refer['coverage'])}; over images: {_fmt(refer['coverage_images'])}). "
            f"Mean set size {_fmt(refer['mean_set_size'])}; accuracy of the referred images "
            f"{_fmt(refer['accuracy_referred'])}; patient-level accuracy of the patients not "
            f"referred (majority of their kept images) {_fmt(refer['patient_accuracy_kept'])}.</p>"
        )
        if refer["patients_referred"]:
            names = ", ".join(html.escape(str(p)) for p in refer["patients_referred"])
            parts.append(f"<p class=how><b>Patients referred:</b> {names}.</p>")
    n_ood = int(refer.get("n_ood", 0))
    reasons = "; ".join(
        f"{html.escape(k)}: {v}" for k, v in (refer.get("ood_reasons") or {}).items()
    )
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
            + _img(plot)
        )
    return "<section id=refer><h2>Knowing when not to answer</h2>" + "".join(parts) + "</section>"


def _weights_text(weights: dict) -> str:
    """``benign 1.101, malignant 0.916``: the loss weights, rounded for reading."""
    return ", ".join(f"{k} {float(v):.3f}" for k, v in weights.items()) or "none"


def _cards(metrics: dict[str, Any]) -> str:
    img = metrics.get("image", {})
    items = [
        ("ROC AUC", img.get("roc_auc", img.get("roc_auc_ovr"))),
        ("Patient recognition rate", img.get("patient_recognition_rate")),
        ("Patient-level AUC", img.get("patient_auc")),
        ("Balanced accuracy", img.get("balanced_accuracy", img.get("accuracy"))),
        ("Images / patients", f"{metrics.get('n_images')} / {metrics.get('n_patients')}"),
    ]
    return _card_row([(k, _fmt(v), "") for k, v in items if v is not None])


def _card_row(items: Sequence[tuple[str, str, str]]) -> str:
    """Cards of (name, value, small print under the value), all already HTML-safe."""
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><b>{v}</b>{f"<small>{note}</small>" if note else ""}'
            f"<span>{k}</span></div>"
            for k, v, note in items
        )
        + "</div>"
    )


def _ci_text(estimate: dict[str, Any], key: str) -> str:
    ci = estimate.get("ci95", {}).get(key)
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return ""
    return f"95% CI {ci[0]:.2f}&ndash;{ci[1]:.2f}"


def _estimate_cards(estimate: dict[str, Any]) -> str:
    """The estimate's main figures with their CIs, and the patients behind them."""
    values = estimate.get("metrics", {})
    keys = (
        ("roc_auc", "patient_auc", "balanced_accuracy")
        if "roc_auc" in values
        else ("balanced_accuracy", "macro_f1", "patient_recognition_rate")
    )
    items = [
        (
            f"{ESTIMATE_KEYS[k][0].upper()}{ESTIMATE_KEYS[k][1:]}",
            _fmt(values[k]),
            _ci_text(estimate, k),
        )
        for k in keys
        if k in values
    ]
    per_class = estimate.get("patients_per_class") or {}
    patients = html.escape(str(estimate.get("n_patients", "?")))
    note = ", ".join(f"{n} {html.escape(str(c))}" for c, n in per_class.items())
    items.append(("Patients", patients, note))
    if estimate.get("n_images") is not None:
        items.append(("Images", html.escape(str(estimate["n_images"])), ""))
    return _card_row(items)


def _estimate_section(title: str, estimate: dict[str, Any]) -> str:
    """The figures a reader should quote: value, 95% CI, what they were measured on, the
    patients of each class behind them, per magnification, and the warnings in words."""
    values = estimate.get("metrics", {})
    if is_from_metrics(estimate):
        how = f"<p class=how>{html.escape(measured_on(estimate))}</p>"
    else:
        how = (
            f"<p class=how><b>Method:</b> {html.escape(str(estimate['method']))}.<br>"
            f"<b>Data:</b> {html.escape(str(estimate['description']))}.</p>"
        )
    support = (
        f"<p class=how><b>Patients behind these figures:</b> "
        f"{html.escape(support_text(estimate))}.</p>"
    )
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class=num>{_fmt(values[k])}</td>"
        f"<td class=num>{_ci_text(estimate, k).replace('95% CI ', '') or 'not stored'}</td></tr>"
        for k, name in ESTIMATE_KEYS.items()
        if k in values
    )
    table = (
        "<table class=fig><tr><th>Metric</th><th>Value</th><th>95% CI (bootstrap over patients)</th></tr>"
        f"{rows}</table>"
    )
    per_mag = estimate.get("per_magnification") or {}
    if per_mag:
        key = "roc_auc" if "roc_auc" in values else "balanced_accuracy"
        body = ""
        for mag, block in per_mag.items():
            per_class = block.get("patients_per_class") or {}
            classes = ", ".join(f"{n} {html.escape(str(c))}" for c, n in per_class.items())
            value = block.get("metrics", {}).get(key)
            ci = _ci_text(block, key)
            shown = "n/a (one class only)" if value is None else _fmt(value)
            body += (
                f"<tr><td>{html.escape(str(mag))}</td><td class=num>{block.get('n_images', '')}"
                f"</td><td class=num>{block.get('n_patients', '')}</td><td>{classes or '?'}</td>"
                f"<td class=num>{shown}{f' ({ci})' if ci else ''}</td></tr>"
            )
        table += (
            "<h3>Per magnification</h3><table class=fig><tr><th>Magnification</th><th>Images</th>"
            f"<th>Patients</th><th>Patients per class</th><th>{ESTIMATE_KEYS[key]}</th></tr>"
            f"{body}</table>"
        )
    warnings = estimate.get("warnings") or []
    box = ""
    if warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
        box = f'<div class="warn"><b>Read these figures with care</b><ul>{items}</ul></div>'
    return (
        f"<section id=estimate><h2>{html.escape(title)}</h2>{_estimate_cards(estimate)}"
        f"{how}{support}{box}{table}</section>"
    )


def _report_estimate(
    meta: CheckpointMetadata | None, metrics: dict[str, Any], ev: Path, own_evaluation: bool
) -> tuple[str, dict[str, Any] | None]:
    """The figures this report leads with, and their section's title.

    An evaluation of new images ('histolens evaluate') stores its own estimate in metrics.json;
    a run's own evaluation is what the checkpoint's estimate was made from; evaluations without
    an estimate (older runs, the Lightning head's test split) are labelled by their split.
    """
    unseen = "Estimated performance on unseen patients"
    if isinstance(metrics.get("estimate"), dict):
        return "Performance on the evaluated images", metrics["estimate"]
    if own_evaluation and meta is not None and meta.estimate is not None:
        return unseen, meta.estimate
    if metrics.get("image"):
        classes = list(meta.class_names) if meta is not None else []
        overall, per_mag_classes = _patients_per_class(ev / "predictions.csv")
        blocks = {}
        for mag, block in (metrics.get("per_magnification") or {}).items():
            blocks[mag] = {
                "n_images": block.get("n"),
                "n_patients": block.get("n_patients"),
                "patients_per_class": per_mag_classes.get(mag, {}),
                "metrics": {k: block[k] for k in ESTIMATE_KEYS if k in block},
                "ci95": {},
            }
        headline = {
            **metrics["image"],
            "split": metrics.get("split", "test"),
            "n_images": metrics.get("n_images"),
            "n_patients": metrics.get("n_patients"),
        }
        estimate = estimate_from_metrics(
            headline,
            classes or sorted(overall),
            meta.task if meta is not None else "binary",
            metrics.get("threshold"),
            patients_per_class=overall,
            per_magnification=blocks,
        )
    else:
        estimate = meta.headline_estimate if meta is not None else None
    # Figures of patients held out from training (a test split, out-of-fold predictions) are an
    # estimate on unseen patients; a validation split chose the threshold, so it is not.
    held_out = estimate is not None and (
        not is_from_metrics(estimate) or estimate.get("split") in ("test", "out-of-fold")
    )
    return (unseen if held_out else "Performance"), estimate


def _patients_per_class(
    predictions_csv: Path,
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Patients of each class in an evaluation's predictions.csv, overall and per magnification
    ('100X'); each patient counted under the label of most of their images."""
    import csv
    from collections import Counter

    if not predictions_csv.is_file():
        return {}, {}
    # (magnification or "" for all, patient) -> label counts of that patient's images
    labels: dict[tuple[str, str], Counter] = {}
    with predictions_csv.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            labels.setdefault(("", row["patient"]), Counter())[row["label"]] += 1
            if row.get("magnification"):
                mag = (f"{row['magnification']}X", row["patient"])
                labels.setdefault(mag, Counter())[row["label"]] += 1
    per_mag: dict[str, Counter] = {}
    for (mag, _), counts in labels.items():
        per_mag.setdefault(mag, Counter())[counts.most_common(1)[0][0]] += 1
    overall = per_mag.pop("", Counter())
    return dict(sorted(overall.items())), {m: dict(sorted(c.items())) for m, c in per_mag.items()}


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


def _threshold_source(meta: CheckpointMetadata) -> str:
    if "cross-validation" in str((meta.estimate or {}).get("method", "")):
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


def _model_card(meta: CheckpointMetadata, estimate: dict[str, Any] | None = None) -> str:
    data = meta.data
    performance = html.escape(headline(estimate if estimate else meta.headline_estimate))
    return f"""
<p><b>Intended use.</b> Research and education in computational pathology: studying how a
classifier of H&amp;E breast histopathology images behaves, comparing backbones and training
recipes, teaching. <b>Not for diagnosis</b> and not a medical device; a pathologist's reading
of the slide is the reference.</p>
<p><b>Model.</b> {html.escape(meta.backbone)} backbone (weights:
{html.escape(str(meta.pretrained))}) with {_head_text(meta)}; task
{html.escape(meta.task)}; classes {html.escape(", ".join(meta.class_names))};
decision threshold {meta.threshold:.3f} chosen on {_threshold_source(meta)};
temperature {meta.temperature:.3f}; stain normalisation {html.escape(meta.stain_method)}.</p>
{_licence_paragraph(meta)}
<p><b>Data.</b> {html.escape(data.path or "")} ({html.escape(data.layout or "")}),
magnification {html.escape(meta.magnification)}; split by
{"image (no patient ids: optimistic)" if data.patient_level_split is False else "patient group"}.</p>
<p><b>Performance.</b> {performance}.</p>
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
    from histolens.checkpoint import BEST_CHECKPOINT, read_metadata

    run_dir = Path(run_dir)
    ev = Path(evaluation_dir) if evaluation_dir else run_dir / "evaluation"
    ckpt = Path(checkpoint) if checkpoint else run_dir / BEST_CHECKPOINT
    meta = read_metadata(ckpt) if ckpt.exists() else None
    metrics_file = ev / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    notes_file = ev / "notes.json"
    saved_notes = json.loads(notes_file.read_text()) if notes_file.is_file() else []
    notes = list(dict.fromkeys([*saved_notes, *notes]))  # saved first, no repeats
    model_id, saved_at = (meta.model_id, meta.saved_at) if meta is not None else (None, None)
    parts = [
        f"<h1>histolens report</h1><div class=sub>{html.escape(model_id or '')}"
        f" &middot; saved {html.escape(saved_at or '')}</div>"
    ]
    parts.append('<div class="warn">Research and education use only. Not for diagnosis.</div>')
    own = evaluation_dir is None or ev.resolve() == (run_dir / "evaluation").resolve()
    title, estimate = _report_estimate(meta, metrics, ev, own)
    shown = set(estimate.get("warnings", [])) if estimate else set()
    for n in notes:
        if n not in shown:  # the estimate's warnings are shown with it, below
            parts.append(f'<div class="warn">{html.escape(n)}</div>')
    if estimate:
        parts.append(_estimate_section(title, estimate))
    elif metrics:
        parts.append(
            f"<section><h2>Headline ({html.escape(str(metrics.get('split', 'test')))} "
            f"split)</h2>{_cards(metrics)}</section>"
        )
    if metrics:
        split = html.escape(str(metrics.get("split", "test")))
        parts.append(
            f"<section><h2>All metrics of these predictions ({split})</h2>"
            f"{_metrics_table(metrics)}</section>"
        )
        parts.append(_refer_section(metrics, ev))
    if meta is not None and meta.data.known:
        data = meta.data
        parts.append(
            f"<section><h2>Data and split</h2><p>{html.escape(str(data.path))} "
            f"&middot; layout: {html.escape(str(data.layout))} &middot; "
            f"class weights: {html.escape(_weights_text(meta.class_weights))}</p>"
            f"{_split_table(data)}</section>"
        )
    figures = [(ev / f, t) for f, t in _PLOTS if (ev / f).is_file()]
    if figures:
        parts.append(
            "<section><h2>Plots</h2>"
            + "".join(f"<h3>{t}</h3>{_img(p)}" for p, t in figures)
            + "</section>"
        )
    gallery = sorted((run_dir / "explanations").glob("*_panel.png"))[:12]
    if gallery:
        captions = _gallery_captions(run_dir / "explanations" / "index.csv")
        parts.append(
            "<section><h2>Example heatmaps</h2><div class=gallery>"
            + "".join(
                f"<figure>{_img(p)}<figcaption>"
                f"{html.escape(captions.get(p.name, p.stem.replace('_panel', '')))}"
                "</figcaption></figure>"
                for p in gallery
            )
            + "</div></section>"
        )
    faith = run_dir / "explanations" / "faithfulness.json"
    if faith.is_file():
        parts.append(_faithfulness_section(json.loads(faith.read_text())))
    if meta is not None:
        card_estimate = estimate if own else meta.headline_estimate
        parts.append(f"<section><h2>Model card</h2>{_model_card(meta, card_estimate)}</section>")
        parts.append(
            "<section><h2>Resolved configuration</h2><pre>"
            f"{html.escape(json.dumps(meta.config, indent=2))}</pre>"
            f"<p>Package versions: {html.escape(json.dumps(meta.versions))}"
            "</p></section>"
        )
    doc = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>histolens report</title>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{_CSS}</style>"
        f"</head><body><main>{''.join(parts)}</main></body></html>"
    )
    return atomic_write_text(run_dir / "report.html", doc)


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
        + "".join(f"<td class=num>{'-' if r.get(c) is None else _fmt(r.get(c))}</td>" for c in cols)
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
