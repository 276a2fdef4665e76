"""Which slides a run takes: slide files named or found in folders, and a job array's share.

``find_slides`` gathers the slide files (a folder is searched, not recursively, for the
suffixes OpenSlide reads; a plain image is taken only when named), refusing two slides with the
same name since their outputs would collide. ``--shard I/N`` takes every N-th slide of the
sorted list from the I-th, so the tasks of a job array share a cohort with no coordination.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from histolens.errors import ConfigError, DataError
from histolens.slides.reader import PLAIN_IMAGE_SUFFIXES

__all__ = ["SLIDE_SUFFIXES", "find_slides", "parse_shard", "shard_slides"]

# What a folder is searched for (a plain image is taken only when named directly).
SLIDE_SUFFIXES = (
    ".svs",
    ".ndpi",
    ".mrxs",
    ".tif",
    ".tiff",
    ".scn",
    ".bif",
    ".svslide",
    ".vms",
    ".dcm",
)


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (I from 0 to N-1, as Slurm's array task ids) -> (I, N)."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--shard must be I/N, e.g. 0/4, not {text!r}.") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text}: I must be from 0 to N-1 and N at least 1.")
    return i, n


def find_slides(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Slide files named or found (not recursively) in folders, sorted and deduplicated; two
    slides with the same name are refused, their outputs would collide."""
    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir() and path.suffix.lower() != ".mrxs":
            found.update(
                p.resolve()
                for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES
            )
        elif path.exists():
            found.add(path.resolve())
        else:
            raise DataError(f"{path} does not exist.")
    if not found:
        raise DataError(
            "No slides found (looked for " + ", ".join(SLIDE_SUFFIXES + PLAIN_IMAGE_SUFFIXES) + ")."
        )
    slides = sorted(found)
    names: dict[str, Path] = {}
    for p in slides:
        if p.stem in names:
            raise DataError(f"Two slides are named {p.stem}: {names[p.stem]} and {p}; rename one.")
        names[p.stem] = p
    return slides


def shard_slides(slides: Sequence[Path], shard: tuple[int, int] | None) -> list[Path]:
    """The slides shard (I, N) takes: every N-th of the sorted list, from the I-th."""
    if shard is None:
        return list(slides)
    i, n = shard
    return list(slides[i::n])
