"""``histolens slide features``: one feature bag per slide, for multiple-instance learning.

A bag is the HDF5 file of ``slide predict`` with ``features`` (N x D pooled backbone features)
required, so it runs the same tiling and scoring (:class:`SlideRun` with ``save_features``) and
writes the same files. It resumes slide by slide, as ``slide predict`` does, and a slide done
earlier without features (a plain ``slide predict``) is done again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from histolens.slides.outputs import SlideOutputs
from histolens.slides.predict import SlideRun

__all__ = ["FeatureRun", "has_features"]


def has_features(h5: Path) -> bool:
    """Whether a finished slide's HDF5 file holds a non-empty ``features`` dataset."""
    import h5py

    try:
        with h5py.File(h5, "r") as f:
            return "features" in f and f["features"].shape[0] == f["coords"].shape[0] > 0
    except OSError:
        return False


class FeatureRun(SlideRun):
    """A :class:`SlideRun` that always stores features and counts a slide done only with them."""

    def __post_init__(self) -> None:
        self.options = replace(self.options, save_features=True)
        super().__post_init__()

    def is_done(self, slide: Path) -> bool:
        return super().is_done(slide) and has_features(SlideOutputs(self.out, slide.stem).h5)
