"""The checkpoint's metadata: one typed, versioned contract, :class:`CheckpointMetadata`.

Its parts (:class:`HeadSpec`, :class:`ProbeChoice`, :class:`SplitPart`, :class:`TrainingData`)
live in :mod:`histolens.checkpoint.parts` and validate themselves as they are built; this module
holds the contract that gathers them, its schema version, every default, and the migration of a
file of an older schema as it is read. Reading and writing files is ``histolens.checkpoint.io``'s job.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from histolens.checkpoint.parts import (
    HeadSpec,
    ProbeChoice,
    SplitPart,
    TrainingData,
    _check_preprocess,
    _InvalidField,
    _mapping,
    _parse_preprocess,
    _plain,
    _r,
    _real,
    _text,
    _whole,
)
from histolens.config import RunConfig
from histolens.errors import CheckpointError
from histolens.models.transforms import Preprocess

if TYPE_CHECKING:
    from histolens.stats.decisions import OperatingPoints

# The parts are listed here too: ``histolens.checkpoint.io`` re-exports this ``__all__``.
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
# 3: operating points per magnification (``operating_points``); an older file has none, and
#    decides every image at its one ``threshold``, as it did.
SCHEMA_VERSION = 3
FORMAT_VERSION = SCHEMA_VERSION

TASKS = ("binary", "subtype")


def _where(source: str | os.PathLike | None) -> str:
    return f"Checkpoint {source}" if source else "The checkpoint"


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
# Records owned by other modules (histolens.stain.normalize, estimate, conformal, ood, export, adapt),
# which validate them when they read them; here they are JSON mappings or None.
_OPTIONAL_RECORDS = (
    "stain",
    "estimate",
    "conformal",
    "ood",
    "adapted_batchnorm",
    "export",
    "operating_points",
)
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
    stain: dict[str, Any] | None = None  # histolens.stain.normalize.StainNormalizer.to_dict()
    stain_reference: str | None = None
    magnification: str = "all"
    # The training images' microns per pixel (``--mpp`` at training) and their (width, height)
    # in pixels; slide tiling takes its scale from them before the BreakHis magnification table.
    training_mpp: float | None = None
    training_image_size: tuple[int, int] | None = None
    config: dict[str, Any] = field(default_factory=dict)  # RunConfig.to_dict()
    class_weights: dict[str, float] = field(default_factory=dict)
    data: TrainingData = field(default_factory=TrainingData)
    metrics: dict[str, Any] = field(default_factory=dict)  # headline of the run's evaluation
    estimate: dict[str, Any] | None = None  # histolens.evaluation.estimate.build_estimate
    probe: ProbeChoice | None = None
    conformal: dict[str, Any] | None = None  # histolens.stats.conformal.ConformalCalibration
    ood: dict[str, Any] | None = None  # histolens.inference.ood.OODGuard (its tensors are weights)
    adapted_batchnorm: dict[str, Any] | None = None  # {"images": n} after Predictor AdaBN
    export: dict[str, Any] | None = None  # an ONNX export's section (histolens.export.onnx)
    # histolens.stats.decisions.OperatingPoints: the threshold per magnification (None: the
    # one ``threshold`` for every image, as checkpoints before schema 3).
    operating_points: dict[str, Any] | None = None
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
        if self.training_mpp is not None:
            mpp = _real("training_mpp", self.training_mpp)
            if not (mpp > 0 and math.isfinite(mpp)):
                raise _InvalidField("training_mpp", f"is {_r(mpp)}, not a positive number")
            put(self, "training_mpp", mpp)
        if self.training_image_size is not None:
            size = self.training_image_size
            if (
                isinstance(size, str)
                or not isinstance(size, Sequence)
                or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
            ):
                raise _InvalidField(
                    "training_image_size", f"is {_r(size)}, not [width, height] in pixels"
                )
            put(self, "training_image_size", (int(size[0]), int(size[1])))
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
    def decision(self) -> OperatingPoints | None:
        """The stored operating points per magnification (None: ``threshold`` for all)."""
        if self.operating_points is None or not self.is_binary:
            return None
        from histolens.stats.decisions import OperatingPoints

        return OperatingPoints.from_dict(self.operating_points)

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


def _from_version_1(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: a missing head is the original project's MLP head, and a head without a
    kind is an MLP (the linear probe, which came later, always wrote its kind)."""
    head = raw.get("head")
    if head is None:
        head = HeadSpec().to_dict()
    elif isinstance(head, Mapping) and "kind" not in head:
        head = {**head, "kind": "mlp"}
    return {**raw, "head": head}


def _from_version_2(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 2 -> 3: no operating points per magnification (the default, None) is what a
    version-2 file means; nothing to change."""
    return raw


# _MIGRATIONS[v - 1] turns version v into version v + 1.
_MIGRATIONS = (_from_version_1, _from_version_2)
assert len(_MIGRATIONS) == SCHEMA_VERSION - 1
