"""The ``histolens`` command line. Heavy imports live inside the commands so --help is instant."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click

from histolens.cli.mil import features_from_option, predict_slides_if_mil
from histolens.cli.options import (
    MAGNIFICATIONS,
    alpha_option,
    checkpoint_argument,
    count_option,
    data_option,
    engine_option,
    magnification_option,
    onnx_runtime_option,
    out_option,
    path_option,
    patient_from_option,
    quiet_option,
    split_name_option,
)
from histolens.errors import HistolensError
from histolens.rundir import EvaluationFiles, RunDir


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
            # Only a training run has a checkpoint to resume from; other commands just stop
            # (what they write is written atomically: nothing half-written is left).
            message = (
                "interrupted; the last good checkpoint is intact (train --resume RUN_DIR "
                "continues)."
                if ctx.invoked_subcommand == "train"
                else f"interrupted; {ctx.invoked_subcommand or 'histolens'} stopped before it "
                "finished."
            )
            click.secho(message, fg="yellow", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="histolens")
def main() -> None:
    """histolens: train, evaluate, explain and serve breast-histopathology classifiers.

    Research and education use only; not for diagnosis.
    """


# --- predict / evaluate / report --------------------------------------------------------------
@main.command()
@checkpoint_argument()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("predictions.csv"),
    show_default=True,
)
@count_option("--batch-size", 32)
@count_option("--workers", 2, help="Threads decoding images ahead of the model.")
@alpha_option()
@magnification_option(
    help="Magnification of every image, for prediction sets calibrated per magnification "
    "(default: read from each file name or folder, else the most cautious calibration).",
    choices=MAGNIFICATIONS,
)
@onnx_runtime_option()
@engine_option()
@patient_from_option()
@features_from_option()
@quiet_option("No progress.")
def predict(
    checkpoint,
    inputs,
    out,
    batch_size,
    workers,
    alpha,
    magnification,
    onnx_runtime,
    engine,
    patient_from,
    features_from,
    quiet,
):
    """Predict the class and calibrated probability of images or folders of images (of slides
    or feature bags, with attention heatmaps, given a MIL checkpoint from 'train --slides').

    Rows go to OUT.partial batch by batch; OUT appears when every image is done. Run an
    interrupted command again (same inputs and --out) to continue. Progress goes to stderr.
    """
    from histolens.inference.batch import PredictionJob, ProgressReporter
    from histolens.inference.patients import check_patient_pattern
    from histolens.inference.predictor import Predictor

    if predict_slides_if_mil(
        checkpoint, inputs, out, alpha, features_from, quiet, batch_size, workers
    ):
        return
    pattern = check_patient_pattern(patient_from)
    predictor = Predictor.from_checkpoint(checkpoint, runtime=onnx_runtime)
    predictor.use_engine(engine)
    predictor.alpha = alpha
    magnification = int(magnification) if magnification else None
    job = PredictionJob.open(predictor, inputs, out, magnification)
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
    _write_prediction_patients(out, predictor, magnification, pattern)


def _write_prediction_patients(out: Path, predictor, magnification, pattern) -> None:
    """patients.csv beside ``out`` when the images carry patient ids (binary models)."""
    from histolens.inference.patients import prediction_patient_rows, write_patients_csv

    rows = prediction_patient_rows(out, predictor, magnification, pattern)
    if rows:
        path = write_patients_csv(rows, out.with_name("patients.csv"))
        referred = sum(r.refer for r in rows)
        click.echo(
            f"{len(rows)} patient(s) decided ({referred} referred: their images disagree). "
            f"Written to {path}"
        )


@main.command()
@checkpoint_argument()
@data_option(help="Data to evaluate on (default: the data the run was trained on).")
@split_name_option(["test", "val", "all"], "test", help="Which images of the run's split.")
@out_option("Output folder (default: <run>/evaluation-<split>).", file_okay=False)
@magnification_option(
    help="Score only the images of this magnification (default: the run's own split as it is; "
    "of other data, the magnification the model was trained on, 'all' by default)."
)
@count_option("--n-boot", 1000, minimum=0)
@alpha_option()
@click.option(
    "--adapt-bn",
    is_flag=True,
    help="First re-estimate the backbone's batch-norm statistics on these images (AdaBN, no "
    "labels used): for a cohort from another lab. On new patients of the training lab it lowered "
    "the AUC (benchmarks/generalisation.py), so leave it off there.",
)
@onnx_runtime_option()
@engine_option()
@patient_from_option()
@quiet_option()
def evaluate(
    checkpoint,
    data_path,
    split_name,
    out,
    magnification,
    n_boot,
    alpha,
    adapt_bn,
    onnx_runtime,
    engine,
    patient_from,
    quiet,
):
    """Metrics with patient-level CIs, plots, predictions.csv and an HTML report."""
    from histolens.evaluation.estimate import build_estimate
    from histolens.evaluation.evaluate import (
        evaluate_checkpoint,
        records_for_evaluation,
        write_evaluation,
    )
    from histolens.evaluation.performance import figure_lines, support_text
    from histolens.report.build import write_report

    ckpt, records, where = records_for_evaluation(checkpoint, data_path, split_name, magnification)
    result, skipped = evaluate_checkpoint(
        ckpt,
        records,
        n_boot=n_boot,
        progress=not quiet,
        alpha=alpha,
        adapt_batchnorm=adapt_bn,
        runtime=onnx_runtime,
        engine=engine,
    )
    if adapt_bn:
        click.echo(f"Batch-norm statistics adapted to these {len(records)} images (AdaBN).")
    result.metrics = replace(result.metrics, split=split_name)
    n_images, n_patients = result.metrics.n_images, result.metrics.n_patients
    # The figures with their CIs and the patients of each class behind them: shown here, and
    # stored in metrics.json so that the report leads with the same.
    estimate = build_estimate(
        result,
        "'histolens evaluate' with the model's stored threshold and temperature",
        f"{n_images} images of {n_patients} patient groups: {where}",
        n_boot=n_boot,
        per_magnification_boot=min(n_boot, 500),
    )
    result.metrics = replace(result.metrics, estimate=estimate)
    if out is None:
        mag = "" if magnification in (None, "all") else f"-{magnification}x"
        out = ckpt.parent / f"evaluation-{split_name}{mag}"
    logs = RunDir(ckpt.parent).logs
    write_evaluation(result, out, logs_dir=logs if logs.is_dir() else None)
    if patient_from:  # patients by the user's pattern instead of the records' ids
        from histolens.evaluation.evaluate import write_patients
        from histolens.inference.patients import check_patient_pattern

        write_patients(result, EvaluationFiles(out).patients, check_patient_pattern(patient_from))
    write_report(out, evaluation_dir=out, checkpoint=ckpt)
    # Whether the model saw these patients in training, evaluate cannot know of other data:
    # it says what the figures rest on and leaves that judgement to the reader.
    click.echo(f"Evaluated {support_text(estimate)}: {where}.")
    for line in figure_lines(estimate):
        click.echo(line)
    _echo_referrals(result, alpha, skipped)
    click.echo(f"Report: {out / 'report.html'}")


def _echo_referrals(result, alpha, skipped) -> None:
    """What ``evaluate`` says after the figures: prediction sets, unusual and skipped images."""
    refer = result.metrics.refer
    if refer is not None and refer.coverage is not None:
        click.echo(
            f"Prediction sets at alpha {refer.alpha:g}: coverage {refer.coverage:.3f} over "
            f"patients (target {refer.target_coverage:.2f}); "
            f"{refer.refer_rate:.1%} of the images referred."
        )
    elif alpha is not None and result.alpha is None:
        click.secho(
            "warning: --alpha has no effect: the checkpoint has no conformal calibration.",
            fg="yellow",
            err=True,
        )
    if refer is not None and refer.n_ood:
        click.echo(f"{refer.n_ood} image(s) not like the training images, counted apart.")
    for s in skipped:
        click.secho(f"skipped {s.path}: {s.reason}", fg="yellow", err=True)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(run_dir):
    """(Re)write RUN_DIR/report.html from the run's checkpoint, evaluation and explanations."""
    from histolens.report.build import write_report

    if not RunDir(run_dir).checkpoint.exists():
        raise click.UsageError(f"{run_dir} is not a run directory (no {RunDir.CHECKPOINT}).")
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
    help="int8: ONNX Runtime static quantisation of the convolutions (QDQ), calibrated on the "
    "run's training images, checked against fp32 on unseen patients.",
)
@out_option(
    "The .onnx file (default: beside the checkpoint, best.onnx or best-int8.onnx).",
    dir_okay=False,
)
@count_option(
    "--calibration-images",
    64,
    help="Training images int8 calibration measures activation ranges on.",
)
@count_option(
    "--verify-images",
    256,
    help="Images the export is checked on, at most (fp32: validation images against PyTorch; "
    "int8: images of unseen patients against the fp32 export).",
)
@path_option(
    "--verify-data",
    exists=True,
    help="int8: labelled images of patients the model was not fitted on (folder or CSV "
    "manifest) to check the int8 export on; default: the run's held-out patients, or per-fold "
    "refits of a cross-validated probe (docs/int8-guard.md).",
)
@quiet_option("No progress lines.")
def export(
    checkpoint, export_format, quantize, out, calibration_images, verify_images, verify_data, quiet
):
    """Export a model for ONNX Runtime; it is checked before it is written.

    fp32 is compared with PyTorch; int8 with the fp32 export on patients the model was not
    fitted on. The .onnx file then goes wherever a checkpoint goes (predict, evaluate, serve,
    gui).
    """
    from histolens.export.onnx import FP32_TOLERANCE, INT8_AUC_TOLERANCE, export_onnx

    result = export_onnx(
        checkpoint,
        out,
        quantize,
        calibration_images=calibration_images,
        verify_images=verify_images,
        verify_data=verify_data,
        progress=None if quiet else (lambda line: click.echo(f"{line} ...", err=True)),
    )
    click.echo(
        f"Wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, "
        f"{'fp32' if quantize == 'none' else quantize}) from {result.source} in "
        f"{result.seconds:.0f} s."
    )
    check = result.int8_check
    if check is None:
        click.echo(
            f"Verified against PyTorch on {result.images_from}: largest probability change "
            f"{result.max_probability_change:.4f} (at most {FP32_TOLERANCE} allowed)."
        )
    else:
        lo, hi = check.drop_ci
        click.echo(
            f"Verified against fp32 on {check.images_from}: image AUC {check.auc_fp32:.4f} -> "
            f"{check.auc_int8:.4f} (drop {check.drop:.4f}, 95% CI over patients {lo:.4f} to "
            f"{hi:.4f}; at most {INT8_AUC_TOLERANCE} allowed), largest probability change "
            f"{check.max_probability_change:.4f}; calibrated on {result.n_calibration} "
            "training images."
        )


def _register_commands() -> None:
    # The data and training commands, and each front end, keep their click commands (light
    # imports only) in their own modules.
    from histolens.cli.calibrate import calibrate_command
    from histolens.cli.data import data_group
    from histolens.cli.explain import explain_command
    from histolens.cli.gui import gui_command
    from histolens.cli.slide import slide_group
    from histolens.cli.train import cv_command, train_command
    from histolens.cli.web import serve_command

    main.add_command(data_group, "data")
    main.add_command(train_command, "train")
    main.add_command(cv_command, "cv")
    main.add_command(calibrate_command, "calibrate")
    main.add_command(explain_command, "explain")
    main.add_command(slide_group, "slide")
    main.add_command(gui_command, "gui")
    main.add_command(serve_command, "serve")


_register_commands()

if __name__ == "__main__":
    main()
