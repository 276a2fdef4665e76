import numpy as np
import pytest
from PIL import Image

from histolens.data.imageio import load_rgb, load_rgb_bytes
from histolens.errors import ImageLoadError


def test_modes_are_converted_to_rgb(tmp_path):
    cases = {
        "gray.png": Image.new("L", (20, 10), 128),
        "rgba.png": Image.new("RGBA", (20, 10), (255, 0, 0, 0)),
        "palette.png": Image.new("RGB", (20, 10), (10, 200, 30)).convert("P"),
        "cmyk.jpg": Image.new("CMYK", (20, 10), (0, 255, 255, 0)),
        "sixteen.png": Image.fromarray(np.full((10, 20), 40000, np.uint16)),
        "la.png": Image.new("LA", (20, 10), (50, 255)),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = load_rgb(tmp_path / name)
        assert out.mode == "RGB" and out.size == (20, 10), name
    # Fully transparent pixels become white (slide background), not black.
    assert load_rgb(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)
    # A 16-bit image keeps visible contrast after conversion.
    ramp = np.tile(np.linspace(1000, 60000, 20).astype(np.uint16), (10, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    arr = np.asarray(load_rgb(tmp_path / "ramp16.png"))
    assert arr[..., 0].max() - arr[..., 0].min() > 200
    assert np.asarray(load_rgb(tmp_path / "cmyk.jpg"))[..., 0].mean() > 200  # red stays red


def test_bad_files_have_reasons(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (300, 300), (1, 2, 3)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    expectations = {
        "empty.png": ("empty", "empty"),
        "text.png": ("not an image", "not_image"),
        "trunc.png": ("corrupt|truncated", "corrupt"),
        "missing.png": ("does not exist", "missing"),
    }
    for name, (reason, kind) in expectations.items():
        with pytest.raises(ImageLoadError, match=reason) as info:
            load_rgb(tmp_path / name)
        assert info.value.path.endswith(name)
        assert info.value.kind == kind


def test_decompression_bomb_is_refused(tmp_path):
    Image.new("L", (5000, 5000)).save(tmp_path / "big.png", optimize=True)
    with pytest.raises(ImageLoadError, match="decompression bomb") as info:
        load_rgb(tmp_path / "big.png", max_pixels=1_000_000)
    assert info.value.kind == "too_large"
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_rgb_bytes((tmp_path / "big.png").read_bytes(), max_pixels=1_000_000)


def test_load_only_reads(tmp_path):
    p = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(p)
    before = (p.read_bytes(), p.stat().st_mtime_ns)
    load_rgb(p)
    assert (p.read_bytes(), p.stat().st_mtime_ns) == before
