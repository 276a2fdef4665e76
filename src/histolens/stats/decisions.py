"""The decisions a binary model takes: its operating points per magnification
(:class:`OperatingPoints`) and per patient (:class:`PatientDecision`), chosen on held-out
predictions by a rule of :mod:`histolens.stats.operating_points`, stored in the checkpoint.

A patient's images are aggregated on one scale: each image's probability *centred* on its
magnification's threshold (moved so that the threshold sits at 0.5,
:func:`histolens.stats.conformal.centred_probabilities`). The patient's decision is the mean at a
patient-level threshold chosen by the same rule; a patient is referred when its images disagree
(the smaller of the shares called malignant and benign) beyond the limit that the out-of-fold
patients decided correctly stay within, in :data:`AGREEMENT_QUANTILE` of cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from histolens.errors import CheckpointError, ConfigError
from histolens.stats.conformal import _strata
from histolens.stats.operating_points import (
    _FORMAT_VERSION,
    DEFAULT_MAGNIFICATION_THRESHOLDS,
    MIN_PATIENTS_PER_CLASS,
    OperatingPointRule,
    check_magnification_thresholds,
    choose_threshold_for,
    magnification_offsets,
    parse_operating_point,
    patient_weights,
    stratum_sort_key,
)
from histolens.stats.stored import read_stored

__all__ = [
    "AGREEMENT_QUANTILE",
    "PROBABILITY_FLOOR",
    "OperatingPoints",
    "PatientDecision",
    "aggregate_patients",
    "fit_on_logits",
]

# The stored predictions keep 6 decimals (to_dict), and thresholds are chosen on predictions
# rounded so (numpy's rounding; Python's round of the result gives the same float). The shared
# choice takes logits within [1e-6, 1 - 1e-6] (about +/-13.8).
STORED_DECIMALS = 6
PROBABILITY_FLOOR = 10.0**-STORED_DECIMALS

# The disagreement limit is the quantile of the disagreement of the out-of-fold patients the
# decision got right: at 0.9, one correctly decided patient in ten would be referred, the same
# error level as the prediction sets' default alpha (0.1).
AGREEMENT_QUANTILE = 0.9


@dataclass(frozen=True, eq=False)  # arrays inside: compare the fields themselves
class OperatingPoints:
    """The pooled threshold, each magnification's own (where it has enough patients), and the
    out-of-fold predictions they were chosen on.

    ``thresholds`` holds only the magnifications with a choice of their own; ``patients`` the
    (benign, malignant) patient counts of every known magnification. ``method`` says how those
    were chosen (:data:`histolens.stats.operating_points.MAGNIFICATION_THRESHOLDS`): ``shared``
    (one choice with each magnification's logit ``offsets`` taken out) or ``separate``.
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
    # The decision per patient (PatientDecision below), chosen on the same predictions' patients.
    patient: PatientDecision | None = None
    method: str = "separate"  # checkpoints from before "shared" existed chose separately
    offsets: dict[str, float] = field(default_factory=dict)  # logit offsets ("shared")

    @classmethod
    def fit(
        cls,
        rule: OperatingPointRule | str,
        y: Sequence[int] | np.ndarray,
        p: Sequence[float] | np.ndarray,
        patients: Sequence[Any] | np.ndarray,
        magnifications: Sequence[Any] | np.ndarray | None,
        keep_predictions: bool = True,
        method: str = DEFAULT_MAGNIFICATION_THRESHOLDS,
    ) -> OperatingPoints:
        """Choose the pooled and per-magnification thresholds on held-out predictions (``p``:
        calibrated positive-class probabilities; NaN rows are left out), the latter ``method``'s
        way (``shared`` or ``separate``)."""
        rule = parse_operating_point(rule)
        check_magnification_thresholds(method)
        y = np.asarray(y, dtype=np.int64)
        p = np.asarray(p, dtype=np.float64)
        strata = _strata(magnifications, len(y))
        ok = np.isfinite(p)
        # Chosen on the probabilities as the checkpoint stores them (to_dict), so that choosing
        # again on the stored ones (calibrate) gives back these thresholds exactly.
        y, p, strata = y[ok], np.round(p[ok], STORED_DECIMALS), strata[ok]
        _, codes = np.unique(np.asarray(patients, dtype=str)[ok], return_inverse=True)
        codes = codes.astype(np.int64)
        # Every patient counts once in the rates a threshold is chosen by (patient_weights).
        pooled = choose_threshold_for(rule, y, p, patient_weights(codes))
        counts: dict[str, tuple[int, int]] = {}
        for s in sorted(set(strata.tolist()) - {""}, key=stratum_sort_key):
            at = strata == s
            counts[s] = (
                len(np.unique(codes[at & (y == 0)])),
                len(np.unique(codes[at & (y == 1)])),
            )
        eligible = [s for s, n in counts.items() if min(n) >= MIN_PATIENTS_PER_CLASS]
        offsets: dict[str, float] = {}
        if method == "shared" and len(eligible) > 1 and rule.kind != "fixed":
            own, offsets = _shared_thresholds(rule, y, p, codes, strata, eligible)
        else:
            own = {
                s: choose_threshold_for(
                    rule, y[strata == s], p[strata == s], patient_weights(codes[strata == s])
                )
                for s in eligible
            }
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
            method=method,
            offsets=offsets,
        )
        if not keep:
            return ops
        thresholds = ops.thresholds_for(strata)
        return replace(ops, patient=PatientDecision.fit(rule, p, y, codes, thresholds))

    @property
    def shared(self) -> bool:
        """Whether several magnifications shared one choice (``method`` shared, and more than
        one magnification with a threshold of its own, under a rule other than fixed)."""
        return bool(self.offsets)

    @property
    def has_predictions(self) -> bool:
        """Whether the predictions chosen on are stored (``refit`` needs them)."""
        return self.p is not None and self.y is not None and len(self.p) > 0

    def refit(self, rule: OperatingPointRule | str, method: str | None = None) -> OperatingPoints:
        """The same predictions, chosen on under another rule (and ``method``; None: this
        one's)."""
        if not self.has_predictions:
            raise CheckpointError(
                "This checkpoint stores no out-of-fold predictions to choose an operating "
                "point on; retrain it with this histolens and --operating-point instead."
            )
        return OperatingPoints.fit(
            rule, self.y, self.p, self.patient_codes, self.strata, method=method or self.method
        )

    def threshold_for(self, magnification: Any) -> float:
        """The threshold an image of ``magnification`` is decided at (pooled: unknown or too
        few patients there)."""
        from histolens.stats.conformal import stratum_of

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
                "basis": self._basis(s),
                "benign_patients": neg,
                "malignant_patients": pos,
            }
            for s, (neg, pos) in self.patients.items()
        ]

    def _basis(self, stratum: str) -> str:
        """Where ``stratum``'s threshold comes from, in words."""
        if stratum not in self.thresholds:
            return "pooled (too few patients)"
        if stratum in self.offsets:
            # Offsets are from the lowest magnification chosen on together (its offset is 0).
            base = next((s for s, v in self.offsets.items() if v == 0.0), None)
            where = f" from {base}X" if base is not None else ""
            return f"shared, offset {self.offsets[stratum]:+.2f} logit{where}"
        return "own"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for the checkpoint's metadata."""
        out: dict[str, Any] = {
            "format_version": _FORMAT_VERSION,
            "rule": str(self.rule),
            "pooled": float(self.pooled),
            "thresholds": {k: float(v) for k, v in self.thresholds.items()},
            "method": self.method,
            "offsets": {k: float(v) for k, v in self.offsets.items()},
            "patients": {k: [int(a), int(b)] for k, (a, b) in self.patients.items()},
            "min_patients_per_class": MIN_PATIENTS_PER_CLASS,
            "patient": None if self.patient is None else self.patient.to_dict(),
        }
        if self.has_predictions:
            out["predictions"] = {
                # Rounded in fit already: this only drops float noise from the JSON text.
                "p": [round(float(v), STORED_DECIMALS) for v in self.p],  # type: ignore[union-attr]
                "y": [int(v) for v in self.y],  # type: ignore[union-attr]
                "patients": [int(v) for v in self.patient_codes],  # type: ignore[union-attr]
                "strata": [str(v) for v in self.strata],  # type: ignore[union-attr]
            }
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OperatingPoints:
        """Read back ``to_dict``; CheckpointError when damaged or newer."""

        def read() -> OperatingPoints:
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
            return cls(
                parse_operating_point(d.get("rule", "youden")),
                float(d["pooled"]),
                {str(k): float(v) for k, v in (d.get("thresholds") or {}).items()},
                {str(k): (int(v[0]), int(v[1])) for k, v in (d.get("patients") or {}).items()},
                *arrays,
                PatientDecision.from_dict(d.get("patient")),
                method=check_magnification_thresholds(str(d.get("method", "separate"))),
                offsets={str(k): float(v) for k, v in (d.get("offsets") or {}).items()},
            )

        return read_stored(
            d,
            _FORMAT_VERSION,
            "The checkpoint's operating points",
            read,
            plural=True,
            errors=(KeyError, TypeError, ValueError, IndexError, ConfigError),
        )


def _shared_thresholds(
    rule: OperatingPointRule,
    y: np.ndarray,
    p: np.ndarray,
    codes: np.ndarray,
    strata: np.ndarray,
    eligible: list[str],
) -> tuple[dict[str, float], dict[str, float]]:
    """The ``shared`` thresholds of the ``eligible`` magnifications, and their logit offsets.

    Each eligible magnification's logits are moved by its offset
    (:func:`~histolens.stats.operating_points.magnification_offsets`) onto one scale; ``rule``
    chooses one threshold there, every patient counting once over all those magnifications (as
    the pooled threshold counts them: a patient seen at two magnifications is still one patient,
    whose images there are not independent evidence); each magnification's threshold is that
    one moved back by its offset."""
    from scipy.special import expit, logit

    at = np.isin(strata, eligible)
    # ``p`` is rounded as the checkpoint stores it (fit); 0 and 1 are kept off infinity.
    z = logit(np.clip(p[at], PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR))
    offsets = magnification_offsets(z, y[at], codes[at], strata[at])
    shift = np.array([offsets[s] for s in strata[at]])
    t = choose_threshold_for(rule, y[at], expit(z - shift), patient_weights(codes[at]))
    t_logit = float(logit(np.clip(t, PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)))
    return {s: float(expit(t_logit + offsets[s])) for s in eligible}, offsets


def fit_on_logits(
    rule: OperatingPointRule | str,
    logits: np.ndarray,
    y: Sequence[int] | np.ndarray,
    patients: Sequence[Any] | np.ndarray,
    magnifications: Sequence[Any] | np.ndarray | None,
    temperature: float,
    method: str = DEFAULT_MAGNIFICATION_THRESHOLDS,
) -> OperatingPoints:
    """The operating points of a binary model's held-out logits (n, 1) at ``temperature``: the
    one path both heads take (the probe's out-of-fold logits, the MLP's validation logits);
    ``method``: how magnifications get their thresholds (``shared`` or ``separate``)."""
    import torch

    from histolens.stats.calibration import probabilities_from_logits

    z = torch.as_tensor(np.asarray(logits).reshape(len(logits), -1)[:, :1], dtype=torch.float32)
    # The same float32 probabilities the pooled choice has always been made on.
    p = probabilities_from_logits(z, temperature)[:, 1].numpy().astype(np.float64)
    return OperatingPoints.fit(rule, y, p, patients, magnifications, method=method)


def _centred(p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    from histolens.stats.conformal import centred_probabilities

    return centred_probabilities(np.stack([1 - p, p], axis=1), thresholds)[:, 1]


@dataclass(frozen=True)
class PatientDecision:
    """The patient-level threshold (on the patient score) and the disagreement limit."""

    threshold: float = 0.5
    disagreement_limit: float = 0.5
    n_patients: int = 0

    @classmethod
    def fit(
        cls,
        rule,
        p: np.ndarray,
        y: np.ndarray,
        patients: np.ndarray,
        thresholds: np.ndarray,
    ) -> PatientDecision:
        """Chosen on out-of-fold images (``p`` calibrated, ``thresholds`` each image's)."""
        score, share, label, _ = aggregate_patients(p, thresholds, patients, y)
        if len(score) == 0:
            return cls()
        threshold = choose_threshold_for(rule, label, score)
        correct = (score >= threshold) == label.astype(bool)
        disagreement = np.minimum(share, 1 - share)
        limit = (
            float(np.quantile(disagreement[correct], AGREEMENT_QUANTILE)) if correct.any() else 0.5
        )
        return cls(float(threshold), limit, len(score))

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "disagreement_limit": self.disagreement_limit,
            "n_patients": self.n_patients,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PatientDecision | None:
        if not d:
            return None
        return cls(float(d["threshold"]), float(d["disagreement_limit"]), int(d["n_patients"]))


def aggregate_patients(p, thresholds, patients, y=None):
    """Per patient (sorted): score, share called malignant, label (majority, when ``y``), and
    the row indices."""
    p = np.asarray(p, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    patients = np.asarray(patients, dtype=str)
    centred = _centred(p, thresholds)
    called = p >= thresholds
    ids = np.unique(patients)
    rows = [np.flatnonzero(patients == q) for q in ids]
    score = np.array([centred[i].mean() for i in rows])
    share = np.array([called[i].mean() for i in rows])
    label = (
        None
        if y is None
        else np.array([int(np.asarray(y)[i].mean() >= 0.5) for i in rows], dtype=np.int64)
    )
    return score, share, label, (ids, rows)
