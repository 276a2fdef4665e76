"""``histolens train`` and ``histolens cv``: a run config from a recipe, a YAML file and flags.

Registered on the main group by ``histolens.cli.commands``; heavy imports live inside the commands.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from histolens.cli.options import (
    alpha_option,
    backbone_option,
    config_option,
    count_option,
    data_option,
    engine_option,
    epochs_option,
    lr_option,
    magnification_option,
    magnification_thresholds_option,
    out_option,
    path_option,
    pretrained_option,
    quiet_option,
    recipe_option,
    seed_option,
    split_options,
    stain_augment_option,
    stain_norm_option,
    task_option,
)
from histolens.rundir import RunDir

__all__ = ["cv_command", "train_command"]

# Where each command-line flag lands in the run config (train and cv share the flags they both have).
_CONFIG_KEYS = {
    "magnification": "data.magnification",
    "task": "data.task",
    "val_fraction": "data.val_fraction",
    "test_fraction": "data.test_fraction",
    "seed": "data.seed",
    "group_by": "data.group_by",
    "mpp": "data.mpp",
    "backbone": "model.backbone",
    "pretrained": "model.pretrained",
    "unfreeze": "model.unfreeze",
    "head": "model.head",
    "input_size": "model.input_size",
    "feature_layer": "model.feature_layer",
    "cv_folds": "train.cv_folds",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "optimizer": "train.optimizer",
    "augment": "augment.enabled",
    "stain_norm": "stain.method",
    "stain_reference": "stain.reference",
    "stain_augment": "augment.stain",
    "feature_cache": "train.feature_cache",
    "cache_views": "train.cache_views",
    "class_weights": "train.class_weights",
    "label_smoothing": "train.label_smoothing",
    "mixup": "train.mixup",
    "cutmix": "train.cutmix",
    "patience": "train.early_stopping_patience",
    "threshold_method": "train.threshold_method",
    "target_sensitivity": "train.target_sensitivity",
    "operating_point": "train.operating_point",
    "magnification_thresholds": "train.magnification_thresholds",
    "alpha": "train.alpha",
    "accelerator": "train.accelerator",
    "devices": "train.devices",
    "strategy": "train.strategy",
    "num_nodes": "train.num_nodes",
    "precision": "train.precision",
    "engine": "train.engine",
}


def _run_config(recipe: str, config_file, flags: dict, extra: dict):
    """The recipe's config, then the YAML file's overrides, then the flags given and ``extra``."""
    from histolens.config import load_yaml_overrides, recipe_config

    cfg = recipe_config(recipe)
    from_file = load_yaml_overrides(config_file) if config_file else {}
    overrides = {_CONFIG_KEYS[k]: v for k, v in flags.items() if v is not None}
    # One override: a file's setting may need a flag's (--mixup in the file, --head mlp given).
    return cfg.override({**from_file, **overrides, **extra})


@click.command("train")
@data_option()
@path_option(
    "--slides",
    "slides_csv",
    exists=True,
    dir_okay=False,
    help="LABELS.csv (slide,label[,patient]; slide = a feature bag .h5): attention MIL.",
)
@out_option("Run directory (default runs/<backbone>-<task>-<time>).")
@path_option(
    "--resume",
    exists=True,
    file_okay=False,
    help="Continue the run in this directory from its last checkpoint.",
)
@recipe_option()
@config_option()
@split_options(defaults=False)
@backbone_option()
@pretrained_option()
@click.option(
    "--head",
    type=click.Choice(["linear", "mlp"]),
    help="linear: logistic regression on frozen features, regularised by inner patient-level "
    "CV (default); mlp: the original project's head, trained by Lightning.",
)
@click.option(
    "--input-size",
    help="HEIGHTxWIDTH the whole image is resized to (default 294x448; larger inputs are "
    "tiled at the backbone's own size), or 'pretrained' for the backbone's input size.",
)
@click.option(
    "--feature-layer",
    help="Where the head reads the backbone: auto (default), last, or blocks.N.",
)
@click.option(
    "--mpp",
    type=float,
    help="Microns per pixel of the training images, recorded in the checkpoint so that "
    "'histolens slide predict' tiles slides at the same scale (default: BreakHis's table).",
)
@click.option(
    "--cv-folds",
    type=click.IntRange(0),
    help="Patient-level k-fold estimate before fitting on all patients (default 5); "
    "0: a single held-out split (--val-fraction/--test-fraction).",
)
@epochs_option()
@click.option("--batch-size", type=click.IntRange(1))
@lr_option()
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]))
@click.option("--unfreeze", type=click.IntRange(0), help="Also train the last N backbone stages.")
@click.option(
    "--label-smoothing",
    type=click.FloatRange(0, 1, max_open=True),
    help="Move training targets this share towards uniform (--head mlp; default 0).",
)
@click.option(
    "--mixup",
    type=click.FloatRange(0),
    metavar="ALPHA",
    help="MixUp of training samples, share ~ Beta(ALPHA, ALPHA) (--head mlp; 0: off, default).",
)
@click.option(
    "--cutmix",
    type=click.FloatRange(0),
    metavar="ALPHA",
    help="CutMix of training images, share ~ Beta(ALPHA, ALPHA) (--head mlp with --unfreeze N).",
)
@click.option("--augment/--no-augment", default=None)
@stain_norm_option()
@click.option("--stain-reference", type=click.Path(exists=True, dir_okay=False))
@stain_augment_option()
@click.option(
    "--feature-cache/--no-feature-cache",
    default=None,
    help="Frozen backbone: compute features once for K views (default on).",
)
@click.option("--cache-views", type=click.IntRange(1), help="K augmented views per image.")
@click.option("--class-weights/--no-class-weights", default=None)
@click.option("--patience", type=click.IntRange(1), help="Early-stopping patience (epochs).")
@click.option("--threshold-method", type=click.Choice(["youden", "sensitivity", "fixed"]))
@click.option("--target-sensitivity", type=float)
@click.option(
    "--operating-point",
    help="Where the decision sits, a threshold per magnification chosen on out-of-fold "
    "predictions: youden (default), sensitivity:0.95 (screening) or specificity:0.95 "
    "(confirmation).",
)
@magnification_thresholds_option("shared")
@alpha_option(
    help="Error level of the prediction sets (default 0.1): a new patient's image has its true "
    "class in its set with probability 1 - alpha; sets of several classes mean 'refer'."
)
@click.option("--accelerator", help="auto, cpu, gpu (Lightning).")
@click.option(
    "--devices", help="Processes (devices) per machine, e.g. 2 with --strategy ddp (default 1)."
)
@click.option("--strategy", help="Lightning strategy, e.g. ddp for data-parallel processes.")
@click.option("--num-nodes", type=click.IntRange(1), help="Machines taking part (default 1).")
@click.option("--precision", help="Lightning precision, e.g. 32-true, 16-mixed, bf16-mixed.")
@engine_option()
@quiet_option()
def train_command(data_path, slides_csv, out, resume, recipe, config_file, quiet, **flags):
    """Train a classifier: frozen EfficientNet-Lite0 features and a linear probe by default.

    By default every patient trains the shipped model, and the metrics shown are a patient-level
    cross-validated estimate (out-of-fold predictions of every patient, 95% CIs over patients).
    With --slides LABELS.csv it trains gated-attention MIL on slide feature bags instead.
    """
    from histolens.training.runner import train as run_training

    if slides_csv is not None:
        if data_path is not None or resume is not None:
            raise click.UsageError("--slides trains on bags alone: leave out --data and --resume.")
        from histolens.cli.mil import train_slides_command

        return train_slides_command(slides_csv, out, flags, quiet)
    if resume is None and data_path is None:
        raise click.UsageError("give --data PATH (or --resume RUN_DIR).")
    extra = {}
    if flags.get("input_size") is not None:
        extra["model.input_size"] = _parse_input_size(flags["input_size"])
    if data_path is not None:
        extra["data.path"] = str(data_path)
    if flags.get("seed") is not None:
        extra["train.seed"] = flags["seed"]
    # --resume trains on the run's saved config: the flags it ignores are not checked either.
    cfg = (
        _run_config(recipe, None, {}, {})
        if resume
        else _run_config(recipe, config_file, flags, extra)
    )
    if resume is not None:
        out = resume
    elif out is None:
        import re
        import time

        name = re.sub(r"[^\w.-]+", "-", cfg.model.backbone)  # hf-hub:ORG/NAME -> hf-hub-ORG-NAME
        out = Path("runs") / f"{name}-{cfg.data.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume is not None:
        ignored = sorted(k for k, v in flags.items() if v is not None and k != "epochs")
        if ignored or data_path is not None:
            click.secho(
                "note: --resume uses the run's saved config; only --epochs is applied.",
                fg="yellow",
                err=True,
            )
    # Progress bars redraw with carriage returns; a log file gets one line per epoch instead.
    terminal = sys.stderr.isatty()
    result = run_training(
        cfg,
        out,
        resume=resume is not None,
        progress=not quiet and terminal,
        epochs=flags.get("epochs") if resume is not None else None,
        epoch_lines=not quiet and not terminal,
    )
    if result.global_rank == 0:  # with several processes, one summary
        click.echo(_train_summary(result))


def _parse_input_size(text: str):
    """'294x448' -> (294, 448); 'pretrained' -> None (the backbone's own input size)."""
    if text.strip().lower() in ("pretrained", "none", "default"):
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(
            f"'{text}' is not HEIGHTxWIDTH (e.g. 294x448) or 'pretrained'.",
            param_hint="--input-size",
        ) from None
    return (h, w)


def _train_summary(result) -> str:
    from histolens.checkpoint.io import read_metadata
    from histolens.evaluation.estimate import estimate_lines
    from histolens.evaluation.performance import stored_estimate
    from histolens.stats.metrics import HEADLINE_METRICS

    meta = read_metadata(result.checkpoint) if result.checkpoint.exists() else None
    estimate = stored_estimate(meta)
    if result.epochs_run:
        trained = (
            f"(epoch {result.best_epoch + 1}, validation loss {result.best_val_loss:.4f}); "
            f"{result.epochs_run} epochs in {result.seconds:.1f} s"
        )
        if result.first_epoch:
            trained += f" (resumed after epoch {result.first_epoch})"
    else:
        part = meta.data.split.get("train") if meta is not None else None
        images = "?" if part is None or part.images is None else part.images
        groups = "?" if part is None or part.groups is None else part.groups
        C = meta.probe.C if meta is not None and meta.probe is not None else float("nan")
        trained = (
            f"(linear probe fitted on {images} images of {groups} patient groups, C={C:g}); "
            f"{result.seconds:.1f} s"
        )
    lines = [f"Run: {result.run_dir}", f"Checkpoint: {result.checkpoint} {trained}"]
    metrics = result.metrics
    img = metrics.image if metrics is not None else None
    if estimate:
        lines += estimate_lines(estimate)
        img = None
    if img is not None and metrics is not None:
        ci = img.ci95 or {}

        def fmt(key: str) -> str:
            v = img.figure(key)
            if v is None:
                return "n/a"
            lo, hi = ci.get(key, (None, None))
            band = f" (95% CI {lo:.2f}-{hi:.2f})" if lo is not None and lo == lo else ""
            return f"{v:.3f}{band}"

        split = metrics.split or "test"
        lines.append(
            f"{split.capitalize()} split ({metrics.n_images} images, "
            f"{metrics.n_patients} patients):"
        )
        for key, name in HEADLINE_METRICS.items():
            if img.figure(key) is not None:
                lines.append(f"  {name}: {fmt(key)}")
    shown = set(estimate.warnings) if estimate else set()
    for n in result.notes:
        if n not in shown:
            lines.append(f"note: {n}")
    report = RunDir(result.run_dir).report
    if report.exists():
        lines.append(f"Report: {report}")
    return "\n".join(lines)


@click.command("cv")
@data_option(required=True)
@count_option("--folds", 5, minimum=2)
@recipe_option()
@config_option()
@magnification_option()
@task_option()
@backbone_option()
@pretrained_option()
@epochs_option()
@lr_option()
@stain_norm_option()
@stain_augment_option()
@seed_option(42, help="Seed of the patient-level folds.")
@engine_option()
def cv_command(data_path, folds, recipe, config_file, seed, **flags):
    """Patient-level k-fold cross-validation: mean and spread of AUC and patient metrics."""
    from histolens.training.crossval import cross_validate

    cfg = _run_config(recipe, config_file, flags, {"data.path": str(data_path), "data.seed": seed})
    click.echo(
        f"{folds}-fold patient-level cross-validation of {cfg.model.backbone} on "
        f"{data_path} (magnification {cfg.data.magnification}, task {cfg.data.task})"
    )
    result = cross_validate(cfg, folds)
    for key, (mean, std) in result.summary().items():
        if mean == mean:  # NaN: no fold has this metric (e.g. ROC AUC of the subtype task)
            click.echo(f"  {key}: {mean:.3f} +/- {std:.3f}")
    click.echo(f"  ({result.seconds:.0f} s)")
