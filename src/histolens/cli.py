"""The ``histolens`` command line. Heavy imports live inside the commands so --help is instant."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from histolens.errors import HistolensError

MAGNIFICATION_CHOICES = ["40", "100", "200", "400", "all"]


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


def _split_options(f):
    for opt in reversed(
        [
            click.option(
                "--magnification",
                "-m",
                default="all",
                show_default=True,
                type=click.Choice(MAGNIFICATION_CHOICES, case_sensitive=False),
            ),
            click.option(
                "--task",
                default="binary",
                show_default=True,
                type=click.Choice(["binary", "subtype"]),
            ),
            click.option("--val-fraction", default=0.15, show_default=True, type=float),
            click.option("--test-fraction", default=0.15, show_default=True, type=float),
            click.option(
                "--seed",
                default=42,
                show_default=True,
                type=int,
                help="Seed of the patient-level split.",
            ),
            click.option(
                "--group-by",
                default="group",
                show_default=True,
                type=click.Choice(["group", "patient"]),
                help="Keep patient groups (numeric id core) or exact patient ids together.",
            ),
        ]
    ):
        f = opt(f)
    return f


@data.command("summary")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@_split_options
def data_summary(path, magnification, task, val_fraction, test_fraction, seed, group_by):
    """Images per class, subtype, magnification and patient group, and the split training uses."""
    from histolens.summary import render_summary

    click.echo(
        render_summary(path, magnification, task, val_fraction, test_fraction, seed, group_by)
    )


@data.command("audit")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--magnification",
    "-m",
    default="all",
    show_default=True,
    type=click.Choice(MAGNIFICATION_CHOICES, case_sensitive=False),
)
@click.option(
    "--threshold",
    default=0.70,
    show_default=True,
    type=click.FloatRange(0.5, 1.0),
    help="Grouped cross-validated AUC at which an attribute is flagged.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the grouped folds.")
@click.option(
    "--colour/--no-colour",
    default=True,
    show_default=True,
    help="Decode a thumbnail per image for the colour attributes (--no-colour: headers only).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
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
@click.option("--seed", default=0, show_default=True, type=int)
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
@click.option(
    "--data",
    "data_path",
    type=click.Path(exists=True, path_type=Path),
    help="Image folder (any supported layout) or CSV manifest.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Run directory (default runs/<backbone>-<task>-<time>).",
)
@click.option(
    "--resume",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Continue the run in this directory from its last checkpoint.",
)
@click.option(
    "--recipe",
    type=click.Choice(["default", "original"]),
    default="default",
    show_default=True,
    help="'original' is the student project's recipe exactly.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, path_type=Path),
    help="YAML file of overrides (sections data/model/augment/stain/train).",
)
@click.option(
    "--magnification", "-m", type=click.Choice(MAGNIFICATION_CHOICES, case_sensitive=False)
)
@click.option("--task", type=click.Choice(["binary", "subtype"]))
@click.option(
    "--backbone",
    help="tf_efficientnet_lite0 (default), vgg16, resnet50, densenet121, efficientnet_b0, "
    "vit_small_patch16_224, or any timm name.",
)
@click.option("--pretrained", help="imagenet (default), none, or a weights file.")
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
@click.option("--epochs", type=click.IntRange(1))
@click.option("--batch-size", type=click.IntRange(1))
@click.option("--lr", type=float)
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]))
@click.option("--unfreeze", type=click.IntRange(0), help="Also train the last N backbone stages.")
@click.option("--augment/--no-augment", default=None)
@click.option("--stain-norm", type=click.Choice(["none", "macenko", "reinhard"]))
@click.option("--stain-reference", type=click.Path(exists=True, dir_okay=False))
@click.option("--stain-augment/--no-stain-augment", default=None)
@click.option(
    "--feature-cache/--no-feature-cache",
    default=None,
    help="Frozen backbone: compute features once for K views (default on).",
)
@click.option("--cache-views", type=click.IntRange(1), help="K augmented views per image.")
@click.option("--class-weights/--no-class-weights", default=None)
@click.option("--patience", type=click.IntRange(1), help="Early-stopping patience (epochs).")
@click.option("--val-fraction", type=float)
@click.option("--test-fraction", type=float)
@click.option("--seed", type=int)
@click.option("--group-by", type=click.Choice(["group", "patient"]))
@click.option("--threshold-method", type=click.Choice(["youden", "sensitivity", "fixed"]))
@click.option("--target-sensitivity", type=float)
@click.option("--accelerator", help="auto, cpu, gpu (Lightning).")
@click.option("--devices", help="Number of devices or 'auto'.")
@click.option("--precision", help="Lightning precision, e.g. 32-true, 16-mixed, bf16-mixed.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
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
        "accelerator": "train.accelerator",
        "devices": "train.devices",
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
        import time

        out = (
            Path("runs") / f"{cfg.model.backbone}-{cfg.data.task}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
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

    meta = read_metadata(result.checkpoint) if result.checkpoint.exists() else {}
    if result.epochs_run:
        trained = (
            f"(epoch {result.best_epoch + 1}, validation loss {result.best_val_loss:.4f}); "
            f"{result.epochs_run} epochs in {result.seconds:.1f} s"
        )
        if result.first_epoch:
            trained += f" (resumed after epoch {result.first_epoch})"
    else:
        train_part = meta.get("data", {}).get("split", {}).get("train", {})
        trained = (
            f"(linear probe fitted on {train_part.get('images', '?')} images of "
            f"{train_part.get('groups', '?')} patient groups, "
            f"C={meta.get('probe', {}).get('C', float('nan')):g}); {result.seconds:.1f} s"
        )
    lines = [f"Run: {result.run_dir}", f"Checkpoint: {result.checkpoint} {trained}"]
    img = result.metrics.get("image", {})
    if meta.get("estimate"):
        lines += estimate_lines(meta["estimate"])
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
        for key, name in (
            ("roc_auc", "ROC AUC"),
            ("balanced_accuracy", "balanced accuracy"),
            ("sensitivity", "sensitivity"),
            ("specificity", "specificity"),
            ("patient_recognition_rate", "patient recognition rate"),
            ("patient_auc", "patient-level AUC"),
            ("accuracy", "accuracy"),
            ("macro_f1", "macro F1"),
        ):
            if key in img:
                lines.append(f"  {name}: {fmt(key)}")
    shown = set(meta.get("estimate", {}).get("warnings", []))
    for n in result.notes:
        if n not in shown:
            lines.append(f"note: {n}")
    report = result.run_dir / "report.html"
    if report.exists():
        lines.append(f"Report: {report}")
    return "\n".join(lines)


@main.command("cv")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2))
@click.option(
    "--recipe", type=click.Choice(["default", "original"]), default="default", show_default=True
)
@click.option("--config", "config_file", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--magnification", "-m", type=click.Choice(MAGNIFICATION_CHOICES, case_sensitive=False)
)
@click.option("--task", type=click.Choice(["binary", "subtype"]))
@click.option("--backbone")
@click.option("--pretrained")
@click.option("--epochs", type=click.IntRange(1))
@click.option("--lr", type=float)
@click.option("--stain-norm", type=click.Choice(["none", "macenko", "reinhard"]))
@click.option("--stain-augment/--no-stain-augment", default=None)
@click.option("--seed", type=int, default=42, show_default=True)
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
@click.option("--quiet", is_flag=True)
def predict(checkpoint, inputs, out, batch_size, quiet):
    """Predict the class and calibrated probability of images or folders of images."""
    import csv
    from collections import Counter

    from tqdm.auto import tqdm

    from histolens.atomic import atomic_open
    from histolens.imageio import is_image_name
    from histolens.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint)
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            paths += sorted(
                p
                for p in item.rglob("*")
                if p.is_file() and is_image_name(p) and "masks" not in p.relative_to(item).parts
            )
        else:
            paths.append(item)
    if not paths:
        raise click.UsageError("no image files found in the given inputs.")
    with tqdm(total=len(paths), desc="Predicting", unit="img", disable=quiet) as bar:
        preds, skipped = predictor.predict_paths(paths, batch_size, progress=bar.update)
    with atomic_open(out, "w", newline="", encoding="utf-8") as fh:
        writer = None
        for p in preds:
            row = p.as_row()
            if writer is None:
                writer = csv.DictWriter(fh, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
    counts = Counter(p.label for p in preds)
    uncertain = sum(p.uncertain for p in preds)
    click.echo(
        f"{len(preds)} image(s) predicted with {predictor.backbone_name} "
        f"(threshold {predictor.threshold:.3f}): "
        + ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
        + f"; {uncertain} flagged for review. Written to {out}"
    )
    if len(preds) <= 20:
        for p in preds:
            flag = "  [review]" if p.uncertain else ""
            click.echo(f"  {Path(p.path).name}: {p.label} ({p.probability:.3f}){flag}")
    for s in skipped:
        click.secho(f"skipped {s.path}: {s.reason}", fg="yellow", err=True)


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--data",
    "data_path",
    type=click.Path(exists=True, path_type=Path),
    help="Data to evaluate on (default: the data the run was trained on).",
)
@click.option(
    "--split",
    "split_name",
    type=click.Choice(["test", "val", "all"]),
    default="test",
    show_default=True,
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (default: <run>/evaluation-<split>).",
)
@click.option(
    "--magnification",
    "-m",
    type=click.Choice(MAGNIFICATION_CHOICES, case_sensitive=False),
    default=None,
    help="Score only the images of this magnification (default: the run's own split as it is; "
    "of other data, the magnification the model was trained on, 'all' by default).",
)
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(0))
@click.option("--quiet", is_flag=True)
def evaluate(checkpoint, data_path, split_name, out, magnification, n_boot, quiet):
    """Metrics with patient-level CIs, plots, predictions.csv and an HTML report."""
    from histolens.estimate import build_estimate
    from histolens.evaluation import evaluate_checkpoint, records_for_evaluation, write_evaluation
    from histolens.performance import figure_lines, support_text

    ckpt, records, where = records_for_evaluation(checkpoint, data_path, split_name, magnification)
    result, skipped = evaluate_checkpoint(ckpt, records, n_boot=n_boot, progress=not quiet)
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
