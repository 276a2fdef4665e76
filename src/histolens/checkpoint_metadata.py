"""The checkpoint's metadata: one typed, versioned contract, :class:`CheckpointMetadata`.

Its parts (:class:`HeadSpec`, :class:`ProbeChoice`, :class:`SplitPart`, :class:`TrainingData`)
validate themselves as they are built, every default lives here, and a file of an older schema
is migrated as it is read. Reading and writing files is ``histolens.checkpoint``'s job.
"""

# Over 400 lines: one schema (the contract, its four parts and their field checks), read together.

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from histolens.config import MLP_HEAD_DIMS, MLP_HEAD_DROPOUTS, RunConfig
from histolens.errors import CheckpointError
from histolens.transforms import Preprocess

__all__ = [
    "CHECKPOINT_FORMAT",
    "SCHEMA_VERSION",
    "CheckpointMetadata",
    "HeadSpec",
    "ProbeChoice",
    "SplitPart",
    "TrainingData",
]

CHECKPOINT_FORMAT = "histolens-checkpoint"
# The metadata's schema. Stored under "format_version", the key every histolens has checked, so
# that an older histolens refuses a newer file in one sentence instead of misreading it.
# 1: the head's kind was not stored (the head was the MLP, or absent for the original one).
# 2: every field is written, the head's kind included.
SCHEMA_VERSION = 2
FORMAT_VERSION = SCHEMA_VERSION

HEAD_KINDS = ("linear", "mlp")
TASKS = ("binary", "subtype")


class _InvalidField(CheckpointError):
    """A metadata field holding what the contract does not allow; ``sentence`` names the file."""

    def __init__(self, name: str, problem: str) -> None:
        self.name, self.problem = name, problem
        super().__init__(self.sentence(None))

    def sentence(self, source: str | os.PathLike | None) -> str:
        where = f"checkpoint {source}" if source else "the checkpoint"
        return f"The metadata field '{self.name}' of {where} {self.problem}."


def _r(value: Any) -> str:
    """A value as an error message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _where(source: str | os.PathLike | None) -> str:
    return f"Checkpoint {source}" if source else "The checkpoint"


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back: tuples as lists, paths as text, arrays as lists, and
    records (``to_dict``) as mappings. Anything else is left for ``json.dumps`` to judge."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return value


def _real(name: str, value: Any) -> float:
    value = _plain(value)  # a numpy or torch scalar reads as its number
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _InvalidField(name, f"is {_r(value)}, not a number")
    return float(value)


def _whole(name: str, value: Any) -> int:
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _InvalidField(name, f"is {_r(value)}, not a whole number")
    return value


def _text(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _InvalidField(name, f"is {_r(value)}, not text")


def _mapping(name: str, value: Any, optional: bool = False) -> dict[str, Any] | None:
    if value is None and optional:
        return None
    if not isinstance(value, Mapping):
        raise _InvalidField(name, f"is {_r(value)}, not a mapping")
    return _plain(value)


@dataclass(frozen=True)
class HeadSpec:
    """The classifier head: ``linear`` (the probe, no hidden layers) or ``mlp`` (the original
    project's head, trained by Lightning: hidden ``dims`` with their ``dropouts``)."""

    kind: str = "mlp"
    dims: tuple[int, ...] = MLP_HEAD_DIMS
    dropouts: tuple[float, ...] = MLP_HEAD_DROPOUTS

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise _InvalidField(
                "head", f"has kind {_r(self.kind)}, not one of {', '.join(HEAD_KINDS)}"
            )
        if isinstance(self.dims, str) or isinstance(self.dropouts, str):
            raise _InvalidField("head", "has dims or dropouts that are text, not numbers")
        dims = tuple(_whole("head", d) for d in self.dims)
        dropouts = tuple(_real("head", p) for p in self.dropouts)
        if len(dims) != len(dropouts):
            raise _InvalidField("head", f"has {len(dims)} dims but {len(dropouts)} dropouts")
        if min(dims, default=1) < 1 or not all(0 <= p < 1 for p in dropouts):
            raise _InvalidField("head", "has a dim under 1 or a dropout outside [0, 1)")
        if self.kind == "linear" and dims:
            raise _InvalidField("head", "is a linear probe with hidden layers")
        object.__setattr__(self, "dims", dims)
        object.__setattr__(self, "dropouts", dropouts)

    @classmethod
    def linear(cls) -> HeadSpec:
        """The linear probe's head."""
        return cls("linear", (), ())

    @classmethod
    def from_config(cls, model: Any) -> HeadSpec:
        """The head a run's ``ModelConfig`` asks for."""
        if model.head == "linear":
            return cls.linear()
        return cls(model.head, tuple(model.head_dims), tuple(model.dropouts))

    @classmethod
    def from_dict(cls, d: Any) -> HeadSpec:
        if not isinstance(d, Mapping):
            raise _InvalidField("head", f"is {_r(d)}, not a mapping")
        if "kind" not in d:
            raise _InvalidField("head", f"has no 'kind' ({' or '.join(HEAD_KINDS)})")
        mlp = d["kind"] == "mlp"
        dims = d.get("dims", MLP_HEAD_DIMS if mlp else ())
        dropouts = d.get("dropouts", MLP_HEAD_DROPOUTS if mlp else ())
        return cls(d["kind"], dims, dropouts)

    @property
    def is_linear(self) -> bool:
        return self.kind == "linear"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "dims": list(self.dims), "dropouts": list(self.dropouts)}


@dataclass(frozen=True)
class ProbeChoice:
    """The linear probe's choice of ``C``, and the inner-CV score of each ``C`` tried."""

    C: float
    inner_cv: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        C = _real("probe", self.C)
        if not C > 0:
            raise _InvalidField("probe", f"has C = {_r(C)}, not a positive number")
        if not isinstance(self.inner_cv, Mapping):
            raise _InvalidField("probe", "has an inner_cv that is not a mapping")
        object.__setattr__(self, "C", C)
        scores = {c: _real("probe", v) for c, v in _plain(self.inner_cv).items()}
        object.__setattr__(self, "inner_cv", scores)

    @classmethod
    def from_dict(cls, d: Any) -> ProbeChoice:
        if not isinstance(d, Mapping) or "C" not in d:
            raise _InvalidField("probe", f"is {_r(d)}, not a mapping with the chosen C")
        return cls(d["C"], d.get("inner_cv") or {})

    def to_dict(self) -> dict[str, Any]:
        return {"C": self.C, "inner_cv": dict(self.inner_cv)}


@dataclass(frozen=True)
class SplitPart:
    """One side of the training split: its images, patient groups and images per class."""

    images: int | None = None
    groups: int | None = None
    classes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> SplitPart:
        if not isinstance(d, Mapping):
            raise _InvalidField("data", f"has a split part {_r(d)} that is not a mapping")
        counts = d.get("classes") or {}
        if not isinstance(counts, Mapping):
            raise _InvalidField("data", "has split classes that are not a mapping")
        numbers = [d.get("images"), d.get("groups"), *counts.values()]
        if any(isinstance(n, bool) or not isinstance(n, int | None) for n in numbers):
            raise _InvalidField("data", f"has split counts {_r(numbers)}, not whole numbers")
        return cls(d.get("images"), d.get("groups"), {str(c): n for c, n in counts.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "groups": self.groups, "classes": dict(self.classes)}


@dataclass(frozen=True)
class TrainingData:
    """What the model was trained on: the data's path and layout, and the split's sizes."""

    path: str | None = None
    layout: str | None = None
    patient_level_split: bool | None = None
    split: dict[str, SplitPart] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any) -> TrainingData:
        if not isinstance(d, Mapping):
            raise _InvalidField("data", f"is {_r(d)}, not a mapping")
        split = d.get("split") or {}
        if not isinstance(split, Mapping):
            raise _InvalidField("data", "has a split that is not a mapping")
        patient_level = d.get("patient_level_split")
        if patient_level is not None and not isinstance(patient_level, bool):
            raise _InvalidField(
                "data", f"has patient_level_split {_r(patient_level)}, not true/false"
            )
        return cls(
            None if d.get("path") is None else str(d["path"]),
            None if d.get("layout") is None else str(d["layout"]),
            patient_level,
            {str(name): SplitPart.from_dict(part) for name, part in split.items()},
        )

    @property
    def known(self) -> bool:
        """Whether the checkpoint says anything about its training data."""
        return self != TrainingData()

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "layout": self.layout,
            "patient_level_split": self.patient_level_split,
            "split": {name: part.to_dict() for name, part in self.split.items()},
        }


# Fields that must be present in every version: without them the model cannot be rebuilt.
_REQUIRED = ("backbone", "class_names", "preprocess")
_OPTIONAL_TEXT = (
    "model_id",
    "timm_name",
    "licence",
    "pretrained",
    "feature_layer",
    "stain_reference",
    "threshold_method",
    "saved_at",
)
# Records owned by other modules (histolens.stain, estimate, conformal, ood, export, adapt),
# which validate them when they read them; here they are JSON mappings or None.
_OPTIONAL_RECORDS = ("stain", "estimate", "conformal", "ood", "adapted_batchnorm", "export")
_RECORDS = ("config", "metrics", "versions", "extra")


@dataclass(frozen=True)
class CheckpointMetadata:
    """What a checkpoint says about its model: the one typed, versioned contract.

    ``from_dict`` reads a file's JSON (migrating older schema versions, refusing newer ones and
    invalid fields in one sentence that names the field); ``to_dict`` gives the JSON back.
    Every default lives here. Keys this version does not know are kept in ``extra`` and written
    back unchanged.
    """

    schema_version: ClassVar[int] = SCHEMA_VERSION

    backbone: str
    class_names: tuple[str, ...]
    preprocess: Preprocess
    task: str = "binary"
    head: HeadSpec = field(default_factory=HeadSpec)
    feature_layer: str | None = None  # 'blocks.N[,blocks.M]'; None: the backbone's last layer
    threshold: float = 0.5  # of the positive class's probability (two classes)
    temperature: float = 1.0
    threshold_method: str | None = None
    model_id: str | None = None
    timm_name: str | None = None
    licence: str | None = None  # of the backbone's weights (None: see the timm model card)
    pretrained: str | None = None
    stain: dict[str, Any] | None = None  # histolens.stain.StainNormalizer.to_dict()
    stain_reference: str | None = None
    magnification: str = "all"
    config: dict[str, Any] = field(default_factory=dict)  # RunConfig.to_dict()
    class_weights: dict[str, float] = field(default_factory=dict)
    data: TrainingData = field(default_factory=TrainingData)
    metrics: dict[str, Any] = field(default_factory=dict)  # headline of the run's evaluation
    estimate: dict[str, Any] | None = None  # histolens.estimate.build_estimate
    probe: ProbeChoice | None = None
    conformal: dict[str, Any] | None = None  # histolens.conformal.ConformalCalibration
    ood: dict[str, Any] | None = None  # histolens.ood.OODGuard (its tensors are weights)
    adapted_batchnorm: dict[str, Any] | None = None  # {"images": n} after Predictor AdaBN
    export: dict[str, Any] | None = None  # an ONNX export's section (histolens.export)
    epoch: int | None = None  # Lightning runs: the best epoch, its loss and validation AUC
    best_val_loss: float | None = None
    val_auc_at_best: float | None = None
    saved_at: str | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        put = object.__setattr__
        if not isinstance(self.backbone, str) or not self.backbone:
            raise _InvalidField("backbone", f"is {_r(self.backbone)}, not a backbone name")
        names = self.class_names
        if (
            isinstance(names, str)
            or not isinstance(names, Sequence)
            or len(names) < 2
            or not all(isinstance(c, str) and c for c in names)
            or len(set(names)) != len(names)
        ):
            raise _InvalidField("class_names", f"is {_r(names)}, not two or more distinct names")
        put(self, "class_names", tuple(names))
        if not isinstance(self.preprocess, Preprocess):
            raise _InvalidField("preprocess", f"is {_r(self.preprocess)}, not a Preprocess")
        _check_preprocess(self.preprocess)
        if self.task not in TASKS:
            raise _InvalidField("task", f"is {_r(self.task)}, not one of {', '.join(TASKS)}")
        if not isinstance(self.head, HeadSpec):
            raise _InvalidField("head", f"is {_r(self.head)}, not a HeadSpec")
        threshold = _real("threshold", self.threshold)
        if not 0 <= threshold <= 1:
            raise _InvalidField("threshold", f"is {_r(threshold)}, not between 0 and 1")
        temperature = _real("temperature", self.temperature)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise _InvalidField("temperature", f"is {_r(temperature)}, not a positive number")
        put(self, "threshold", threshold)
        put(self, "temperature", temperature)
        for name in _OPTIONAL_TEXT:
            _text(name, getattr(self, name))
        if isinstance(self.magnification, bool) or not isinstance(self.magnification, str | int):
            raise _InvalidField("magnification", f"is {_r(self.magnification)}, not 40 ... 'all'")
        put(self, "magnification", str(self.magnification))
        for name in _OPTIONAL_RECORDS:
            put(self, name, _mapping(name, getattr(self, name), optional=True))
        for name in _RECORDS:
            put(self, name, _mapping(name, getattr(self, name)))
        weights = _mapping("class_weights", self.class_weights)
        put(self, "class_weights", {c: _real("class_weights", w) for c, w in weights.items()})
        if not isinstance(self.data, TrainingData):
            raise _InvalidField("data", f"is {_r(self.data)}, not TrainingData")
        if self.probe is not None and not isinstance(self.probe, ProbeChoice):
            raise _InvalidField("probe", f"is {_r(self.probe)}, not a ProbeChoice")
        if self.epoch is not None:
            put(self, "epoch", _whole("epoch", self.epoch))
        for name in ("best_val_loss", "val_auc_at_best"):
            if getattr(self, name) is not None:
                put(self, name, _real(name, getattr(self, name)))

    # --- reading and writing ---------------------------------------------------------------
    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], source: str | os.PathLike | None = None
    ) -> CheckpointMetadata:
        """The metadata in a checkpoint's JSON (``source`` names the file in errors).

        Older schema versions are migrated; a newer one, a missing required field or an invalid
        value raises CheckpointError naming it. ``null`` reads as "not stored" (the default).
        """
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{_where(source)} has metadata that is not a JSON object.")
        raw = dict(d)
        fmt = raw.pop("format", CHECKPOINT_FORMAT)
        if fmt != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{_where(source)} is not a histolens checkpoint (format {_r(fmt)})."
            )
        version = raw.pop("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise CheckpointError(
                f"{_where(source)} has the format version {_r(version)}, not a whole number from 1."
            )
        if version > SCHEMA_VERSION:
            from histolens import __version__

            raise CheckpointError(
                f"{_where(source)} was written by a newer histolens (checkpoint format version "
                f"{version}, while histolens {__version__} reads versions 1 to {SCHEMA_VERSION}); "
                "upgrade histolens to load it."
            )
        for migrate in _MIGRATIONS[version - 1 :]:
            raw = migrate(raw)
        for name in _REQUIRED:
            if raw.get(name) is None:
                raise CheckpointError(f"{_where(source)} lacks the metadata field '{name}'.")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        extra = {k: v for k, v in raw.items() if k not in known}
        parsers = {
            "preprocess": _parse_preprocess,
            "head": HeadSpec.from_dict,
            "data": TrainingData.from_dict,
            "probe": ProbeChoice.from_dict,
        }
        try:
            for name, parse in parsers.items():
                if name in values:
                    values[name] = parse(values[name])
            return cls(**values, extra=extra)
        except _InvalidField as exc:
            raise CheckpointError(exc.sentence(source)) from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON of this metadata (what ``from_dict`` reads back to an equal object)."""
        out: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "format_version": SCHEMA_VERSION}
        for f in fields(self):
            if f.name != "extra":
                out[f.name] = _plain(getattr(self, f.name))
        return {**out, **{k: v for k, v in self.extra.items() if k not in out}}

    # --- what the front ends ask ---------------------------------------------------------
    @property
    def is_binary(self) -> bool:
        """Two classes: one sigmoid logit, decided at ``threshold``."""
        return len(self.class_names) == 2

    @property
    def positive_class(self) -> str | None:
        """The class whose probability the threshold applies to (two classes only)."""
        return self.class_names[1] if self.is_binary else None

    @property
    def headline_estimate(self) -> dict[str, Any] | None:
        """The figures to quote, with their 95% CIs: the stored estimate on unseen patients, or
        an older checkpoint's metrics labelled as what they are; None when nothing is stored."""
        from histolens.performance import checkpoint_estimate

        return checkpoint_estimate(
            self.estimate, self.metrics, self.class_names, self.task, self.threshold
        )

    @property
    def stain_method(self) -> str:
        """The stain normalisation the model expects ('none' when it has none)."""
        return str((self.stain or {}).get("method") or "none")

    @property
    def export_source(self) -> str | None:
        """The torch checkpoint an ONNX export was made from, as recorded at export."""
        return (self.export or {}).get("source_checkpoint")

    @property
    def run_config(self) -> RunConfig:
        """The resolved config the model was trained with (the defaults when none is stored)."""
        return RunConfig.from_dict(self.config) if self.config else RunConfig()


def _check_preprocess(pre: Preprocess) -> None:
    size, mean, std = pre.input_size, pre.mean, pre.std
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise _InvalidField("preprocess", f"has input_size {_r(size)}, not (height, width)")
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise _InvalidField("preprocess", "has no three means and three positive stds")


def _parse_preprocess(d: Any) -> Preprocess:
    if not isinstance(d, Mapping):
        raise _InvalidField("preprocess", f"is {_r(d)}, not a mapping")
    try:
        return Preprocess.from_dict(d)
    except KeyError as exc:
        raise _InvalidField("preprocess", f"lacks {exc}") from None
    except (TypeError, ValueError) as exc:
        raise _InvalidField("preprocess", f"cannot be read ({exc})") from None


def _from_version_1(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: a missing head is the original project's MLP head, and a head without a
    kind is an MLP (the linear probe, which came later, always wrote its kind)."""
    head = raw.get("head")
    if head is None:
        head = HeadSpec().to_dict()
    elif isinstance(head, Mapping) and "kind" not in head:
        head = {**head, "kind": "mlp"}
    return {**raw, "head": head}


# _MIGRATIONS[v - 1] turns version v into version v + 1.
_MIGRATIONS = (_from_version_1,)
assert len(_MIGRATIONS) == SCHEMA_VERSION - 1
