"""Attention heatmaps of a MIL checkpoint over the slides of a ``slide features`` output folder.

For each bag (``h5/<slide>.h5`` with ``features``) the MIL model gives the slide's probability
and one attention weight per tile (they sum to 1 over the slide). The weights go to
``attention/<slide>.csv`` (``x,y,attention``, level-0 corners) and, drawn as the tile-probability
heatmap is (divided by the slide's largest weight, so the most-attended tile is 1), to
``heatmaps/<slide>.attention.png`` beside ``heatmaps/<slide>.png``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histolens.atomic import atomic_open
from histolens.errors import DataError
from histolens.slides.outputs import SlideOutputs, read_summary, write_heatmap
from histolens.slides.reader import open_slide
from histolens.slides.tissue import MASK_MPP

__all__ = [
    "SlideAttention",
    "attention_heatmaps",
    "attention_paths",
    "check_bag_width",
    "write_attention",
]


@dataclass(frozen=True)
class SlideAttention:
    """One slide's MIL answer and where its attention was written."""

    slide: str
    probability: float
    tiles: int
    top_tile: tuple[int, int]
    heatmap: Path | None  # None when the slide file is not where its summary says
    table: Path


def attention_paths(out: Path, name: str) -> tuple[Path, Path]:
    """(heatmap PNG, attention CSV) of slide ``name`` under an output folder."""
    return out / "heatmaps" / f"{name}.attention.png", out / "attention" / f"{name}.csv"


def _write_table(target: Path, coords: np.ndarray, weights: np.ndarray) -> None:
    with atomic_open(target, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["x", "y", "attention"])
        for (x, y), w in zip(coords, weights, strict=True):
            writer.writerow([int(x), int(y), f"{w:.8g}"])


def write_attention(
    bag_path: Path, out: Path, coords: np.ndarray, weights: np.ndarray, caption: str
) -> tuple[Path | None, Path]:
    """``out/attention/<slide>.csv`` and, when the slide file named by the bag's summary
    (``summaries/<slide>.json`` beside the bag's ``h5`` folder) is there,
    ``out/heatmaps/<slide>.attention.png``; (heatmap or None, table)."""
    import h5py

    name = bag_path.stem
    heatmap, table = attention_paths(out, name)
    _write_table(table, coords, weights)
    summary = read_summary(SlideOutputs(bag_path.parent.parent, name).summary)
    with h5py.File(bag_path, "r") as f:
        size0 = tuple(int(v) for v in f.attrs.get("patch_size_level0", ()))
    if summary is None or len(size0) != 2 or not Path(summary.path).exists():
        return None, table
    with open_slide(summary.path, summary.slide_mpp) as reader:
        thumbnail = reader.thumbnail(MASK_MPP)
        dims = reader.dimensions
    write_heatmap(thumbnail, coords, size0, weights / weights.max(), dims, heatmap, caption)
    return heatmap, table


def check_bag_width(path: Path, width: int, trained: int) -> None:
    """One sentence when a bag's features are not as wide as the MIL model's."""
    if width != trained:
        raise DataError(
            f"{path.name} has {width} features per tile; the MIL model was trained on "
            f"{trained}: extract with the same backbone."
        )


def attention_heatmaps(
    checkpoint: str | os.PathLike, results: str | os.PathLike
) -> list[SlideAttention]:
    """Score every bag under ``results/h5`` with the MIL ``checkpoint``; write the attention."""
    from histolens.training.mil import predict_mil
    from histolens.training.mil_data import read_bag
    from histolens.training.mil_run import load_mil

    model, meta = load_mil(checkpoint)
    results = Path(results)
    bags = sorted((results / "h5").glob("*.h5"))
    if not bags:
        raise DataError(f"{results} holds no bags (h5/*.h5); run 'histolens slide features'.")
    done = []
    for path in bags:
        bag = read_bag(path)
        check_bag_width(path, bag.features.shape[1], int(meta["feature_dim"]))
        (prob,), (weights,) = predict_mil(model, [bag.features])
        label = f"attention / slide max (P({meta['positive_class']}) = {prob:.3f})"
        heatmap, table = write_attention(path, results, bag.coords, weights, label)
        top = tuple(int(v) for v in bag.coords[int(np.argmax(weights))])
        done.append(SlideAttention(path.stem, prob, len(bag), top, heatmap, table))
    return done
