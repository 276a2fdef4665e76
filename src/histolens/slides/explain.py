"""Explanations of single slide tiles: the tile read as ``slide predict`` reads it, explained by
:class:`histolens.explain.Explainer` at the tile's full (read) resolution, saved as overlays."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from histolens.atomic import atomic_path
from histolens.errors import DataError

__all__ = ["explain_tiles", "top_tiles"]


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
        w, h = reader.dimensions
        # Full resolution: read at level 0 (the Explainer resizes for the model and maps the
        # heatmap back to this size).
        for x, y in corners:
            if not (0 <= x < w and 0 <= y < h):
                raise DataError(f"Tile corner {x},{y} lies outside {name} ({w} x {h} px).")
            tile = reader.read_region((x, y), 0, size0)
            result = explainer.explain(tile, method)
            target = out / f"{name}_x{x}_y{y}_{result.method}.png"
            with atomic_path(target) as tmp:
                result.overlay().save(tmp, format="PNG")
            p = result.prediction
            yield f"{target}: {p.label} ({p.probability:.3f}), {result.method} on {result.target_class}"
