"""PNG plots of an evaluation (non-interactive backend, written atomically)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histolens.atomic import atomic_path
from histolens.evaluation.results import ReferMetrics, RiskCoverage

__all__ = [
    "plot_confusion_matrix",
    "plot_misclassified",
    "plot_probability_distribution",
    "plot_reliability",
    "plot_risk_coverage",
    "plot_roc_pr",
    "plot_training_curves",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_roc_pr(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    path: str | os.PathLike,
    title: str = "",
    predicted: np.ndarray | None = None,
) -> Path:
    """ROC and precision-recall curves side by side, with the operating point marked
    (``predicted``, the 0/1 decisions, when they were not taken at ``threshold`` on ``p``)."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.3))
    y = np.asarray(y).astype(int)
    pred = np.asarray(p) >= threshold if predicted is None else np.asarray(predicted).astype(bool)
    marker = f"threshold {threshold:.2f}" if predicted is None else "operating point"
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        a.plot(fpr, tpr, lw=2, label=f"ROC AUC = {auc(fpr, tpr):.3f}")
        op_fpr = (pred & (y == 0)).sum() / max(1, (y == 0).sum())
        op_tpr = (pred & (y == 1)).sum() / max(1, (y == 1).sum())
        a.plot([op_fpr], [op_tpr], "o", color="crimson", ms=8, label=marker)
        prec, rec, _ = precision_recall_curve(y, p)
        b.plot(rec, prec, lw=2, label=f"PR AUC = {auc(rec, prec):.3f}")
        op_prec = (pred & (y == 1)).sum() / max(1, pred.sum())
        b.plot([op_tpr], [op_prec], "o", color="crimson", ms=8, label=marker)
        b.axhline(y.mean(), ls=":", color="grey", label=f"prevalence {y.mean():.2f}")
    else:
        a.text(0.5, 0.5, "one class only: no ROC", ha="center")
    a.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    for ax, xlabel, ylabel, title in (
        (
            a,
            "False positive rate (1 - specificity)",
            "True positive rate (sensitivity)",
            "ROC curve",
        ),
        (b, "Recall (sensitivity)", "Precision", "Precision-recall curve"),
    ):
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.02))
    a.legend(loc="lower right")
    b.legend(loc="lower left")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_confusion_matrix(
    y: Sequence[int], pred: Sequence[int], classes: Sequence[str], path: str | os.PathLike
) -> Path:
    """Counts with row percentages (share of each true class)."""
    plt = _plt()
    k = len(classes)
    cm = np.zeros((k, k), int)
    for t, q in zip(y, pred, strict=True):
        cm[int(t), int(q)] += 1
    rows = cm.sum(axis=1, keepdims=True)
    pct = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    size = 3.2 + 0.6 * k
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    ax.imshow(pct, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{pct[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if pct[i, j] > 0.6 else "black",
                fontsize=10 if k <= 4 else 8,
            )
    ax.set(
        xticks=range(k),
        yticks=range(k),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="Predicted",
        ylabel="True",
        title="Confusion matrix (count, row %)",
    )
    plt.setp(ax.get_xticklabels(), rotation=30 if k > 2 else 0, ha="right" if k > 2 else "center")
    return _save(fig, path)


def plot_probability_distribution(
    y: np.ndarray, p: np.ndarray, classes: Sequence[str], threshold: float, path: str | os.PathLike
) -> Path:
    """Histogram of the positive-class probability for each true class."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bins = np.linspace(0, 1, 21)
    colors = ["#3a7dc9", "#d1495b"]
    for c in range(2):
        ax.hist(
            np.asarray(p)[np.asarray(y) == c],
            bins=bins,
            alpha=0.6,
            color=colors[c],
            label=f"true {classes[c]}",
        )
    ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.2f}")
    ax.set(
        xlabel=f"Predicted probability of {classes[1]}",
        ylabel="Images",
        title="Probability distribution per class",
    )
    ax.legend()
    return _save(fig, path)


def plot_reliability(
    y: np.ndarray,
    p_before: np.ndarray,
    p_after: np.ndarray,
    temperature: float,
    path: str | os.PathLike,
) -> Path:
    """Reliability diagram before and after temperature scaling."""
    from histolens.stats.metrics import expected_calibration_error, reliability_curve

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.3), sharey=True)
    for ax, p, name in (
        (axes[0], p_before, "Before calibration"),
        (axes[1], p_after, f"After temperature scaling (T = {temperature:.2f})"),
    ):
        conf, freq, count = reliability_curve(y, p)
        centers = (np.arange(10) + 0.5) / 10
        ax.bar(
            centers,
            np.nan_to_num(freq),
            width=0.09,
            alpha=0.7,
            edgecolor="black",
            label="observed frequency",
        )
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.plot(conf, freq, "o-", color="crimson", label="mean predicted")
        ax.set(
            title=f"{name}\nECE = {expected_calibration_error(y, p):.3f}",
            xlabel="Predicted probability",
            xlim=(0, 1),
            ylim=(0, 1.02),
        )
    axes[0].set_ylabel("Fraction positive")
    axes[0].legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_training_curves(logs_dir: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """Loss and validation AUC per epoch from Lightning's CSV logs (resumed runs have several
    version folders, read in order); None when there is no log."""
    logs_dir = Path(logs_dir)
    files = sorted(
        logs_dir.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])
    )
    series: dict[str, dict[int, float]] = {}
    for metrics_csv in files:
        with open(metrics_csv, newline="") as fh:
            for row in csv.DictReader(fh):
                if not row.get("epoch"):
                    continue
                epoch = int(float(row["epoch"]))
                for key in ("train_loss", "val_loss", "val_auc", "val_acc"):
                    if row.get(key):
                        series.setdefault(key, {})[epoch] = float(row[key])
    if not series:
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        if key in series:
            xs = sorted(series[key])
            a.plot([x + 1 for x in xs], [series[key][x] for x in xs], label=key.replace("_", " "))
    a.set(xlabel="Epoch", ylabel="Loss", title="Loss")
    a.legend()
    for key in ("val_auc", "val_acc"):
        if key in series:
            xs = sorted(series[key])
            b.plot([x + 1 for x in xs], [series[key][x] for x in xs], label=key.replace("_", " "))
    b.set(xlabel="Epoch", ylim=(0, 1.02), title="Validation")
    b.legend()
    return _save(fig, path)


def plot_misclassified(
    items: Sequence[tuple[str, str, str, float]], path: str | os.PathLike, max_items: int = 16
) -> Path | None:
    """Grid of misclassified images: (path, true, predicted, probability of predicted)."""
    from histolens.data.imageio import load_rgb
    from histolens.errors import ImageLoadError

    items = list(items)[:max_items]
    if not items:
        return None
    plt = _plt()
    cols = min(4, len(items))
    rows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img_path, true, pred, prob) in zip(axes.flat, items, strict=False):
        try:
            img = load_rgb(img_path)
            img.thumbnail((320, 320))
            ax.imshow(img)
        except ImageLoadError:
            ax.text(0.5, 0.5, "unreadable", ha="center")
        name = Path(img_path).name
        ax.set_title(f"{name[:34]}\ntrue {true}, predicted {pred} (P = {prob:.2f})", fontsize=7.5)
    fig.suptitle(f"Misclassified images ({len(items)} shown)")
    return _save(fig, path)


def plot_risk_coverage(refer: ReferMetrics, path: str | os.PathLike) -> Path:
    """Accuracy of the images kept against the fraction referred (least confident first), with
    the conformal operating point at ``alpha`` marked: the ``refer`` block of the metrics."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.3))
    curve = refer.curve or RiskCoverage()
    referred = np.asarray(curve.referred, dtype=float)
    accuracy = np.asarray(curve.accuracy, dtype=float)
    ax.plot(
        referred, accuracy, lw=2, label=f"least confident referred first (AURC {refer.aurc:.3f})"
    )
    if refer.alpha is not None:
        ax.plot(
            [refer.refer_rate],
            [refer.accuracy_kept],
            "o",
            color="crimson",
            ms=8,
            label=f"prediction sets at alpha {refer.alpha:g} (coverage {refer.coverage:.2f})",
        )
    ax.set_xlabel("fraction of images referred")
    ax.set_ylabel("accuracy of the images kept")
    ax.set_xlim(0, 1)
    ax.set_ylim(min(0.5, float(np.nanmin(accuracy)) - 0.02) if len(accuracy) else 0.5, 1.005)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    n_ood = refer.n_ood
    ax.set_title(
        "Risk-coverage"
        + (f" ({n_ood} images unlike the training images left out)" if n_ood else ""),
        fontsize=10,
    )
    return _save(fig, path)
