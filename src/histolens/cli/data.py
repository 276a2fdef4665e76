"""``histolens data``: inspect image folders and make synthetic practice data.

Registered on the main group by ``histolens.cli.commands``; heavy imports live inside the commands.
"""

from __future__ import annotations

from pathlib import Path

import click

from histolens.cli.options import (
    float_option,
    magnification_option,
    quiet_option,
    seed_option,
    split_options,
)

__all__ = ["data_group"]


@click.group("data")
def data_group() -> None:
    """Inspect image folders and make synthetic practice data."""


@data_group.command("summary")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@split_options()
def data_summary(path, magnification, task, val_fraction, test_fraction, seed, group_by):
    """Images per class, subtype, magnification and patient group, and the split training uses."""
    from histolens.data.summary import render_summary

    click.echo(
        render_summary(path, magnification, task, val_fraction, test_fraction, seed, group_by)
    )


@data_group.command("audit")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@magnification_option("all")
@float_option(
    "--threshold", 0.70, "Grouped cross-validated AUC at which an attribute is flagged.", 0.5, 1.0
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
    from histolens.data.audit import audit_dataset

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


@data_group.command("synth")
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
@click.option(
    "--slides",
    default=0,
    type=click.IntRange(0, 1000),
    help="Write this many synthetic whole slides (pyramidal TIFF) with planted lesions and their "
    "truth masks under OUT/slides instead of the tile dataset.",
)
@click.option(
    "--slide-size",
    default="8192x6144",
    show_default=True,
    help="Level-0 WIDTHxHEIGHT of each synthetic slide.",
)
def data_synth(out, n, seed, magnification, patients, slides, slide_size):
    """Write a synthetic H&E-like dataset (BreakHis names, lesion masks, a contact sheet).

    With --slides N: N synthetic whole slides at the --magnification's scale instead, with the
    tissue and lesion masks that 'histolens slide coverage' scores heatmaps against. With
    --patients P too: a cohort for 'train --slides' (half the patients with one lesion of 1%-20%
    of the tissue in each slide, the others none) and its labels.csv.
    """
    if slides:
        from histolens.slides.synthetic import write_synthetic_slides
        from histolens.slides.synthetic_cohort import write_slide_cohort

        try:
            w, h = (int(v) for v in slide_size.lower().split("x"))
        except ValueError:
            raise click.BadParameter(
                "expected WIDTHxHEIGHT, e.g. 8192x6144", param_hint="--slide-size"
            ) from None
        if patients:
            written = write_slide_cohort(out, slides, patients, seed, (w, h), int(magnification))
        else:
            written = write_synthetic_slides(out, slides, seed, (w, h), int(magnification))
        click.echo(
            f"Wrote {len(written.slides)} slide(s) to {written.folder}; truth in {written.manifest}"
        )
        return
    from histolens.data.synth import generate_synthetic
    from histolens.progress import progress_bar

    with progress_bar(n, "Synthesising", "img") as bar:
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
