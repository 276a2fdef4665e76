"""Feature bags and slide labels for multiple-instance learning (MIL).

A bag is one slide's tile features: the HDF5 file ``histolens slide predict --save-features`` and
``histolens slide features`` write (``h5/<slide>.h5``: ``coords`` N x 2, ``features`` N x D and
the slide's attributes). ``LABELS.csv`` names the bags with columns ``slide,label[,patient]``.
Only h5py and numpy are needed here, so the training layer reads bags without the slide reader.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histolens.atomic import atomic_path
from histolens.errors import DataError

__all__ = [
    "Bag",
    "SlideLabels",
    "read_bag",
    "read_slide_labels",
    "write_bag",
]

# Labels read as the positive class of a 0/1 or false/true column; otherwise the class sorted last.
_NUMERIC_POSITIVE = {"1", "true", "yes"}
# How a bag's slide was tiled (its HDF5 attributes), so that a new slide is tiled the same way.
_TILING = ("tile_mpp", "min_tissue", "overlap")


@dataclass(frozen=True)
class Bag:
    """One slide's tiles: level-0 corners (N x 2) and features (N x D, float32), with the
    fingerprint and path of the tile checkpoint that extracted them (empty when unknown)."""

    name: str
    features: np.ndarray
    coords: np.ndarray
    fingerprint: str = ""
    checkpoint: str = ""
    tiling: dict[str, float] = field(default_factory=dict)  # tile_mpp, min_tissue, overlap

    def __len__(self) -> int:
        return int(self.features.shape[0])


def read_bag(path: str | os.PathLike) -> Bag:
    """Read a bag; one sentence if the file is missing, unreadable or has no ``features``."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(f"Bag {path} does not exist.")
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise DataError(
                    f"{path} has no 'features'; write bags with 'histolens slide features'."
                )
            features = np.asarray(f["features"][:], np.float32)
            coords = (
                np.asarray(f["coords"][:], np.int64)
                if "coords" in f
                else np.zeros((len(features), 2), np.int64)
            )
            name = str(f.attrs.get("name", path.stem))
            fingerprint = str(f.attrs.get("checkpoint_fingerprint", ""))
            checkpoint = str(f.attrs.get("checkpoint", ""))
            tiling = {k: float(f.attrs[k]) for k in _TILING if k in f.attrs}
    except OSError as exc:
        raise DataError(f"{path} is not a readable HDF5 bag ({exc}).") from None
    if features.ndim != 2 or len(features) == 0:
        raise DataError(f"{path}: 'features' must be N x D with at least one tile.")
    if not np.isfinite(features).all():
        raise DataError(f"{path}: 'features' holds NaN or infinite values.")
    return Bag(name, features, coords, fingerprint, checkpoint, tiling)


def write_bag(
    path: str | os.PathLike,
    features: np.ndarray,
    coords: np.ndarray,
    extra: Mapping[str, np.ndarray] | None = None,
    attrs: Mapping[str, object] | None = None,
) -> Path:
    """Write a bag atomically in the ``slide predict`` layout (``coords``, ``features``, any
    ``extra`` datasets, e.g. a synthetic slide's planted ``lesion`` tiles)."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, np.int64))
        f.create_dataset("features", data=np.asarray(features, np.float32))
        for key, value in (extra or {}).items():
            f.create_dataset(key, data=np.asarray(value))
        f.attrs["name"] = path.stem
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    return path


@dataclass(frozen=True)
class SlideLabels:
    """The rows of ``LABELS.csv``: bag paths, 0/1 targets, patients, and the class names."""

    bags: tuple[Path, ...]
    targets: np.ndarray
    patients: tuple[str, ...]
    class_names: tuple[str, str]
    patients_given: bool

    def __len__(self) -> int:
        return len(self.bags)


def _positive_class(labels: Sequence[str]) -> tuple[str, str]:
    names = sorted(set(labels))
    if len(names) != 2:
        shown = ", ".join(names) or "none"
        raise DataError(f"MIL needs exactly two slide labels; LABELS.csv has {shown}.")
    lowered = [n.lower() for n in names]
    if set(lowered) <= {"0", "1"} or set(lowered) <= {"false", "true"} or "yes" in lowered:
        pos = next(n for n in names if n.lower() in _NUMERIC_POSITIVE)
        return (next(n for n in names if n != pos), pos)
    return (names[0], names[1])


def read_slide_labels(path: str | os.PathLike) -> SlideLabels:
    """Read ``slide,label[,patient]``; relative bag paths are taken from the CSV's folder.

    Without a ``patient`` column every slide is its own patient. Raises :class:`DataError` with
    one sentence for a missing file or column, an empty file, a missing bag, a repeated slide or
    other than two labels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist.")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("slide", "label") if c not in columns]
        if missing:
            raise DataError(
                f"{path} needs the columns slide,label[,patient]; missing {', '.join(missing)}."
            )
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if not rows:
        raise DataError(f"{path} has a header but no slides.")
    bags, labels, patients, seen = [], [], [], set()
    for line, row in enumerate(rows, start=2):
        if not row["slide"] or not row["label"]:
            raise DataError(f"{path} line {line}: slide and label must not be empty.")
        bag = Path(row["slide"])
        bag = bag if bag.is_absolute() else path.parent / bag
        if bag.suffix.lower() not in (".h5", ".hdf5"):
            raise DataError(
                f"{path} line {line}: {row['slide']} is not a feature bag (.h5); write bags "
                "with 'histolens slide features' first."
            )
        if not bag.is_file():
            raise DataError(f"{path} line {line}: bag {bag} does not exist.")
        if bag.resolve() in seen:
            raise DataError(f"{path} line {line}: slide {row['slide']} is listed twice.")
        seen.add(bag.resolve())
        bags.append(bag)
        labels.append(row["label"])
        patients.append(row.get("patient") or f"slide:{bag.stem}")
    names = _positive_class(labels)
    targets = np.array([int(v == names[1]) for v in labels], np.int64)
    given = "patient" in columns and all(row.get("patient") for row in rows)
    return SlideLabels(tuple(bags), targets, tuple(patients), names, given)
