"""The int8 guard: an int8 export is scored against the fp32 export on patients the model was
not fitted on, and refused when it loses more image AUC than allowed.

Which images (:func:`unseen_patient_images`), in this order:

1. ``--verify-data PATH``: labelled images the user gives (a folder or CSV manifest); refused
   when they share patients (or files) with the images that trained the model;
2. the run's held-out patients: the validation and test sides of its ``split.csv``;
3. a cross-validated linear-probe run (every patient trained the shipped probe): the probe is
   refit per fold on the fp32 export's features of the fold's training patients (the run's
   folds and ``C``), and each image is scored by the probe of the fold that held its patient
   out, through the fp32 and the int8 backbone alike (the head stays fp32 in both files).

Otherwise the export is refused, in one sentence that names ``--verify-data``. The comparison
(:func:`compare_int8`) gives the image AUC of both files, the drop with a 95% CI over patients
(bootstrap of patients, :func:`histolens.stats.metrics.bootstrap_ci`) and the largest probability
change; :func:`enforce_int8_limit` refuses a drop above the limit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histolens.data.records import ImageRecord, target_of
from histolens.export.verify import (
    ExportError,
    model_inputs,
    probability_auc,
    spread_evenly,
)
from histolens.inference.predictor import Predictor
from histolens.inference.runtimes import OnnxRunner

__all__ = [
    "Int8Check",
    "UnseenImages",
    "compare_int8",
    "enforce_int8_limit",
    "score_unseen",
    "unseen_patient_images",
]

# Resamples of patients behind the CI of the AUC drop.
N_BOOT = 1000


@dataclass(frozen=True)
class UnseenImages:
    """Images of patients the model was not fitted on, where they came from, and whether each
    must be scored by a probe refit without its fold's patients (``refit``)."""

    records: list[ImageRecord]
    where: str
    refit: bool = False


@dataclass(frozen=True)
class Int8Check:
    """The int8 export against the fp32 export on the same unseen-patient images."""

    n_images: int
    n_patients: int
    images_from: str
    auc_fp32: float
    auc_int8: float
    drop_ci: tuple[float, float]  # 95% over patients; NaN when too few patients of a class
    max_probability_change: float

    @property
    def drop(self) -> float:
        return self.auc_fp32 - self.auc_int8


def _patient_of(r: ImageRecord) -> str:
    """The unit a run's folds and the CI resample: group, else patient, else the image."""
    return r.group or r.patient or r.path


def compare_int8(
    y: np.ndarray,
    patients: Sequence[str],
    p_fp32: np.ndarray,
    p_int8: np.ndarray,
    where: str,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> Int8Check:
    """Image AUC of both files' class probabilities (n, C) against class indices ``y``, the drop
    with its CI over ``patients``, and the largest probability change."""
    y = np.asarray(y)
    p_fp32, p_int8 = np.asarray(p_fp32, float), np.asarray(p_int8, float)
    auc_fp32, auc_int8 = probability_auc(y, p_fp32), probability_auc(y, p_int8)
    if math.isnan(auc_fp32) or math.isnan(auc_int8):
        raise ExportError(
            f"The int8 export cannot be checked: {where} hold a single class, so there is no AUC "
            "to compare, and nothing was written."
        )

    def drop(idx: np.ndarray) -> float:
        return probability_auc(y[idx], p_fp32[idx]) - probability_auc(y[idx], p_int8[idx])

    from histolens.stats.metrics import bootstrap_ci

    ci = bootstrap_ci(drop, patients, n_boot, seed) if n_boot else (math.nan, math.nan)
    return Int8Check(
        len(y),
        len(set(patients)),
        where,
        auc_fp32,
        auc_int8,
        ci,
        float(np.abs(p_fp32 - p_int8).max()),
    )


def enforce_int8_limit(check: Int8Check, limit: float) -> None:
    """Refuse, in one sentence with the figures, an int8 export that loses more than ``limit``
    of image AUC on unseen patients."""
    if check.drop > limit:
        lo, hi = check.drop_ci
        raise ExportError(
            f"The int8 export loses {check.drop:.4f} of image AUC ({check.auc_fp32:.4f} -> "
            f"{check.auc_int8:.4f}, 95% CI of the drop over patients {lo:.4f} to {hi:.4f}; "
            f"largest probability change {check.max_probability_change:.4f}) on "
            f"{check.images_from}, more than the {limit} allowed, so nothing was written; the "
            "fp32 export keeps the model's figures."
        )


def _run_split(source: Path):
    """The run's own split.csv beside the checkpoint, or None: only it says which patients
    trained the model (splitting the data again by the config may not match the run)."""
    from histolens.data.splits import load_split_csv

    path = source.parent / "split.csv"
    return load_split_csv(path) if path.is_file() else None


def unseen_patient_images(
    source: Path, verify_data: str | os.PathLike | None, limit: int
) -> UnseenImages:
    """Up to ``limit`` images of patients the checkpoint ``source`` was not fitted on (see the
    module docstring for where they come from); one sentence naming --verify-data if none."""
    from histolens.checkpoint.io import read_metadata

    split = _run_split(source)
    train = split.train if split is not None else []
    if verify_data is not None:
        records = _verify_data_records(source, verify_data, train)
        chosen = spread_evenly(records, limit)
        return UnseenImages(chosen, _phrase(chosen, records, f"--verify-data {verify_data}"))
    held = [*split.val, *split.test] if split is not None else []
    if held:
        chosen = spread_evenly(held, limit)
        where = "held-out (validation and test) patients of the run's split.csv"
        return UnseenImages(chosen, _phrase(chosen, held, where))
    meta = read_metadata(source)
    if train and meta.head.kind == "linear":
        chosen = spread_evenly(train, limit)
        folds = max(2, meta.run_config.train.cv_folds or 5)
        where = (
            f"run's patients, each scored by the probe refit without its fold ({folds} folds "
            "over patients, as the run's estimate)"
        )
        return UnseenImages(chosen, _phrase(chosen, train, where), refit=True)
    why = (
        "its run keeps no held-out images and its head cannot be refit per fold"
        if split is not None
        else "no split.csv beside it says which patients trained it"
    )
    raise ExportError(
        f"The int8 export of {source} cannot be checked on patients the model was not fitted "
        f"on: {why}, so give labelled images of other patients with --verify-data PATH."
    )


def _phrase(chosen: Sequence[ImageRecord], pool: Sequence[ImageRecord], where: str) -> str:
    patients = len({_patient_of(r) for r in chosen})
    return f"{len(chosen)} of the {len(pool)} images ({patients} patients) of the {where}"


def _verify_data_records(
    source: Path, verify_data: str | os.PathLike, train: Sequence[ImageRecord]
) -> list[ImageRecord]:
    """The labelled images under ``verify_data`` for the model's task, refused when they share
    patients or files with the run's training images."""
    from histolens.checkpoint.io import read_metadata
    from histolens.data.records import discover, filter_records

    meta = read_metadata(source)
    records = filter_records(discover(verify_data).records, "all", meta.task)
    if not records:
        raise ExportError(f"--verify-data {verify_data} holds no labelled image for this model.")
    trained_files = {os.path.realpath(r.path) for r in train}
    trained_patients = {r.patient for r in train if r.patient}
    shared = sorted(
        {r.patient for r in records if r.patient in trained_patients}
        | {Path(r.path).name for r in records if os.path.realpath(r.path) in trained_files}
    )
    if shared:
        raise ExportError(
            f"--verify-data {verify_data} shares {len(shared)} patients or images with the "
            f"images that trained the model (e.g. {shared[0]}); give images of other patients."
        )
    return records


def _run_graph(
    predictor: Predictor,
    graph: OnnxRunner,
    records: Sequence[ImageRecord],
    batch_size: int,
) -> tuple[list[ImageRecord], np.ndarray, np.ndarray]:
    """The readable ``records``, and ``graph``'s logits and pooled features of them."""
    kept: list[ImageRecord] = []
    logits, features = [], []
    for batch_records, x in model_inputs(predictor, records, batch_size):
        z, f = graph.forward_with_features(x)
        kept += batch_records
        logits.append(z.double().numpy())
        features.append(f.double().numpy())
    if not kept:
        raise ExportError("The int8 export cannot be verified: none of its images was readable.")
    return kept, np.concatenate(logits), np.concatenate(features)


def score_unseen(
    predictor: Predictor,
    fp32_graph: Path,
    int8_graph: Path,
    unseen: UnseenImages,
    source: Path,
    batch_size: int = 16,
    say: Callable[[str], None] = lambda _line: None,
    n_boot: int = N_BOOT,
) -> Int8Check:
    """Score the unseen-patient images through both files and compare them (``compare_int8``)."""
    fp32, int8 = OnnxRunner(fp32_graph), OnnxRunner(int8_graph)
    index = {c: i for i, c in enumerate(predictor.class_names)}
    kept, z32, f32 = _run_graph(predictor, fp32, unseen.records, batch_size)
    _, z8, f8 = _run_graph(predictor, int8, kept, batch_size)
    if unseen.refit:
        z32, z8 = _fold_logits(predictor, fp32, source, kept, f32, f8, batch_size, say)
    known = np.array([target_of(r, predictor.task) in index for r in kept])
    y = np.array([index.get(target_of(r, predictor.task), -1) for r in kept])[known]
    patients = [_patient_of(r) for r, k in zip(kept, known, strict=True) if k]
    p32 = predictor.probabilities(torch.from_numpy(z32[known]))
    p8 = predictor.probabilities(torch.from_numpy(z8[known]))
    return compare_int8(y, patients, p32, p8, unseen.where, n_boot)


def _fold_logits(
    predictor: Predictor,
    fp32: OnnxRunner,
    source: Path,
    scored: Sequence[ImageRecord],
    f32: np.ndarray,
    f8: np.ndarray,
    batch_size: int,
    say: Callable[[str], None],
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of ``scored`` (fp32 and int8 features ``f32``, ``f8``) by probes refit per fold
    on the fp32 export's features of the other folds' patients (the run's number of folds,
    seed and ``C``)."""
    from histolens.checkpoint.io import read_metadata
    from histolens.training.probe import fit_linear_probe, group_folds

    meta = read_metadata(source)
    cfg = meta.run_config
    split = _run_split(source)
    train = split.train if split is not None else []
    index = {c: i for i, c in enumerate(predictor.class_names)}
    train = [r for r in train if target_of(r, predictor.task) in index]
    say(f"Refitting the probe per fold on the fp32 features of {len(train)} training images")
    features = {r.path: f for r, f in zip(scored, f32, strict=True)}
    rest = [r for r in train if r.path not in features]
    if rest:
        more, _, x_rest = _run_graph(predictor, fp32, rest, batch_size)
        features.update({r.path: f for r, f in zip(more, x_rest, strict=True)})
    kept = [r for r in train if r.path in features]
    x = np.stack([features[r.path] for r in kept])
    y = np.array([index[target_of(r, predictor.task)] for r in kept])
    groups = np.array([_patient_of(r) for r in kept])
    row = {r.path: i for i, r in enumerate(kept)}
    where = np.array([row.get(r.path, -1) for r in scored])
    cs = (meta.probe.C,) if meta.probe is not None else cfg.train.probe_cs
    n_classes = len(predictor.class_names)
    out32 = np.full((len(scored), 1 if n_classes == 2 else n_classes), np.nan)
    out8 = out32.copy()
    for k, (tr, te) in enumerate(group_folds(y, groups, cfg.train.cv_folds or 5, cfg.data.seed)):
        if len(np.unique(y[tr])) < 2:
            continue
        fit = fit_linear_probe(
            x[tr],
            y[tr],
            groups[tr],
            n_classes,
            cs,
            5,
            cfg.data.seed + k,
            cfg.train.probe_weighting,
        )
        mine = np.isin(where, te)
        out32[mine], out8[mine] = fit.logits(f32[mine]), fit.logits(f8[mine])
    scored_ok = ~np.isnan(out32).any(1)
    if not scored_ok.all():
        raise ExportError(
            "The int8 export cannot be checked per fold: some images fell in no fold whose "
            "training patients hold two classes; give images of other patients with "
            "--verify-data PATH."
        )
    return out32, out8
