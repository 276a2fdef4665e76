"""The Augmenter's geometry: where a marked pixel goes under a shift, a rotation and a flip."""

from __future__ import annotations

import math

import pytest
import torch

from histolens.config import AugmentConfig
from histolens.models.transforms import Augmenter, view_generator


def _only(**changes) -> Augmenter:
    """An Augmenter doing nothing but ``changes`` (zero fill, so moved-in borders are black)."""
    base = dict(rotation=0.0, shift=0.0, shear=0.0, zoom=0.0, hflip=False, vflip=False)
    return Augmenter(AugmentConfig(**{**base, "fill": "constant", **changes}))


def _marked(height: int, width: int, x: int, y: int) -> torch.Tensor:
    """A black (1, 3, H, W) image with a white 5x5 square centred on pixel (x, y)."""
    image = torch.zeros(1, 3, height, width)
    image[..., y - 2 : y + 3, x - 2 : x + 3] = 1.0
    return image


def _mark_centre(image: torch.Tensor) -> tuple[float, float]:
    weights = image[0, 0]
    ys, xs = torch.meshgrid(
        torch.arange(weights.shape[0], dtype=torch.float32),
        torch.arange(weights.shape[1], dtype=torch.float32),
        indexing="ij",
    )
    total = float(weights.sum())
    return float((weights * xs).sum()) / total, float((weights * ys).sum()) / total


def _drawn_matrix(augmenter: Augmenter, generator: torch.Generator) -> torch.Tensor:
    """The affine matrix the Augmenter will draw from ``generator``, without consuming it."""
    twin = torch.Generator()
    twin.set_state(generator.get_state())
    return augmenter._matrix(twin)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shift_moves_the_image_by_the_drawn_fraction_of_its_size(seed):
    height, width = 48, 80
    augmenter = _only(shift=0.2)
    image = _marked(height, width, 40, 24)
    generator = torch.Generator().manual_seed(seed)
    matrix = _drawn_matrix(augmenter, generator)
    fx, fy = float(matrix[0, 2]) / 2, float(matrix[1, 2]) / 2  # fractions of width and height
    assert max(abs(fx), abs(fy)) > 0.0 and abs(fx) <= 0.2 and abs(fy) <= 0.2
    out = augmenter(image, [generator])
    x, y = _mark_centre(out)
    # The grid samples the input at (output + shift): the content moves the other way.
    assert x == pytest.approx(40 - fx * width, abs=0.3)
    assert y == pytest.approx(24 - fy * height, abs=0.3)
    assert float(out.sum()) == pytest.approx(float(image.sum()), rel=0.02)  # moved, not lost


@pytest.mark.parametrize("seed", [1, 3, 5])  # draws of about +21, -40 and +26 degrees
def test_rotation_turns_the_image_about_its_centre_by_the_drawn_angle(seed):
    size = 64
    augmenter = _only(rotation=40.0)
    image = _marked(size, size, 32, 12)  # 20.5 px above the centre (31.5, 31.5)
    generator = torch.Generator().manual_seed(seed)
    matrix = _drawn_matrix(augmenter, generator)
    angle = math.atan2(float(matrix[1, 0]), float(matrix[0, 0]))
    assert 15.0 < abs(math.degrees(angle)) <= 40.0
    x, y = _mark_centre(augmenter(image, [generator]))
    centre = (size - 1) / 2
    dx, dy = 32 - centre, 12 - centre
    # The output samples the input at R(angle) applied to it, so the mark turns by -angle.
    expected = (
        centre + math.cos(angle) * dx + math.sin(angle) * dy,
        centre - math.sin(angle) * dx + math.cos(angle) * dy,
    )
    assert x == pytest.approx(expected[0], abs=0.4)
    assert y == pytest.approx(expected[1], abs=0.4)


def test_rotation_keeps_distances_on_a_non_square_image():
    height, width = 48, 96
    augmenter = _only(rotation=30.0)
    image = _marked(height, width, 48, 9)
    centre = ((width - 1) / 2, (height - 1) / 2)
    before = math.dist(_mark_centre(image), centre)
    generator = torch.Generator().manual_seed(3)
    assert abs(float(_drawn_matrix(augmenter, generator)[1, 0])) > 0.3  # a turn of ~30 degrees
    after = math.dist(_mark_centre(augmenter(image, [generator])), centre)
    assert after == pytest.approx(before, abs=0.5)


def test_flips_mirror_the_image_exactly_or_leave_it():
    augmenter = _only(hflip=True)
    image = torch.rand(1, 3, 20, 30)
    seen = set()
    for seed in range(8):
        out = augmenter(image, [torch.Generator().manual_seed(seed)])
        if torch.allclose(out, image, atol=1e-5):
            seen.add("kept")
        else:
            torch.testing.assert_close(out, image.flip(-1), atol=1e-5, rtol=0)
            seen.add("mirrored")
    assert seen == {"kept", "mirrored"}


def test_nearest_fill_replicates_the_edge_where_constant_fill_is_black():
    image = torch.full((1, 3, 32, 32), 0.6)
    nearest = Augmenter(
        AugmentConfig(rotation=0, shift=0.3, shear=0, zoom=0, hflip=False, vflip=False)
    )
    generator_state = torch.Generator().manual_seed(4).get_state()

    def fresh() -> torch.Generator:
        g = torch.Generator()
        g.set_state(generator_state)
        return g

    torch.testing.assert_close(nearest(image, [fresh()]), image)
    zero_filled = _only(shift=0.3)(image, [fresh()])
    assert float(zero_filled.min()) == 0.0 and float(zero_filled.max()) == pytest.approx(0.6)


def test_a_view_is_the_same_whenever_it_is_drawn():
    augmenter = Augmenter(AugmentConfig())
    image = torch.rand(1, 3, 40, 40)
    first = augmenter(image, [view_generator(7, "a.png", 0)])
    again = augmenter(image, [view_generator(7, "a.png", 0)])
    other_view = augmenter(image, [view_generator(7, "a.png", 1)])
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, other_view)
