"""Finding labelled images the way users have them, as records that carry path, label and patient.

Four layouts are recognised: the original project's ``<MAG>X/{benign,malignant}/`` folders, the
official BreakHis archive tree, generic ``<class>/**`` folders, and a CSV manifest. BreakHis file
names are parsed wherever they appear, so patient ids survive any folder layout.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from histolens.data.imageio import is_image_name
from histolens.errors import DataError, check_choice

__all__ = [
    "BENIGN_SUBTYPES",
    "BINARY_CLASSES",
    "MAGNIFICATIONS",
    "MALIGNANT_SUBTYPES",
    "SUBTYPE_CLASSES",
    "SUBTYPE_NAMES",
    "BreakHisName",
    "Dataset",
    "ImageRecord",
    "Skipped",
    "class_names_for",
    "target_of",
    "discover",
    "filter_records",
    "magnification_from_path",
    "parse_breakhis_name",
    "patient_group",
]

BINARY_CLASSES = ("benign", "malignant")
BENIGN_SUBTYPES = ("A", "F", "PT", "TA")
MALIGNANT_SUBTYPES = ("DC", "LC", "MC", "PC")
SUBTYPE_CLASSES = BENIGN_SUBTYPES + MALIGNANT_SUBTYPES
SUBTYPE_NAMES = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes tumor",
    "TA": "tubular adenoma",
    "DC": "ductal carcinoma",
    "LC": "lobular carcinoma",
    "MC": "mucinous carcinoma",
    "PC": "papillary carcinoma",
}
# Folder names used by the official archive for each subtype.
_SUBTYPE_FOLDERS = {name.replace(" ", "_"): code for code, name in SUBTYPE_NAMES.items()}
MAGNIFICATIONS = (40, 100, 200, 400)
TASKS = ("binary", "subtype")

# SOB_B_TA-14-3411F-100-001.png: procedure, class, subtype, year-id, magnification, image number.
_BREAKHIS_RE = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<subtype>A|F|PT|TA|DC|LC|MC|PC)-(?P<patient>\d{2}-\d+[A-Z]*)"
    r"-(?P<mag>40|100|200|400)-(?P<num>\d+)\.(?:png|jpe?g|tiff?)$",
    re.IGNORECASE,
)
# Resized re-publications (e.g. the 200X-224px folder): DC_10926_000.png, without the year.
_SHORT_RE = re.compile(
    r"^(?P<subtype>A|F|PT|TA|DC|LC|MC|PC)_(?P<patient>\d+[A-Z]*)_(?P<num>\d+)\.(?:png|jpe?g|tiff?)$",
    re.IGNORECASE,
)
_MAG_FOLDER_RE = re.compile(r"^(?P<mag>40|100|200|400)X(?:[-_].*)?$", re.IGNORECASE)
_WRAPPER_FOLDERS = {"classificacao_binaria", "histology_slides", "breast", "sob"}


@dataclass(frozen=True)
class BreakHisName:
    """What a BreakHis file name says about its image."""

    label: str
    subtype: str
    patient: str
    magnification: int | None
    image_number: int


def patient_group(patient: str) -> str:
    """The numeric core of a BreakHis patient id: 14-22549AB, 14-22549CD and 22549G -> '22549'.

    BreakHis gives one person's slides several suffixed ids, so leakage-safe splits keep a group.
    """
    core = patient.split("-", 1)[1] if re.match(r"^\d{2}-", patient) else patient
    digits = re.match(r"\d+", core)
    return digits.group(0) if digits else patient


def parse_breakhis_name(name: str) -> BreakHisName | None:
    """Parse a BreakHis file name (official or the short re-published form); None if it is not one."""
    base = Path(name).name
    m = _BREAKHIS_RE.match(base)
    if m:
        subtype = m["subtype"].upper()
        return BreakHisName(
            label="benign" if m["cls"].upper() == "B" else "malignant",
            subtype=subtype,
            patient=m["patient"].upper(),
            magnification=int(m["mag"]),
            image_number=int(m["num"]),
        )
    m = _SHORT_RE.match(base)
    if m:
        subtype = m["subtype"].upper()
        return BreakHisName(
            label="benign" if subtype in BENIGN_SUBTYPES else "malignant",
            subtype=subtype,
            patient=m["patient"].upper(),
            magnification=None,
            image_number=int(m["num"]),
        )
    return None


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image. ``group`` is the unit a split keeps together (a patient group)."""

    path: str
    label: str
    subtype: str | None = None
    patient: str | None = None
    group: str | None = None
    magnification: int | None = None

    def as_row(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Skipped:
    """A file that was found but cannot be used, with the reason."""

    path: str
    reason: str


@dataclass
class Dataset:
    """Records found under a root, how they were found, and what was skipped."""

    root: str
    layout: str
    records: list[ImageRecord]
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def has_patients(self) -> bool:
        return bool(self.records) and all(r.group for r in self.records)

    def counts(self, attr: str) -> Counter:
        return Counter(getattr(r, attr) for r in self.records)


def magnification_from_path(path: str | os.PathLike | None) -> int | None:
    """An image's magnification from its BreakHis file name, else from the nearest folder named
    like '100X'; None when neither says."""
    if not path:
        return None
    p = Path(path)
    parsed = parse_breakhis_name(p.name)
    if parsed is not None and parsed.magnification:
        return parsed.magnification
    for part in reversed(p.parts[:-1]):
        m = _MAG_FOLDER_RE.match(part)
        if m:
            return int(m["mag"])
    return None


def class_names_for(task: str, records: Iterable[ImageRecord] = ()) -> tuple[str, ...]:
    """Class names, in logit order: BreakHis's for its labels, else the sorted folder names."""
    check_choice("task", task, TASKS)
    if task == "subtype":
        return SUBTYPE_CLASSES
    labels = {r.label for r in records}
    if not labels or labels <= set(BINARY_CLASSES):
        return BINARY_CLASSES
    return tuple(sorted(labels))


def _descend_wrappers(root: Path) -> Path:
    """Step through wrapper folders (dataset_cancer_v1/classificacao_binaria, BreaKHis_v1/...)."""
    current = root
    for _ in range(6):
        try:
            entries = [e for e in os.scandir(current) if not e.name.startswith(".")]
        except OSError:
            return current
        dirs = [e for e in entries if e.is_dir()]
        files = [e for e in entries if e.is_file() and is_image_name(e.name)]
        if files or len(dirs) != 1:
            return current
        child = dirs[0]
        # A lone class folder (e.g. only 'benign/') is data, not a wrapper around it.
        if child.name.lower() in BINARY_CLASSES or _has_images(child.path):
            return current
        if child.name.lower() in _WRAPPER_FOLDERS or len(entries) == 1:
            current = Path(child.path)
        else:
            return current
    return current


def _has_images(folder: str) -> bool:
    try:
        return any(e.is_file() and is_image_name(e.name) for e in os.scandir(folder))
    except OSError:
        return False


def _walk_images(root: Path) -> tuple[list[Path], list[Skipped]]:
    images: list[Path] = []
    skipped: list[Skipped] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # masks/ holds lesion masks (the synthetic generator writes them), not a class.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "masks")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            if is_image_name(name):
                images.append(path)
            elif name.lower() not in {"manifest.csv", "readme.md", "readme.txt", "thumbs.db"}:
                skipped.append(Skipped(str(path), "not an image file (unrecognised extension)"))
    return images, skipped


def _record_from_folders(path: Path, root: Path, classes_seen: set[str]) -> ImageRecord | str:
    rel = path.relative_to(root).parts[:-1]
    root_mag = _MAG_FOLDER_RE.match(root.name)
    magnification = int(root_mag["mag"]) if root_mag else None
    remaining: list[str] = []
    for part in rel:
        m = _MAG_FOLDER_RE.match(part)
        if m:
            magnification = int(m["mag"])
            continue
        if part.lower() in _WRAPPER_FOLDERS:
            continue
        remaining.append(part)
    parsed = parse_breakhis_name(path.name)
    folder_label = remaining[0] if remaining else None
    if parsed is not None:
        folder_says = next((p.lower() for p in remaining if p.lower() in BINARY_CLASSES), None)
        if folder_says and folder_says != parsed.label:
            return f"file name says {parsed.label} but the folder says {folder_says}"
        return ImageRecord(
            path=str(path),
            label=parsed.label,
            subtype=parsed.subtype,
            patient=parsed.patient,
            group=patient_group(parsed.patient),
            magnification=parsed.magnification or magnification,
        )
    if folder_label is None:
        return "image is not inside a class folder (expected <root>/<class>/...)"
    label = folder_label.lower() if folder_label.lower() in BINARY_CLASSES else folder_label
    classes_seen.add(label)
    return ImageRecord(path=str(path), label=label, magnification=magnification)


def _layout_name(root: Path, records: Sequence[ImageRecord]) -> str:
    top = {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    if any(_MAG_FOLDER_RE.match(t) for t in top) or _MAG_FOLDER_RE.match(root.name):
        return "original project (<MAG>X/<class>/)"
    if {"benign", "malignant"} <= {t.lower() for t in top} and any(
        "SOB" in Path(r.path).parts for r in records
    ):
        return "official BreakHis archive (breast/<class>/SOB/<subtype>/<patient>/<MAG>X/)"
    return "class folders (<class>/**)"


def _read_manifest(csv_path: Path) -> Dataset:
    base = csv_path.parent
    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = {c.strip().lower() for c in (reader.fieldnames or [])}
            missing = {"path", "label"} - columns
            if missing:
                raise DataError(
                    f"Manifest {csv_path} lacks the column(s) {', '.join(sorted(missing))}; "
                    "it needs 'path,label' and optionally 'patient,subtype,magnification'."
                )
            for line_no, raw in enumerate(reader, start=2):
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
                if not row.get("path") or not row.get("label"):
                    skipped.append(Skipped(f"{csv_path}:{line_no}", "row without path or label"))
                    continue
                path = (
                    (base / row["path"]).resolve()
                    if not os.path.isabs(row["path"])
                    else Path(row["path"])
                )
                parsed = parse_breakhis_name(path.name)
                patient = row.get("patient") or (parsed.patient if parsed else None)
                group = row.get("group") or (patient_group(patient) if patient else None)
                mag_text = row.get("magnification", "").upper().rstrip("X")
                magnification = (
                    int(mag_text)
                    if mag_text.isdigit()
                    else (parsed.magnification if parsed else None)
                )
                subtype = row.get("subtype") or (parsed.subtype if parsed else None)
                label = row["label"]
                if label.lower() in BINARY_CLASSES:
                    label = label.lower()
                if not path.is_file():
                    skipped.append(Skipped(str(path), "listed in the manifest but missing"))
                    continue
                records.append(
                    ImageRecord(
                        path=str(path),
                        label=label,
                        subtype=subtype.upper() if subtype else None,
                        patient=patient or None,
                        group=group or None,
                        magnification=magnification,
                    )
                )
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read manifest {csv_path}: {exc}") from None
    return Dataset(root=str(csv_path), layout="CSV manifest", records=records, skipped=skipped)


def discover(path: str | os.PathLike) -> Dataset:
    """Find every labelled image under ``path`` (a folder or a CSV manifest); files are only read."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"Data path {path} does not exist.")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(
                f"Data path {path} is a file; give a folder of class folders or a CSV manifest."
            )
        dataset = _read_manifest(path)
    else:
        root = _descend_wrappers(path)
        images, skipped = _walk_images(root)
        records: list[ImageRecord] = []
        classes_seen: set[str] = set()
        for image in images:
            result = _record_from_folders(image, root, classes_seen)
            if isinstance(result, str):
                skipped.append(Skipped(str(image), result))
            else:
                records.append(result)
        dataset = Dataset(str(root), _layout_name(root, records), records, skipped)
    if not dataset.records:
        raise DataError(
            f"No labelled images found in {path}; expected <root>/<class>/*.png folders "
            "(e.g. 400X/benign, 400X/malignant), the BreakHis archive tree, or a CSV manifest "
            "with 'path,label' columns."
        )
    return dataset


def filter_records(
    records: Iterable[ImageRecord], magnification: str | int = "all", task: str = "binary"
) -> list[ImageRecord]:
    """Keep the records of one magnification ('all' keeps every one) usable for ``task``."""
    check_choice("task", task, TASKS)
    mag = str(magnification).upper().rstrip("X").lower()
    if mag != "all":
        check_choice("magnification", mag, [str(m) for m in MAGNIFICATIONS] + ["all"])
    kept = []
    for r in records:
        if mag != "all" and r.magnification != int(mag):
            continue
        if task == "subtype" and r.subtype not in SUBTYPE_CLASSES:
            continue
        kept.append(r)
    if not kept:
        raise DataError(
            f"No images left for magnification {magnification} and task {task}"
            + (
                "; subtype labels come from BreakHis file names or a manifest's subtype column."
                if task == "subtype"
                else "."
            )
        )
    return kept


def target_of(record: ImageRecord, task: str) -> str:
    """The class name a record has for ``task``."""
    return record.subtype if task == "subtype" else record.label  # type: ignore[return-value]
