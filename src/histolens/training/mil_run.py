"""``histolens train --slides LABELS.csv``: cross-validate, fit on every slide, write the run.

The run directory holds ``mil.safetensors`` (the weights, with the metadata as JSON under the
safetensors key ``histolens_mil``), the same metadata in ``mil.json`` (``schema`` ``histolens.mil``,
``version`` 1: the MIL model is not a tile classifier, so it does not pretend to be a
``CheckpointMetadata``), ``oof_predictions.csv`` (each slide's out-of-fold probability from both
methods) and ``metrics.json`` (slide AUCs with patient-bootstrap CIs).
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
from histolens.training.mil import MilConfig, build_mil_model, fit_mil
from histolens.training.mil_cv import MilCrossValidation, cross_validate_mil
from histolens.training.mil_data import read_bag, read_slide_labels

__all__ = [
    "MIL_SCHEMA",
    "MIL_SCHEMA_VERSION",
    "MilRun",
    "load_mil",
    "save_mil",
    "train_slides",
]

MIL_SCHEMA = "histolens.mil"
MIL_SCHEMA_VERSION = 1
_META_KEY = "histolens_mil"


def save_mil(path: str | os.PathLike, model, metadata: dict) -> Path:
    """Weights and metadata in one safetensors file, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={_META_KEY: json.dumps(metadata)})
    return Path(path)


def load_mil(path: str | os.PathLike):
    """(model in eval mode, metadata dict) from a ``mil.safetensors``; one sentence if it is not
    one, or of a newer schema."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "mil.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(_META_KEY)
        state = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable MIL checkpoint ({exc}).") from None
    if header is None:
        raise CheckpointError(f"{path} is not a MIL checkpoint (no '{_META_KEY}' metadata).")
    meta = json.loads(header)
    if meta.get("schema") != MIL_SCHEMA or int(meta.get("version", 0)) > MIL_SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} holds {meta.get('schema')} version {meta.get('version')}; this histolens "
            f"reads {MIL_SCHEMA} up to version {MIL_SCHEMA_VERSION}."
        )
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


def train_slides(
    labels_csv: str | os.PathLike,
    out: str | os.PathLike,
    config: MilConfig = MilConfig(),
    folds: int = 5,
) -> MilRun:
    """Cross-validate MIL and the mean-pooling probe by patient, then fit MIL on every slide."""
    labels = read_slide_labels(labels_csv)
    bags = [read_bag(p).features for p in labels.bags]
    dims = {b.shape[1] for b in bags}
    if len(dims) != 1:
        raise CheckpointError(
            f"The bags have features of different widths ({sorted(dims)}): they come from "
            "different backbones; extract them all with one."
        )
    notes = []
    if not labels.patients_given:
        notes.append(
            "LABELS.csv has no patient for some slides: each such slide is its own patient."
        )
    cv = cross_validate_mil(bags, labels.targets, labels.patients, config, folds)
    table = cv.table()
    metrics = {
        "slides": len(labels),
        "patients": len(set(labels.patients)),
        "folds": folds,
        "slide_auc": {m: {"auc": a, "ci95": [lo, hi]} for m, (a, lo, hi) in table.items()},
        "epoch_seconds_mean": float(np.mean(cv.epoch_seconds)),
    }
    fit = fit_mil(bags, labels.targets, config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "schema": MIL_SCHEMA,
        "version": MIL_SCHEMA_VERSION,
        "model": "gated-attention-mil",
        "feature_dim": int(dims.pop()),
        "class_names": list(labels.class_names),
        "positive_class": labels.class_names[1],
        "config": config.to_dict(),
        "metrics": metrics,
        "labels_csv": str(Path(labels_csv).resolve()),
        "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    checkpoint = save_mil(out / "mil.safetensors", fit.model, meta)
    atomic_write_text(out / "mil.json", json.dumps(meta, indent=1))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    _write_oof(out / "oof_predictions.csv", labels, cv)
    return MilRun(out, checkpoint, cv, metrics, labels.class_names, notes)
