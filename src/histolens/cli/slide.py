"""``histolens slide``: predict on whole-slide images, merge the cohort table, explain tiles.

Registered by the main CLI; heavy imports (torch, openslide, h5py) stay inside the commands so
``histolens --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from histolens.cli.options import (
    checkpoint_argument,
    count_option,
    onnx_runtime_option,
    path_option,
    quiet_option,
)

__all__ = ["slide_group"]

_MPP_HELP = (
    "The slide's microns per level-0 pixel, where its metadata lacks it or is wrong "
    "(needed for PNG/JPEG)."
)


@click.group("slide")
def slide_group() -> None:
    """Whole-slide images (SVS, NDPI, MRXS, tiled TIFF, DICOM; PNG/JPEG with --mpp)."""


@slide_group.command("predict")
@checkpoint_argument()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--mpp", type=float, default=None, help=_MPP_HELP)
@click.option(
    "--tile-mpp",
    type=float,
    default=None,
    help="Microns per pixel of the model input (default: the checkpoint's training scale).",
)
@click.option(
    "--tile-size",
    type=int,
    default=None,
    help="Square tiles of this many pixels at the tile scale, resized to the model input "
    "(default: the model input's own size and shape).",
)
@click.option(
    "--min-tissue",
    type=float,
    default=0.5,
    show_default=True,
    help="Tiles with a smaller share of tissue are skipped.",
)
@click.option(
    "--overlap",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of a tile its neighbour overlaps.",
)
@count_option("--batch-size", 32)
@count_option(
    "--workers", 2, help="DataLoader processes reading tiles; each opens the slide once.", minimum=0
)
@click.option(
    "--save-features",
    is_flag=True,
    help="Also store each tile's pooled backbone features (h5 'features', N x D).",
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Tiles at or above it go to the GeoJSON (default: the checkpoint's).",
)
@click.option(
    "--score-class",
    default=None,
    help="The class the heatmap shows (default: the positive class of a binary model).",
)
@count_option("--top-k", 10, help="Tiles averaged for the slide's top-k score.")
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Take only every N-th slide from the I-th (I = 0..N-1), for job arrays.",
)
@onnx_runtime_option()
@quiet_option("No progress bar.")
def slide_predict(
    checkpoint,
    inputs,
    out,
    mpp,
    tile_mpp,
    tile_size,
    min_tissue,
    overlap,
    batch_size,
    workers,
    save_features,
    threshold,
    score_class,
    top_k,
    shard,
    onnx_runtime,
    quiet,
):
    """Score the tissue of slides tile by tile: HDF5, heatmap, mask, GeoJSON, slides.csv.

    Slides already done with this checkpoint are skipped, and a slide stopped part way resumes
    at its next batch: run the same command again. With --shard, each job writes only its
    slides' files; 'histolens slide merge OUT' then builds slides.csv.
    """
    from histolens.inference.predictor import Predictor
    from histolens.slides.predict import SlideRun, find_slides, shard_slides

    part = _shard(shard)
    options = _slide_options("save_features", "threshold", "top_k")
    slides = shard_slides(find_slides(inputs), part)
    predictor = Predictor.from_checkpoint(checkpoint, runtime=onnx_runtime)
    run = SlideRun(predictor, out, options, progress=not quiet)
    click.echo(
        f"{len(slides)} slide(s); tiles of {run.scale.field_um[0]:.0f} x "
        f"{run.scale.field_um[1]:.0f} um at {run.scale.mpp:.3f} um/px ({run.scale.source}).",
        err=True,
    )
    click.echo(
        f"Tiles decided as {run.operating_point.label}: {run.operating_point.description}.",
        err=True,
    )
    log = _SlideLog()
    try:
        run.run(slides, log)
    except KeyboardInterrupt:
        click.secho(
            "interrupted; finished slides are kept and the current one resumes at its next "
            "batch: run the same command again.",
            fg="yellow",
            err=True,
        )
        raise SystemExit(130) from None
    _finish(out, part)
    if log.failed:
        raise SystemExit(1)


def _shard(text: str | None) -> tuple[int, int] | None:
    """--shard I/N parsed, or None for every slide."""
    from histolens.slides.predict import parse_shard

    return parse_shard(text) if text else None


_TILING = ("tile_mpp", "tile_size", "min_tissue", "overlap", "batch_size", "workers", "score_class")


def _slide_options(*extra: str):
    """The command's SlideOptions: --mpp (the slide's own scale), the tiling options shared by
    'predict' and 'features', and the ``extra`` options of this command."""
    from histolens.slides.predict import SlideOptions

    params = click.get_current_context().params
    return SlideOptions(slide_mpp=params["mpp"], **{name: params[name] for name in _TILING + extra})


class _SlideLog:
    """One line per slide on stderr; remembers the slides that could not be read."""

    def __init__(self) -> None:
        self.failed: list[Path] = []

    def __call__(self, summary, path: Path, note: str | None) -> None:
        if summary is None:
            colour = "yellow" if note and "already done" not in note else None
            if colour:
                self.failed.append(path)
            click.secho(f"{path.name}: skipped: {note}", fg=colour, err=True)
            return
        rate = summary.tiles_scored / summary.seconds if summary.seconds > 0 else 0.0
        click.echo(
            f"{summary.slide}: {summary.tiles_scored} tiles in {summary.seconds:.1f} s "
            f"({rate:.1f} tiles/s), {summary.tissue_mm2:.2f} mm2 tissue, score mean "
            f"{summary.score_mean:.3f} max {summary.score_max:.3f} top-{summary.top_k} "
            f"{summary.score_topk_mean:.3f}, {summary.tiles_above_threshold} tiles >= "
            f"{summary.threshold:.3f}, {summary.tiles_ood} unlike training",
            err=True,
        )


def _finish(out: Path, part: tuple[int, int] | None) -> None:
    """Write slides.csv after a whole run; after one shard, say how to build it."""
    from histolens.slides.outputs import merge_summaries

    if part is None:
        table, rows = merge_summaries(out)
        click.echo(f"{rows} slide(s) in {table}")
    else:
        click.echo(
            f"Shard {part[0]}/{part[1]} done; 'histolens slide merge {out}' builds slides.csv."
        )


@slide_group.command("merge")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def slide_merge(out):
    """Build OUT/slides.csv from every slide's summary (after sharded runs)."""
    from histolens.slides.outputs import merge_summaries

    table, rows = merge_summaries(out)
    click.echo(f"{rows} slide(s) in {table}")


def _point(text: str) -> tuple[int, int]:
    try:
        x, y = (int(float(v)) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected X,Y in level-0 pixels, not {text!r}") from None
    return x, y


@slide_group.command("explain")
@checkpoint_argument()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option(
    "--at",
    "points",
    multiple=True,
    metavar="X,Y",
    help="Level-0 top-left corner of a tile to explain (repeatable).",
)
@count_option(
    "--top",
    None,
    help="Explain the N highest-scoring tiles of a 'slide predict' output (--results).",
)
@path_option(
    "--results",
    exists=True,
    file_okay=False,
    help="The --out folder of 'histolens slide predict' (for --top).",
)
@click.option("--method", default="gradcam", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--mpp", type=float, default=None, help=_MPP_HELP)
@click.option("--tile-mpp", type=float, default=None)
@click.option("--tile-size", type=int, default=None)
def slide_explain(checkpoint, slide, points, top, results, method, out, mpp, tile_mpp, tile_size):
    """Grad-CAM (or another method) on chosen tiles of a slide, at the tile's full resolution."""
    from histolens.slides.explain import explain_tiles, top_tiles

    if bool(points) == (top is not None):
        raise click.UsageError("Give either --at X,Y (one or more) or --top N.")
    if top is not None:
        if results is None:
            raise click.UsageError("--top needs --results, the folder of 'slide predict'.")
        corners = top_tiles(results, Path(slide).stem, top)
    else:
        corners = [_point(p) for p in points]
    for line in explain_tiles(checkpoint, slide, corners, out, method, mpp, tile_mpp, tile_size):
        click.echo(line)


@slide_group.command("coverage")
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("slides", type=click.Path(exists=True, file_okay=False, path_type=Path))
def slide_coverage(results, slides):
    """How well RESULTS (of 'slide predict') find the lesions planted in synthetic SLIDES
    ('histolens data synth --slides N' writes OUT/slides): the share of the lesion area covered
    by tiles at or above the threshold, and the share of the other tissue covered."""
    from histolens.slides.synthetic import coverage_of

    rows = coverage_of(results, slides)
    for r in rows:
        click.echo(
            f"{r['slide']}: lesion covered {r['lesion_covered']:.1%}, other tissue covered "
            f"{r['other_tissue_covered']:.1%}"
        )
    if len(rows) > 1:
        lesion = sum(r["lesion_covered"] for r in rows) / len(rows)
        other = sum(r["other_tissue_covered"] for r in rows) / len(rows)
        click.echo(f"mean of {len(rows)} slides: lesion {lesion:.1%}, other tissue {other:.1%}")


@slide_group.command("features")
@checkpoint_argument()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--mpp", type=float, default=None, help=_MPP_HELP)
@click.option("--tile-mpp", type=float, default=None, help="Microns per pixel of the model input.")
@click.option("--tile-size", type=int, default=None, help="Square tiles of N pixels.")
@click.option("--min-tissue", type=float, default=0.5, show_default=True)
@click.option("--overlap", type=float, default=0.0, show_default=True)
@count_option("--batch-size", 32)
@count_option("--workers", 2, minimum=0)
@click.option("--score-class", default=None, help="For a model of more than two classes.")
@click.option("--shard", default=None, metavar="I/N", help="Every N-th slide from the I-th.")
@quiet_option("No progress bar.")
def slide_features(checkpoint, inputs, out, mpp, tile_mpp, tile_size, min_tissue, overlap,
                   batch_size, workers, score_class, shard, quiet):  # fmt: skip
    """One feature bag per slide (OUT/h5/<slide>.h5 with 'features'), for 'train --slides'.

    The files are those of 'slide predict --save-features'. Run the same command again to
    resume: finished slides are skipped, the current one resumes at its next batch.
    """
    from histolens.inference.predictor import Predictor
    from histolens.slides.features import FeatureRun
    from histolens.slides.outputs import SlideOutputs
    from histolens.slides.predict import find_slides, shard_slides

    part = _shard(shard)
    options = _slide_options()
    slides = shard_slides(find_slides(inputs), part)
    run = FeatureRun(Predictor.from_checkpoint(checkpoint), out, options, progress=not quiet)
    failed = []

    def report(summary, path, note):
        if summary is None:
            if note and "already done" not in note:
                failed.append(path)
            click.echo(f"{path.name}: skipped: {note}", err=True)
            return
        bag = SlideOutputs(Path(out), summary.slide).h5
        click.echo(f"{summary.slide}: {summary.tiles_scored} tiles -> {bag}", err=True)

    try:
        run.run(slides, report)
    except KeyboardInterrupt:
        click.secho("interrupted: run the same command again to resume.", fg="yellow", err=True)
        raise SystemExit(130) from None
    click.echo(f"{len(slides) - len(failed)} bag(s) under {Path(out) / 'h5'}")
    if failed:
        raise SystemExit(1)


@slide_group.command("attention")
@click.argument("mil_checkpoint", type=click.Path(exists=True, path_type=Path))
@click.argument("results", type=click.Path(exists=True, file_okay=False, path_type=Path))
def slide_attention(mil_checkpoint, results):
    """A MIL checkpoint's slide probability and attention over the bags of RESULTS ('slide
    features'): RESULTS/attention/<slide>.csv and RESULTS/heatmaps/<slide>.attention.png."""
    from histolens.slides.attention import attention_heatmaps

    for row in attention_heatmaps(mil_checkpoint, results):
        where = row.heatmap or "(slide file not found: no heatmap)"
        click.echo(
            f"{row.slide}: P = {row.probability:.3f} over {row.tiles} tiles, most attended tile "
            f"at {row.top_tile[0]},{row.top_tile[1]}; {where}"
        )
