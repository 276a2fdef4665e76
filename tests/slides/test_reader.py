"""The slide reader: levels, scale (metadata, objective power, --mpp) and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histolens.errors import DataError
from histolens.slides.reader import OpenSlideReader, PillowReader, open_slide

DATA = Path(__file__).resolve().parents[1] / "data" / "slides"
CMU = DATA / "CMU-1-Small-Region.svs"
CMU_TISSUE = DATA / "CMU-1-Small-Region.tissue.png"


def test_cmu_slide_metadata():
    with open_slide(CMU) as s:
        assert isinstance(s, OpenSlideReader)
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1
        assert s.mpp == pytest.approx(0.499)
        assert s.mpp_source == "slide metadata"
        assert s.objective_power == 20
        thumb = s.thumbnail(8.0)
        # 2220 px * 0.499 um / 8 um = 138.5 px
        assert thumb.size == (138, 185)


def test_pyramid_has_every_level_and_reduced_levels_hold_tissue(pyramid):
    path, slide = pyramid
    with open_slide(path) as s:
        assert s.level_dimensions == ((4096, 4096), (1024, 1024), (256, 256))
        assert s.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert s.mpp == pytest.approx(0.5, rel=1e-4)  # from the TIFF's resolution in cm
        # The slide's centre is tissue: level 1 must show it, not a blank page.
        region = np.asarray(s.read_region((1536, 1536), 1, (256, 256))).astype(np.float32)
        assert region.std() > 10 and region.mean() < 235
        assert s.best_level(4.0) == 1 and s.best_level(3.9) == 0 and s.best_level(100) == 2
        # Level 1 shows what level 0 shows, a quarter the size (JPEG and sampling aside).
        full = s.read_region((1536, 1536), 0, (1024, 1024)).resize((256, 256), Image.BOX)
        assert np.abs(np.asarray(full, np.float32) - region).mean() < 40


def test_synthetic_slide_written_as_aperio_svs(tmp_path, bank):
    from histolens.slides.synthetic import make_synthetic_slide, write_pyramid_tiff

    slide = make_synthetic_slide(1280, 1024, 0.25, n_lesions=1, seed=3, bank=bank)
    svs = write_pyramid_tiff(slide, tmp_path / "s.svs", levels=2, aperio=True)
    plain = write_pyramid_tiff(slide, tmp_path / "s.tiff", levels=2)
    import openslide

    assert openslide.OpenSlide.detect_format(str(svs)) == "aperio"
    with open_slide(svs) as s, open_slide(plain) as p:
        assert (s.mpp, s.mpp_source, s.objective_power) == (0.25, "slide metadata", 40)
        assert s.level_dimensions == ((1280, 1024), (320, 256))
        # Only the metadata differ: the same JPEG tiles at every level.
        for level in (0, 1):
            a = s.read_region((0, 0), level, (256, 256))
            assert np.array_equal(
                np.asarray(a), np.asarray(p.read_region((0, 0), level, (256, 256)))
            )


def _aperio(path, with_power: bool):
    desc = "Aperio Image Library v12.0.15 \r\n512x512 [0,0 512x512] (256x256) JPEG/RGB Q=70"
    desc += "|AppMag = 20|Filename = fake" if with_power else "|Filename = fake"
    img = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(
        path,
        img,
        tile=(256, 256),
        photometric="rgb",
        compression="jpeg",
        description=desc,
        metadata=None,
    )
    return path


def test_objective_power_fallback_states_its_assumption(tmp_path):
    with open_slide(_aperio(tmp_path / "a.svs", True)) as s:
        assert s.mpp == pytest.approx(0.5)  # 10 / 20x
        assert "assumed from objective power 20x" in s.mpp_source
    with open_slide(tmp_path / "a.svs", mpp=0.26) as s:
        assert (s.mpp, s.mpp_source) == (0.26, "--mpp")


def test_no_scale_asks_for_mpp(tmp_path):
    with pytest.raises(DataError, match=r"neither microns per pixel nor objective power.*--mpp"):
        open_slide(_aperio(tmp_path / "b.svs", False))
    with open_slide(tmp_path / "b.svs", mpp=0.5) as s:
        assert s.mpp == 0.5


def test_plain_image_goes_through_the_same_interface(tmp_path):
    img = np.zeros((300, 400, 3), np.uint8)
    img[..., 0] = 180
    Image.fromarray(img).save(tmp_path / "field.png")
    with pytest.raises(DataError, match="plain image with no reliable scale; give .* --mpp"):
        open_slide(tmp_path / "field.png")
    with open_slide(tmp_path / "field.png", mpp=0.25) as s:
        assert isinstance(s, PillowReader)
        assert s.level_dimensions == ((400, 300),) and s.level_downsamples == (1.0,)
        region = np.asarray(s.read_region((350, 250), 0, (100, 100)))
        assert region.shape == (100, 100, 3)
        assert (region[:50, :50, 0] == 180).all()  # inside the image
        assert (region[60:, 60:] == 255).all()  # outside: white


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("noise.svs", b"\x00\x01garbage" * 100, "not a slide format OpenSlide reads"),
        ("empty.tiff", b"", "not a slide format OpenSlide reads|cannot be read"),
        ("broken.png", b"\x89PNG\r\n\x1a\n broken", "cannot be read"),
    ],
)
def test_bad_files_get_one_sentence(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        open_slide(tmp_path / name, mpp=0.5 if name.endswith(".png") else None)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(DataError, match="positive number"):
        open_slide(CMU, mpp=-1.0)


@pytest.mark.parametrize(
    "where, size0",
    [
        ((1536, 1536), (224, 224)),  # inside, already the model's size: the array fast path
        ((4096 - 100, 2000), (224, 224)),  # past the right edge: transparent, composited on white
        ((1500, 1500), (448, 448)),  # twice the model's size: resized as predict resizes
        ((1000, 1000), (896, 896)),  # read from level 1 (downsample 4): 224 px, the fast path
    ],
)
def test_tile_loop_reads_the_pixels_predict_would(pyramid, where, size0):
    """The tile loop's array path gives exactly what Preprocess.resize gives on read_field's
    image (integer pixels, the same operations: equality, not a tolerance)."""
    import torch

    from histolens.models.transforms import Preprocess
    from histolens.slides.tiles import TileDataset

    path, _ = pyramid
    pre = Preprocess((224, 224), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    data = TileDataset(path, 0.5, np.array([where]), size0, pre)
    try:
        tile = data[0]
    finally:
        data.close()
    with open_slide(path) as s:
        image = s.read_field(*where, *size0, size0[0] / 224)
        rgb = s.read_field_rgb(*where, *size0, size0[0] / 224)
    assert tile.dtype == torch.uint8 and tile.shape == (3, 224, 224)
    assert torch.equal(tile, pre.resize(image))
    assert rgb.dtype == np.uint8 and np.array_equal(rgb, np.asarray(image))
    if where[0] + size0[0] > 4096:  # the part outside the slide reads white
        assert (tile[:, :, -50:] == 255).all()
        # ... and the part inside is the slide's own pixels, as a region wholly inside reads them
        with open_slide(path) as s:
            inside = np.asarray(s.read_region((4096 - 224, where[1]), 0, (224, 224)))
        assert np.array_equal(tile[:, :, :100].permute(1, 2, 0).numpy(), inside[:, 124:])
