"""Operating points per magnification: where a binary model turns a probability into a decision.

One threshold for all magnifications is set where the most common magnification's images sit
(on breakhis-dev, the resized 200X images), and another magnification's probabilities may sit
elsewhere: a pooled Youden threshold called half of breakhis-dev's 100X cancers benign. So the
threshold is chosen per magnification from the out-of-fold predictions, exactly as the
prediction sets are calibrated per magnification (Mondrian, :mod:`histolens.conformal`), with
the same stratum keys (:func:`histolens.conformal.stratum_of`). A magnification with fewer than
:data:`MIN_PATIENTS_PER_CLASS` patients of either class borrows the pooled choice, and says how
many it would need. An image of an unknown magnification gets the pooled choice.

The rule (:class:`OperatingPointRule`) is what the user asks for: ``youden`` (sensitivity +
specificity - 1 at its largest), ``sensitivity:0.95`` (the highest threshold whose sensitivity
reaches 0.95: screening) or ``specificity:0.95`` (the lowest whose specificity reaches 0.95:
confirmation). The out-of-fold predictions the choice was made on are stored with it, so that
``histolens calibrate`` can choose again under another rule without retraining.

Used by both heads: the linear probe (out-of-fold predictions of cross-validation, and each
fold's own choice on its inner out-of-fold predictions) and the MLP head (validation patients).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from histolens.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from histolens.patients import PatientDecision

__all__ = [
    "MIN_PATIENTS_PER_CLASS",
    "OPERATING_POINT_FORMS",
    "OperatingPointRule",
    "OperatingPoints",
    "choose_threshold_for",
    "fit_on_logits",
    "parse_operating_point",
    "rule_from_train_config",
]

# A magnification chooses its own threshold only with at least this many patients of each class
# there. Images of one patient are alike, so the choice is set by the boundary between the
# classes' patients: with 3 of each, a choice still rests on 2 patients of each class when any
# one patient is held out (as cross-validation and a new patient do), never on a single patient.
# Below it, one atypical patient would set the threshold for everyone at that magnification.
MIN_PATIENTS_PER_CLASS = 3

OPERATING_POINT_FORMS = "youden, sensitivity:T or specificity:T (T between 0 and 1, e.g. 0.95)"
_FORMAT_VERSION = 1
_RULE_RE = re.compile(r"^(sensitivity|specificity)\s*:\s*([0-9]*\.?[0-9]+)$")


@dataclass(frozen=True)
class OperatingPointRule:
    """How a threshold is chosen: ``kind`` youden, sensitivity, specificity (or fixed, 0.5: the
    old ``threshold_method``), with ``target`` the rate a sensitivity/specificity rule reaches."""

    kind: str = "youden"
    target: float | None = None

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}:{self.target:g}"

    @property
    def describes(self) -> str:
        """The rule in words, for reports."""
        if self.kind == "youden":
            return "Youden's J (sensitivity + specificity - 1 at its largest)"
        if self.kind == "fixed":
            return "a fixed 0.5"
        return f"{self.kind} at least {self.target:g}"


def parse_operating_point(text: str | OperatingPointRule) -> OperatingPointRule:
    """``youden``, ``sensitivity:0.95`` or ``specificity:0.95`` as a rule; a ConfigError naming
    the valid forms for anything else."""
    if isinstance(text, OperatingPointRule):
        return text
    s = str(text).strip().lower()
    if s in ("youden", "fixed"):
        return OperatingPointRule(s)
    m = _RULE_RE.match(s)
    if m is not None:
        target = float(m[2])
        if 0.0 < target < 1.0:
            return OperatingPointRule(m[1], target)
    raise ConfigError(f"Unknown operating point '{text}'; use {OPERATING_POINT_FORMS}.")


def rule_from_train_config(train: Any) -> OperatingPointRule:
    """The rule a TrainConfig asks for: ``operating_point`` when set, else the older
    ``threshold_method`` (``sensitivity`` at ``target_sensitivity``)."""
    chosen = getattr(train, "operating_point", None)
    if chosen:
        return parse_operating_point(chosen)
    method = getattr(train, "threshold_method", "youden")
    if method == "sensitivity":
        return OperatingPointRule("sensitivity", float(train.target_sensitivity))
    return parse_operating_point(method)


def choose_threshold_for(rule: OperatingPointRule, y: np.ndarray, p: np.ndarray) -> float:
    """The threshold ``rule`` chooses on labels ``y`` (0/1) and positive-class probabilities
    ``p``; 0.5 when one class is absent."""
    from sklearn.metrics import roc_curve

    from histolens.calibration import choose_threshold

    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    if rule.kind in ("youden", "fixed"):
        return choose_threshold(y, p, rule.kind)
    if rule.kind == "sensitivity":
        return choose_threshold(y, p, "sensitivity", float(rule.target))
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    finite = np.isfinite(thr)
    fpr, thr = fpr[finite], thr[finite]
    # The lowest threshold (largest sensitivity) whose specificity reaches the target.
    ok = np.flatnonzero(1.0 - fpr >= float(rule.target))
    return float(thr[ok[-1]]) if len(ok) else float(thr[0])


def fit_on_logits(
    rule: OperatingPointRule | str,
    logits: np.ndarray,
    y: Sequence[int] | np.ndarray,
    patients: Sequence[Any] | np.ndarray,
    magnifications: Sequence[Any] | np.ndarray | None,
    temperature: float,
) -> OperatingPoints:
    """The operating points of a binary model's held-out logits (n, 1) at ``temperature``: the
    one path both heads take (the probe's out-of-fold logits, the MLP's validation logits)."""
    import torch

    from histolens.prediction import probabilities_from_logits

    z = torch.as_tensor(np.asarray(logits).reshape(len(logits), -1)[:, :1], dtype=torch.float32)
    # The same float32 probabilities the pooled choice has always been made on.
    p = probabilities_from_logits(z, temperature)[:, 1].numpy().astype(np.float64)
    return OperatingPoints.fit(rule, y, p, patients, magnifications)


def _strata(magnifications: Sequence[Any] | None, n: int) -> np.ndarray:
    from histolens.conformal import stratum_of

    if magnifications is None:
        return np.full(n, "", dtype=object)
    out = np.array([stratum_of(m) for m in magnifications], dtype=object)
    if len(out) != n:
        raise ValueError(f"{n} images but {len(out)} magnifications.")
    return out


@dataclass(frozen=True, eq=False)  # arrays inside: compare the fields themselves
class OperatingPoints:
    """The pooled threshold, each magnification's own (where it has enough patients), and the
    out-of-fold predictions they were chosen on.

    ``thresholds`` holds only the magnifications with a choice of their own; ``patients`` the
    (benign, malignant) patient counts of every known magnification.
    """

    rule: OperatingPointRule
    pooled: float
    thresholds: dict[str, float] = field(default_factory=dict)
    patients: dict[str, tuple[int, int]] = field(default_factory=dict)
    # The predictions chosen on: positive-class probability, label, patient code, stratum.
    p: np.ndarray | None = None
    y: np.ndarray | None = None
    patient_codes: np.ndarray | None = None
    strata: np.ndarray | None = None
    # The decision per patient (histolens.patients), chosen on the same predictions' patients.
    patient: PatientDecision | None = None

    @classmethod
    def fit(
        cls,
        rule: OperatingPointRule | str,
        y: Sequence[int] | np.ndarray,
        p: Sequence[float] | np.ndarray,
        patients: Sequence[Any] | np.ndarray,
        magnifications: Sequence[Any] | np.ndarray | None,
        keep_predictions: bool = True,
    ) -> OperatingPoints:
        """Choose the pooled and per-magnification thresholds on held-out predictions (``p``:
        calibrated positive-class probabilities; NaN rows are left out)."""
        rule = parse_operating_point(rule)
        y = np.asarray(y, dtype=np.int64)
        p = np.asarray(p, dtype=np.float64)
        strata = _strata(magnifications, len(y))
        ok = np.isfinite(p)
        y, p, strata = y[ok], p[ok], strata[ok]
        _, codes = np.unique(np.asarray(patients, dtype=str)[ok], return_inverse=True)
        codes = codes.astype(np.int64)
        pooled = choose_threshold_for(rule, y, p)
        own: dict[str, float] = {}
        counts: dict[str, tuple[int, int]] = {}
        for s in sorted(set(strata.tolist()) - {""}, key=_stratum_order):
            at = strata == s
            n_neg = len(np.unique(codes[at & (y == 0)]))
            n_pos = len(np.unique(codes[at & (y == 1)]))
            counts[s] = (n_neg, n_pos)
            if min(n_neg, n_pos) >= MIN_PATIENTS_PER_CLASS:
                own[s] = choose_threshold_for(rule, y[at], p[at])
        keep = keep_predictions
        ops = cls(
            rule,
            pooled,
            own,
            counts,
            p if keep else None,
            y if keep else None,
            codes if keep else None,
            strata if keep else None,
        )
        if not keep:
            return ops
        from dataclasses import replace

        from histolens.patients import PatientDecision

        thresholds = ops.thresholds_for(strata)
        return replace(ops, patient=PatientDecision.fit(rule, p, y, codes, thresholds))

    @property
    def has_predictions(self) -> bool:
        """Whether the predictions chosen on are stored (``refit`` needs them)."""
        return self.p is not None and self.y is not None and len(self.p) > 0

    def refit(self, rule: OperatingPointRule | str) -> OperatingPoints:
        """The same predictions, chosen on under another rule."""
        if not self.has_predictions:
            raise CheckpointError(
                "This checkpoint stores no out-of-fold predictions to choose an operating "
                "point on; retrain it with this histolens and --operating-point instead."
            )
        return OperatingPoints.fit(rule, self.y, self.p, self.patient_codes, self.strata)

    def threshold_for(self, magnification: Any) -> float:
        """The threshold an image of ``magnification`` is decided at (pooled: unknown or too
        few patients there)."""
        from histolens.conformal import stratum_of

        return self.thresholds.get(stratum_of(magnification), self.pooled)

    def thresholds_for(self, magnifications: Sequence[Any]) -> np.ndarray:
        """``threshold_for`` of each image."""
        return np.array([self.threshold_for(m) for m in magnifications], dtype=np.float64)

    def borrowed(self) -> dict[str, tuple[int, int]]:
        """The known magnifications deciding at the pooled threshold, with their patient counts."""
        return {s: c for s, c in self.patients.items() if s not in self.thresholds}

    def notes(self) -> list[str]:
        """One note per magnification that borrows the pooled threshold."""
        out = []
        for s, (neg, pos) in self.borrowed().items():
            out.append(
                f"{s}X images are decided at the pooled threshold ({self.pooled:.3f}): a "
                f"threshold of their own needs {MIN_PATIENTS_PER_CLASS} patients of each class "
                f"at {s}X, and there are {neg} benign and {pos} malignant."
            )
        return out

    def table(self) -> list[dict[str, Any]]:
        """One row per known magnification (threshold, where from, patients), for reports."""
        return [
            {
                "magnification": f"{s}X",
                "threshold": self.threshold_for(s),
                "basis": "own" if s in self.thresholds else "pooled (too few patients)",
                "benign_patients": neg,
                "malignant_patients": pos,
            }
            for s, (neg, pos) in self.patients.items()
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for the checkpoint's metadata."""
        out: dict[str, Any] = {
            "format_version": _FORMAT_VERSION,
            "rule": str(self.rule),
            "pooled": float(self.pooled),
            "thresholds": {k: float(v) for k, v in self.thresholds.items()},
            "patients": {k: [int(a), int(b)] for k, (a, b) in self.patients.items()},
            "min_patients_per_class": MIN_PATIENTS_PER_CLASS,
            "patient": None if self.patient is None else self.patient.to_dict(),
        }
        if self.has_predictions:
            out["predictions"] = {
                "p": [round(float(v), 6) for v in self.p],  # type: ignore[union-attr]
                "y": [int(v) for v in self.y],  # type: ignore[union-attr]
                "patients": [int(v) for v in self.patient_codes],  # type: ignore[union-attr]
                "strata": [str(v) for v in self.strata],  # type: ignore[union-attr]
            }
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OperatingPoints:
        """Read back ``to_dict``; CheckpointError when damaged or newer."""
        try:
            if int(d.get("format_version", 1)) > _FORMAT_VERSION:
                raise CheckpointError(
                    "The checkpoint's operating points were written by a newer histolens; upgrade."
                )
            pred = d.get("predictions") or {}
            arrays = (
                (
                    np.asarray(pred["p"], dtype=np.float64),
                    np.asarray(pred["y"], dtype=np.int64),
                    np.asarray(pred["patients"], dtype=np.int64),
                    np.array(pred["strata"], dtype=object),
                )
                if pred
                else (None, None, None, None)
            )
            from histolens.patients import PatientDecision

            return cls(
                parse_operating_point(d.get("rule", "youden")),
                float(d["pooled"]),
                {str(k): float(v) for k, v in (d.get("thresholds") or {}).items()},
                {str(k): (int(v[0]), int(v[1])) for k, v in (d.get("patients") or {}).items()},
                *arrays,
                PatientDecision.from_dict(d.get("patient")),
            )
        except (KeyError, TypeError, ValueError, IndexError, ConfigError) as exc:
            raise CheckpointError(
                f"The checkpoint's operating points are damaged ({exc})."
            ) from None


def _stratum_order(key: str) -> float:
    try:
        return float(key)
    except ValueError:
        return float("inf")
