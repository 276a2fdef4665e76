"""The ``histolens`` command line. Heavy imports live inside the commands so --help is instant."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from histolens.cli_options import (
    alpha_option,
    backbone_option,
    checkpoint_argument,
    config_option,
    data_option,
    epochs_option,
    lr_option,
    magnification_option,
    out_option,
    pretrained_option,
    quiet_option,
    recipe_option,
    seed_option,
    split_name_option,
    split_options,
    stain_augment_option,
    stain_norm_option,
    task_option,
)
from histolens.errors import HistolensError


def _fail(exc: Exception) -> None:
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(1)


class _Group(click.Group):
    """Turns histolens errors into one line and exit 1, and Ctrl-C into a resumable stop."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HistolensError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            click.secho(
                "interrupted; the last good checkpoint is intact (train --resume RUN_DIR "
                "continues).",
                fg="yellow",
                err=True,
            )
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="histolens")
def main() -> None:
    """histolens: train, evaluate, explain and serve breast-histopathology classifiers.

    Research and education use only; not for diagnosis.
    """


# --- data -------------------------------------------------------------------------------------
@main.group(cls=_Group)
def data() -> None:
    """Inspect image folders and make synthetic practice data."""


@data.command("summary")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@split_options()
def data_summary(path, magnification, task, val_fraction, test_fraction, seed, group_by):
    """Images per class, subtype, magnification and patient group, and the split training uses."""
    from histolens.summary import render_summary

    click.echo(
        render_summary(path, magnification, task, val_fraction, test_fraction, seed, group_by)
    )


@data.command("audit")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@magnification_option("all")
@click.option(
    "--threshold",
    default=0.70,
    show_default=True,
    type=click.FloatRange(0.5, 1.0),
    help="Grouped cross-validated AUC at which an attribute is flagged.",
)
@seed_option(0, help="Seed of the grouped folds.")
@click.option(
    "--colour/--no-colour",
    default=True,
    show_default=True,
    help="Decode a thumbnail per image for the colour attributes (--no-colour: headers only).",
)
@quiet_option("No progress bar.")
def data_audit(path, magnification, threshold, seed, colour, quiet):
    """Warn when image size, format, source folder or colour predicts the label across patients.

    Advice only: the exit code is 0 whether or not something is flagged.
    """
    from histolens.audit import audit_dataset

    report = audit_dataset(
        path,
        threshold=threshold,
        progress=not quiet,
        seed=seed,
        magnification=magnification,
        colour=colour,
    )
    click.echo(report.render())
    for warning in report.warnings:
        click.echo(f"warning: {warning}")


@data.command("synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--n", "n", default=240, show_default=True, type=click.IntRange(2, 100000))
@seed_option(0, help="Seed of the images and patients.")
@click.option(
    "--magnification",
    default=400,
    show_default=True,
    type=click.Choice(["40", "100", "200", "400"]),
)
@click.option(
    "--patients",
    default=None,
    type=click.IntRange(2, 10000),
    help="Number of synthetic patients (default: from --n).",
)
def data_synth(out, n, seed, magnification, patients):
    """Write a synthetic H&E-like dataset (BreakHis names, lesion masks, a contact sheet)."""
    from tqdm.auto import tqdm

    from histolens.synth import generate_synthetic

    with tqdm(total=n, desc="Synthesising", unit="img") as bar:
        summary = generate_synthetic(
            out,
            n=n,
            seed=seed,
            magnification=int(magnification),
            n_patients=patients,
            progress=lambda done, total: bar.update(done - bar.n),
        )
    click.echo(
        f"Wrote {summary.n_images} images of {summary.n_patients} patients to {out} in "
        f"{summary.seconds:.1f} s; contact sheet: {summary.contact_sheet}"
    )


# --- train ------------------------------------------------------------------------------------
@main.command()
@data_option()
@out_option("Run directory (default runs/<backbone>-<task>-<time>).")
@click.option(
    "--resume",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Continue the run in this directory from its last checkpoint.",
)
@recipe_option()
@config_option()
@split_options(defaults=False)
@click.option(
    "--backbone",
    help="tf_efficientnet_lite0 (default), vgg16, resnet50, densenet121, efficientnet_b0, "
    "vit_small_patch16_224, uni, uni2-h, virchow2, h-optimus-0, midnight, any timm name, or "
    "hf-hub:ORG/NAME (a timm model on the Hugging Face hub).",
)
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
@quiet_option()
def train(data_path, out, resume, recipe, config_file, quiet, **flags):
    """Train a classifier: frozen EfficientNet-Lite0 features and a linear probe by default.

    By default every patient trains the shipped model, and the metrics shown are a patient-level
    cross-validated estimate (out-of-fold predictions of every patient, 95% CIs over patients).
    """
    from histolens.config import load_yaml_overrides, recipe_config
    from histolens.training import train as run_training

    if resume is None and data_path is None:
        raise click.UsageError("give --data PATH (or --resume RUN_DIR).")
    cfg = recipe_config(recipe)
    if config_file:
        cfg = cfg.override(load_yaml_overrides(config_file))
    mapping = {
        "magnification": "data.magnification",
        "task": "data.task",
        "val_fraction": "data.val_fraction",
        "test_fraction": "data.test_fraction",
        "seed": "data.seed",
        "group_by": "data.group_by",
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
        "patience": "train.early_stopping_patience",
        "threshold_method": "train.threshold_method",
        "target_sensitivity": "train.target_sensitivity",
        "alpha": "train.alpha",
        "accelerator": "train.accelerator",
        "devices": "train.devices",
        "strategy": "train.strategy",
        "num_nodes": "train.num_nodes",
        "precision": "train.precision",
    }
    overrides = {mapping[k]: v for k, v in flags.items() if v is not None}
    if flags.get("input_size") is not None:
        overrides["model.input_size"] = _parse_input_size(flags["input_size"])
    if data_path is not None:
        overrides["data.path"] = str(data_path)
    if flags.get("seed") is not None:
        overrides["train.seed"] = flags["seed"]
    cfg = cfg.override(overrides)
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
    from histolens.checkpoint import read_metadata
    from histolens.estimate import estimate_lines
    from histolens.metrics import HEADLINE_METRICS

    meta = read_metadata(result.checkpoint) if result.checkpoint.exists() else None
    estimate = meta.estimate if meta is not None else None
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
    img = result.metrics.get("image", {})
    if estimate:
        lines += estimate_lines(estimate)
        img = {}
    if img:
        ci = img.get("ci95", {})

        def fmt(key: str) -> str:
            v = img.get(key)
            if v is None:
                return "n/a"
            lo, hi = ci.get(key, (None, None))
            band = f" (95% CI {lo:.2f}-{hi:.2f})" if lo is not None and lo == lo else ""
            return f"{v:.3f}{band}"

        split = result.metrics.get("split", "test")
        lines.append(
            f"{split.capitalize()} split ({result.metrics['n_images']} images, "
            f"{result.metrics['n_patients']} patients):"
        )
        for key, name in HEADLINE_METRICS.items():
            if key in img:
                lines.append(f"  {name}: {fmt(key)}")
    shown = set((estimate or {}).get("warnings", []))
    for n in result.notes:
        if n not in shown:
            lines.append(f"note: {n}")
    report = result.run_dir / "report.html"
    if report.exists():
        lines.append(f"Report: {report}")
    return "\n".join(lines)


@main.command("cv")
@data_option(required=True)
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2))
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
def cv(data_path, folds, recipe, config_file, seed, **flags):
    """Patient-level k-fold cross-validation: mean and spread of AUC and patient metrics."""
    from histolens.config import load_yaml_overrides, recipe_config
    from histolens.crossval import cross_validate

    cfg = recipe_config(recipe)
    if config_file:
        cfg = cfg.override(load_yaml_overrides(config_file))
    mapping = {
        "magnification": "data.magnification",
        "task": "data.task",
        "backbone": "model.backbone",
        "pretrained": "model.pretrained",
        "epochs": "train.epochs",
        "lr": "train.lr",
        "stain_norm": "stain.method",
        "stain_augment": "augment.stain",
    }
    overrides = {mapping[k]: v for k, v in flags.items() if v is not None}
    cfg = cfg.override({**overrides, "data.path": str(data_path), "data.seed": seed})
    click.echo(
        f"{folds}-fold patient-level cross-validation of {cfg.model.backbone} on "
        f"{data_path} (magnification {cfg.data.magnification}, task {cfg.data.task})"
    )
    result = cross_validate(cfg, folds)
    for key, (mean, std) in result.summary().items():
        if mean == mean:  # NaN: no fold has this metric (e.g. ROC AUC of the subtype task)
            click.echo(f"  {key}: {mean:.3f} +/- {std:.3f}")
    click.echo(f"  ({result.seconds:.0f} s)")


# --- predict / evaluate / report --------------------------------------------------------------
@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("predictions.csv"),
    show_default=True,
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="Threads decoding images ahead of the model.",
)
@alpha_option()
@click.option("--quiet", is_flag=True, help="No progress.")
def predict(checkpoint, inputs, out, batch_size, workers, alpha, quiet):
    """Predict the class and calibrated probability of images or folders of images.

    Rows are written to OUT.partial batch by batch, and OUT appears when every image is done.
    Run an interrupted command again, with the same inputs and --out, and it continues where it
    stopped. Progress (images/s) goes to stderr.
    """
    from histolens.batch_predict import PredictionJob, ProgressReporter
    from histolens.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint)
    predictor.alpha = alpha
    job = PredictionJob.open(predictor, inputs, out)
    if job.already_done and not quiet:
        click.echo(
            f"Resuming {job.partial}: {job.already_done} of {job.total} images already predicted.",
            err=True,
        )
    try:
        with ProgressReporter(job.total, job.already_done, enabled=not quiet) as progress:
            summary = job.run(batch_size, workers, progress=progress.update)
    except KeyboardInterrupt:
        click.secho(
            f"interrupted; {job.partial} keeps the rows written so far (run the same command "
            "again to finish).",
            fg="yellow",
            err=True,
        )
        sys.exit(130)
    click.echo(
        f"{summary.rows} image(s) predicted with {predictor.backbone_name} "
        f"(threshold {predictor.threshold:.3f}): "
        + ", ".join(f"{c} {n}" for c, n in sorted(summary.labels.items()))
        + f"; {summary.uncertain} flagged for review. Written to {out}"
    )
    if summary.rows <= 20:
        for row in summary.first:
            flag = "  [review]" if row.uncertain else ""
            click.echo(f"  {Path(row.path).name}: {row.label} ({row.probability:.3f}){flag}")
    for s in summary.skipped:
        click.secho(f"skipped {s.path}: {s.reason}", fg="yellow", err=True)


@main.command()
@checkpoint_argument()
@data_option(help="Data to evaluate on (default: the data the run was trained on).")
@split_name_option(["test", "val", "all"], "test", help="Which images of the run's split.")
@out_option("Output folder (default: <run>/evaluation-<split>).", file_okay=False)
@magnification_option(
    help="Score only the images of this magnification (default: the run's own split as it is; "
    "of other data, the magnification the model was trained on, 'all' by default)."
)
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(0))
@alpha_option()
@quiet_option()
def evaluate(checkpoint, data_path, split_name, out, magnification, n_boot, alpha, quiet):
    """Metrics with patient-level CIs, plots, predictions.csv and an HTML report."""
    from histolens.estimate import build_estimate
    from histolens.evaluation import evaluate_checkpoint, records_for_evaluation, write_evaluation
    from histolens.performance import figure_lines, support_text

    ckpt, records, where = records_for_evaluation(checkpoint, data_path, split_name, magnification)
    result, skipped = evaluate_checkpoint(
        ckpt, records, n_boot=n_boot, progress=not quiet, alpha=alpha
    )
    result.metrics["split"] = split_name
    n_images, n_patients = result.metrics["n_images"], result.metrics["n_patients"]
    # The figures with their CIs and the patients of each class behind them: shown here, and
    # stored in metrics.json so that the report leads with the same.
    estimate = build_estimate(
        result,
        "'histolens evaluate' with the model's stored threshold and temperature",
        f"{n_images} images of {n_patients} patient groups: {where}",
        n_boot=n_boot,
        per_magnification_boot=min(n_boot, 500),
    )
    result.metrics["estimate"] = estimate
    if out is None:
        mag = "" if magnification in (None, "all") else f"-{magnification}x"
        out = ckpt.parent / f"evaluation-{split_name}{mag}"
    logs = ckpt.parent / "logs"
    write_evaluation(result, out, logs_dir=logs if logs.is_dir() else None, checkpoint=ckpt)
    # Whether the model saw these patients in training, evaluate cannot know of other data:
    # it says what the figures rest on and leaves that judgement to the reader.
    click.echo(f"Evaluated {support_text(estimate)}: {where}.")
    for line in figure_lines(estimate):
        click.echo(line)
    refer = result.metrics.get("refer") or {}
    if "coverage" in refer:
        click.echo(
            f"Prediction sets at alpha {refer['alpha']:g}: coverage {refer['coverage']:.3f} over "
            f"patients (target {refer['target_coverage']:.2f}); "
            f"{refer['refer_rate']:.1%} of the images referred."
        )
    elif alpha is not None and result.alpha is None:
        click.secho(
            "warning: --alpha has no effect: the checkpoint has no conformal calibration.",
            fg="yellow",
            err=True,
        )
    if refer.get("n_ood"):
        click.echo(f"{refer['n_ood']} image(s) not like the training images, counted apart.")
    for s in skipped:
        click.secho(f"skipped {s.path}: {s.reason}", fg="yellow", err=True)
    click.echo(f"Report: {out / 'report.html'}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(run_dir):
    """(Re)write RUN_DIR/report.html from the run's checkpoint, evaluation and explanations."""
    from histolens.report import write_report

    if not (run_dir / "best.safetensors").exists():
        raise click.UsageError(f"{run_dir} is not a run directory (no best.safetensors).")
    click.echo(f"Report: {write_report(run_dir)}")


# --- export -----------------------------------------------------------------------------------
@main.command("export")
@checkpoint_argument()
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["onnx"]),
    default="onnx",
    show_default=True,
    help="onnx: the whole classifier (tiling included) for ONNX Runtime, with its metadata.",
)
@click.option(
    "--quantize",
    type=click.Choice(["none", "int8"]),
    default="none",
    show_default=True,
    help="int8: ONNX Runtime static quantisation (QDQ), calibrated on the run's training images.",
)
@out_option(
    "The .onnx file (default: beside the checkpoint, best.onnx or best-int8.onnx).",
    dir_okay=False,
)
@click.option(
    "--calibration-images",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    help="Training images int8 calibration measures activation ranges on.",
)
@click.option(
    "--verify-images",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Validation images the export is compared with PyTorch on, at most.",
)
@quiet_option("No progress lines.")
def export(checkpoint, export_format, quantize, out, calibration_images, verify_images, quiet):
    """Export a model for ONNX Runtime; it is checked against PyTorch before it is written.

    The .onnx file then goes wherever a checkpoint goes (predict, evaluate, serve, gui).
    """
    from histolens.export import FP32_TOLERANCE, INT8_AUC_TOLERANCE, export_onnx

    result = export_onnx(
        checkpoint,
        out,
        quantize,
        calibration_images=calibration_images,
        verify_images=verify_images,
        progress=None if quiet else (lambda line: click.echo(f"{line} ...", err=True)),
    )
    click.echo(
        f"Wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, "
        f"{'fp32' if quantize == 'none' else quantize}) from {result.source} in "
        f"{result.seconds:.0f} s."
    )
    check = (
        f"Verified on {result.images_from}: largest probability change "
        f"{result.max_probability_change:.4f}"
    )
    if result.auc_drop is None:
        click.echo(f"{check} (at most {FP32_TOLERANCE} allowed).")
    else:
        click.echo(
            f"{check}; AUC {result.auc_torch:.4f} -> {result.auc_onnx:.4f} (drop "
            f"{result.auc_drop:.4f}, at most {INT8_AUC_TOLERANCE} allowed; calibrated on "
            f"{result.n_calibration} training images)."
        )


def _register_front_ends() -> None:
    # Each front end keeps its click command (light imports only) in its own subpackage.
    from histolens.explain.cli import explain_command
    from histolens.gui.cli import gui_command
    from histolens.web.cli import serve_command

    main.add_command(explain_command, "explain")
    main.add_command(gui_command, "gui")
    main.add_command(serve_command, "serve")


_register_front_ends()

if __name__ == "__main__":
    main()
