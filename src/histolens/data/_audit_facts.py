"""What the shortcut audit reads from each image: header facts, JPEG quality, thumbnail colour.

Also the image's source folder, which comes from its path, not its pixels.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histolens.data.records import BINARY_CLASSES, ImageRecord, Skipped
from histolens.errors import ImageLoadError

THUMBNAIL_SIZE = 64

# The IJG (libjpeg) luminance quantisation table at quality 50; encoders scale it by quality.
_IJG_LUMINANCE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ]
).ravel()


def _ijg_tables() -> np.ndarray:
    q = np.arange(1, 101)
    scale = np.where(q < 50, 5000 // q, 200 - 2 * q)
    tables = np.clip((_IJG_LUMINANCE[None, :] * scale[:, None] + 50) // 100, 1, 255)
    return np.sort(tables, axis=1)


_IJG_SORTED = _ijg_tables()


def estimate_jpeg_quality(tables: dict[int, Sequence[int]] | None) -> int | None:
    """The IJG quality (1-100) whose luminance table is closest to the file's; None without one.

    Values are compared sorted, so the estimate does not depend on zigzag vs natural order.
    """
    if not tables or 0 not in tables or len(tables[0]) != 64:
        return None
    observed = np.sort(np.asarray(tables[0], dtype=np.int64))
    return int(np.argmin(np.abs(_IJG_SORTED - observed).sum(axis=1))) + 1


@dataclass(frozen=True)
class ImageFacts:
    """What the audit reads from one image file; colour fields are None when not decoded."""

    width: int
    height: int
    format: str
    file_bytes: int
    jpeg_quality: int | None = None
    mean_rgb: tuple[float, float, float] | None = None
    saturation: float | None = None


def read_image_facts(
    path: str | os.PathLike, max_pixels: int | None = None, colour: bool = True
) -> ImageFacts:
    """Header facts plus a thumbnail's colour; raises ImageLoadError when the file is unusable.

    Only the header is parsed for size and format; colour comes from a ``THUMBNAIL_SIZE`` px
    thumbnail (JPEG decodes at reduced scale via ``draft``). Images over ``max_pixels`` (default:
    the loader's limit) keep their size but get no colour; ``colour=False`` reads headers only.
    """
    from histolens.data.imageio import MAX_PIXELS, to_rgb

    limit = MAX_PIXELS if max_pixels is None else max_pixels
    path = Path(path)
    try:
        file_bytes = path.stat().st_size
        with Image.open(path) as img:
            width, height = img.size
            fmt = (img.format or path.suffix.lstrip(".")).upper()
            quality = (
                estimate_jpeg_quality(getattr(img, "quantization", None)) if fmt == "JPEG" else None
            )
            if width <= 0 or height <= 0:
                raise ImageLoadError(path, "image has zero width or height", "corrupt")
            if not colour or width * height > limit:
                return ImageFacts(width, height, fmt, file_bytes, quality)
            if fmt == "JPEG":
                img.draft("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            img.load()
            thumb = to_rgb(img)
            factor = max(1, min(thumb.size) // THUMBNAIL_SIZE)
            if factor > 1:
                thumb = thumb.reduce(factor)
            rgb = np.asarray(thumb, dtype=np.float64)
            saturation = np.asarray(thumb.convert("HSV"), dtype=np.float64)[..., 1].mean() / 255
    except ImageLoadError:
        raise
    except Exception as exc:  # any decoder failure is one skipped file, never a crash
        raise ImageLoadError(path, f"cannot be read ({str(exc) or type(exc).__name__})") from None
    mean = rgb.reshape(-1, 3).mean(axis=0) / 255
    return ImageFacts(
        width,
        height,
        fmt,
        file_bytes,
        quality,
        (float(mean[0]), float(mean[1]), float(mean[2])),
        float(saturation),
    )


def read_all_facts(
    records: Sequence[ImageRecord], progress: bool, colour: bool
) -> tuple[list[ImageFacts | None], list[Skipped]]:
    """Facts of every record (None where unreadable) and the files skipped, read on two threads."""
    from tqdm.auto import tqdm

    def read(record: ImageRecord) -> ImageFacts | Skipped:
        try:
            return read_image_facts(record.path, colour=colour)
        except ImageLoadError as exc:
            return Skipped(record.path, exc.reason)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(
                tqdm(
                    pool.map(read, records),
                    total=len(records),
                    desc="Auditing",
                    unit="img",
                    disable=not progress,
                )
            )
    facts = [r if isinstance(r, ImageFacts) else None for r in results]
    return facts, [r for r in results if isinstance(r, Skipped)]


def source_folders(records: Sequence[ImageRecord], root: Path | None) -> list[str]:
    """First folder under the root of each image, unless that folder is a class folder."""
    paths = [Path(os.path.abspath(r.path)) for r in records]
    if root is not None:
        root = Path(os.path.abspath(root))  # record paths are absolute; a given root may not be
    if root is None:
        try:
            root = Path(os.path.commonpath([p.parent for p in paths]))
        except ValueError:  # different drives
            return ["(top level)"] * len(records)
    class_names = {c.lower() for c in BINARY_CLASSES} | {r.label.lower() for r in records}
    folders = []
    for p in paths:
        try:
            parts = p.parent.relative_to(root).parts
        except ValueError:
            parts = ()
        first = parts[0] if parts else ""
        folders.append(first if first and first.lower() not in class_names else "(top level)")
    return folders
