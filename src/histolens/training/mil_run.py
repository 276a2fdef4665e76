"""``histolens train --slides LABELS.csv``: cross-validate, calibrate, fit on every slide, write.

The run directory holds ``mil.safetensors`` (the weights, with the metadata as JSON under the
safetensors key ``histolens_mil``), the same metadata in ``mil.json`` (``schema`` ``histolens.mil``,
``version`` 2: the MIL model is not a tile classifier, so it does not pretend to be a
``CheckpointMetadata``; it holds the decision, estimate, model card and the tile features'
source), ``oof_predictions.csv`` (each slide's out-of-fold probability from both methods),
``metrics.json`` (slide AUCs with patient-bootstrap CIs; under ``training`` each fold's and the
final model's epochs, best epoch and inner validation split), ``evaluation/`` (the tile workflow's
evaluation files, one row per slide) and ``report.html``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histolens.atomic import atomic_open, atomic_path, atomic_write_text
from histolens.errors import CheckpointError
from histolens.evaluation.evaluate import headline_metrics
from histolens.stats.conformal import DEFAULT_ALPHA
from histolens.stats.operating_points import parse_operating_point
from histolens.training.mil import MilConfig, build_mil_model
from histolens.training.mil_cv import MilCrossValidation, cross_validate_mil
from histolens.training.mil_data import read_bag, read_slide_labels
from histolens.training.mil_decision import MilDecision, cross_fitted_evaluation, fit_mil_decision
from histolens.training.mil_fit import MilFit, MilProcesses, fit_mil
from histolens.training.mil_folds import INNER_FOLDS
from histolens.training.mil_outputs import (
    feature_source,
    mil_model_card,
    slide_auc_table,
    write_mil_outputs,
)

__all__ = [
    "read_mil_metadata",
    "MIL_SCHEMA",
    "MIL_SCHEMA_VERSION",
    "MilRun",
    "is_mil_checkpoint",
    "load_mil",
    "save_mil",
    "train_slides",
]

MIL_SCHEMA = "histolens.mil"
MIL_SCHEMA_VERSION = 2  # 2: decision, estimate, model card and feature source
_META_KEY = "histolens_mil"


def save_mil(path: str | os.PathLike, model, metadata: dict) -> Path:
    """Weights and metadata in one safetensors file, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={_META_KEY: json.dumps(metadata)})
    return Path(path)


def is_mil_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a file, or a run directory holding ``mil.safetensors``) is a MIL
    checkpoint; reads only the safetensors header."""
    from safetensors import SafetensorError, safe_open

    path = _mil_file(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return _META_KEY in (f.metadata() or {})
    except (OSError, ValueError, RuntimeError, SafetensorError):
        return False  # not readable as one: the tile checkpoint loader says why, in one sentence


def read_mil_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a ``mil.safetensors`` (a file, or a run directory holding it), from its
    header only; one sentence if it is not one, or of a newer schema."""
    from safetensors import SafetensorError, safe_open

    path = _mil_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(_META_KEY)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{path} is not a readable MIL checkpoint ({exc}).") from None
    if header is None:
        raise CheckpointError(f"{path} is not a MIL checkpoint (no '{_META_KEY}' metadata).")
    meta = json.loads(header)
    if meta.get("schema") != MIL_SCHEMA or int(meta.get("version", 0)) > MIL_SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} holds {meta.get('schema')} version {meta.get('version')}; this histolens "
            f"reads {MIL_SCHEMA} up to version {MIL_SCHEMA_VERSION}."
        )
    return meta


def _mil_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / "mil.safetensors" if path.is_dir() else path


def load_mil(path: str | os.PathLike):
    """(model in eval mode, metadata dict) from a ``mil.safetensors``; one sentence if it is not
    one, or of a newer schema."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta, path = read_mil_metadata(path), _mil_file(path)
    try:
        state = load_file(str(path))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{path} is not a readable MIL checkpoint ({exc}).") from None
    model = build_mil_model(int(meta["feature_dim"]), MilConfig(**meta["config"]))
    model.load_state_dict(state)
    model.eval()
    return model, meta


@dataclass
class MilRun:
    """What ``train_slides`` wrote and measured."""

    run_dir: Path
    checkpoint: Path
    cv: MilCrossValidation
    metrics: dict
    class_names: tuple[str, str]
    notes: list[str]
    decision: MilDecision | None = None
    estimate: dict | None = None
    global_rank: int = 0  # with several processes, only rank 0 wrote the files


def _write_oof(path: Path, labels, cv: MilCrossValidation) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "patient", "label", "target", "fold", "p_mil", "p_mean_pool"])
        for i, bag in enumerate(labels.bags):
            writer.writerow(
                [
                    str(bag),
                    labels.patients[i],
                    labels.class_names[int(cv.targets[i])],
                    int(cv.targets[i]),
                    int(cv.fold[i]),
                    f"{cv.mil[i]:.6f}",
                    f"{cv.mean_pool[i]:.6f}",
                ]
            )


def _training_record(cv: MilCrossValidation, final: MilFit, config: MilConfig) -> dict:
    """How each fold's model and the final model were trained (``metrics.json``'s ``training``)."""
    return {
        "inner_validation": (
            f"1/{INNER_FOLDS} of the training patients (stratified group k-fold); early "
            f"stopping patience {config.patience}, at most {config.max_epochs} epochs, the best "
            f"epoch's weights kept; a fixed {config.epochs} epochs without an inner split"
        ),
        "folds": cv.fits,
        "final": final.summary(),
    }


def _fallback_note(cv: MilCrossValidation, final: MilFit, config: MilConfig) -> str | None:
    """One line naming the fits that had too few patients for an inner split, or None."""
    fits = [(f"fold {f['fold'] + 1}", f["no_split"]) for f in cv.fits]
    fits.append(("the final model", final.no_split))
    fell = [(name, reason) for name, reason in fits if reason]
    if not fell:
        return None
    names = ", ".join(name for name, _ in fell)
    return f"No early stopping for {names} ({fell[0][1]}): trained a fixed {config.epochs} epochs."


def train_slides(
    labels_csv: str | os.PathLike,
    out: str | os.PathLike,
    config: MilConfig = MilConfig(),
    folds: int = 5,
    operating_point: str = "youden",
    alpha: float = DEFAULT_ALPHA,
    processes: MilProcesses = MilProcesses(),
    echo: bool = False,
) -> MilRun:
    """Cross-validate MIL and the mean-pooling probe by patient; fit the calibration, operating
    point and prediction sets on the out-of-fold slides and measure them cross-fitted; fit MIL on
    every slide (early stopping on a fifth of the patients); write the checkpoint, the evaluation
    and the report (rank 0 only, when ``processes`` start several)."""
    labels = read_slide_labels(labels_csv)
    bags = [read_bag(p) for p in labels.bags]
    features = feature_source(bags)
    notes = []
    if not labels.patients_given:
        notes.append(
            "LABELS.csv has no patient for some slides: each such slide is its own patient."
        )
    x = [b.features for b in bags]
    cv = cross_validate_mil(x, labels.targets, labels.patients, config, folds, processes, echo)
    fit = fit_mil(
        x, labels.targets, config, labels.patients, processes, "final model " if echo else None
    )
    fallback = _fallback_note(cv, fit, config)
    notes += [fallback] if fallback else []
    rule = parse_operating_point(operating_point)
    classes = labels.class_names
    decision = fit_mil_decision(
        cv.logits, labels.targets, labels.patients, classes, rule, alpha, notes
    )
    n_patients = len(set(labels.patients))
    data = f"{len(labels)} slides of {n_patients} patients in {Path(labels_csv).name}"
    evaluation, estimate = cross_fitted_evaluation(
        cv, [str(b) for b in labels.bags], classes, decision, rule, data, config.seed
    )
    metrics = {
        "slides": len(labels),
        "patients": n_patients,
        "folds": folds,
        "slide_auc": slide_auc_table(cv),
        "epoch_seconds_mean": float(np.mean(cv.epoch_seconds)),
        "training": _training_record(cv, fit, config),
        **headline_metrics(evaluation.metrics),
    }
    out = Path(out)
    checkpoint = out / "mil.safetensors"
    run = MilRun(out, checkpoint, cv, metrics, classes, notes, decision, estimate, fit.global_rank)
    if fit.global_rank != 0:
        return run
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "schema": MIL_SCHEMA,
        "version": MIL_SCHEMA_VERSION,
        "model": "gated-attention-mil",
        "feature_dim": features["feature_dim"],
        "features": features,
        "class_names": list(classes),
        "positive_class": classes[1],
        "config": config.to_dict(),
        "decision": decision.to_dict(),
        "estimate": estimate,
        "metrics": metrics,
        "model_card": mil_model_card(
            decision, estimate, metrics["slide_auc"], config, features, data, fit.summary()
        ),
        "labels_csv": str(Path(labels_csv).resolve()),
        "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    save_mil(checkpoint, fit.model, meta)
    atomic_write_text(out / "mil.json", json.dumps(meta, indent=1))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    _write_oof(out / "oof_predictions.csv", labels, cv)
    write_mil_outputs(out, evaluation, meta, notes)
    return run
