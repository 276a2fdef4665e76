"""The parts of the checkpoint's metadata, and the field checks they share.

:class:`HeadSpec`, :class:`ProbeChoice`, :class:`SplitPart` and :class:`TrainingData` validate
themselves as they are built; a field holding what the contract does not allow raises
``_InvalidField``, which :meth:`histolens.checkpoint.metadata.CheckpointMetadata.from_dict` turns
into one sentence naming the file. The checks (``_real``, ``_whole``, ``_text``, ``_mapping``,
``_check_preprocess``) and ``_plain`` (a value as JSON gives it back) serve the parts and
:class:`~histolens.checkpoint.metadata.CheckpointMetadata` alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histolens.config import MLP_HEAD_DIMS, MLP_HEAD_DROPOUTS
from histolens.errors import CheckpointError
from histolens.models.transforms import Preprocess

__all__ = ["HeadSpec", "ProbeChoice", "SplitPart", "TrainingData"]

HEAD_KINDS = ("linear", "mlp")


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


def _check_mapping(name: str, value: Any, problem: str | None = None) -> Mapping:
    """``value`` when it is a mapping; else the field ``name`` is invalid (``problem`` says how,
    default "is X, not a mapping")."""
    if not isinstance(value, Mapping):
        raise _InvalidField(name, problem or f"is {_r(value)}, not a mapping")
    return value


def _mapping(name: str, value: Any, optional: bool = False) -> dict[str, Any] | None:
    if value is None and optional:
        return None
    return _plain(_check_mapping(name, value))


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
        _check_mapping("head", d)
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
        _check_mapping("data", d, f"has a split part {_r(d)} that is not a mapping")
        counts = d.get("classes") or {}
        _check_mapping("data", counts, "has split classes that are not a mapping")
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
        _check_mapping("data", d)
        split = _check_mapping("data", d.get("split") or {}, "has a split that is not a mapping")
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


def _check_preprocess(pre: Preprocess) -> None:
    size, mean, std = pre.input_size, pre.mean, pre.std
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise _InvalidField("preprocess", f"has input_size {_r(size)}, not (height, width)")
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise _InvalidField("preprocess", "has no three means and three positive stds")


def _parse_preprocess(d: Any) -> Preprocess:
    _check_mapping("preprocess", d)
    try:
        return Preprocess.from_dict(d)
    except KeyError as exc:
        raise _InvalidField("preprocess", f"lacks {exc}") from None
    except (TypeError, ValueError) as exc:
        raise _InvalidField("preprocess", f"cannot be read ({exc})") from None
