"""Which files of a folder are images to classify: one rule for every command and front end."""

from __future__ import annotations

import os
from pathlib import Path

from histolens.data.imageio import IMAGE_SUFFIXES, is_image_name
from histolens.errors import DataError

__all__ = ["images_under"]

# Synthetic datasets keep their lesion masks in masks/ next to the tissue: not images to classify.
_SKIPPED_FOLDERS = frozenset({"masks"})


def images_under(*paths: str | os.PathLike) -> list[Path]:
    """Image files of ``paths``, in order: a folder gives the images below it, a file itself.

    Folders are searched recursively and sorted by path; hidden files and folders and ``masks/``
    folders are skipped, and a file is an image by its suffix (``IMAGE_SUFFIXES``, any case). A
    file named explicitly is kept whatever its suffix, so that reading it reports what is wrong.

    Raises:
        DataError: a path does not exist, or none of ``paths`` holds an image.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += _images_in_folder(path)
        elif path.exists():
            found.append(path)
        else:
            raise DataError(f"{path} does not exist.")
    if not found:
        where = ", ".join(str(p) for p in paths) or "no path given"
        raise DataError(
            f"No images in {where} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)."
        )
    return found


def _images_in_folder(root: Path) -> list[Path]:
    images: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIPPED_FOLDERS]
        images += [Path(dirpath) / name for name in filenames if is_image_name(name)]
    return sorted(images)
