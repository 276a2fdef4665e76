"""Shortcut audit: does something other than the tissue predict the label across patient groups?

Each image gets cheap "nuisance" attributes (size, format, JPEG quality, source folder, colour,
bytes per pixel) read from its header and a small thumbnail. Each attribute is then scored the
way a model would exploit it: fitted on some patient groups, tested on the others (stratified
group k-fold), so a per-patient constant only counts when it separates the classes across groups.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from histolens.data._audit_facts import THUMBNAIL_SIZE as THUMBNAIL_SIZE  # still importable here
from histolens.data._audit_facts import (
    ImageFacts,
    estimate_jpeg_quality,
    read_all_facts,
    read_image_facts,
    source_folders,
)
from histolens.data._audit_scoring import DISCRETE_MAX_VALUES as DISCRETE_MAX_VALUES  # likewise
from histolens.data._audit_scoring import (
    TELL_MIN_ODDS_RATIO,
    TELL_MIN_SHARE,
    AttributeFinding,
    Folds,
    ValueTell,
    categorical_oof_scores,
    evaluate_attribute,
    numeric_oof_scores,
    value_tells,
)
from histolens.data.records import (
    BINARY_CLASSES,
    Dataset,
    ImageRecord,
    Skipped,
    discover,
    filter_records,
)
from histolens.errors import DataError

__all__ = [
    "AttributeFinding",
    "AuditReport",
    "ImageFacts",
    "ValueTell",
    "audit_dataset",
    "categorical_oof_scores",
    "estimate_jpeg_quality",
    "evaluate_attribute",
    "numeric_oof_scores",
    "read_image_facts",
    "value_tells",
]

MIN_GROUPS = 4
FEW_GROUPS = 10  # below this, say that the AUCs are rough


# --- attributes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Attribute:
    name: str
    kind: str  # "numeric" or "categorical"
    value: Callable[[ImageFacts, ImageRecord, str], object]
    tissue_signal: bool = False  # colour may carry real tissue signal: warn more cautiously
    fmt: Callable[[object], str] = str


def _channel(i: int) -> Callable[[ImageFacts, ImageRecord, str], float | None]:
    return lambda f, r, s: f.mean_rgb[i] if f.mean_rgb else None


_ATTRIBUTES = (
    _Attribute("image width", "numeric", lambda f, r, s: f.width, fmt=lambda v: f"{v:g}"),
    _Attribute("image height", "numeric", lambda f, r, s: f.height, fmt=lambda v: f"{v:g}"),
    _Attribute(
        "aspect ratio", "numeric", lambda f, r, s: f.width / f.height, fmt=lambda v: f"{v:.2f}"
    ),
    _Attribute(
        "pixel count", "numeric", lambda f, r, s: f.width * f.height, fmt=lambda v: f"{v:,.0f}"
    ),
    _Attribute("source folder", "categorical", lambda f, r, s: s, fmt=lambda v: f"'{v}'"),
    _Attribute(
        "magnification",
        "categorical",
        lambda f, r, s: f"{r.magnification}X" if r.magnification else "unknown",
    ),
    _Attribute("file format", "categorical", lambda f, r, s: f.format),
    _Attribute("JPEG quality", "numeric", lambda f, r, s: f.jpeg_quality, fmt=lambda v: f"{v:g}"),
    _Attribute(
        "bytes per pixel",
        "numeric",
        lambda f, r, s: f.file_bytes / (f.width * f.height),
        fmt=lambda v: f"{v:.2f}",
    ),
    _Attribute("mean red", "numeric", _channel(0), True, lambda v: f"{v:.2f}"),
    _Attribute("mean green", "numeric", _channel(1), True, lambda v: f"{v:.2f}"),
    _Attribute("mean blue", "numeric", _channel(2), True, lambda v: f"{v:.2f}"),
    _Attribute(
        "mean saturation", "numeric", lambda f, r, s: f.saturation, True, lambda v: f"{v:.2f}"
    ),
)


# --- the audit ----------------------------------------------------------------------------------
@dataclass
class AuditReport:
    """Per-attribute findings; ``warnings`` are the flagged ones, as sentences."""

    source: str
    n_images: int
    n_groups: int
    grouping: str
    positive: str | None  # the class scored against the rest; None: every class, one-vs-rest
    threshold: float
    findings: list[AttributeFinding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def warnings(self) -> list[str]:
        return [f.message for f in self.findings if f.flagged]

    @property
    def flagged(self) -> list[str]:
        """Names of the flagged attributes."""
        return [f.name for f in self.findings if f.flagged]

    def render(self, max_skipped: int = 10) -> str:
        """A readable table of every attribute, then notes and skipped files."""
        groups = (
            "no patient groups" if self.grouping == "image" else f"{self.n_groups} {self.grouping}s"
        )
        out = [
            f"Shortcut audit of {self.source}: {self.n_images} images, {groups} "
            f"({self.seconds:.1f} s)"
        ]
        target = f"'{self.positive}'" if self.positive else "a class"
        if self.findings:
            out += [
                f"Scored on held-out {self.grouping}s after fitting on the others "
                f"({target} vs the rest AUC).",
                f"Flagged: AUC >= {self.threshold:.2f}, or one value (>= {TELL_MIN_SHARE:.0%} of "
                f"the images) with >= {TELL_MIN_ODDS_RATIO:g}x or <= 1/{TELL_MIN_ODDS_RATIO:g} "
                f"the rest's odds of {target}.",
            ]
            rows = [
                [
                    f.name,
                    f.kind,
                    str(f.n_values),
                    "-" if f.auc is None else f"{f.auc:.2f}",
                    "FLAG" if f.flagged else "",
                    f.detail,
                ]
                for f in self.findings
            ]
            out += ["", _table(["attribute", "kind", "values", "AUC", "", "note"], rows)]
        out += [f"note: {n}" for n in self.notes]
        if self.skipped:
            out += ["", f"Skipped files: {len(self.skipped)}"]
            out += [f"  {s.path}: {s.reason}" for s in self.skipped[:max_skipped]]
            if len(self.skipped) > max_skipped:
                out.append(f"  ... and {len(self.skipped) - max_skipped} more")
        if self.findings and not self.warnings:
            out += ["", f"No attribute predicts {target} across {self.grouping}s."]
        return "\n".join(out)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    cells = [headers] + rows
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _positives(labels: Sequence[str]) -> list[str]:
    classes = sorted(set(labels))
    if "malignant" in classes and set(classes) <= set(BINARY_CLASSES):
        return ["malignant"]
    if len(classes) == 2:
        return [classes[1]]
    return classes  # one-vs-rest; the strongest finding per attribute is kept


def audit_dataset(
    path_or_records: str | os.PathLike | Sequence[ImageRecord],
    root: str | os.PathLike | None = None,
    threshold: float = 0.70,
    progress: bool = True,
    seed: int = 0,
    magnification: str | int = "all",
    colour: bool = True,
) -> AuditReport:
    """Check whether image size, format, source folder, colour ... predict the label.

    Args:
        path_or_records: a data folder or CSV manifest (as ``discover`` takes), or records.
        root: folder that source folders are relative to (default: the dataset's root, or the
            records' common folder).
        threshold: grouped cross-validated AUC at which an attribute is flagged.
        progress: show a progress bar while reading images.
        seed: seed of the grouped folds.
        magnification: keep one magnification ('all' keeps every image).
        colour: decode a thumbnail of every image for the colour attributes; False reads file
            headers only (PNG decoding is most of the audit's time).

    Unreadable images are skipped and listed; too few classes or patient groups give a report
    that says so instead of an error.
    """
    start = time.perf_counter()
    records, source, root_dir, skipped = _audit_input(path_or_records, root, magnification)
    facts, unreadable = read_all_facts(records, progress, colour)
    skipped += unreadable
    readable = [(r, f) for r, f in zip(records, facts, strict=True) if f is not None]
    records, grouping = _grouped_records([r for r, _ in readable])
    report = AuditReport(
        source=source,
        n_images=len(records),
        n_groups=len({r.group or r.path for r in records}),
        grouping=grouping,
        positive=None,
        threshold=threshold,
        skipped=skipped,
    )
    folds = _audit_folds(report, records, seed)
    if folds is not None:
        _add_findings(report, records, [f for _, f in readable], root_dir, folds, colour, seed)
    report.seconds = time.perf_counter() - start
    return report


def _audit_input(
    path_or_records: str | os.PathLike | Sequence[ImageRecord],
    root: str | os.PathLike | None,
    magnification: str | int,
) -> tuple[list[ImageRecord], str, Path | None, list[Skipped]]:
    """The records to audit, the source's name, the folder above source folders, files skipped."""
    skipped: list[Skipped] = []
    if isinstance(path_or_records, (str, os.PathLike)):
        dataset: Dataset = discover(path_or_records)
        source = dataset.root
        if root is None:
            root = Path(dataset.root)
            root = root.parent if root.is_file() else root
        records = list(dataset.records)
        skipped += dataset.skipped
    else:
        records = list(path_or_records)
        source = str(root) if root is not None else f"{len(records)} records"
    if records and magnification != "all":
        records = filter_records(records, magnification)
    return records, source, Path(root) if root is not None else None, skipped


def _grouped_records(records: list[ImageRecord]) -> tuple[list[ImageRecord], str]:
    """Records with the group the folds keep together, and what that group is.

    Patient groups when every record has one, else patients, else each image on its own.
    """
    if not records or all(r.group for r in records):
        return records, "patient group"
    if all(r.group or r.patient for r in records):
        return [replace(r, group=r.group or r.patient) for r in records], "patient"
    return records, "image"


def _audit_folds(report: AuditReport, records: Sequence[ImageRecord], seed: int) -> Folds | None:
    """Stratified grouped folds, or None when the data cannot be audited; notes go to ``report``."""
    if report.grouping == "image":
        report.notes.append(
            "no patient ids: images are grouped one by one, so a per-patient constant can look "
            "like a shortcut; give a manifest with a patient column for a fair audit."
        )
    counts = Counter(r.label for r in records)
    if len(counts) < 2 or report.n_groups < MIN_GROUPS:
        report.notes.append(
            f"the audit needs at least 2 classes and {MIN_GROUPS} patient groups; these images "
            f"have {len(counts)} class(es) and {report.n_groups} group(s)."
        )
        return None
    # Stratified folds need every class in every fold: no more folds than the rarest class has
    # images (or groups, for a group per class).
    n_splits = min(5, report.n_groups, min(counts.values()))
    if n_splits < 2:
        report.notes.append(
            "the audit needs at least 2 images of every class; "
            + ", ".join(f"{c}: {n}" for c, n in sorted(counts.items()))
            + "."
        )
        return None
    from histolens.data.splits import group_kfold

    try:
        folds = group_kfold(records, "binary", n_splits=n_splits, seed=seed)
    except (DataError, ValueError) as exc:  # advice must not stop a training run
        report.notes.append(f"no grouped folds could be made: {exc}")
        return None
    if report.n_groups < FEW_GROUPS:
        report.notes.append(
            f"only {report.n_groups} {report.grouping}s: each AUC is a rough estimate, so treat "
            "flags as hints and check them on more patients."
        )
    return folds


def _add_findings(
    report: AuditReport,
    records: Sequence[ImageRecord],
    facts: Sequence[ImageFacts],
    root: Path | None,
    folds: Folds,
    colour: bool,
    seed: int,
) -> None:
    """Score every attribute of the images and add its strongest finding to ``report``."""
    folders = source_folders(records, root)
    labels = [r.label for r in records]
    positives = _positives(labels)
    report.positive = positives[0] if len(positives) == 1 else None
    for attr in _ATTRIBUTES:
        if attr.tissue_signal and not colour:
            continue
        values = [attr.value(f, r, s) for f, r, s in zip(facts, records, folders, strict=True)]
        report.findings.append(
            _strongest_finding(
                attr,
                values,
                labels,
                positives,
                folds,
                report.threshold,
                seed,
                f"{report.grouping}s",
            )
        )


def _strongest_finding(
    attr: _Attribute,
    values: Sequence[object],
    labels: Sequence[str],
    positives: Sequence[str],
    folds: Folds,
    threshold: float,
    seed: int,
    unit: str,
) -> AttributeFinding:
    """The attribute scored against each positive class in turn; flagged first, then by AUC."""
    best: AttributeFinding | None = None
    for positive in positives:
        y = np.array([label == positive for label in labels], dtype=np.int64)
        finding = evaluate_attribute(
            attr.name,
            attr.kind,
            values,
            y,
            folds,
            positive,
            threshold,
            attr.tissue_signal,
            attr.fmt,
            seed,
            unit,
        )
        if best is None or (finding.flagged, finding.auc or 0) > (best.flagged, best.auc or 0):
            best = finding
    return best
