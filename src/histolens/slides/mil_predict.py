"""``histolens predict MIL_CHECKPOINT SLIDES_OR_BAGS``: a slide's class from slide-level MIL.

A feature bag (``.h5`` from ``histolens slide features``) is scored as it is. A slide is first
made into a bag by the tile checkpoint whose features the MIL model was trained on (recorded in
the MIL checkpoint; ``features_from`` overrides it), tiled as the training bags were (their
tile scale, tissue share and overlap, recorded in the MIL checkpoint), into
``OUT/h5``, with its tile-probability heatmap in ``OUT/heatmaps/<slide>.png``. Each slide then
gets its class at the MIL checkpoint's operating point, its calibrated probability and its
prediction set, and the attention heatmap ``OUT/heatmaps/<slide>.attention.png`` (with the
weights in ``OUT/attention/<slide>.csv``). Bags and tile checkpoints that do not belong to the
MIL model are refused with one sentence, before any work.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histolens.atomic import atomic_open
from histolens.errors import ConfigError, DataError
from histolens.slides.attention import check_bag_width, write_attention

__all__ = ["SlideMilPrediction", "predict_slides_mil", "split_bags", "write_slide_predictions"]

BAG_SUFFIXES = (".h5", ".hdf5")


@dataclass(frozen=True)
class SlideMilPrediction:
    """One slide's MIL answer and where its outputs are."""

    slide: str
    path: Path  # what was asked for: the slide, or the bag
    bag: Path
    label: str
    probability: float  # calibrated, of the positive class
    prediction_set: tuple[str, ...]
    tiles: int
    top_tile: tuple[int, int]
    attention_heatmap: Path | None  # None when the slide file could not be found
    attention_table: Path

    @property
    def refer(self) -> bool:
        return len(self.prediction_set) > 1


def split_bags(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """(bags, other inputs): files ending in .h5/.hdf5 are bags, the rest slides or folders."""
    bags = [Path(p) for p in inputs if Path(p).suffix.lower() in BAG_SUFFIXES]
    others = [Path(p) for p in inputs if Path(p).suffix.lower() not in BAG_SUFFIXES]
    return bags, others


def _check_source(bag, path: Path, features: dict) -> None:
    """One sentence when ``bag`` was extracted by another tile checkpoint than the MIL's."""
    trained = features.get("fingerprint")
    if trained and bag.fingerprint and bag.fingerprint != trained:
        source = features.get("checkpoint") or "its tile checkpoint"
        raise DataError(
            f"{path.name} was extracted by another tile checkpoint than the bags this MIL model "
            f"was trained on; extract it with {source} ('histolens slide features')."
        )


def _tile_predictor(features: dict, features_from: str | os.PathLike | None):
    """The tile checkpoint's Predictor that makes bags for this MIL model; one sentence when
    none is known or the given one is another."""
    from histolens.inference.predictor import Predictor
    from histolens.inference.resume import model_fingerprint

    source = features_from or features.get("checkpoint")
    if not source:
        raise ConfigError(
            "This MIL checkpoint does not record the tile checkpoint of its bags; give it with "
            "--features-from CKPT, or predict bags made by 'histolens slide features'."
        )
    if not Path(source).exists():
        raise DataError(
            f"The tile checkpoint of this MIL model's bags ({source}) is not there; give it "
            "with --features-from CKPT."
        )
    predictor = Predictor.from_checkpoint(source)
    trained = features.get("fingerprint")
    if trained and model_fingerprint(predictor) != trained:
        raise DataError(
            f"{source} is not the tile checkpoint whose features this MIL model was trained "
            "on; give that one with --features-from."
        )
    return predictor


def _bags_of_slides(
    slides: Sequence[Path],
    out: Path,
    features: dict,
    features_from,
    progress: bool,
    batch_size: int,
    workers: int,
) -> list[tuple[Path, Path]]:
    """(slide, its bag under ``out/h5``) of each slide, made (or resumed) by the tile
    checkpoint."""
    from histolens.slides.features import FeatureRun
    from histolens.slides.outputs import SlideOutputs
    from histolens.slides.predict import SlideOptions, find_slides

    found = find_slides(slides)
    tiling = features.get("tiling") or {}
    options = SlideOptions(
        tile_mpp=tiling.get("tile_mpp"),
        min_tissue=tiling.get("min_tissue", 0.5),
        overlap=tiling.get("overlap", 0.0),
        batch_size=batch_size,
        workers=workers,
    )
    predictor = _tile_predictor(features, features_from)
    errors: list[str] = []

    def note(summary, path: Path, message: str | None) -> None:
        if summary is None and message and "already done" not in message:
            errors.append(f"{path.name}: {message}")

    FeatureRun(predictor, out, options, progress=progress).run(found, note)
    if errors:
        raise DataError("; ".join(errors))
    return [(p, SlideOutputs(out, p.stem).h5) for p in found]


def predict_slides_mil(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    alpha: float | None = None,
    features_from: str | os.PathLike | None = None,
    progress: bool = False,
    batch_size: int = 32,
    workers: int = 2,
) -> list[SlideMilPrediction]:
    """Each input slide's (or bag's) MIL answer, with its attention written under ``out``."""
    from histolens.training.mil import mil_logits
    from histolens.training.mil_data import read_bag
    from histolens.training.mil_decision import MilDecision
    from histolens.training.mil_run import load_mil

    model, meta = load_mil(checkpoint)
    decision = MilDecision.from_dict(meta.get("decision"))
    features = meta.get("features") or {"feature_dim": meta["feature_dim"]}
    out = Path(out)
    bag_paths, slides = split_bags(inputs)
    bags = [(p, p, read_bag(p)) for p in bag_paths]
    for _, path, bag in bags:  # every bag checked before any work
        check_bag_width(path, bag.features.shape[1], int(meta["feature_dim"]))
        _check_source(bag, path, features)
    if slides:
        made = _bags_of_slides(slides, out, features, features_from, progress, batch_size, workers)
        bags += [(slide, p, read_bag(p)) for slide, p in made]
    results = []
    for source, path, bag in bags:
        check_bag_width(path, bag.features.shape[1], int(meta["feature_dim"]))
        (logit,), (weights,) = mil_logits(model, [bag.features])
        (call,) = decision.decide([logit], alpha)
        caption = f"attention / slide max ({call.label}, P = {call.probability:.3f})"
        heatmap, table = write_attention(path, out, bag.coords, weights, caption)
        top = tuple(int(v) for v in bag.coords[int(np.argmax(weights))])
        results.append(
            SlideMilPrediction(
                path.stem,
                source,
                path,
                call.label,
                call.probability,
                call.prediction_set,
                len(bag),
                top,
                heatmap,
                table,
            )  # fmt: skip
        )
    return results


def write_slide_predictions(
    rows: Sequence[SlideMilPrediction], classes: Sequence[str], path: str | os.PathLike
) -> Path:
    """The predictions CSV (the columns every predictions CSV starts with, then the slide's
    tiles, most-attended tile and attention heatmap)."""
    from histolens.inference.predictions_csv import core_columns, core_row

    columns = [*core_columns(classes), "tiles", "top_tile_x", "top_tile_y", "attention_heatmap"]
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        for r in rows:
            p = {classes[0]: 1.0 - r.probability, classes[1]: r.probability}
            row = core_row(
                classes, str(r.path), r.label, p[r.label], p, r.prediction_set, r.refer,
                False, "",
            )  # fmt: skip
            row.update(
                tiles=r.tiles,
                top_tile_x=r.top_tile[0],
                top_tile_y=r.top_tile[1],
                attention_heatmap=str(r.attention_heatmap or ""),
            )
            writer.writerow(row)
    return Path(path)
