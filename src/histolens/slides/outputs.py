"""What ``histolens slide predict`` writes for each slide, and the cohort table.

Per slide, under the output folder (CLAM-like: one folder per kind, one file per slide):
``h5/<slide>.h5`` (``coords`` N x 2 level-0, ``probabilities`` N x C, ``score``, ``ood``,
optional ``features`` N x D; attrs with the tile size, level and scale), ``masks/<slide>.png``,
``heatmaps/<slide>.png``, ``geojson/<slide>.geojson`` (QuPath) and ``summaries/<slide>.json``,
written last: a slide is done when its summary exists. ``slides.csv`` gathers the summaries.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from histolens.atomic import atomic_open, atomic_path, atomic_write_text
from histolens.errors import DataError

__all__ = [
    "SLIDES_CSV",
    "SlideOutputs",
    "SlideSummary",
    "heatmap_background",
    "merge_summaries",
    "read_summary",
    "write_geojson",
    "write_heatmap",
    "write_mask",
]

SLIDES_CSV = "slides.csv"
HEATMAP_SIDE = 1200  # longest side, in pixels, of the thumbnail under the heatmap


@dataclass(frozen=True)
class SlideOutputs:
    """The files of one slide under an output folder."""

    out: Path
    name: str

    @property
    def h5(self) -> Path:
        return self.out / "h5" / f"{self.name}.h5"

    @property
    def partial_h5(self) -> Path:
        return self.out / "h5" / f".{self.name}.h5.partial"

    @property
    def mask(self) -> Path:
        return self.out / "masks" / f"{self.name}.png"

    @property
    def heatmap(self) -> Path:
        return self.out / "heatmaps" / f"{self.name}.png"

    @property
    def geojson(self) -> Path:
        return self.out / "geojson" / f"{self.name}.geojson"

    @property
    def summary(self) -> Path:
        return self.out / "summaries" / f"{self.name}.json"

    def all(self) -> tuple[Path, ...]:
        return (self.h5, self.mask, self.heatmap, self.geojson, self.summary)


@dataclass(frozen=True)
class SlideSummary:
    """One slide's row of ``slides.csv`` (and its ``summaries/<slide>.json``)."""

    slide: str
    score_mean: float
    score_max: float
    score_topk_mean: float
    top_k: int
    score_class: str
    threshold: float
    magnification: str
    operating_point: str
    tiles_above_threshold: int
    tissue_mm2: float
    tiles_scored: int
    tiles_ood: int
    seconds: float
    slide_mpp: float
    mpp_source: str
    tile_mpp: float
    tile_size_level0: str
    read_level: int
    fingerprint: str
    path: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def read_summary(path: Path) -> SlideSummary | None:
    """A slide's summary, or None if it is missing or unreadable (the slide is then redone)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return SlideSummary(**{f.name: data[f.name] for f in fields(SlideSummary)})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def merge_summaries(out: Path, target: Path | None = None) -> tuple[Path, int]:
    """Write ``slides.csv`` (atomically) from every slide summary under ``out``; returns the file
    and its number of rows."""
    folder = Path(out) / "summaries"
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    rows = [s for s in (read_summary(p) for p in files) if s is not None]
    if not rows:
        raise DataError(f"{out} holds no slide summaries (summaries/*.json): nothing to merge.")
    target = target or Path(out) / SLIDES_CSV
    names = [f.name for f in fields(SlideSummary)]
    with atomic_open(target, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r.slide):
            writer.writerow(asdict(row))
    return target, len(rows)


def write_mask(mask: np.ndarray, target: Path) -> None:
    """The tissue mask as a black-and-white PNG."""
    _save_png(Image.fromarray(mask.astype(np.uint8) * 255), target)


def _save_png(image: Image.Image, target: Path) -> None:
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG")


def heatmap_background(thumbnail: Image.Image) -> Image.Image:
    """The thumbnail at most HEATMAP_SIDE pixels a side: the figure is drawn at about 840 pixels
    wide, and matplotlib resamples a full-size thumbnail and its score layer through float
    copies whose size grows with the slide's area."""
    if max(thumbnail.size) <= HEATMAP_SIDE:
        return thumbnail
    small = thumbnail.convert("RGB")
    small.thumbnail((HEATMAP_SIDE, HEATMAP_SIDE), Image.Resampling.BOX)
    return small


def write_heatmap(
    thumbnail: Image.Image,
    coords: np.ndarray,
    size: tuple[int, int],
    scores: np.ndarray,
    dimensions: tuple[int, int],
    target: Path,
    label: str,
) -> None:
    """Tile scores over the thumbnail with a colour bar (scores 0 to 1; unscored tissue clear)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thumbnail = heatmap_background(thumbnail)
    tw, th = thumbnail.size
    fx, fy = tw / dimensions[0], th / dimensions[1]
    total = np.zeros((th, tw), np.float32)
    count = np.zeros((th, tw), np.float32)
    for (x, y), s in zip(coords, scores, strict=True):
        x0, y0 = int(x * fx), int(y * fy)
        x1, y1 = max(x0 + 1, int((x + size[0]) * fx)), max(y0 + 1, int((y + size[1]) * fy))
        total[y0:y1, x0:x1] += s
        count[y0:y1, x0:x1] += 1
    heat = np.ma.masked_where(count == 0, total / np.maximum(count, 1))
    aspect = th / tw
    fig, ax = plt.subplots(figsize=(7, max(2.5, 6 * aspect)), dpi=120)
    ax.imshow(np.asarray(thumbnail))
    shown = ax.imshow(heat, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.55, interpolation="nearest")
    ax.set_axis_off()
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label(label)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    with atomic_open(target, "wb") as fh:
        fh.write(buffer.getvalue())


def write_geojson(
    coords: Iterable[tuple[int, int]],
    size: tuple[int, int],
    scores: Iterable[float],
    class_name: str,
    target: Path,
) -> int:
    """A GeoJSON FeatureCollection of tiles (level-0 polygons) QuPath imports as detections
    classified ``class_name``, each with its score as a measurement; returns the count."""
    features = []
    w, h = size
    for (x, y), s in zip(coords, scores, strict=True):
        x, y = int(x), int(y)
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]],
                },
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": class_name, "color": [220, 40, 40]},
                    "measurements": {"probability": round(float(s), 6)},
                },
            }
        )
    atomic_write_text(target, json.dumps({"type": "FeatureCollection", "features": features}))
    return len(features)


def outputs_exist(outputs: SlideOutputs) -> bool:
    return all(os.path.exists(p) for p in outputs.all())
