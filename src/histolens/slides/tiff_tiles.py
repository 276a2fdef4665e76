"""Regions of a tiled JPEG TIFF pyramid (Aperio SVS, generic tiled TIFF) read straight from its
tiles: each tile is decoded once (imagecodecs' libjpeg-turbo, the colour space set from the TIFF
tags as OpenSlide sets it) and kept in a small cache, and a region is cut from decoded tiles by
array copies.

Why: OpenSlide composites every region through cairo, about 0.55-0.8 ms of CPU for a 224-pixel
tile even when its tiles are in OpenSlide's cache (``benchmarks/results/bench_slide.txt``); on a
2-core machine that is CPU the model does not get. The slide pipeline's reading workers, the
thumbnail and the viewers read regions on whole pixels of a level, which :class:`TiffTiles`
serves; everything else stays with OpenSlide.

Only what is checked is served. The levels must be the pages OpenSlide takes as levels, in its
order (Aperio: every tiled page; generic TIFF: page 0 and the reduced-resolution tiled pages,
widest first), each a tiled 8-bit RGB or YCbCr JPEG page of OpenSlide's size with every tile
stored (OpenSlide fills a missing Aperio tile from the level above; a missing generic TIFF tile is
an error), a level's downsample a whole number, and a probe in the middle of every level read
both ways when the file is opened equal to the bit; otherwise :meth:`TiffTiles.open` returns None
and OpenSlide reads everything. A tile that fails to decode later leaves its region to OpenSlide,
which reports a corrupt file in its own words.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["CACHE_BYTES", "TiffTiles"]

# OpenSlide's "openslide.vendor" values whose levels are plain tiled TIFF pages; Philips, Ventana,
# NDPI and the others keep OpenSlide.
VENDORS = ("aperio", "generic-tiff")
# Decoded tiles kept per reader (each reading worker holds its own). A tissue row of 224-pixel
# tiles spans two rows of 256-pixel TIFF tiles; where those need more than this (tissue wider
# than about 40,000 pixels), a row-by-row scan decodes a tile up to twice, which still costs less
# than OpenSlide's compositing.
CACHE_BYTES = 64 << 20
WHITE = 255
# libjpeg's colour spaces (J_COLOR_SPACE), chosen from the page's photometric tag as OpenSlide
# does, never guessed from the JPEG's own markers.
_JCS_RGB, _JCS_YCBCR = 2, 3

Region = tuple[tuple[int, int], int, tuple[int, int]]


class TiffTiles:
    """Decoded-tile access to the levels of one tiled JPEG TIFF, in OpenSlide's level order."""

    def __init__(self, tiff, pages: Sequence, downsamples: Sequence[float]) -> None:
        self._tiff = tiff
        self._pages = list(pages)
        self._downsamples = [int(round(d)) if _whole(d) else None for d in downsamples]
        self._colorspaces = [_colorspace(p) for p in self._pages]
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()  # the file handle and the cache; viewer threads share them

    @classmethod
    def open(
        cls,
        path: Path,
        vendor: str | None,
        level_dimensions: Sequence[tuple[int, int]],
        level_downsamples: Sequence[float],
        reference: Callable[[tuple[int, int], int, tuple[int, int]], np.ndarray],
    ) -> TiffTiles | None:
        """The tiles of ``path`` if its levels (OpenSlide's dimensions and downsamples) are
        pages this class decodes and a region in the middle of every level reads exactly what
        ``reference(location, level, size)`` (OpenSlide) reads; None otherwise."""
        if vendor not in VENDORS:
            return None
        import tifffile

        try:
            tiff = tifffile.TiffFile(path)
        except Exception:  # noqa: BLE001  (anything tifffile refuses stays with OpenSlide)
            return None
        try:
            pages = _level_pages(tiff, vendor)
            if len(pages) != len(level_dimensions) or not all(
                (p.imagewidth, p.imagelength) == tuple(d) and _decodable(p)
                for p, d in zip(pages, level_dimensions, strict=False)
            ):
                tiff.close()
                return None
            tiles = cls(tiff, pages, level_downsamples)
        except Exception:  # noqa: BLE001  (a file that fails here is read by OpenSlide instead)
            tiff.close()
            return None
        ok = False
        try:  # OpenSlide's own error on a probe (a corrupt slide) goes to the caller
            ok = all(
                (mine := tiles.read(*probe)) is not None and np.array_equal(mine, reference(*probe))
                for probe in tiles._probes(level_dimensions)
            )
        finally:
            if not ok:
                tiles.close()
        return tiles if ok else None

    def read(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray | None:
        """The (H, W, 3) uint8 region of ``size`` at ``level`` whose top-left corner is level-0
        ``location``, white outside the image; None where OpenSlide must read it (a corner off
        the level's pixel grid, a level whose downsample is not whole, a tile that does not
        decode)."""
        w, h = int(size[0]), int(size[1])
        if not 0 <= level < len(self._pages) or w <= 0 or h <= 0:
            return None  # OpenSlide's answer (white, or its error) stands
        ds = self._downsamples[level]
        x, y = int(location[0]), int(location[1])  # as OpenSlide's reader takes them
        if ds is None or x % ds or y % ds:
            return None
        x0, y0 = x // ds, y // ds
        page = self._pages[level]
        iw, ih = page.imagewidth, page.imagelength
        tw, th = page.tilewidth, page.tilelength
        # The part of the region inside the image, in level pixels; outside it reads white.
        ax0, ay0 = max(x0, 0), max(y0, 0)
        ax1, ay1 = min(x0 + w, iw), min(y0 + h, ih)
        inside = (ax0, ay0, ax1, ay1) == (x0, y0, x0 + w, y0 + h)
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), WHITE, np.uint8)
        if ax0 >= ax1 or ay0 >= ay1:
            return out
        across = math.ceil(iw / tw)
        for row in range(ay0 // th, (ay1 - 1) // th + 1):
            for col in range(ax0 // tw, (ax1 - 1) // tw + 1):
                try:
                    tile = self._tile(level, row * across + col)
                except Exception:  # noqa: BLE001  (OpenSlide re-reads it and names the fault)
                    return None
                # The overlap of this tile with the region, in level pixels.
                sx0, sy0 = max(ax0, col * tw), max(ay0, row * th)
                sx1, sy1 = min(ax1, (col + 1) * tw), min(ay1, (row + 1) * th)
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = tile[
                    sy0 - row * th : sy1 - row * th, sx0 - col * tw : sx1 - col * tw
                ]
        return out

    def _probes(self, level_dimensions: Sequence[tuple[int, int]]) -> list[Region]:
        """A region across tile borders in the middle of every level, on its pixel grid."""
        probes = []
        for level, (w, h) in enumerate(level_dimensions):
            ds = self._downsamples[level]
            if ds is None:
                continue
            size = (min(256, w), min(256, h))
            corner = (max(0, w // 2 - 128) * ds, max(0, h // 2 - 128) * ds)
            probes.append((corner, level, size))
        return probes

    def _tile(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        page = self._pages[level]
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
            fh = self._tiff.filehandle
            fh.seek(page.dataoffsets[index])
            data = fh.read(page.databytecounts[index])
        # A short read or a tile cut before its end marker goes to OpenSlide, whose decoder
        # stops on what libjpeg only warns about (damage inside the entropy-coded data that
        # still decodes is not caught here: OpenSlide would refuse it).
        if len(data) != page.databytecounts[index] or data[-2:] != b"\xff\xd9":
            raise ValueError(f"tile {index} is truncated")
        import imagecodecs

        tile = imagecodecs.jpeg8_decode(  # the GIL is released: threads decode side by side
            data,
            tables=page.jpegtables,
            colorspace=self._colorspaces[level],
            outcolorspace=_JCS_RGB,
            shape=(page.tilelength, page.tilewidth),
        )
        if tile.shape != (page.tilelength, page.tilewidth, 3):
            raise ValueError(f"tile {index} decodes to {tile.shape}")
        with self._lock:
            if key in self._cache:  # another thread decoded it meanwhile: keep one copy
                return self._cache[key]
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


def _level_pages(tiff, vendor: str) -> list:
    """The pages OpenSlide takes as levels: Aperio, every tiled page in file order; generic
    TIFF, page 0 and the tiled reduced-resolution pages, widest first."""
    pages = list(tiff.pages)
    if vendor == "aperio":
        return [p for p in pages if p.is_tiled]
    levels = [p for i, p in enumerate(pages) if p.is_tiled and (i == 0 or p.subfiletype & 1)]
    return sorted(levels, key=lambda p: -p.imagewidth)


def _decodable(page) -> bool:
    """A tiled 8-bit RGB/YCbCr JPEG page of one plane with every tile stored."""
    from tifffile import COMPRESSION, PHOTOMETRIC, PLANARCONFIG

    tiles = math.ceil(page.imagewidth / page.tilewidth) * math.ceil(
        page.imagelength / page.tilelength
    )
    return bool(
        page.compression == COMPRESSION.JPEG
        and page.photometric in (PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR)
        and page.samplesperpixel == 3
        and page.bitspersample == 8
        and not page.extrasamples
        and page.planarconfig == PLANARCONFIG.CONTIG
        and page.imagedepth == 1
        and len(page.dataoffsets) == tiles
        and all(page.databytecounts)
    )


def _colorspace(page) -> int:
    from tifffile import PHOTOMETRIC

    return _JCS_YCBCR if page.photometric == PHOTOMETRIC.YCBCR else _JCS_RGB
