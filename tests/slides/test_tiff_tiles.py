"""Regions read from decoded TIFF tiles are OpenSlide's pixels, or OpenSlide reads them.

Equality, not a tolerance: both paths decode the same JPEG bytes with libjpeg-turbo and copy
integer pixels, and where they would not agree (fractional level coordinates, other
compressions, a decoder that differs) the reader must use OpenSlide.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from histolens.slides import tiff_tiles
from histolens.slides.reader import TIFF_TILES_ENV, open_slide
from histolens.slides.tiff_tiles import TiffTiles

CMU = Path(__file__).resolve().parents[1] / "data" / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def aperio_svs(tmp_path_factory, bank):
    """A two-level synthetic slide with Aperio's description (OpenSlide's 'aperio' vendor)."""
    from histolens.slides.synthetic import make_synthetic_slide, write_pyramid_tiff

    slide = make_synthetic_slide(1280, 1024, 0.25, n_lesions=1, seed=3, bank=bank)
    path = tmp_path_factory.mktemp("svs") / "s.svs"
    return write_pyramid_tiff(slide, path, levels=2, aperio=True)


def _regions(reader, n: int, seed: int):
    """``n`` regions (location, level, size) across every level, some past the slide's edges,
    every other one on whole pixels of its level."""
    rng = np.random.default_rng(seed)
    w, h = reader.dimensions
    for k in range(n):
        level = int(rng.integers(0, reader.level_count))
        ds = reader.level_downsamples[level]
        x, y = int(rng.integers(-300, w)), int(rng.integers(-300, h))
        if k % 2 == 0:
            x, y = int(round(x / ds) * ds), int(round(y / ds) * ds)
        yield (x, y), level, (int(rng.integers(1, 520)), int(rng.integers(1, 520)))


@pytest.mark.parametrize("which", ["generic TIFF pyramid", "synthetic SVS", "CMU SVS (real)"])
def test_tiles_read_exactly_what_openslide_reads(which, pyramid, aperio_svs):
    path = {"generic TIFF pyramid": pyramid[0], "synthetic SVS": aperio_svs, "CMU SVS (real)": CMU}
    with open_slide(path[which]) as s:
        assert s.reads_tiles
        served = 0
        for location, level, size in _regions(s, 160, seed=len(which)):
            direct = s._tiles.read(location, level, size, s.level_downsamples[level])
            served += direct is not None
            expected = s._read_openslide(location, level, size)
            got = s._read_rgb(location, level, size)
            assert got.shape == (size[1], size[0], 3) and got.dtype == np.uint8
            assert np.array_equal(got, expected), (location, level, size)
        assert served >= 80  # the level-aligned half at least came from the tiles


def test_the_tile_cache_stays_within_its_bound(pyramid, monkeypatch):
    path, _ = pyramid
    with open_slide(path) as s:
        tile_bytes = 256 * 256 * 3
        monkeypatch.setattr(tiff_tiles, "CACHE_BYTES", 3 * tile_bytes)
        for y in range(0, 1024, 224):
            for x in range(0, 2048, 224):
                got = s._read_rgb((x, y), 0, (224, 224))
                assert np.array_equal(got, s._read_openslide((x, y), 0, (224, 224)))
                assert s._tiles._cached_bytes <= 3 * tile_bytes


def test_a_decoder_that_disagrees_with_openslide_is_not_used(pyramid, monkeypatch):
    real = TiffTiles._tile

    def off_by_one(self, level, index):
        tile = real(self, level, index)
        return None if tile is None else tile ^ np.uint8(1)

    monkeypatch.setattr(TiffTiles, "_tile", off_by_one)
    with open_slide(pyramid[0]) as s:
        assert not s.reads_tiles
        assert np.array_equal(
            s._read_rgb((1000, 1000), 0, (300, 300)), s._read_openslide((1000, 1000), 0, (300, 300))
        )


def test_other_compressions_and_the_switch_keep_openslide(tmp_path, pyramid, monkeypatch):
    img = np.random.default_rng(0).integers(0, 255, (600, 700, 3), dtype=np.uint8)
    deflate = tmp_path / "deflate.tiff"
    tifffile.imwrite(deflate, img, tile=(256, 256), compression="zlib", photometric="rgb")
    with open_slide(deflate, mpp=0.5) as s:
        assert not s.reads_tiles
        assert np.array_equal(np.asarray(s.read_region((0, 0), 0, (700, 600))), img)
    monkeypatch.setenv(TIFF_TILES_ENV, "0")
    with open_slide(pyramid[0]) as s:
        assert not s.reads_tiles


def test_threads_sharing_one_reader_get_the_same_pixels(pyramid):
    with open_slide(pyramid[0]) as s:
        regions = list(_regions(s, 60, seed=7))
        expected = [s._read_openslide(*r) for r in regions]
        got: list = [None] * len(regions)

        def work(start: int) -> None:
            for i in range(start, len(regions), 4):
                got[i] = s._read_rgb(*regions[i])

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
