"""``histolens data summary`` on folders without patient ids, with files it cannot use."""

from __future__ import annotations

from histolens.data.summary import render_summary
from histolens.testing import make_tissue_image


def test_summary_lists_unreadable_files_and_falls_back_to_an_image_split(tmp_path):
    for cls in ("benign", "malignant"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            make_tissue_image(seed=i, dark=cls == "malignant").save(tmp_path / cls / f"{i}.png")
    (tmp_path / "benign" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "benign" / "notes.txt").write_text("hello")

    text = render_summary(tmp_path, max_skipped=1)
    lines = text.splitlines()
    assert "Images found: 11" in lines  # the broken PNG is found, then fails to decode
    assert "benign          5               -" in lines  # 5 readable, no patient groups
    assert "unknown             5          5" in lines  # no magnification in the names
    assert any(line.startswith("Patient ids: none") for line in lines)
    assert "Skipped files: 2" in lines and "  ... and 1 more" in lines
    assert "Split training would use (by IMAGE: no patient ids, seed 42, val 15%, test 15%):" in (
        lines
    )
    assert "Class weights (balanced, from training): benign 1.000, malignant 1.000" in lines


def test_summary_of_one_class_has_no_split(tmp_path):
    (tmp_path / "benign").mkdir()
    for i in range(3):
        make_tissue_image(seed=i).save(tmp_path / "benign" / f"{i}.png")
    text = render_summary(tmp_path)
    assert "benign       3               -" in text.splitlines()
    assert "Split training would use" not in text and "Skipped files" not in text
