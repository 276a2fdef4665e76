"""One small slide-reader interface over OpenSlide and Pillow, and the slide's scale (um/px).

:func:`open_slide` picks the backend: Pillow for a plain PNG / JPEG / BMP, OpenSlide for the rest
(SVS, NDPI, MRXS, Philips and generic tiled TIFF, DICOM). Both answer the same questions (levels,
dimensions, downsamples, microns per pixel, objective power) and read regions in level-0
coordinates, so a plain image goes through the same pipeline as a slide.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

from histolens.errors import DataError, ImageLoadError

__all__ = [
    "OBJECTIVE_MPP_RULE",
    "PLAIN_IMAGE_SUFFIXES",
    "OpenSlideReader",
    "PillowReader",
    "SlideReader",
    "TIFF_TILES_ENV",
    "mpp_from_objective",
    "open_slide",
]

PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# Set to 0 to read every region through OpenSlide (histolens.slides.tiff_tiles is then unused).
TIFF_TILES_ENV = "HISTOLENS_TIFF_TILES"
# Where a slide stores an objective power but no pixel size: um/px = 10 / power (20x -> 0.5,
# 40x -> 0.25), the convention of Aperio scanners and TIAToolbox's ``objective_power2mpp``.
OBJECTIVE_MPP_RULE = "10 / objective power"
# Plain images bigger than this are refused (a decompression bomb, or a slide saved as PNG).
PLAIN_IMAGE_MAX_PIXELS = 400_000_000


def mpp_from_objective(power: float) -> float:
    """Microns per pixel assumed for a scan at objective ``power`` (see OBJECTIVE_MPP_RULE)."""
    return 10.0 / float(power)


def _ask_for_mpp(path: Path, why: str) -> DataError:
    return DataError(
        f"{path} {why}; give its level-0 scale with --mpp (microns per pixel, e.g. 0.25 for a "
        "40x scan, 0.5 for 20x)."
    )


class SlideReader(ABC):
    """A slide (or a plain image) read by region; coordinates are level-0 pixels.

    Attributes:
        path: the file.
        mpp: microns per level-0 pixel, and ``mpp_source`` says where it came from.
        objective_power: the scan's objective power, None when not recorded.
    """

    path: Path
    mpp: float
    mpp_source: str
    objective_power: float | None

    # --- the pyramid -----------------------------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each level, level 0 first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of each level relative to level 0."""

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) at level 0."""
        return self.level_dimensions[0]

    def best_level(self, downsample: float) -> int:
        """The smallest level that is still at least as sharp as ``downsample`` asks."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-6):
                best = i
        return best

    # --- reading ---------------------------------------------------------------------------
    @abstractmethod
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        """RGB region of ``size`` (w, h) pixels at ``level``, its top-left corner at level-0
        ``location``; outside the slide reads white."""

    def read_field(self, x: int, y: int, width: int, height: int, scale: float) -> Image.Image:
        """The level-0 field (x, y, width, height), read from the best level for a downsample
        of ``scale`` (the caller resizes it to its own size)."""
        return self.read_region((x, y), *self._field_level(width, height, scale))

    def read_field_rgb(self, x: int, y: int, width: int, height: int, scale: float) -> np.ndarray:
        """:meth:`read_field`'s pixels as an (H, W, 3) uint8 array, for the tile loop (a backend
        that has them as one returns it without an image object)."""
        img = self.read_field(x, y, width, height, scale)
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))

    def _field_level(self, width: int, height: int, scale: float) -> tuple[int, tuple[int, int]]:
        """The level a level-0 field is read from for a downsample of ``scale``, and its size
        there."""
        level = self.best_level(scale)
        ds = self.level_downsamples[level]
        return level, (max(1, round(width / ds)), max(1, round(height / ds)))

    def thumbnail(self, mpp: float = 8.0) -> Image.Image:
        """The whole slide at about ``mpp`` microns per pixel (never larger than level 0)."""
        w, h = self.dimensions
        factor = max(1.0, mpp / self.mpp)
        size = (max(1, round(w / factor)), max(1, round(h / factor)))
        return self._thumbnail(size)

    @abstractmethod
    def _thumbnail(self, size: tuple[int, int]) -> Image.Image: ...

    def close(self) -> None:  # noqa: B027  (backends without a handle have nothing to close)
        """Release the file handle."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """One line: size, levels and scale, for logs."""
        w, h = self.dimensions
        power = f", {self.objective_power:g}x" if self.objective_power else ""
        return (
            f"{self.path.name}: {w:,} x {h:,} px, {self.level_count} level(s), "
            f"{self.mpp:.3f} um/px ({self.mpp_source}){power}"
        )


def _rgba_on_white(img: Image.Image) -> np.ndarray:
    """OpenSlide's RGBA (transparent outside scanned areas) as RGB on white: an (H, W, 3) uint8
    array, a view of the RGBA pixels where all are opaque (the common case: no copy)."""
    arr = np.asarray(img)
    alpha = arr[..., 3]
    if alpha.min() == 255:
        return arr[..., :3]
    a = alpha[..., None].astype(np.float32) / 255.0
    rgb = arr[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


class OpenSlideReader(SlideReader):
    """A slide read by OpenSlide (SVS, NDPI, MRXS, tiled TIFF, DICOM, ...)."""

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        import openslide

        self.path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise DataError(
                f"{path} is not a slide format OpenSlide reads (SVS, NDPI, MRXS, tiled TIFF, "
                "DICOM, ...)."
            ) from None
        except (openslide.OpenSlideError, OSError) as exc:
            raise DataError(
                f"{path} cannot be read as a slide (corrupt or truncated: {exc})."
            ) from None
        props = self._slide.properties
        power = _positive(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        self.objective_power = power
        mpps = [
            _positive(props.get(k))
            for k in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y)
        ]
        if mpp is not None:
            self.mpp, self.mpp_source = float(mpp), "--mpp"
        elif all(m is not None for m in mpps):
            self.mpp, self.mpp_source = float(np.mean(mpps)), "slide metadata"
        elif power is not None:
            self.mpp = mpp_from_objective(power)
            self.mpp_source = (
                f"assumed from objective power {power:g}x as {OBJECTIVE_MPP_RULE}; "
                "give --mpp if wrong"
            )
        else:
            self._slide.close()
            raise _ask_for_mpp(path, "records neither microns per pixel nor objective power")
        # Tiled JPEG TIFFs (SVS, generic) are read from their decoded tiles where that gives
        # OpenSlide's pixels (histolens.slides.tiff_tiles); OpenSlide reads everything else.
        self._tiles = None
        if os.environ.get(TIFF_TILES_ENV, "1").strip() != "0":
            from histolens.slides.tiff_tiles import TiffTiles

            try:
                self._tiles = TiffTiles.open(
                    path,
                    props.get(openslide.PROPERTY_NAME_VENDOR),
                    self.level_dimensions,
                    self.level_downsamples,
                    self._read_openslide,
                )
            except DataError:  # OpenSlide could not read a probe: the slide is corrupt
                self._slide.close()
                raise

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(d) for d in self._slide.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._slide.level_downsamples)

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        return Image.fromarray(self._read_rgb(location, level, size))

    def read_field_rgb(self, x: int, y: int, width: int, height: int, scale: float) -> np.ndarray:
        return self._read_rgb((x, y), *self._field_level(width, height, scale))

    def _read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if self._tiles is not None:
            region = self._tiles.read(location, level, size)
            if region is not None:
                return region
        return self._read_openslide(location, level, size)

    def _read_openslide(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        import openslide

        try:
            region = self._slide.read_region(
                (int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1]))
            )
        except openslide.OpenSlideError as exc:
            raise DataError(f"{self.path} cannot be read at {location} (corrupt: {exc}).") from None
        return _rgba_on_white(region)

    @property
    def reads_tiles(self) -> bool:
        """Whether level-aligned regions come from decoded TIFF tiles rather than OpenSlide."""
        return self._tiles is not None

    def _thumbnail(self, size: tuple[int, int]) -> Image.Image:
        w, h = self.dimensions
        level = self.best_level(min(w / size[0], h / size[1]))
        region = self.read_region((0, 0), level, self.level_dimensions[level])
        return region.resize(size, Image.Resampling.BOX)

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
            self._tiles = None
        self._slide.close()


class PillowReader(SlideReader):
    """A plain PNG / JPEG / BMP as a one-level slide; its scale must be given (``mpp``)."""

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        from histolens.data.imageio import load_rgb

        self.path = path
        if mpp is None:
            raise _ask_for_mpp(path, "is a plain image with no reliable scale")
        try:
            self._image = load_rgb(path, max_pixels=PLAIN_IMAGE_MAX_PIXELS)
        except ImageLoadError as exc:
            raise DataError(f"{path} cannot be read: {exc.reason}.") from None
        self.mpp, self.mpp_source, self.objective_power = float(mpp), "--mpp", None

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return (self._image.size,)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        iw, ih = self._image.size
        if x >= 0 and y >= 0 and x + w <= iw and y + h <= ih:
            return self._image.crop((x, y, x + w, y + h))
        out = Image.new("RGB", (w, h), (255, 255, 255))
        box = (max(0, x), max(0, y), min(iw, x + w), min(ih, y + h))
        if box[0] < box[2] and box[1] < box[3]:
            out.paste(self._image.crop(box), (box[0] - x, box[1] - y))
        return out

    def _thumbnail(self, size: tuple[int, int]) -> Image.Image:
        return self._image.resize(size, Image.Resampling.BOX)


def _positive(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> SlideReader:
    """Open a slide or a plain image; ``mpp`` (microns per level-0 pixel) overrides the file's.

    Raises DataError with one sentence for a missing, unsupported or corrupt file, or one whose
    scale is neither recorded nor given.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist.")
    if path.is_dir() and path.suffix.lower() != ".mrxs":
        raise DataError(f"{path} is a folder, not a slide file.")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise DataError(f"--mpp must be a positive number of microns per pixel, not {mpp}.")
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        return PillowReader(path, mpp)
    return OpenSlideReader(path, mpp)
