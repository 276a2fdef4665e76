"""Tissue mask and tile grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histolens.slides.reader import open_slide
from histolens.slides.scale import BREAKHIS_MPP, training_scale
from histolens.slides.tissue import mask_area_mm2, tile_grid, tissue_mask

DATA = Path(__file__).resolve().parents[1] / "data" / "slides"
CMU = DATA / "CMU-1-Small-Region.svs"
CMU_TISSUE = DATA / "CMU-1-Small-Region.tissue.png"


def test_cmu_mask_matches_the_hand_drawn_one():
    with open_slide(CMU) as s:
        thumb = s.thumbnail(8.0)
        mask = tissue_mask(thumb, s.mpp * s.dimensions[0] / thumb.size[0])
    truth = np.asarray(Image.open(CMU_TISSUE)) > 0
    assert mask.shape == truth.shape
    iou = (mask & truth).sum() / (mask | truth).sum()
    # The hand-drawn outline is good to about one thumbnail pixel (8 um) along a ~600-pixel
    # boundary around ~9,500 tissue pixels, i.e. ~6% of the area each way: IoU 0.85 leaves room
    # for that and fails if the mask misses a lobe or takes in the glass (measured 0.897).
    assert iou >= 0.85
    assert (mask & truth).sum() / truth.sum() >= 0.88  # the tissue is covered


def test_glass_only_gives_an_empty_mask():
    rng = np.random.default_rng(0)
    glass = (240 + rng.integers(-3, 4, (100, 120, 3))).astype(np.uint8)
    assert not tissue_mask(Image.fromarray(glass), 8.0).any()
    assert not tissue_mask(Image.new("RGB", (50, 50), (255, 255, 255)), 8.0).any()


def test_grid_keeps_tiles_by_tissue_share():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half of a 1000 x 1000 slide
    grid = tile_grid((1000, 1000), (200, 200), mask, min_tissue=0.5)
    # Columns at x = 0 and 200 are all tissue, at 400 half ([400, 600) against [0, 500)).
    assert len(grid) == 15
    assert set(grid.coords[:, 0]) == {0, 200, 400}
    assert set(grid.tissue[grid.coords[:, 0] == 400]) == {0.5}
    assert np.all(grid.tissue[grid.coords[:, 0] < 400] == 1.0)
    straddle = tile_grid((1000, 1000), (200, 200), mask, min_tissue=0.0)
    assert len(straddle) == 25
    overlap = tile_grid((1000, 1000), (200, 200), mask, min_tissue=0.5, overlap=0.5)
    assert overlap.stride == (100, 100)
    # Columns 0 to 300 are all tissue, 400 half: kept in rows 0 to 800; the row at 900 hangs
    # half over the edge, which keeps 0 to 300 (half tissue) and drops 400 (a quarter).
    assert sorted(set(overlap.coords[:, 0])) == [0, 100, 200, 300, 400]
    assert len(overlap) == 5 * 9 + 4
    # A tile hanging over the slide's edge counts the part outside as glass.
    full = np.ones((10, 11), bool)  # a 1100 x 1000 slide, all tissue
    edge = tile_grid((1100, 1000), (200, 200), full, min_tissue=0.5)
    assert sorted(set(edge.coords[:, 0])) == [0, 200, 400, 600, 800, 1000]
    assert set(edge.tissue[edge.coords[:, 0] == 1000]) == {0.5}
    assert 1000 not in tile_grid((1100, 1000), (200, 200), full, min_tissue=0.6).coords[:, 0]
    assert mask_area_mm2(mask, (1000, 1000), 1.0) == pytest.approx(0.5)


def test_training_scale_from_breakhis_magnification():
    scale = training_scale((294, 448), "200")
    # 700 x 460 px at the assumed 0.5 um/px of 200X, into a 448 x 294 input.
    assert scale.field_um == pytest.approx((350.0, 230.0))
    assert scale.input_size == (448, 294)
    assert scale.level0_size(0.25) == (1400, 920)
    assert training_scale((294, 448), "all").field_um == scale.field_um
    assert training_scale((294, 448), "40").field_um[0] == pytest.approx(700 * BREAKHIS_MPP[40])
    assert training_scale((224, 224), "200", tile_mpp=0.5).field_um == (112.0, 112.0)
    assert training_scale((224, 224), "200", tile_mpp=0.5, tile_size=256).field_um == (128.0, 128.0)
