"""``histolens data summary``: a readable table of what a data folder holds and how it splits."""

from __future__ import annotations

import os
import warnings
from collections import Counter

from histolens.data.records import SUBTYPE_NAMES, ImageRecord, discover, filter_records, target_of
from histolens.data.splits import balanced_class_weights, split_by_patient

__all__ = ["render_summary"]


def _table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join(
        [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    )


def render_summary(
    path: str | os.PathLike,
    magnification: str = "all",
    task: str = "binary",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
    group_by: str = "group",
    max_skipped: int = 20,
) -> str:
    """The summary text: counts by class/subtype/magnification/patient group, skipped files, split."""
    ds = discover(path)
    out = [f"Data: {ds.root}", f"Layout: {ds.layout}", f"Images found: {len(ds.records)}"]
    records = filter_records(ds.records, magnification, task)
    if len(records) != len(ds.records):
        out.append(f"Kept for magnification {magnification}, task {task}: {len(records)}")
    records, unreadable = _readable(records)
    out += _class_lines(records)
    out += _subtype_lines(records)
    out += _magnification_lines(records)
    out += _group_lines(records)
    out += _skipped_lines([(s.path, s.reason) for s in ds.skipped] + unreadable, max_skipped)
    if len({target_of(r, task) for r in records}) >= 2:
        out += _split_lines(records, task, val_fraction, test_fraction, seed, group_by)
    return "\n".join(out)


def _readable(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[tuple[str, str]]]:
    """The records whose image decodes, and (path, reason) of those that do not.

    Every image is opened and decoded, so corrupt files are reported now, not mid-training.
    """
    from histolens.data.imageio import load_rgb
    from histolens.errors import ImageLoadError

    unreadable = []
    for r in records:
        try:
            load_rgb(r.path)
        except ImageLoadError as exc:
            unreadable.append((r.path, exc.reason))
    bad = {p for p, _ in unreadable}
    return [r for r in records if r.path not in bad], unreadable


def _class_lines(records: list[ImageRecord]) -> list[str]:
    """Images and patient groups of each class."""
    classes = Counter(r.label for r in records)
    groups_per_class = {
        c: len({r.group for r in records if r.label == c and r.group}) for c in classes
    }
    return [
        "",
        _table(
            ["class", "images", "patient groups"],
            [[c, n, groups_per_class[c] or "-"] for c, n in sorted(classes.items())],
        ),
    ]


def _subtype_lines(records: list[ImageRecord]) -> list[str]:
    """Images and patient groups of each BreakHis subtype; nothing when no record has one."""
    subtypes = Counter((r.label, r.subtype) for r in records if r.subtype)
    if not subtypes:
        return []
    return [
        "",
        _table(
            ["subtype", "name", "class", "images", "patient groups"],
            [
                [
                    s,
                    SUBTYPE_NAMES.get(s, ""),
                    c,
                    n,
                    len({r.group for r in records if r.subtype == s and r.group}),
                ]
                for (c, s), n in sorted(subtypes.items())
            ],
        ),
    ]


def _magnification_lines(records: list[ImageRecord]) -> list[str]:
    """Images of each class at each magnification ('unknown' when the name does not say)."""
    classes = sorted({r.label for r in records})
    mags = Counter(r.magnification for r in records)
    return [
        "",
        _table(
            ["magnification"] + classes,
            [
                [f"{m}X" if m else "unknown"]
                + [
                    sum(1 for r in records if r.magnification == m and r.label == c)
                    for c in classes
                ]
                for m in sorted(mags, key=lambda m: m or 0)
            ],
        ),
    ]


def _group_lines(records: list[ImageRecord]) -> list[str]:
    """Each patient group's class, subtypes and images, or why there are no patient ids."""
    groups = Counter((r.group, r.label) for r in records if r.group)
    if not groups:
        return [
            "",
            "Patient ids: none (file names are not BreakHis names and there is no "
            "manifest): splits fall back to images, with a warning.",
        ]
    subtype_of = {}
    for r in records:
        if r.group:
            subtype_of.setdefault(r.group, set()).add(r.subtype or "")
    rows = [
        [g, c, "/".join(sorted(subtype_of[g])), n]
        for (g, c), n in sorted(groups.items(), key=lambda kv: (kv[0][1], -kv[1]))
    ]
    return [
        "",
        f"Patient groups: {len({g for g, _ in groups})}",
        _table(["group", "class", "subtypes", "images"], rows),
    ]


def _skipped_lines(skipped: list[tuple[str, str]], max_skipped: int) -> list[str]:
    """The first ``max_skipped`` skipped files with their reasons, and how many more there are."""
    if not skipped:
        return []
    out = ["", f"Skipped files: {len(skipped)}"]
    out += [f"  {p}: {reason}" for p, reason in skipped[:max_skipped]]
    if len(skipped) > max_skipped:
        out.append(f"  ... and {len(skipped) - max_skipped} more")
    return out


def _split_lines(
    records: list[ImageRecord],
    task: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    group_by: str,
) -> list[str]:
    """The split training would make of ``records``, its class weights and its warnings."""
    from histolens.data.records import class_names_for

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        split = split_by_patient(records, task, val_fraction, test_fraction, seed, group_by)
    names = class_names_for(task, records)
    summary = split.summary(task)
    out = [
        "",
        f"Split training would use ({'patient-disjoint' if split.patient_level else 'by IMAGE: no patient ids'}, "
        f"seed {seed}, val {val_fraction:.0%}, test {test_fraction:.0%}):",
        _table(
            ["split", "images", "groups"] + list(names),
            [
                [name, s["images"], s["groups"]] + [s["classes"].get(c, 0) for c in names]
                for name, s in summary.items()
            ],
        ),
    ]
    weights = balanced_class_weights(split.train, names, task)
    out.append(
        "Class weights (balanced, from training): "
        + ", ".join(f"{c} {w:.3f}" for c, w in zip(names, weights, strict=True))
    )
    out += [f"warning: {w}" for w in split.warnings]
    return out
