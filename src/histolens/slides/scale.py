"""The scale slide tiles are read at: the field of tissue each model input covered in training.

A model sees one field of view per input. For a BreakHis-trained checkpoint that field is the
700 x 460-pixel image at its magnification; a slide tile must cover the same tissue (in microns)
before it is resized to the model's input, or the model sees cells at a size it never learnt.

BreakHis pixel size: Spanhol et al. (2016), "A Dataset for Breast Cancer Histopathological Image
Classification", IEEE TBME 63(7):1455-1462, took the images through an Olympus BX-50 with 4x, 10x,
20x and 40x objectives and a 10x eyepiece, and named them by the total magnification (40X to
400X); they publish no pixel size. We assume the scanner convention um/px = 10 / objective power
(as Aperio scanners and TIAToolbox's ``objective_power2mpp``), i.e. um/px = 100 / magnification:
``BREAKHIS_MPP``. A checkpoint trained on every magnification ('all') is tiled at 200X's scale,
the middle of its range and the 20x scale most slide models use; ``--tile-mpp`` overrides both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from histolens.errors import ConfigError

__all__ = ["BREAKHIS_IMAGE_SIZE", "BREAKHIS_MPP", "TileScale", "training_scale"]

BREAKHIS_IMAGE_SIZE = (700, 460)  # (width, height) of every BreakHis image
BREAKHIS_MPP = {40: 2.5, 100: 1.0, 200: 0.5, 400: 0.25}  # um/px = 100 / magnification (assumed)
MIXED_MAGNIFICATION = 200
SAME_FIELD = 0.05  # magnifications differ 2x or more: a field within 5% is unambiguous


@dataclass(frozen=True)
class TileScale:
    """The tissue field (microns) each tile covers, the model input it is resized to, and why.

    Attributes:
        field_um: (width, height) of one tile in microns.
        input_size: (width, height) of the model input the tile is resized to.
        source: one phrase saying where the scale comes from (printed and stored).
        magnification: the training magnification (BreakHis, 40 ... 400) whose image field the
            tiles cover, within :data:`SAME_FIELD`; None where an override matches none.
    """

    field_um: tuple[float, float]
    input_size: tuple[int, int]
    source: str
    # The training magnification whose field the tiles cover (None: they match none).
    magnification: int | None = None

    def __post_init__(self) -> None:
        if not all(math.isfinite(f) and f > 0 for f in self.field_um):
            raise ConfigError(f"A tile must cover a positive field, not {self.field_um} um.")

    @property
    def mpp(self) -> float:
        """Microns per pixel of the tile once resized to the model input (width-wise)."""
        return self.field_um[0] / self.input_size[0]

    def level0_size(self, slide_mpp: float) -> tuple[int, int]:
        """(width, height) of one tile in level-0 pixels of a slide at ``slide_mpp``."""
        return (
            max(1, round(self.field_um[0] / slide_mpp)),
            max(1, round(self.field_um[1] / slide_mpp)),
        )


def training_scale(
    input_size: tuple[int, int],
    magnification: str,
    tile_mpp: float | None = None,
    tile_size: int | None = None,
    image_mpp: float | None = None,
    image_size: tuple[int, int] | None = None,
) -> TileScale:
    """The tile scale of a model with ``input_size`` (height, width), trained at
    ``magnification`` ('40' ... '400' or 'all').

    ``image_mpp`` and ``image_size`` (width, height) are the training images' scale and size as
    the checkpoint recorded them (``--mpp`` at training); they come before the BreakHis
    magnification table. ``tile_mpp`` (microns per pixel of the model input) and ``tile_size``
    (square tiles of that many pixels at that scale, resized to the input) override both.
    """
    h, w = int(input_size[0]), int(input_size[1])
    fields = _training_fields(magnification, image_mpp, image_size, (w, h))
    if tile_mpp is not None and not (math.isfinite(tile_mpp) and tile_mpp > 0):
        raise ConfigError(f"--tile-mpp must be a positive number of microns, not {tile_mpp}.")
    if tile_size is not None and tile_size < 8:
        raise ConfigError(f"--tile-size must be at least 8 pixels, not {tile_size}.")
    if tile_mpp is not None:
        mpp_x = mpp_y = float(tile_mpp)
        source = f"--tile-mpp {tile_mpp:g}"
    elif image_mpp is not None:
        # The whole training image was resized to the input, so one input pixel covered
        # image_mpp * image pixels / input pixels (the input itself where no size is recorded).
        iw, ih = image_size if image_size is not None else (w, h)
        mpp_x, mpp_y = image_mpp * iw / w, image_mpp * ih / h
        source = f"checkpoint trained on {iw} x {ih} px images at {image_mpp:g} um/px (--mpp)"
    else:
        mixed = str(magnification) == "all"
        mag = MIXED_MAGNIFICATION if mixed else _magnification(magnification)
        if mag not in BREAKHIS_MPP:
            raise ConfigError(
                f"The checkpoint's magnification {magnification!r} has no known scale; give "
                "--tile-mpp (microns per pixel of the model input)."
            )
        native = BREAKHIS_MPP[mag]
        mpp_x = native * BREAKHIS_IMAGE_SIZE[0] / w
        mpp_y = native * BREAKHIS_IMAGE_SIZE[1] / h
        what = "trained on every magnification, tiled at 200X" if mixed else f"trained at {mag}X"
        source = (
            f"checkpoint {what}: a {BREAKHIS_IMAGE_SIZE[0]} x {BREAKHIS_IMAGE_SIZE[1]} "
            f"BreakHis field at an assumed {native:g} um/px"
        )
    if tile_size is not None:
        side = tile_size * mpp_x
        field_um, source = (side, side), f"{source}; --tile-size {tile_size}"
    else:
        field_um = (w * mpp_x, h * mpp_y)
    return TileScale(field_um, (w, h), source, _matching(field_um, fields))


def _training_fields(
    magnification: str,
    image_mpp: float | None,
    image_size: tuple[int, int] | None,
    input_wh: tuple[int, int],
) -> dict[int, tuple[float, float]]:
    """The tissue field (um) of one training image at each magnification the checkpoint was
    trained on: the recorded scale's (its magnification read off ``BREAKHIS_MPP``), else the
    BreakHis table's at the trained magnification, or at all four for 'all'."""
    if image_mpp is not None:
        iw, ih = image_size if image_size is not None else input_wh
        mags = [m for m, mpp in BREAKHIS_MPP.items() if abs(image_mpp / mpp - 1) <= SAME_FIELD]
        return {m: (iw * image_mpp, ih * image_mpp) for m in mags}
    mags = list(BREAKHIS_MPP) if str(magnification) == "all" else [_magnification(magnification)]
    return {
        m: (BREAKHIS_IMAGE_SIZE[0] * BREAKHIS_MPP[m], BREAKHIS_IMAGE_SIZE[1] * BREAKHIS_MPP[m])
        for m in mags
        if m in BREAKHIS_MPP
    }


def _matching(field_um: tuple[float, float], fields: dict[int, tuple[float, float]]) -> int | None:
    """The magnification whose training field ``field_um`` covers within SAME_FIELD, else None."""
    for mag, (fw, fh) in fields.items():
        if abs(field_um[0] / fw - 1) <= SAME_FIELD and abs(field_um[1] / fh - 1) <= SAME_FIELD:
            return mag
    return None


def _magnification(value: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1
