"""Exceptions raised by histolens; the CLI turns each into one line and a non-zero exit."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "HistolensError",
    "ImageLoadError",
    "LeakageError",
    "PretrainedWeightsError",
    "did_you_mean",
]


class HistolensError(Exception):
    """Base class: a problem the user can fix, described in one sentence."""


class DataError(HistolensError):
    """The data folder, manifest or records cannot be used."""


class ImageLoadError(HistolensError):
    """One image cannot be read; carries the path, the reason and a machine-readable kind.

    ``kind`` is one of 'missing', 'empty', 'not_image', 'corrupt', 'too_large' (decompression
    bombs and oversized images) or 'unreadable' (permissions, folders).
    """

    def __init__(self, path: object, reason: str, kind: str = "corrupt") -> None:
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}: {reason}")


class LeakageError(DataError):
    """A split puts one patient group on two sides."""


class ConfigError(HistolensError):
    """An option has an invalid value or name."""


class CheckpointError(HistolensError):
    """A checkpoint is missing, corrupt or not a histolens checkpoint."""


class PretrainedWeightsError(HistolensError):
    """Pretrained weights cannot be obtained (offline, missing file, wrong architecture)."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest valid choice, or '' when none is close."""
    matches = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean '{matches[0]}'?" if matches else ""


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Validate that ``value`` is one of ``choices``, raising a ConfigError that names them."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(
            f"Unknown {name} '{value}'; choose one of: {', '.join(map(str, choices))}."
            + did_you_mean(value, choices)
        )
    return value
