"""Regions of a tiled JPEG TIFF pyramid (Aperio SVS, generic tiled TIFF) read straight from its
tiles: each tile is decoded once (tifffile + imagecodecs, the libjpeg-turbo OpenSlide uses too)
and kept in a small cache, and a region is cut from the decoded tiles by array copies.

Why: OpenSlide composites every region through cairo, about 0.55-0.8 ms of CPU for a 224-pixel
tile even when its tiles are in OpenSlide's cache (``benchmarks/results/bench_slide.txt``); on a
2-core machine that is CPU the model does not get. The slide pipeline's reading workers read
level-aligned regions of exactly these files, so :class:`TiffTiles` serves them and leaves
everything else (other vendors and compressions, regions at fractional level coordinates,
thumbnails) to OpenSlide.

Only what is checked is served: every OpenSlide level must be a tiled 8-bit RGB/YCbCr JPEG page of
the same size, and a region read both ways when the file is opened must agree to the last bit,
or :meth:`TiffTiles.open` returns None and OpenSlide reads everything.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

__all__ = ["CACHE_BYTES", "TiffTiles"]

# Vendors whose levels are plain tiled TIFF pages in OpenSlide's own order (OpenSlide's
# "openslide.vendor" property); Philips, Ventana, NDPI and the rest keep OpenSlide.
VENDORS = ("aperio", "generic-tiff")
# Decoded tiles kept per reader: a row of 256-pixel tiles across a 100,000-pixel-wide slide is
# 77 MB, so a row-by-row scan decodes a tile about once; each reading worker holds its own.
CACHE_BYTES = 64 << 20
WHITE = 255


class TiffTiles:
    """Decoded-tile access to the levels of one tiled JPEG TIFF, in OpenSlide's level order."""

    def __init__(self, path: Path, tiff, pages: list) -> None:
        self.path = path
        self._tiff = tiff
        self._pages = pages
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()  # one file handle and one cache; GUI threads share them

    @classmethod
    def open(cls, path: Path, vendor: str | None, level_dimensions, check) -> TiffTiles | None:
        """The tiles of ``path`` if every level (``level_dimensions``, OpenSlide's) is a tiled
        JPEG page this class decodes and ``check(tiles)`` (a comparison with OpenSlide) passes;
        None otherwise."""
        if vendor not in VENDORS:
            return None
        import tifffile

        try:
            tiff = tifffile.TiffFile(path)
        except Exception:  # noqa: BLE001  (anything tifffile refuses stays with OpenSlide)
            return None
        try:
            pages = [_page_of(tiff, dims) for dims in level_dimensions]
            if any(p is None for p in pages):
                tiff.close()
                return None
            tiles = cls(path, tiff, pages)
            if not check(tiles):
                tiles.close()
                return None
            return tiles
        except Exception:  # noqa: BLE001  (a file that fails here is read by OpenSlide instead)
            tiff.close()
            return None

    def read(
        self, location: tuple[int, int], level: int, size: tuple[int, int], downsample: float
    ) -> np.ndarray | None:
        """The (H, W, 3) uint8 region of ``size`` at ``level`` whose top-left corner is level-0
        ``location``, white outside the image; None where the corner does not fall on a whole
        pixel of the level (OpenSlide resamples those)."""
        lx, ly = location[0] / downsample, location[1] / downsample
        if not (_whole(lx) and _whole(ly)):
            return None
        x0, y0 = round(lx), round(ly)
        w, h = int(size[0]), int(size[1])
        page = self._pages[level]
        iw, ih = page.imagewidth, page.imagelength
        tw, th = page.tilewidth, page.tilelength
        out = np.full((h, w, 3), WHITE, np.uint8)
        # The part of the region inside the image, in level pixels.
        ax0, ay0 = max(x0, 0), max(y0, 0)
        ax1, ay1 = min(x0 + w, iw), min(y0 + h, ih)
        if ax0 >= ax1 or ay0 >= ay1:
            return out
        across = math.ceil(iw / tw)
        with self._lock:
            for row in range(ay0 // th, (ay1 - 1) // th + 1):
                for col in range(ax0 // tw, (ax1 - 1) // tw + 1):
                    tile = self._tile(level, row * across + col)
                    # The overlap of this tile with the region, in level pixels.
                    sx0, sy0 = max(ax0, col * tw), max(ay0, row * th)
                    sx1, sy1 = min(ax1, (col + 1) * tw), min(ay1, (row + 1) * th)
                    if tile is None:
                        continue  # a tile the file does not store reads white, as in OpenSlide
                    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                        sy0 - row * th : sy1 - row * th, sx0 - col * tw : sx1 - col * tw
                    ]
        return out

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        key = (level, index)
        tile = self._cache.get(key)
        if tile is not None:
            self._cache.move_to_end(key)
            return tile
        page = self._pages[level]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            return None
        fh = self._tiff.filehandle
        fh.seek(offset)
        data = fh.read(count)
        decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        tile = np.ascontiguousarray(decoded[0])
        self._cache[key] = tile
        self._cached_bytes += tile.nbytes
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        return tile

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0
            self._tiff.close()


def _whole(value: float) -> bool:
    return abs(value - round(value)) < 1e-9


def _page_of(tiff, dims: tuple[int, int]):
    """The tiled 8-bit RGB/YCbCr JPEG page of ``dims`` (width, height), or None."""
    from tifffile import COMPRESSION, PHOTOMETRIC, PLANARCONFIG

    for page in tiff.pages:
        if (page.imagewidth, page.imagelength) != tuple(dims):
            continue
        ok = (
            page.is_tiled
            and page.compression == COMPRESSION.JPEG
            and page.photometric in (PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR)
            and page.samplesperpixel == 3
            and page.bitspersample == 8
            and page.planarconfig == PLANARCONFIG.CONTIG
            and page.imagedepth == 1
            and len(page.dataoffsets)
            == math.ceil(page.imagewidth / page.tilewidth)
            * math.ceil(page.imagelength / page.tilelength)
        )
        return page if ok else None
    return None
