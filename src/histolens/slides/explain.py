"""Explanations of single slide tiles: the tile read as ``slide predict`` reads it, explained by
:class:`histolens.explain.Explainer` at the tile's full (read) resolution, saved as overlays."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histolens.atomic import atomic_path
from histolens.errors import DataError

if TYPE_CHECKING:
    from histolens.explain import Explainer, Explanation
    from histolens.slides.reader import SlideReader

__all__ = ["explain_tile", "explain_tiles", "top_tiles"]


def top_tiles(results: str | os.PathLike, slide_name: str, n: int) -> list[tuple[int, int]]:
    """Level-0 corners of the ``n`` highest-scoring tiles in a ``slide predict`` output."""
    import h5py

    from histolens.slides.outputs import SlideOutputs

    h5 = SlideOutputs(Path(results), slide_name).h5
    if not h5.is_file():
        raise DataError(
            f"{h5} does not exist: run 'histolens slide predict' on {slide_name} first."
        )
    with h5py.File(h5, "r") as f:
        scores, coords = f["score"][:], f["coords"][:]
    order = np.argsort(-scores, kind="stable")[:n]
    return [(int(x), int(y)) for x, y in coords[order]]


def explain_tile(
    explainer: Explainer,
    reader: SlideReader,
    corner: tuple[int, int],
    size0: tuple[int, int],
    method: str = "gradcam",
) -> Explanation:
    """The :class:`~histolens.explain.Explanation` of the tile of level-0 ``size0`` at level-0
    ``corner`` of an open slide ``reader``, read at full resolution (level 0: the Explainer
    resizes it for the model and maps the heatmap back to this size)."""
    x, y = (int(v) for v in corner)
    w, h = reader.dimensions
    if not (0 <= x < w and 0 <= y < h):
        raise DataError(f"Tile corner {x},{y} lies outside {reader.path.stem} ({w} x {h} px).")
    return explainer.explain(reader.read_region((x, y), 0, size0), method)


def explain_tiles(
    checkpoint: str | os.PathLike,
    slide: str | os.PathLike,
    corners: Sequence[tuple[int, int]],
    out: str | os.PathLike,
    method: str = "gradcam",
    mpp: float | None = None,
    tile_mpp: float | None = None,
    tile_size: int | None = None,
) -> Iterator[str]:
    """Explain the tiles at level-0 ``corners``; writes ``<slide>_x<X>_y<Y>_<method>.png``
    overlays under ``out`` and yields one line per tile."""
    from histolens.explain import Explainer
    from histolens.inference.predictor import Predictor
    from histolens.slides.reader import open_slide
    from histolens.slides.scale import training_scale

    predictor = Predictor.from_checkpoint(checkpoint)
    meta = predictor.metadata
    scale = training_scale(
        predictor.preprocess.input_size,
        meta.magnification if meta is not None else "all",
        tile_mpp,
        tile_size,
        meta.training_mpp if meta is not None else None,
        meta.training_image_size if meta is not None else None,
    )
    out = Path(out)
    name = Path(slide).stem
    with open_slide(slide, mpp) as reader, Explainer(predictor) as explainer:
        size0 = scale.level0_size(reader.mpp)
        for x, y in corners:
            result = explain_tile(explainer, reader, (x, y), size0, method)
            target = out / f"{name}_x{x}_y{y}_{result.method}.png"
            with atomic_path(target) as tmp:
                result.overlay().save(tmp, format="PNG")
            p = result.prediction
            yield f"{target}: {p.label} ({p.probability:.3f}), {result.method} on {result.target_class}"
