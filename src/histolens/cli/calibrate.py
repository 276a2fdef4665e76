"""``histolens calibrate``: a trained model's operating point chosen again (light imports)."""

from __future__ import annotations

import click

from histolens.cli.options import checkpoint_argument, magnification_thresholds_option


@click.command("calibrate")
@checkpoint_argument()
@click.option(
    "--operating-point",
    required=True,
    help="youden, sensitivity:0.95 (screening: few cancers missed) or specificity:0.95 "
    "(confirmation: few benign cases called malignant); thresholds per magnification, chosen "
    "as --magnification-thresholds says.",
)
@magnification_thresholds_option("as the checkpoint chose")
def calibrate_command(checkpoint, operating_point, magnification_thresholds):
    """Choose the decision threshold per magnification again from the stored out-of-fold
    predictions, and rewrite the checkpoint (no retraining)."""
    from histolens.evaluation.estimate import estimate_lines
    from histolens.training.recalibrate import recalibrate_checkpoint

    result = recalibrate_checkpoint(checkpoint, operating_point, magnification_thresholds)
    way = (
        f"; thresholds per magnification {result.before.method} -> {result.after.method}"
        if result.before.method != result.after.method
        else f"; thresholds per magnification {result.after.method}"
    )
    click.echo(
        f"Rewrote {result.checkpoint}: operating point {result.before.rule} -> "
        f"{result.after.rule}{way}."
    )
    for row in result.after.table():
        old = result.before.threshold_for(row["magnification"])
        click.echo(
            f"  {row['magnification']}: threshold {old:.3f} -> {row['threshold']:.3f} "
            f"({row['basis']}; {row['benign_patients']} benign and "
            f"{row['malignant_patients']} malignant patients)"
        )
    click.echo(f"  other magnifications: threshold {result.after.pooled:.3f} (pooled)")
    if result.estimate is not None:
        for line in estimate_lines(result.estimate):
            click.echo(line)
    for note in result.notes:
        click.echo(f"note: {note}")
