"""Shortcut audit: does something other than the tissue predict the label across patient groups?

Each image gets cheap "nuisance" attributes (size, format, JPEG quality, source folder, colour,
bytes per pixel) read from its header and a small thumbnail. Each attribute is then scored the
way a model would exploit it: fitted on some patient groups, tested on the others (stratified
group k-fold), so a per-patient constant only counts when it separates the classes across groups.
"""

# Over 400 lines: one audit read top to bottom: the per-image facts, the grouped-CV score of each
# attribute and the report naming them share one attribute table.

from __future__ import annotations

import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from histolens.data import BINARY_CLASSES, Dataset, ImageRecord, Skipped, discover, filter_records
from histolens.errors import DataError, ImageLoadError

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

THUMBNAIL_SIZE = 64
MIN_GROUPS = 4
FEW_GROUPS = 10  # below this, say that the AUCs are rough
# A single value (a folder, an image size) is a "tell" when it holds at least this share of the
# images and the odds of the class differ at least this much between it and the rest, both in the
# data and as predicted for held-out groups. AUC alone misses such a value when it covers most
# images of a skewed dataset: its AUC is (sensitivity + specificity) / 2 whatever its odds ratio.
TELL_MIN_SHARE = 0.05
TELL_MIN_ODDS_RATIO = 3.0
# Numeric attributes with at most this many distinct values are also read value by value.
DISCRETE_MAX_VALUES = 12

_CAUSE = "a model may learn how the images were made instead of the tissue"
_CAUSE_COLOUR = "may be stain/scanner differences, or may be the tissue"

# The IJG (libjpeg) luminance quantisation table at quality 50; encoders scale it by quality.
_IJG_LUMINANCE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ]
).ravel()


def _ijg_tables() -> np.ndarray:
    q = np.arange(1, 101)
    scale = np.where(q < 50, 5000 // q, 200 - 2 * q)
    tables = np.clip((_IJG_LUMINANCE[None, :] * scale[:, None] + 50) // 100, 1, 255)
    return np.sort(tables, axis=1)


_IJG_SORTED = _ijg_tables()


def estimate_jpeg_quality(tables: dict[int, Sequence[int]] | None) -> int | None:
    """The IJG quality (1-100) whose luminance table is closest to the file's; None without one.

    Values are compared sorted, so the estimate does not depend on zigzag vs natural order.
    """
    if not tables or 0 not in tables or len(tables[0]) != 64:
        return None
    observed = np.sort(np.asarray(tables[0], dtype=np.int64))
    return int(np.argmin(np.abs(_IJG_SORTED - observed).sum(axis=1))) + 1


@dataclass(frozen=True)
class ImageFacts:
    """What the audit reads from one image file; colour fields are None when not decoded."""

    width: int
    height: int
    format: str
    file_bytes: int
    jpeg_quality: int | None = None
    mean_rgb: tuple[float, float, float] | None = None
    saturation: float | None = None


def read_image_facts(
    path: str | os.PathLike, max_pixels: int | None = None, colour: bool = True
) -> ImageFacts:
    """Header facts plus a thumbnail's colour; raises ImageLoadError when the file is unusable.

    Only the header is parsed for size and format; colour comes from a ``THUMBNAIL_SIZE`` px
    thumbnail (JPEG decodes at reduced scale via ``draft``). Images over ``max_pixels`` (default:
    the loader's limit) keep their size but get no colour; ``colour=False`` reads headers only.
    """
    from histolens.imageio import MAX_PIXELS, to_rgb

    limit = MAX_PIXELS if max_pixels is None else max_pixels
    path = Path(path)
    try:
        file_bytes = path.stat().st_size
        with Image.open(path) as img:
            width, height = img.size
            fmt = (img.format or path.suffix.lstrip(".")).upper()
            quality = (
                estimate_jpeg_quality(getattr(img, "quantization", None)) if fmt == "JPEG" else None
            )
            if width <= 0 or height <= 0:
                raise ImageLoadError(path, "image has zero width or height", "corrupt")
            if not colour or width * height > limit:
                return ImageFacts(width, height, fmt, file_bytes, quality)
            if fmt == "JPEG":
                img.draft("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            img.load()
            thumb = to_rgb(img)
            factor = max(1, min(thumb.size) // THUMBNAIL_SIZE)
            if factor > 1:
                thumb = thumb.reduce(factor)
            rgb = np.asarray(thumb, dtype=np.float64)
            saturation = np.asarray(thumb.convert("HSV"), dtype=np.float64)[..., 1].mean() / 255
    except ImageLoadError:
        raise
    except Exception as exc:  # any decoder failure is one skipped file, never a crash
        raise ImageLoadError(path, f"cannot be read ({str(exc) or type(exc).__name__})") from None
    mean = rgb.reshape(-1, 3).mean(axis=0) / 255
    return ImageFacts(
        width,
        height,
        fmt,
        file_bytes,
        quality,
        (float(mean[0]), float(mean[1]), float(mean[2])),
        float(saturation),
    )


# --- statistics (pure functions over aligned arrays) -------------------------------------------
Folds = Sequence[tuple[Sequence[int], Sequence[int]]]


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-3, 1 - 1e-3)
    return np.log(p / (1 - p))


def numeric_oof_scores(
    values: np.ndarray, y: np.ndarray, folds: Folds, seed: int = 0
) -> np.ndarray:
    """Out-of-fold lift from a depth-2 tree on one numeric feature, fitted on the training folds.

    A lift is the predicted log-odds minus the training folds' base log-odds. Raw probabilities
    would carry each fold's base rate, which is anti-correlated with its test fold's (a fold rich
    in one class leaves its training folds poor in it), and pooled AUC would then be pessimistic.
    """
    from sklearn.tree import DecisionTreeClassifier

    x = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    y = np.asarray(y, dtype=np.int64)
    scores = np.zeros(len(y))
    for train, test in folds:
        train, test = np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)
        if len(test) == 0 or len(np.unique(y[train])) < 2:
            continue
        tree = DecisionTreeClassifier(
            max_depth=2, min_samples_leaf=max(2, len(train) // 50), random_state=seed
        )
        tree.fit(x[train], y[train])
        scores[test] = _logit(tree.predict_proba(x[test])[:, 1]) - _logit(y[train].mean())
    return scores


def categorical_oof_scores(
    values: Sequence[object], y: np.ndarray, folds: Folds, prior_weight: float = 2.0
) -> np.ndarray:
    """Out-of-fold lift of each image's value: its training-fold rate over the training base rate.

    Rates are shrunk towards the base rate by ``prior_weight`` pseudo-images, so a value seen in
    a handful of training images (or none: lift 0) cannot claim a certain class.
    """
    y = np.asarray(y, dtype=np.float64)
    values = list(values)
    scores = np.zeros(len(y))
    for train, test in folds:
        if len(train) == 0:
            continue
        base = float(np.mean(y[np.asarray(train, dtype=np.int64)]))
        sums: dict[object, list[float]] = {}
        for i in train:
            acc = sums.setdefault(values[i], [0.0, 0.0])
            acc[0] += y[i]
            acc[1] += 1
        for i in test:
            pos, n = sums.get(values[i], (0.0, 0.0))
            rate = (pos + prior_weight * base) / (n + prior_weight)
            scores[i] = _logit(rate) - _logit(base)
    return scores


@dataclass(frozen=True)
class ValueTell:
    """A value whose images have clearly different class odds from the rest."""

    value: object
    share: float
    rate: float
    rest_rate: float
    log_odds_ratio: float


def value_tells(
    values: Sequence[object],
    y: np.ndarray,
    oof_scores: np.ndarray,
    min_share: float = TELL_MIN_SHARE,
    min_odds_ratio: float = TELL_MIN_ODDS_RATIO,
) -> list[ValueTell]:
    """Values whose class odds differ from the rest by ``min_odds_ratio`` (either way).

    The difference must hold in the labels and in the out-of-fold lifts (log-odds, as from
    ``categorical_oof_scores``), i.e. as learnt from other patient groups, so a value seen in one
    patient only (lift 0 when that patient is held out) is never a tell. Values enriched in the
    class come first, then the rest, each by share times log odds ratio.
    """
    y = np.asarray(y, dtype=np.float64)
    arr = np.asarray([str(v) for v in values])
    originals = {str(v): v for v in values}
    tells = []
    for key in np.unique(arr):
        mask = arr == key
        share = float(mask.mean())
        if share < min_share or share > 1 - min_share:
            continue
        pos, n = y[mask].sum(), mask.sum()
        rest_pos, rest_n = y[~mask].sum(), (~mask).sum()
        # Haldane's +0.5 keeps a pure value's odds finite.
        realised = float(_logit((pos + 0.5) / (n + 1)) - _logit((rest_pos + 0.5) / (rest_n + 1)))
        predicted = float(oof_scores[mask].mean() - oof_scores[~mask].mean())
        if realised * predicted > 0 and min(abs(realised), abs(predicted)) >= np.log(
            min_odds_ratio
        ):
            tells.append(ValueTell(originals[key], share, pos / n, rest_pos / rest_n, realised))
    # A value enriched in the class, covering many images, reads best ("224 is 82% malignant").
    return sorted(tells, key=lambda t: (t.log_odds_ratio < 0, -t.share * abs(t.log_odds_ratio)))


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


@dataclass(frozen=True)
class AttributeFinding:
    """How well one attribute predicts the label across patient groups."""

    name: str
    kind: str
    auc: float | None
    n_values: int
    flagged: bool
    message: str
    detail: str = ""


def evaluate_attribute(
    attr_name: str,
    kind: str,
    values: Sequence[object],
    y: np.ndarray,
    folds: Folds,
    positive: str,
    threshold: float = 0.70,
    tissue_signal: bool = False,
    fmt: Callable[[object], str] = str,
    seed: int = 0,
    unit: str = "patient groups",
) -> AttributeFinding:
    """Score one attribute: grouped out-of-fold AUC, value tells, and the finding's message.

    ``values`` may hold None (attribute missing for that image); those rows are left out.
    ``y`` is 1 for ``positive``; ``folds`` are (train, test) indices over all rows; ``unit``
    names what the folds keep together, for the message.
    """
    from histolens.metrics import safe_auc

    present = np.array([v is not None and v == v for v in values], dtype=bool)
    kept = [v for v, p in zip(values, present, strict=True) if p]
    n_values = len(set(kept))
    if n_values == 0:
        return AttributeFinding(attr_name, kind, None, 0, False, "", "missing for every image")
    if n_values == 1:
        return AttributeFinding(attr_name, kind, None, 1, False, "", f"constant ({fmt(kept[0])})")
    index = np.flatnonzero(present)
    y_kept = np.asarray(y)[index]
    if len(np.unique(y_kept)) < 2:
        return AttributeFinding(attr_name, kind, None, n_values, False, "", "one class only")
    remap = np.full(len(present), -1)
    remap[index] = np.arange(len(index))
    sub_folds = [
        (remap[np.asarray(tr, dtype=np.int64)], remap[np.asarray(te, dtype=np.int64)])
        for tr, te in folds
    ]
    sub_folds = [(tr[tr >= 0], te[te >= 0]) for tr, te in sub_folds]
    if kind == "numeric":
        x = np.asarray(kept, dtype=np.float64)
        scores = numeric_oof_scores(x, y_kept, sub_folds, seed)
    else:
        scores = categorical_oof_scores(kept, y_kept, sub_folds)
    auc = safe_auc(y_kept, scores)
    auc = None if auc != auc else auc
    discrete = kind == "categorical" or n_values <= DISCRETE_MAX_VALUES
    tells = value_tells(kept, y_kept, scores) if discrete else []
    coverage = "" if len(kept) == len(values) else f" ({len(kept)} of {len(values)} images)"
    by_auc = auc is not None and auc >= threshold
    flagged = by_auc or bool(tells)
    auc_text = f"AUC {auc:.2f} over {unit}" if auc is not None else "no AUC"
    cause = _CAUSE_COLOUR if tissue_signal else _CAUSE
    if tells:
        tell = tells[0]
        detail = f"{fmt(tell.value)} is {tell.rate:.0%} {positive} (others {tell.rest_rate:.0%})"
        message = (
            f"{attr_name} {detail}, {tell.share:.0%} of the images ({auc_text}{coverage}): {cause}."
        )
    elif by_auc and kind == "numeric":
        x = np.asarray(kept, dtype=np.float64)
        higher = x[y_kept == 1].mean() > x[y_kept == 0].mean()
        detail = f"{'higher' if higher else 'lower'} values go with '{positive}'"
        message = f"{attr_name} predicts '{positive}' ({auc_text}{coverage}; {detail}): {cause}."
    elif by_auc:
        detail = ""
        message = f"{attr_name} predicts '{positive}' ({auc_text}{coverage}): {cause}."
    else:
        detail = message = ""
    return AttributeFinding(attr_name, kind, auc, n_values, flagged, message, detail)


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


def _source_folders(records: Sequence[ImageRecord], root: Path | None) -> list[str]:
    """First folder under the root of each image, unless that folder is a class folder."""
    paths = [Path(os.path.abspath(r.path)) for r in records]
    if root is not None:
        root = Path(os.path.abspath(root))  # record paths are absolute; a given root may not be
    if root is None:
        try:
            root = Path(os.path.commonpath([p.parent for p in paths]))
        except ValueError:  # different drives
            return ["(top level)"] * len(records)
    class_names = {c.lower() for c in BINARY_CLASSES} | {r.label.lower() for r in records}
    folders = []
    for p in paths:
        try:
            parts = p.parent.relative_to(root).parts
        except ValueError:
            parts = ()
        first = parts[0] if parts else ""
        folders.append(first if first and first.lower() not in class_names else "(top level)")
    return folders


def _positives(labels: Sequence[str]) -> list[str]:
    classes = sorted(set(labels))
    if "malignant" in classes and set(classes) <= set(BINARY_CLASSES):
        return ["malignant"]
    if len(classes) == 2:
        return [classes[1]]
    return classes  # one-vs-rest; the strongest finding per attribute is kept


def _read_all(
    records: Sequence[ImageRecord], progress: bool, colour: bool
) -> tuple[list[ImageFacts | None], list[Skipped]]:
    from tqdm.auto import tqdm

    def read(record: ImageRecord) -> ImageFacts | Skipped:
        try:
            return read_image_facts(record.path, colour=colour)
        except ImageLoadError as exc:
            return Skipped(record.path, exc.reason)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(
                tqdm(
                    pool.map(read, records),
                    total=len(records),
                    desc="Auditing",
                    unit="img",
                    disable=not progress,
                )
            )
    facts = [r if isinstance(r, ImageFacts) else None for r in results]
    return facts, [r for r in results if isinstance(r, Skipped)]


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
    facts, unreadable = _read_all(records, progress, colour)
    skipped += unreadable
    readable = [(r, f) for r, f in zip(records, facts, strict=True) if f is not None]
    records = [r for r, _ in readable]

    grouping = "patient group"
    if records and not all(r.group for r in records):
        if all(r.group or r.patient for r in records):
            records = [replace(r, group=r.group or r.patient) for r in records]
            grouping = "patient"
        else:
            grouping = "image"
    groups = {r.group or r.path for r in records}
    labels = [r.label for r in records]
    report = AuditReport(
        source=source,
        n_images=len(records),
        n_groups=len(groups),
        grouping=grouping,
        positive=None,
        threshold=threshold,
        skipped=skipped,
    )
    if grouping == "image":
        report.notes.append(
            "no patient ids: images are grouped one by one, so a per-patient constant can look "
            "like a shortcut; give a manifest with a patient column for a fair audit."
        )
    if len(set(labels)) < 2 or len(groups) < MIN_GROUPS:
        report.notes.append(
            f"the audit needs at least 2 classes and {MIN_GROUPS} patient groups; these images "
            f"have {len(set(labels))} class(es) and {len(groups)} group(s)."
        )
        report.seconds = time.perf_counter() - start
        return report

    from histolens.splits import group_kfold

    # Stratified folds need every class in every fold: no more folds than the rarest class has
    # images (or groups, for a group per class).
    n_splits = min(5, len(groups), min(Counter(labels).values()))
    if n_splits < 2:
        report.notes.append(
            "the audit needs at least 2 images of every class; "
            + ", ".join(f"{c}: {n}" for c, n in sorted(Counter(labels).items()))
            + "."
        )
        report.seconds = time.perf_counter() - start
        return report
    try:
        folds = group_kfold(records, "binary", n_splits=n_splits, seed=seed)
    except (DataError, ValueError) as exc:  # advice must not stop a training run
        report.notes.append(f"no grouped folds could be made: {exc}")
        report.seconds = time.perf_counter() - start
        return report
    if len(groups) < FEW_GROUPS:
        report.notes.append(
            f"only {len(groups)} {grouping}s: each AUC is a rough estimate, so treat flags as "
            "hints and check them on more patients."
        )
    folders = _source_folders(records, Path(root) if root is not None else None)
    kept_facts = [f for _, f in readable]
    positives = _positives(labels)
    report.positive = positives[0] if len(positives) == 1 else None
    for attr in _ATTRIBUTES:
        if attr.tissue_signal and not colour:
            continue
        values = [attr.value(f, r, s) for f, r, s in zip(kept_facts, records, folders, strict=True)]
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
                f"{grouping}s",
            )
            if best is None or (finding.flagged, finding.auc or 0) > (best.flagged, best.auc or 0):
                best = finding
        report.findings.append(best)
    report.seconds = time.perf_counter() - start
    return report
