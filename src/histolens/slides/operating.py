"""The operating point slide tiles are decided at: their magnification's, else the pooled one.

A checkpoint stores a decision threshold per magnification (``histolens.stats.decisions``), and
prediction sets calibrated per magnification. Slide tiles are cut at a training field
(``histolens.slides.scale``), so they are images of that magnification: every tile is decided,
and its prediction set made, as an image of it. Where ``--tile-mpp``/``--tile-size`` cut tiles
that match no training magnification, tiles get the pooled threshold (and the most cautious
prediction sets, as an image of unknown magnification) and the run says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from histolens.slides.scale import TileScale

__all__ = ["TileOperatingPoint", "tile_operating_point"]


@dataclass(frozen=True)
class TileOperatingPoint:
    """The magnification tiles are decided as (None: unknown), the threshold of the GeoJSON and
    the slide's counts, and one line saying where both come from."""

    magnification: int | None
    threshold: float
    description: str

    @property
    def label(self) -> str:
        """The magnification as stored in slides.csv and the HDF5 attrs ('200X', or 'pooled')."""
        return f"{self.magnification}X" if self.magnification is not None else "pooled"

    def as_attrs(self) -> dict[str, str | float]:
        """What the HDF5 attrs and the slide summary record of it."""
        return {
            "magnification": self.label,
            "threshold": float(self.threshold),
            "operating_point": self.description,
        }


def tile_operating_point(
    predictor, scale: TileScale, threshold: float | None = None
) -> TileOperatingPoint:
    """The operating point of tiles at ``scale`` for ``predictor``; ``threshold`` (--threshold)
    overrides the threshold only (prediction sets keep the magnification's calibration)."""
    mag = scale.magnification
    if not predictor.is_binary:
        what = f"{mag}X prediction sets" if mag else "pooled prediction sets"
        return TileOperatingPoint(mag, 0.5 if threshold is None else float(threshold), what)
    ops = predictor.operating_points
    if threshold is not None:
        chosen, why = float(threshold), "--threshold"
    elif mag is None:
        chosen = float(predictor.threshold_for(None))
        why = (
            f"the pooled threshold: tiles at {scale.mpp:.3f} um/px over "
            f"{scale.field_um[0]:.0f} x {scale.field_um[1]:.0f} um match no training "
            "magnification"
        )
    elif ops is None:
        chosen = float(predictor.threshold)
        why = f"{mag}X tiles; the checkpoint stores one threshold for all magnifications"
    elif str(mag) in ops.thresholds:
        chosen = float(predictor.threshold_for(mag))
        why = (
            f"{mag}X's threshold (one choice shared across magnifications, moved by {mag}X's "
            f"offset {ops.offsets[str(mag)]:+.2f} logit)"
            if str(mag) in ops.offsets
            else f"{mag}X's own threshold"
        )
    else:
        chosen = float(predictor.threshold_for(mag))
        why = f"{mag}X tiles, which borrow the pooled threshold (too few {mag}X patients)"
    return TileOperatingPoint(mag, chosen, f"threshold {chosen:.3f}: {why}")
