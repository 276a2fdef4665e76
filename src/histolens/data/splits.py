"""Patient-disjoint, class-stratified splits and cross-validation folds, with a leakage check."""

from __future__ import annotations

import csv
import os
import random
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from histolens.atomic import atomic_open
from histolens.data.records import ImageRecord, target_of
from histolens.errors import ConfigError, DataError, LeakageError

__all__ = [
    "SPLIT_NAMES",
    "Split",
    "assert_patient_disjoint",
    "balanced_class_weights",
    "group_kfold",
    "load_split_csv",
    "split_by_patient",
    "targets",
]

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Split:
    """Which records go where; ``patient_level`` is False when ids were missing."""

    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]
    patient_level: bool = True
    warnings: list[str] = field(default_factory=list)

    def parts(self) -> dict[str, list[ImageRecord]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def side(self, name: str) -> list[ImageRecord]:
        """The records of ``name`` ('train', 'val' or 'test'), or of all three for 'all'."""
        return self.train + self.val + self.test if name == "all" else self.parts()[name]

    def summary(self, task: str) -> dict[str, dict]:
        out = {}
        for name, recs in self.parts().items():
            out[name] = {
                "images": len(recs),
                "groups": len({_group_key(r) for r in recs}),
                "classes": dict(sorted(Counter(target_of(r, task) for r in recs).items())),
            }
        return out

    def write_csv(self, path: str | os.PathLike) -> None:
        """Save the split (one row per image, with its side) atomically."""
        with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
            fields = ["split", "path", "label", "subtype", "patient", "group", "magnification"]
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            for name, recs in self.parts().items():
                for r in recs:
                    writer.writerow({"split": name, **r.as_row()})


def _group_key(record: ImageRecord) -> str:
    return record.group or f"image:{record.path}"


def assert_patient_disjoint(parts: dict[str, Sequence[ImageRecord]]) -> None:
    """Raise LeakageError when any patient group appears in two parts."""
    seen: dict[str, str] = {}
    for name, recs in parts.items():
        for r in recs:
            if r.group is None:
                continue
            other = seen.setdefault(r.group, name)
            if other != name:
                raise LeakageError(
                    f"Patient group {r.group} appears in both the {other} and the {name} split; "
                    "refusing a split that leaks patients."
                )


def _validate_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("validation", val_fraction), ("test", test_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"The {name} fraction must be in [0, 1), got {value}.")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"Validation ({val_fraction}) and test ({test_fraction}) fractions leave no training data."
        )


def _assign_sides(
    by_group: dict[str, list[ImageRecord]],
    group_class: dict[str, str],
    held_out: dict[str, float],
    seed: int,
) -> dict[str, str]:
    """The side ('train', 'val' or 'test') of each group, filled class by class in seeded order;
    ``held_out`` is each held-out side's share of the images, in the order the sides are filled."""
    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    for cls in sorted(set(group_class.values())):
        groups = sorted(g for g, c in group_class.items() if c == cls)
        rng.shuffle(groups)
        total = sum(len(by_group[g]) for g in groups)
        remaining = list(groups)
        for side, fraction in held_out.items():
            if fraction <= 0 or len(remaining) <= 1:
                continue
            target = fraction * total
            taken = 0
            for g in list(remaining):
                size = len(by_group[g])
                # Take a group only when it brings this side closer to its share.
                if len(remaining) > 1 and abs(taken + size - target) < abs(taken - target):
                    remaining.remove(g)
                    assignment[g] = side
                    taken += size
            if taken == 0 and len(groups) >= 3 and len(remaining) > 1:
                g = min(remaining, key=lambda g: len(by_group[g]))
                remaining.remove(g)
                assignment[g] = side
        for g in remaining:
            assignment[g] = "train"
    return assignment


def _missing_class_notes(
    parts: dict[str, list[ImageRecord]],
    group_class: dict[str, str],
    task: str,
    held_out: dict[str, float],
) -> list[str]:
    """A note for each requested side that ended up without some class's images."""
    notes = []
    for name in SPLIT_NAMES:
        present = {target_of(r, task) for r in parts[name]}
        missing = sorted(set(group_class.values()) - present)
        if missing and (name == "train" or held_out[name] > 0):
            notes.append(
                f"The {name} split has no {', '.join(missing)} images: too few patient groups "
                "of that class to put one on every side."
            )
    return notes


def split_by_patient(
    records: Sequence[ImageRecord],
    task: str = "binary",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
    group_by: str = "group",
) -> Split:
    """Split into train/val/test keeping every patient group on one side, stratified by class.

    Groups are assigned class by class (a group's class is its majority label), in a seeded order,
    until each side holds its fraction of that class's images; every side gets at least one group
    of a class that has three or more. ``group_by='patient'`` uses exact ids instead of groups.
    Without patient ids the split falls back to images, with a warning.
    """
    _validate_fractions(val_fraction, test_fraction)
    if group_by not in ("group", "patient"):
        raise ConfigError(f"Unknown group_by '{group_by}'; choose 'group' or 'patient'.")
    notes: list[str] = []
    patient_level = all(r.group for r in records)
    if patient_level and group_by == "patient":
        records = [
            ImageRecord(r.path, r.label, r.subtype, r.patient, r.patient, r.magnification)
            for r in records
        ]
    if not patient_level:
        msg = (
            "No patient ids for some images (generic folders): splitting by image, so images of one "
            "patient may land in both training and test and metrics will be optimistic."
        )
        notes.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    by_group: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        by_group[_group_key(r)].append(r)
    group_class = {
        g: Counter(target_of(r, task) for r in recs).most_common(1)[0][0]
        for g, recs in by_group.items()
    }
    held_out = {"test": test_fraction, "val": val_fraction}  # the test side is filled first
    assignment = _assign_sides(by_group, group_class, held_out, seed)
    parts: dict[str, list[ImageRecord]] = {"train": [], "val": [], "test": []}
    for r in records:
        parts[assignment[_group_key(r)]].append(r)
    notes += _missing_class_notes(parts, group_class, task, held_out)
    assert_patient_disjoint(parts)
    if not parts["train"]:
        raise DataError("The split left no training images; add data or lower the fractions.")
    return Split(parts["train"], parts["val"], parts["test"], patient_level, notes)


def group_kfold(
    records: Sequence[ImageRecord], task: str = "binary", n_splits: int = 5, seed: int = 42
) -> list[tuple[list[int], list[int]]]:
    """Stratified group k-fold (scikit-learn) over patient groups: (train, test) index lists."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = [_group_key(r) for r in records]
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise DataError(
            f"{n_splits}-fold cross-validation needs at least {n_splits} patient "
            f"groups; the data have {n_groups}."
        )
    y = [target_of(r, task) for r in records]
    with warnings.catch_warnings():
        # "The least populated class has only N members" is expected with few patients.
        warnings.simplefilter("ignore", UserWarning)
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        folds = [(list(tr), list(te)) for tr, te in cv.split(np.zeros(len(y)), y, groups)]
    for tr, te in folds:
        assert_patient_disjoint(
            {"train": [records[i] for i in tr], "test": [records[i] for i in te]}
        )
    return folds


def balanced_class_weights(
    records: Sequence[ImageRecord], classes: Sequence[str], task: str
) -> list[float]:
    """Balanced weights n / (k * n_c), as scikit-learn's 'balanced'; 0 for an absent class."""
    counts = Counter(target_of(r, task) for r in records)
    n = sum(counts[c] for c in classes)
    present = sum(1 for c in classes if counts[c])
    return [n / (present * counts[c]) if counts[c] else 0.0 for c in classes]


def load_split_csv(path: str | os.PathLike) -> Split:
    """Read a split written by :meth:`Split.write_csv` (e.g. to evaluate on a run's test set)."""
    parts: dict[str, list[ImageRecord]] = {"train": [], "val": [], "test": []}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                mag = row.get("magnification") or ""
                parts[row["split"]].append(
                    ImageRecord(
                        path=row["path"],
                        label=row["label"],
                        subtype=row.get("subtype") or None,
                        patient=row.get("patient") or None,
                        group=row.get("group") or None,
                        magnification=int(mag) if mag.isdigit() else None,
                    )
                )
    except (OSError, KeyError, csv.Error) as exc:
        raise DataError(f"Cannot read split file {path}: {exc}") from None
    patient_level = all(r.group for recs in parts.values() for r in recs)
    assert_patient_disjoint(parts)
    return Split(parts["train"], parts["val"], parts["test"], patient_level)


def targets(records: Sequence[ImageRecord], classes: Sequence[str], task: str) -> list[int]:
    """Class indices of ``records`` for ``task``."""
    index = {c: i for i, c in enumerate(classes)}
    return [index[target_of(r, task)] for r in records]
