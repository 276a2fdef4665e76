"""Reading images the way real folders have them: every failure becomes an ImageLoadError."""

from __future__ import annotations

import io
import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from histolens.errors import ImageLoadError

__all__ = ["IMAGE_SUFFIXES", "MAX_PIXELS", "is_image_name", "load_rgb", "load_rgb_bytes", "to_rgb"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
# Microscopy tiles are at most a few thousand pixels a side; 64 MP leaves room for stitched
# fields of view while refusing decompression bombs long before they allocate gigabytes.
MAX_PIXELS = 64_000_000
# PIL's bomb limit is a module global; opening under a lock keeps concurrent callers (the web
# service decodes in threads) from seeing each other's limit.
_OPEN_LOCK = threading.Lock()


def is_image_name(path: str | os.PathLike) -> bool:
    """True when the file name has an image suffix (case-insensitive) and is not hidden."""
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F) to 8-bit RGB.

    Transparent pixels are composited on white (a slide's background); 16-bit and float images
    are rescaled from their own range, not clipped, so faint 16-bit scans stay visible.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16") and hi <= 255:
            scaled = arr
        else:
            scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK (PIL undoes Adobe's inverted JPEG CMYK itself), YCbCr, HSV, LAB, 1-bit: plain convert.
    return img.convert("RGB")


def _open_checked(fp, path_for_errors: str, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with _OPEN_LOCK:
                old_limit = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = max_pixels
                try:
                    img = Image.open(fp)  # reads the header only
                finally:
                    Image.MAX_IMAGE_PIXELS = old_limit
            width, height = img.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    path_for_errors,
                    f"image is {width}x{height} pixels, over the {max_pixels:,}-pixel limit "
                    "(possible decompression bomb)",
                    "too_large",
                )
            img.load()
        except ImageLoadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageLoadError(
                path_for_errors, f"refused as a possible decompression bomb ({exc})", "too_large"
            ) from None
        except UnidentifiedImageError:
            raise ImageLoadError(
                path_for_errors, "not an image file PIL can read", "not_image"
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            msg = str(exc) or type(exc).__name__
            if "truncated" in msg.lower():
                msg = f"truncated or corrupt image data ({msg})"
            else:
                msg = f"corrupt image data ({msg})"
            raise ImageLoadError(path_for_errors, msg, "corrupt") from None
    if img.size[0] == 0 or img.size[1] == 0:
        raise ImageLoadError(path_for_errors, "image has zero width or height", "corrupt")
    return img


def load_rgb(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read an image file as 8-bit RGB, only reading the file; raise ImageLoadError on failure."""
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "file does not exist", "missing")
    if path.is_dir():
        raise ImageLoadError(path, "is a folder, not an image file", "unreadable")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(path, f"cannot be read ({exc.strerror})", "unreadable") from None
    if size == 0:
        raise ImageLoadError(path, "file is empty (0 bytes)", "empty")
    try:
        with open(path, "rb") as fh:
            img = _open_checked(fh, str(path), max_pixels)
            return to_rgb(img)
    except PermissionError:
        raise ImageLoadError(path, "permission denied", "unreadable") from None


def load_rgb_bytes(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read an in-memory image (an upload) as RGB; raise ImageLoadError on failure."""
    if not data:
        raise ImageLoadError(name, "file is empty (0 bytes)", "empty")
    return to_rgb(_open_checked(io.BytesIO(data), name, max_pixels))
