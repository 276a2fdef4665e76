"""Fixtures of the slide tests: small synthetic pyramidal slides written with tifffile."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bank():
    from histolens.slides.synthetic import TextureBank

    return TextureBank.paint(seed=0, k=2)


@pytest.fixture(scope="session")
def pyramid(tmp_path_factory, bank):
    """A 4096 x 4096 synthetic slide at 0.5 um/px with three levels (1, 4, 16): (path, slide)."""
    from histolens.slides.synthetic import make_synthetic_slide, write_pyramid_tiff

    slide = make_synthetic_slide(4096, 4096, 0.5, n_lesions=2, seed=5, bank=bank)
    path = tmp_path_factory.mktemp("pyramid") / "pyramid.tiff"
    return write_pyramid_tiff(slide, path, levels=3), slide


@pytest.fixture(scope="session")
def small_slides(tmp_path_factory, bank) -> Path:
    """A folder of two small synthetic slides (2048 x 1536 and 1536 x 1536, 0.5 um/px)."""
    from histolens.slides.synthetic import make_synthetic_slide, write_pyramid_tiff

    folder = tmp_path_factory.mktemp("slides")
    for i, (w, h) in enumerate([(2048, 1536), (1536, 1536)]):
        slide = make_synthetic_slide(w, h, 0.5, n_lesions=1, seed=10 + i, bank=bank)
        write_pyramid_tiff(slide, folder / f"slide{i}.tiff", levels=2)
    return folder
