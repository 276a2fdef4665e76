"""The typed results of an evaluation: :class:`Metrics` and :class:`Estimate`.

:func:`histolens.evaluation.metrics.compute_metrics` returns a :class:`Metrics` (with its
:class:`ImageMetrics` blocks and :class:`ReferMetrics`), and
:func:`histolens.evaluation.estimate.build_estimate` an :class:`Estimate` (with its
:class:`EstimateBlock` per magnification). They cross into JSON in three places: a
checkpoint's metadata (``estimate``), an evaluation's ``metrics.json`` and the web API (whose
pydantic schemas are derived from these classes). ``to_dict`` gives exactly the JSON that was
written before these classes existed (same keys, same order; a field that is None is left out
unless the JSON always carried it), and ``from_dict`` reads it back, older files included: a key
this version does not know is kept in ``extra`` and written back last.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

from histolens.errors import DataError

__all__ = [
    "CI",
    "ClassMetrics",
    "Estimate",
    "EstimateBlock",
    "ImageMetrics",
    "Metrics",
    "ReferMetrics",
    "RiskCoverage",
    "as_estimate",
]

# A 95% confidence interval (low, high); JSON holds it as a two-element list.
CI = tuple[float, float]
R = TypeVar("R", bound="_Record")


def _spec(
    default: Any = None,
    *,
    key: str | None = None,
    always: bool = False,
    parse: Callable[[Any], Any] | None = None,
    factory: Callable[[], Any] | None = None,
    api: bool = True,
    required: bool = False,
) -> Any:
    """A field with how it is spelled in JSON: ``key`` (default: its name), ``always`` (written
    even when None or empty), ``parse`` (JSON value -> field value) and ``api`` (False: left out
    of the web API's schema)."""
    meta = {"key": key, "always": always, "parse": parse, "api": api}
    if required:
        return field(metadata=meta)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _plain(value: Any) -> Any:
    """A field value as JSON holds it: records as mappings, tuples as lists."""
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class _Record:
    """``to_dict``/``from_dict`` of a frozen dataclass from its fields' ``_spec``."""

    extra: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The JSON mapping: fields in order, None (and False, empty) left out unless ``always``."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "extra":
                continue
            if not f.metadata["always"] and (value is None or value is False):
                continue
            out[f.metadata["key"] or f.name] = _plain(value)
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any] | R) -> R:
        """The record of a JSON mapping (``to_dict``'s, or an older file's)."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise DataError(f"A stored {cls.__name__} is {type(data).__name__}, not a mapping.")
        by_key = {f.metadata["key"] or f.name: f for f in fields(cls) if f.name != "extra"}  # type: ignore[arg-type]
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            f = by_key.get(key)
            if f is None:
                extra[key] = value
                continue
            parse = f.metadata["parse"]
            values[f.name] = parse(value) if parse is not None and value is not None else value
        missing = [
            f.metadata["key"] or f.name
            for f in fields(cls)  # type: ignore[arg-type]
            if f.default is MISSING and f.default_factory is MISSING and f.name not in values
        ]
        if missing:
            raise DataError(f"A stored {cls.__name__} has no {', '.join(missing)}.")
        return cls(**values, extra=extra)


def _cis(value: Mapping[str, Any]) -> dict[str, CI]:
    return {k: tuple(v) for k, v in value.items()}  # type: ignore[misc]


def _records(kind: type[_Record]) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    return lambda value: {k: kind.from_dict(v) for k, v in value.items()}


@dataclass(frozen=True, kw_only=True)
class ClassMetrics(_Record):
    """Precision, recall, F1 and images of one class (multi-class tasks)."""

    precision: float = _spec(always=True)
    recall: float = _spec(always=True)
    f1: float = _spec(always=True)
    support: int = _spec(always=True)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ImageMetrics(_Record):
    """A block of image-level metrics: binary (``binary_metrics``, with the patient figures and
    their CIs) or multi-class (``multiclass_metrics``); a magnification's row adds its images,
    patients per class and referral rate. A figure the block does not have is None."""

    n: int | None = _spec()
    accuracy: float | None = _spec()
    precision: float | None = _spec()
    recall: float | None = _spec()
    sensitivity: float | None = _spec()
    specificity: float | None = _spec()
    f1: float | None = _spec()
    balanced_accuracy: float | None = _spec()
    roc_auc: float | None = _spec()
    pr_auc: float | None = _spec()
    brier: float | None = _spec()
    ece: float | None = _spec()
    tp: int | None = _spec()
    tn: int | None = _spec()
    fp: int | None = _spec()
    fn: int | None = _spec()
    threshold: float | None = _spec()
    per_class: dict[str, ClassMetrics] | None = _spec(parse=_records(ClassMetrics))
    macro_precision: float | None = _spec()
    macro_recall: float | None = _spec()
    macro_f1: float | None = _spec()
    weighted_precision: float | None = _spec()
    weighted_recall: float | None = _spec()
    weighted_f1: float | None = _spec()
    roc_auc_ovr: float | None = _spec()
    log_loss: float | None = _spec()
    patient_recognition_rate: float | None = _spec()
    patient_auc: float | None = _spec()
    n_patients: int | None = _spec()
    ci95: dict[str, CI] | None = _spec(parse=_cis)
    n_images: int | None = _spec()
    n_benign_patients: int | None = _spec()
    n_malignant_patients: int | None = _spec()
    refer_rate: float | None = _spec()
    extra: dict[str, Any] = field(default_factory=dict)

    def figure(self, name: str) -> float | None:
        """The figure called ``name`` (``roc_auc``, ...), None when the block has none."""
        return getattr(self, name) if name in _FIGURES else None

    def figures(self) -> dict[str, float]:
        """Every figure the block has, by name, in the block's order."""
        return {k: v for k in _FIGURES if (v := self.figure(k)) is not None}


_FIGURES = tuple(
    f.name for f in fields(ImageMetrics) if f.name not in ("per_class", "ci95", "extra")
)


@dataclass(frozen=True, kw_only=True)
class RiskCoverage(_Record):
    """The accuracy of the images kept as the least confident are referred first."""

    referred: list[float] = _spec(always=True, factory=list)
    accuracy: list[float] = _spec(always=True, factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ReferMetrics(_Record):
    """Knowing when not to answer: images unlike the training images (counted apart), the
    risk-coverage curve, and (with prediction sets, ``alpha`` not None) their coverage and the
    referrals of images and patients."""

    n_ood: int = _spec(0, always=True)
    ood_rate: float = _spec(0.0, always=True)
    ood_reasons: dict[str, int] = _spec(always=True, factory=dict)
    aurc: float | None = _spec()
    curve: RiskCoverage | None = _spec(parse=RiskCoverage.from_dict)
    alpha: float | None = _spec()
    method: str | None = _spec()
    target_coverage: float | None = _spec()
    coverage: float | None = _spec()
    coverage_images: float | None = _spec()
    mean_set_size: float | None = _spec()
    refer_rate: float | None = _spec()
    accuracy_kept: float | None = _spec()
    accuracy_referred: float | None = _spec()
    n_patients: int | None = _spec()
    patients_referred: list[str] = _spec(always=True, factory=list)
    patient_accuracy_kept: float | None = _spec()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class EstimateBlock(_Record):
    """Figures measured on a set of patients, with their 95% CIs and the patients behind them."""

    n_images: int | None = _spec(always=True)
    n_patients: int | None = _spec(always=True)
    patients_per_class: dict[str, int] = _spec(always=True, factory=dict)
    metrics: dict[str, float] = _spec(always=True, factory=dict)
    ci95: dict[str, CI] = _spec(always=True, factory=dict, parse=_cis)
    threshold: float | None = _spec()
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Estimate(_Record):
    """How well a model does on patients it has not seen (``build_estimate``), or an older
    checkpoint's figures in the same shape (``from_metrics``: ``estimate_from_metrics``)."""

    version: int = _spec(1, always=True, api=False)
    from_metrics: bool = _spec(False, api=False)  # written only when True
    split: str | None = _spec(api=False)  # from_metrics: the split the figures are of
    method: str = _spec(required=True, always=True)
    description: str = _spec(required=True, always=True)
    task: str = _spec("binary", always=True, api=False)
    classes: list[str] = _spec(always=True, factory=list, api=False)
    threshold: float | None = _spec(always=True)
    operating_point: str | None = _spec()
    # How the magnifications' thresholds were chosen: "shared" (several magnifications shared
    # one choice) or "separate"; None: no magnification had a threshold of its own (or the
    # estimate predates the shared choice, which chose separately).
    magnification_thresholds: str | None = _spec()
    operating_points: list[dict[str, Any]] | None = _spec(api=False)
    n_images: int | None = _spec(always=True)
    n_patients: int | None = _spec(always=True)
    patients_per_class: dict[str, int] = _spec(always=True, factory=dict)
    metrics: dict[str, float] = _spec(always=True, factory=dict)
    ci95: dict[str, CI] = _spec(always=True, factory=dict, parse=_cis)
    per_magnification: dict[str, EstimateBlock] = _spec(
        always=True, factory=dict, parse=_records(EstimateBlock)
    )
    warnings: list[str] = _spec(always=True, factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def main_figure(self) -> str:
        """The figure to lead with: ROC AUC (binary), else balanced accuracy."""
        return "roc_auc" if "roc_auc" in self.metrics else "balanced_accuracy"


@dataclass(frozen=True, kw_only=True)
class Metrics(_Record):
    """An evaluation's metrics (``compute_metrics``), as ``metrics.json`` holds them: counts,
    the decision, the image-level block with CIs over patients, the same at threshold 0.5, the
    uncalibrated Brier score and ECE, per magnification, referrals, and (added by whoever
    evaluates) the split's name and an estimate."""

    n_images: int | None = _spec()
    n_patients: int | None = _spec()
    threshold: float | None = _spec()
    temperature: float | None = _spec()
    operating_point: str | None = _spec()
    image: ImageMetrics | None = _spec(parse=ImageMetrics.from_dict)
    image_at_05: ImageMetrics | None = _spec(key="image_at_0.5", parse=ImageMetrics.from_dict)
    uncalibrated: ImageMetrics | None = _spec(parse=ImageMetrics.from_dict)
    per_magnification: dict[str, ImageMetrics] | None = _spec(parse=_records(ImageMetrics))
    refer: ReferMetrics | None = _spec(parse=ReferMetrics.from_dict)
    split: str | None = _spec()
    estimate: Estimate | None = _spec(parse=Estimate.from_dict)
    extra: dict[str, Any] = field(default_factory=dict)


def as_estimate(value: Estimate | Mapping[str, Any] | None) -> Estimate | None:
    """An estimate, read from its JSON (a checkpoint's ``estimate``) where it is a mapping;
    None for None or an empty mapping."""
    if value is None or isinstance(value, Estimate):
        return value
    return Estimate.from_dict(value) if value else None
