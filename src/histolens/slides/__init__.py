"""Whole-slide images: read a slide, find its tissue, classify it tile by tile, write the results.

Owns the slide reader (OpenSlide for SVS, NDPI, MRXS, tiled TIFF and DICOM; Pillow for a plain PNG
or JPEG, through the same interface), the tissue mask, the tile grid at the model's training scale,
batched tile inference through :class:`histolens.inference.predictor.Predictor`, and the per-slide outputs
(CLAM/TRIDENT-layout HDF5, heatmap and mask PNGs, QuPath GeoJSON, the cohort table).

Layering: it sits above ``histolens.inference.predictor`` / inference and ``histolens.explain`` and below the
command line; it may import those, ``histolens.atomic``, ``histolens.errors`` and the data and
synthetic-image modules, and nothing imports it except ``histolens.slides.cli`` and the CLI.
Heavy libraries (openslide, h5py, torch) are imported inside functions or submodules, never by
this ``__init__``, so ``histolens --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from histolens.lazy import lazy_getattr

if TYPE_CHECKING:
    from histolens.slides.reader import SlideReader, open_slide
    from histolens.slides.scale import TileScale, training_scale
    from histolens.slides.tissue import tissue_mask

_LAZY = {
    "SlideReader": "reader",
    "open_slide": "reader",
    "TileScale": "scale",
    "training_scale": "scale",
    "tissue_mask": "tissue",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["SlideReader", "TileScale", "open_slide", "tissue_mask", "training_scale"]
