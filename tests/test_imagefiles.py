"""images_under: the one rule for which files of a folder are images to classify."""

from __future__ import annotations

import pytest

from histolens.data.imagefiles import images_under
from histolens.errors import DataError


@pytest.fixture()
def tree(tmp_path):
    files = [
        "b/x.png",
        "a/z.jpg",
        "a/deeper/y.TIF",
        "a/B.JPEG",
        "a/.hidden.png",  # hidden file
        ".cache/thumb.png",  # hidden folder
        "masks/a/z_mask.png",  # lesion masks of synthetic data
        "b/masks/x_mask.png",
        "notes.txt",
        "b/readme.md",
    ]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_a_folder_gives_its_images_recursively_sorted_by_path(tree):
    found = images_under(tree)
    assert [p.relative_to(tree).as_posix() for p in found] == [
        "a/B.JPEG",
        "a/deeper/y.TIF",
        "a/z.jpg",
        "b/x.png",
    ]


def test_a_named_file_is_kept_whatever_its_suffix(tree):
    """Reading it then says what is wrong, instead of the file vanishing silently."""
    assert images_under(tree / "notes.txt") == [tree / "notes.txt"]
    assert images_under(tree / "b", tree / "a" / "z.jpg") == [
        tree / "b" / "x.png",
        tree / "a" / "z.jpg",
    ]


def test_a_folder_named_masks_given_as_the_root_is_searched(tree):
    assert [p.name for p in images_under(tree / "masks")] == ["z_mask.png"]


def test_no_images_and_missing_paths_are_data_errors(tree):
    (tree / "empty").mkdir()
    with pytest.raises(DataError, match=r"No images in .*empty \(looked for .*\.png.*recursively"):
        images_under(tree / "empty")
    with pytest.raises(DataError, match=r"nowhere does not exist"):
        images_under(tree / "b", tree / "nowhere")
