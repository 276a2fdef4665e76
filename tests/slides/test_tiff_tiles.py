"""Regions read from decoded TIFF tiles are OpenSlide's pixels, or OpenSlide reads them.

Equality, not a tolerance: both paths decode the same JPEG bytes with libjpeg-turbo and copy
integer pixels, and where they would not agree (fractional level coordinates, other
compressions, a decoder that differs) the reader must use OpenSlide.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histolens.errors import DataError
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


@pytest.fixture(scope="module")
def svs_with_thumbnail(tmp_path_factory):
    """An Aperio layout as scanners write it: level 0, a stripped thumbnail page, then a tiled
    level 1 (OpenSlide's levels are the tiled pages only)."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    level0 = np.asarray(Image.fromarray(base).resize((1280, 1024), Image.Resampling.BICUBIC))
    level1 = np.asarray(Image.fromarray(level0).resize((320, 256), Image.Resampling.BOX))
    thumb = np.asarray(Image.fromarray(level0).resize((160, 128), Image.Resampling.BOX))
    desc = (
        "Aperio Image Library v12.0.15 \r\n1280x1024 (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = 0.5"
    )
    path = tmp_path_factory.mktemp("svs-thumb") / "t.svs"
    with tifffile.TiffWriter(path) as tw:
        kw = {"compression": "jpeg", "photometric": "rgb", "metadata": None}
        tw.write(level0, tile=(256, 256), description=desc, **kw)
        tw.write(thumb, **kw)
        tw.write(level1, tile=(256, 256), **kw)
    return path


@pytest.fixture(scope="module")
def odd_pyramid(tmp_path_factory, bank):
    """A generic pyramid of odd size: its reduced levels' downsamples are not whole numbers."""
    from histolens.slides.synthetic import make_synthetic_slide, write_pyramid_tiff

    slide = make_synthetic_slide(2049, 1537, 0.5, n_lesions=1, seed=4, bank=bank)
    return write_pyramid_tiff(slide, tmp_path_factory.mktemp("odd") / "odd.tiff", levels=3)


SLIDES = ["generic TIFF pyramid", "synthetic SVS", "CMU SVS (real)", "SVS with a thumbnail page"]


@pytest.mark.parametrize("which", SLIDES)
def test_tiles_read_exactly_what_openslide_reads(which, pyramid, aperio_svs, svs_with_thumbnail):
    path = dict(zip(SLIDES, [pyramid[0], aperio_svs, CMU, svs_with_thumbnail], strict=True))
    with open_slide(path[which]) as s:
        assert s.reads_tiles
        if which == "SVS with a thumbnail page":
            assert s.level_dimensions == ((1280, 1024), (320, 256))
        served = 0
        for location, level, size in _regions(s, 160, seed=len(which)):
            direct = s._tiles.read(location, level, size)
            served += direct is not None
            expected = s._read_openslide(location, level, size)
            got = s._read_rgb(location, level, size)
            assert got.shape == (size[1], size[0], 3) and got.dtype == np.uint8
            assert np.array_equal(got, expected), (location, level, size)
        assert served >= 80  # the level-aligned half at least came from the tiles


def test_levels_off_a_whole_downsample_are_left_to_openslide(odd_pyramid):
    with open_slide(odd_pyramid) as s:
        assert s.reads_tiles and s.level_downsamples[1] != round(s.level_downsamples[1])
        assert s._tiles.read((0, 0), 1, (64, 64)) is None  # level 1: OpenSlide's
        assert s._tiles.read((512, 512), 0, (64, 64)) is not None  # level 0: the tiles'
        for location, level, size in _regions(s, 120, seed=11):
            expected = s._read_openslide(location, level, size)
            assert np.array_equal(s._read_rgb(location, level, size), expected)


def _damaged_copy(source: Path, target: Path, at_end: bool, nbytes: int) -> Path:
    """A copy of ``source`` with ``nbytes`` zero bytes written over the start (or the end) of
    the level-0 tile covering pixels (256-511, 256-511), far from the opening probes."""
    shutil.copyfile(source, target)
    with tifffile.TiffFile(target) as tif:
        page = tif.pages[0]
        index = -(-page.imagewidth // page.tilewidth) + 1
        start, count = page.dataoffsets[index], page.databytecounts[index]
    with open(target, "r+b") as fh:
        fh.seek(start + count - nbytes if at_end else start)
        fh.write(b"\0" * nbytes)
    return target


def test_a_tile_that_does_not_decode_is_reported_by_openslide(tmp_path, pyramid):
    # No JPEG start marker: neither decoder can read the tile.
    broken = _damaged_copy(pyramid[0], tmp_path / "broken.tiff", at_end=False, nbytes=16)
    with open_slide(broken) as s:
        assert s.reads_tiles
        good = s._read_openslide((2048, 2048), 0, (64, 64))
        assert np.array_equal(s._read_rgb((2048, 2048), 0, (64, 64)), good)
        # (OpenSlide refuses every read after its first error, so that one comes last.)
        with pytest.raises(DataError, match="cannot be read at"):
            s.read_region((300, 300), 0, (64, 64))


def test_a_tile_cut_before_its_end_is_left_to_openslide(tmp_path, pyramid):
    cut = _damaged_copy(pyramid[0], tmp_path / "cut.tiff", at_end=True, nbytes=2)  # no end marker
    with open_slide(cut) as s:
        assert s.reads_tiles
        assert s._tiles.read((300, 300), 0, (64, 64)) is None  # OpenSlide decides
        assert s._tiles.read((2048, 2048), 0, (64, 64)) is not None


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
        cache = s._tiles._cache
        assert s._tiles._cached_bytes == sum(t.nbytes for t in cache.values())
