"""``histolens explain``: heatmap files for images or folders, and the faithfulness table.

The only place in ``histolens.explain`` that writes files; every output is written atomically.
The main CLI group registers ``explain_command``; heavy imports stay inside the command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from histolens.cli.options import (
    checkpoint_argument,
    count_option,
    device_option,
    engine_option,
    float_option,
    out_option,
    quiet_option,
    split_name_option,
)
from histolens.errors import HistolensError, check_choice
from histolens.explain import METHODS, get_method
from histolens.rundir import ExplanationFiles, RunDir

__all__ = ["OPACITY_RENAMED", "explain_command"]

OPACITY_RENAMED = (
    "explain's heatmap opacity is --opacity now (--alpha is the conformal error level of "
    "predict and evaluate)."
)


def _split_paths(checkpoint: Path, split_name: str) -> list[Path]:
    """Images of one side of a run's split.csv (the run directory holding CHECKPOINT)."""
    from histolens.checkpoint.io import resolve_checkpoint_path
    from histolens.data.splits import load_split_csv

    split_csv = RunDir(resolve_checkpoint_path(checkpoint).parent).split
    if not split_csv.is_file():
        raise click.UsageError(f"--split needs a run directory with split.csv ({split_csv}).")
    records = load_split_csv(split_csv).side(split_name)
    if not records and split_name in ("val", "test"):
        raise click.UsageError(
            f"The run's split.csv has no {split_name} images: the run was cross-validated and "
            "every patient trained the model. Use --split all, or give images."
        )
    # Sorted by class then name, so an evenly spread --limit covers every class.
    return [Path(r.path) for r in sorted(records, key=lambda r: (r.label, r.path))]


def _evenly_spread(paths: list[Path], n: int) -> list[Path]:
    """At most ``n`` of ``paths``, evenly spread from the first to the last."""
    import numpy as np

    if len(paths) <= n:
        return paths
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, n).round()]


def _default_out(checkpoint: Path) -> Path:
    return RunDir.of_checkpoint(checkpoint).explanations.path


def _stem(path: Path, root: Path) -> str:
    """A file-name-safe id that stays unique across subfolders (a/b/x.png -> a__b__x)."""
    rel = path.relative_to(root) if root.is_dir() and path != root else Path(path.name)
    return "__".join(rel.with_suffix("").parts)


def _csv_text(rows: list[dict]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _save_png(image, target: Path) -> None:
    from histolens.atomic import atomic_path

    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG")


def _save_npy(array, target: Path) -> None:
    import numpy as np

    from histolens.atomic import atomic_path

    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def _resolve_methods(methods: tuple[str, ...], evaluate: bool) -> list[str]:
    if not methods:
        return list(METHODS) if evaluate else ["gradcam"]
    chosen: list[str] = []
    for item in methods:
        for name in item.split(","):
            name = name.strip().lower()
            if name == "all":
                chosen += [m for m in METHODS if m not in chosen]
            elif name and name not in chosen:
                chosen.append(get_method(name).name)
    return chosen


@click.command("explain")
@checkpoint_argument()
@click.argument(
    "target",
    metavar="[IMAGE_OR_FOLDER]",
    required=False,
    type=click.Path(exists=True, path_type=Path),
)
@split_name_option(
    ["test", "val", "train", "all"],
    None,
    help="Instead of IMAGE_OR_FOLDER: images of this side of the run's split.csv.",
)
@count_option(
    "--limit", None, help="Explain at most this many images (evenly spread over the sorted list)."
)
@click.option(
    "--method",
    "-m",
    "methods",
    multiple=True,
    help=f"Method(s), repeatable or comma-separated, or 'all': "
    f"{', '.join(METHODS)}. [default: gradcam; all with --evaluate]",
)
@out_option("Output folder (default: <run dir>/explanations).", file_okay=False)
@float_option("--opacity", 0.5, "Opacity of the heatmap in overlays.", 0.0, 1.0)
# The old spelling, refused: everywhere else --alpha is the conformal error level.
@click.option("--alpha", "old_alpha", default=None, hidden=True, expose_value=True)
@click.option(
    "--target-class", default=None, help="Explain this class instead of the predicted one."
)
@click.option(
    "--layers",
    default=None,
    metavar="LAYER[,LAYER]",
    help="Backbone layer(s) the CAMs explain, comma-separated, e.g. blocks.5 "
    "[default: the model's own: every feature level of a multi-level model].",
)
@click.option(
    "--evaluate",
    is_flag=True,
    help="Write the faithfulness table (deletion/insertion AUC, ROAD, and on synthetic "
    "data the pointing game and lesion IoU) instead of heatmaps.",
)
@count_option(
    "--max-images", 20, help="With --evaluate: evaluate at most this many images (evenly spread)."
)
@click.option("--no-road", is_flag=True, help="With --evaluate: skip ROAD (the slowest metric).")
@count_option(
    "--n-samples", 200, help="Perturbed images per LIME / Kernel SHAP explanation.", minimum=10
)
@device_option()
@engine_option()
@quiet_option()
def explain_command(checkpoint, target, split_name, limit, old_alpha, **options):
    """Heatmaps of what the model looked at, for an image or a folder of images.

    Per image and method: <name>_<method>_heatmap.npy (float32 at the image's own size),
    _overlay.png and _panel.png, and index.csv for the whole run.
    """
    if old_alpha is not None:
        click.secho(f"error: {OPACITY_RENAMED}", fg="red", err=True)
        sys.exit(2)
    if (target is None) == (split_name is None):
        raise click.UsageError("give IMAGE_OR_FOLDER or --split (one of them).")
    try:
        paths = _split_paths(checkpoint, split_name) if split_name else None
        _run(checkpoint, target, paths, limit, **options)
    except HistolensError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)


def _run(
    checkpoint: Path,
    target: Path | None,
    paths: list[Path] | None,
    limit: int | None,
    *,
    methods: tuple[str, ...],
    out: Path | None,
    opacity: float,
    target_class: str | None,
    layers: str | None,
    evaluate: bool,
    max_images: int,
    no_road: bool,
    n_samples: int,
    device: str,
    engine: str | None,
    quiet: bool,
) -> None:
    """Explain TARGET's images (or ``paths``, a split's images) and write the files."""
    from histolens.data.imagefiles import images_under
    from histolens.explain import Explainer
    from histolens.inference.predictor import Predictor
    from histolens.progress import progress_bar

    chosen = _resolve_methods(methods, evaluate)
    if paths is None:
        paths = images_under(target)
    elif paths:
        target = Path(os.path.commonpath([str(p.parent) for p in paths]))
    else:
        raise click.UsageError("the run's split.csv lists no images of that split.")
    if limit is not None:
        paths = _evenly_spread(paths, limit)
    if not target.is_dir():
        from histolens.data.imageio import load_rgb

        load_rgb(target)  # a single unreadable file is an error, not a skipped row
    out = out or _default_out(checkpoint)
    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    if target_class is not None:  # refused before any work, not after the first image
        check_choice("target class", target_class, predictor.class_names)
    with Explainer(predictor, n_samples=n_samples, layers=layers) as explainer:
        if evaluate:
            _evaluate(explainer, paths, chosen, out, max_images, not no_road, quiet, engine)
        else:
            with progress_bar(len(paths) * len(chosen), "Explaining", "map", not quiet) as bar:
                rows = _explain_all(
                    explainer, paths, target, chosen, out, opacity, target_class, bar.update
                )
            _report(rows, out, quiet)


def _explain_all(
    explainer, paths, root, methods, out, opacity, target_class, advance
) -> list[dict]:
    from histolens.data.imageio import load_rgb
    from histolens.data.records import magnification_from_path
    from histolens.errors import ImageLoadError
    from histolens.explain import render_panel

    rows: list[dict] = []
    for path in paths:
        try:
            image = load_rgb(path)
        except ImageLoadError as exc:
            rows.append({"path": str(path), "status": f"skipped: {exc.reason}"})
            advance(len(methods))
            continue
        stem = _stem(path, root)
        for method in methods:
            e = explainer.explain(image, method, target_class, magnification_from_path(path))
            base = out / f"{stem}_{method}"
            heat_file = base.with_name(base.name + "_heatmap.npy")
            overlay_file = base.with_name(base.name + "_overlay.png")
            panel_file = base.with_name(base.name + "_panel.png")
            _save_npy(e.heatmap, heat_file)
            _save_png(e.overlay(opacity), overlay_file)
            caption = [
                f"{path.name}  |  method: {get_method(method).display_name}",
                f"prediction: {e.prediction.label} (p = {e.prediction.probability:.3f})"
                + ("  [review]" if e.prediction.uncertain else ""),
                f"explained class: {e.target_class}",
            ]
            _save_png(render_panel(image, e.heatmap, caption, opacity), panel_file)
            rows.append(
                {
                    "path": str(path),
                    "status": "ok",
                    "method": method,
                    "prediction": e.prediction.label,
                    "probability": round(e.prediction.probability, 6),
                    "uncertain": e.prediction.uncertain,
                    "target_class": e.target_class,
                    "width": image.width,
                    "height": image.height,
                    "heatmap": heat_file.name,
                    "overlay": overlay_file.name,
                    "panel": panel_file.name,
                    "seconds": round(e.seconds, 4),
                }
            )
            advance(1)
    return rows


def _report(rows: list[dict], out: Path, quiet: bool) -> None:
    from histolens.atomic import atomic_write_text

    index = atomic_write_text(ExplanationFiles(out).index, _csv_text(rows))
    done = [r for r in rows if r["status"] == "ok"]
    skipped = [r for r in rows if r["status"] != "ok"]
    if not done:
        raise HistolensError(f"no image could be read; see {index}.")
    click.echo(
        f"{len(done)} heatmap(s) of {len({r['path'] for r in done})} image(s) written to "
        f"{out} (index: {index.name})."
    )
    for r in skipped:
        click.secho(
            f"skipped {r['path']}: {r['status'].removeprefix('skipped: ')}", fg="yellow", err=True
        )


def _evaluate(explainer, paths, methods, out, max_images, road, quiet, engine=None) -> None:
    import json

    from histolens.atomic import atomic_write_text
    from histolens.explain.faithfulness import evaluate_faithfulness
    from histolens.progress import progress_bar

    paths = _evenly_spread(paths, max_images)
    with progress_bar(len(paths), "Evaluating", "img", enabled=not quiet) as bar:
        rows = evaluate_faithfulness(
            explainer, paths, methods, road=road, progress=bar.update, engine=engine
        )
    table = [r.as_dict() for r in rows]
    atomic_write_text(out / "faithfulness.csv", _csv_text(table))
    atomic_write_text(
        ExplanationFiles(out).faithfulness, json.dumps({"rows": table}, indent=2) + "\n"
    )
    click.echo(format_table(table))
    click.echo(f"written to {out / 'faithfulness.csv'} and faithfulness.json")


def format_table(rows: list[dict]) -> str:
    """The faithfulness rows as a fixed-width text table (None shown as '-')."""
    from histolens.explain.faithfulness import COLUMNS as cols

    lines = ["  ".join(f"{c:>13}" if i else f"{c:<22}" for i, c in enumerate(cols))]
    for r in rows:
        cells = []
        for i, c in enumerate(cols):
            v = r.get(c)
            text = "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
            cells.append(f"{text:>13}" if i else f"{text:<22}")
        lines.append("  ".join(cells))
    return "\n".join(lines)
