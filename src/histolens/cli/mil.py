"""``histolens train --slides LABELS.csv``: attention MIL on feature bags, and its summary.

Called by ``histolens.cli.train``'s command when ``--slides`` is given; heavy imports inside.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

__all__ = ["train_slides_command"]

# What of the tile flags the MIL run uses; the others do not apply to bags.
_USED = {
    "epochs", "lr", "seed", "cv_folds", "operating_point", "alpha", "patience",
    "accelerator", "devices", "strategy", "num_nodes",
}  # fmt: skip


def _mil_config(flags: dict):
    """The MIL config of the flags: --epochs is the ceiling with early stopping and the fixed
    count without an inner split; --patience the early-stopping patience."""
    from histolens.training.mil import MilConfig

    given = {
        "epochs": flags.get("epochs"),
        "max_epochs": flags.get("epochs"),
        "lr": flags.get("lr"),
        "seed": flags.get("seed"),
        "patience": flags.get("patience"),
    }
    return MilConfig(**{k: v for k, v in given.items() if v is not None})


def _mil_processes(flags: dict):
    """Lightning's accelerator, devices, strategy and nodes, as for tile training."""
    from histolens.training.mil_fit import MilProcesses

    given = {k: flags.get(k) for k in ("accelerator", "devices", "strategy", "num_nodes")}
    return MilProcesses(**{k: v for k, v in given.items() if v is not None})


def train_slides_command(
    labels_csv: Path, out: Path | None, flags: dict, quiet: bool = False
) -> None:
    """Cross-validate MIL and mean pooling by patient, fit MIL on all slides, print the table."""
    import sys

    from histolens.evaluation.estimate import estimate_lines
    from histolens.stats.conformal import DEFAULT_ALPHA
    from histolens.training.mil_run import train_slides

    ignored = sorted(k for k, v in flags.items() if v not in (None, False) and k not in _USED)
    if ignored:
        names = ", ".join("--" + k.replace("_", "-") for k in ignored)
        click.secho(f"note: {names} do(es) not apply to --slides.", fg="yellow", err=True)
    config = _mil_config(flags)
    folds = flags.get("cv_folds") or 5
    out = out or Path("runs") / f"mil-{time.strftime('%Y%m%d-%H%M%S')}"
    run = train_slides(
        labels_csv,
        out,
        config,
        folds,
        flags.get("operating_point") or "youden",
        flags.get("alpha") or DEFAULT_ALPHA,
        _mil_processes(flags),
        echo=not quiet and not sys.stderr.isatty(),  # a log gets one line per epoch
    )
    if run.global_rank != 0:  # with several processes, one summary
        return
    m = run.metrics
    click.echo(f"Run: {run.run_dir}")
    click.echo(
        f"Checkpoint: {run.checkpoint} (gated-attention MIL on all {m['slides']} slides; "
        f"positive class {run.class_names[1]})"
    )
    click.echo(
        f"Slide AUC, {folds}-fold patient-level CV ({m['slides']} slides, {m['patients']} "
        "patients; 95% CI over patients):"
    )
    for method, row in m["slide_auc"].items():
        lo, hi = row["ci95"]
        click.echo(f"  {method:<28} {row['auc']:.3f} ({lo:.3f}-{hi:.3f})")
    click.echo(f"MIL epoch: {m['epoch_seconds_mean'] * 1000:.0f} ms")
    for fit in [*m["training"]["folds"], {**m["training"]["final"], "fold": None}]:
        name = "final model" if fit["fold"] is None else f"fold {fit['fold'] + 1}"
        if fit["early_stopping"]:
            click.echo(
                f"  {name}: best epoch {fit['best_epoch']} of {fit['epochs']} (validation loss "
                f"{fit['best_val_loss']:.4f} on {fit['val_slides']} slides of "
                f"{fit['val_patients']} held-out patients)"
            )
    d = run.decision
    click.echo(
        f"Decision (fitted on the out-of-fold slides): temperature {d.temperature:.3f}, "
        f"threshold {d.threshold:.3f} ({d.operating_points.rule})"
        + (f", prediction sets at alpha {d.alpha:g}" if d.alpha is not None else "")
    )
    for line in estimate_lines(run.estimate, per_magnification=False):
        click.echo(line)
    click.echo(f"Report: {run.run_dir / 'report.html'}")
    for note in run.notes:
        click.echo(f"note: {note}")


def features_from_option():
    """``--features-from CKPT``: the tile checkpoint that makes a slide's bag for a MIL model."""
    return click.option(
        "--features-from",
        type=click.Path(exists=True, path_type=Path),
        help="With a MIL checkpoint and slides: the tile checkpoint that extracts their features "
        "(default: the one the MIL checkpoint records).",
    )


def predict_slides_if_mil(checkpoint, inputs, out: Path, alpha, features_from, quiet,
                          batch_size: int = 32, workers: int = 2) -> bool:  # fmt: skip
    """``histolens predict`` with a MIL checkpoint: each slide's (or bag's) class, calibrated
    probability, prediction set and attention heatmap; False for a tile checkpoint (which is
    refused feature bags with one sentence)."""
    from histolens.errors import ConfigError, DataError
    from histolens.slides.mil_predict import (
        predict_slides_mil,
        split_bags,
        write_slide_predictions,
    )
    from histolens.training.mil_run import is_mil_checkpoint, read_mil_metadata

    if not is_mil_checkpoint(checkpoint):
        bags, _ = split_bags(inputs)
        if bags:
            raise DataError(
                f"{bags[0].name} is a feature bag: predict it with a MIL checkpoint "
                "('histolens train --slides'), not a tile checkpoint."
            )
        if features_from is not None:
            raise ConfigError("--features-from goes with a MIL checkpoint only.")
        return False
    results = out.with_suffix("")  # predictions.csv -> predictions/ (bags, heatmaps, attention)
    rows = predict_slides_mil(
        checkpoint, inputs, results, alpha, features_from, not quiet, batch_size, workers
    )
    meta = read_mil_metadata(checkpoint)
    write_slide_predictions(rows, meta["class_names"], out)
    for r in rows:
        where = r.attention_heatmap or "no heatmap: slide file not found"
        refer = "  [refer: both classes in the set]" if r.refer else ""
        click.echo(
            f"  {r.slide}: {r.label} (P({meta['positive_class']}) = {r.probability:.3f}; "
            f"set {{{', '.join(r.prediction_set)}}}){refer}; attention {where}"
        )
    click.echo(f"{len(rows)} slide(s) predicted by attention MIL. Written to {out}")
    return True
