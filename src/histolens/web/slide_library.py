"""The server-side slide folder: slides named by opaque ids, and their Deep Zoom tiles.

A client never sends a path. :class:`SlideLibrary` lists the slide files under one folder and
names each by a hash of its path relative to that folder; every other request looks the id up
in that listing, so an id that is not in it (a path, ``..``, an absolute path) is simply unknown.
Tiles come from OpenSlide's ``DeepZoomGenerator`` over one OpenSlide handle per slide, opened on
first use and kept (libopenslide's reads are thread-safe; Pillow-backed images get a lock).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histolens.errors import DataError
from histolens.slides.predict import SLIDE_SUFFIXES

__all__ = ["DZI_OVERLAP", "DZI_TILE_SIZE", "SlideEntry", "SlideLibrary", "UnknownSlide"]

DZI_TILE_SIZE = 254
DZI_OVERLAP = 1
_ID = re.compile(r"^[0-9a-f]{16}$")


class UnknownSlide(DataError):
    """No slide (or tile) of that id: answered with 404."""


@dataclass(frozen=True)
class SlideEntry:
    """One slide of the folder: its id, its path relative to the folder, size and mtime."""

    id: str
    name: str
    relative: str
    path: Path
    size: int
    mtime_ns: int

    @property
    def version(self) -> str:
        """Changes when the file does: part of the analysis cache key."""
        return f"{self.size}-{self.mtime_ns}"


def slide_id(relative: str) -> str:
    """The opaque id of a slide: the first 16 hex digits of SHA-256 of its relative path."""
    return hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()[:16]


class SlideLibrary:
    """The slides under ``root`` (searched recursively, hidden folders skipped).

    Args:
        root: the folder; it is only read.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise DataError(f"The slide folder {root} is not a folder.")
        self._lock = threading.Lock()
        self._entries: dict[str, SlideEntry] = {}
        self._zooms: dict[str, tuple[Any, Any, threading.Lock | None]] = {}
        self.refresh()

    def refresh(self) -> list[SlideEntry]:
        """Search the folder again; returns the slides sorted by relative path."""
        found: dict[str, SlideEntry] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.startswith(".") or path.suffix.lower() not in SLIDE_SUFFIXES:
                    continue
                real = path.resolve()
                if not real.is_relative_to(self.root) or not real.is_file():
                    continue  # a link out of the folder is not served
                relative = path.relative_to(self.root).as_posix()
                stat = real.stat()
                sid = slide_id(relative)
                found[sid] = SlideEntry(
                    sid, path.stem, relative, real, stat.st_size, stat.st_mtime_ns
                )
        with self._lock:
            self._entries = found
        return self.entries()

    def entries(self) -> list[SlideEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.relative)

    def get(self, sid: str) -> SlideEntry:
        """The slide of id ``sid``, else :class:`UnknownSlide`."""
        with self._lock:
            entry = self._entries.get(sid) if _ID.match(sid) else None
        if entry is None:
            raise UnknownSlide("There is no slide with that id; GET /v1/slides lists them.")
        return entry

    # --- Deep Zoom ------------------------------------------------------------------------------
    def _zoom(self, sid: str) -> tuple[Any, Any, threading.Lock | None]:
        entry = self.get(sid)
        with self._lock:
            held = self._zooms.get(sid)
            if held is None:
                import openslide
                from openslide.deepzoom import DeepZoomGenerator

                try:
                    slide = openslide.open_slide(str(entry.path))
                except (openslide.OpenSlideError, OSError) as exc:
                    raise DataError(f"{entry.relative} could not be opened: {exc}") from None
                zoom = DeepZoomGenerator(slide, DZI_TILE_SIZE, DZI_OVERLAP, limit_bounds=False)
                # ImageSlide (a plain image through Pillow) is not safe to share between threads.
                lock = None if isinstance(slide, openslide.OpenSlide) else threading.Lock()
                held = self._zooms[sid] = (slide, zoom, lock)
        return held

    def dzi(self, sid: str) -> str:
        """The slide's Deep Zoom descriptor (XML)."""
        return self._zoom(sid)[1].get_dzi("jpeg")

    def tile_jpeg(self, sid: str, level: int, col: int, row: int, quality: int = 80) -> bytes:
        """One Deep Zoom tile as JPEG bytes; :class:`UnknownSlide` when out of range."""
        _, zoom, lock = self._zoom(sid)
        if not 0 <= level < zoom.level_count:
            raise UnknownSlide(
                f"Deep Zoom level {level} does not exist (0-{zoom.level_count - 1})."
            )
        cols, rows = zoom.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise UnknownSlide(f"Tile {col}_{row} is outside level {level} ({cols} x {rows}).")
        if lock is None:
            tile = zoom.get_tile(level, (col, row))
        else:
            with lock:
                tile = zoom.get_tile(level, (col, row))
        buf = io.BytesIO()
        tile.convert("RGB").save(buf, "JPEG", quality=quality)
        return buf.getvalue()

    def dimensions(self, sid: str) -> tuple[int, int]:
        """Level-0 width and height of the slide."""
        return tuple(self._zoom(sid)[0].dimensions)

    def close(self) -> None:
        """Close every open slide handle."""
        with self._lock:
            zooms, self._zooms = self._zooms, {}
        for slide, _, _ in zooms.values():
            slide.close()
