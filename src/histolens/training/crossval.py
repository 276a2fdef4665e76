"""Patient-level (stratified group) k-fold cross-validation of a training config.

Each fold trains on its training patients (an inner patient-level split gives the validation set
for early stopping, threshold and temperature) and is scored on its held-out patients. Images
are decoded once and a frozen backbone's features are computed once per image and view, so
the folds cost little more than one run.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histolens.config import RunConfig
from histolens.data.splits import Split, group_kfold, split_by_patient
from histolens.stats.metrics import HEADLINE_METRICS

__all__ = ["CVResult", "cross_validate", "image_bank_for"]


@dataclass
class CVResult:
    """Per-fold metrics and their mean and standard deviation."""

    folds: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def mean_std(self, key: str) -> tuple[float, float]:
        vals = np.array([f[key] for f in self.folds if key in f and np.isfinite(f[key])])
        if not len(vals):
            return float("nan"), float("nan")
        return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0

    def summary(self) -> dict[str, tuple[float, float]]:
        """Mean and standard deviation over folds of each headline metric (NaN where none)."""
        return {k: self.mean_std(k) for k in HEADLINE_METRICS}


def image_bank_for(cfg: RunConfig, progress: bool = True, records=None):
    """The decoded images of ``cfg``'s data (or of ``records``), preprocessed for its backbone:
    one bank that several cross-validations of the same data and backbone can share."""
    from histolens.models.backbones import create_backbone, get_backbone_spec
    from histolens.models.pipeline import ImageBank
    from histolens.models.transforms import resolve_preprocess
    from histolens.training.runner import prepare_records

    if records is None:
        records = prepare_records(cfg)[1]
    spec = get_backbone_spec(cfg.model.backbone)
    size = spec.input_size_for(cfg.model.input_size)
    preprocess = resolve_preprocess(create_backbone(spec, "none"), size)
    return ImageBank([r.path for r in records], preprocess, progress)


def _run_fold(
    cfg: RunConfig,
    train_recs: list,
    test_recs: list,
    seed: int,
    run_dir: Path,
    bank,
    store: dict,
) -> dict[str, float]:
    """Train one fold on ``train_recs`` (inner patient-level validation split) and score it on
    ``test_recs``: its headline image metrics, test support and best epoch."""
    from histolens.training.runner import train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        inner = split_by_patient(
            train_recs,
            cfg.data.task,
            val_fraction=0.2,
            test_fraction=0.0,
            seed=seed,
            group_by=cfg.data.group_by,
        )
    split = Split(inner.train, inner.val, test_recs, inner.patient_level)
    run = train(
        cfg,
        run_dir,
        split=split,
        bank=bank,
        feature_store=store,
        progress=False,
        write_outputs=False,
    )
    img = run.metrics.image if run.metrics is not None else None
    figures = img.figures() if img is not None else {}
    fold = {key: float(figures[key]) for key in HEADLINE_METRICS if key in figures}
    fold.update(
        n_test_images=len(test_recs),
        n_test_patients=len({r.group for r in test_recs}),
        best_epoch=run.best_epoch + 1,
    )
    return fold


def cross_validate(
    cfg: RunConfig,
    n_splits: int = 5,
    seed: int | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    feature_store: dict | None = None,
    bank=None,
) -> CVResult:
    """Run k-fold patient-level cross-validation of ``cfg``; returns fold metrics.

    ``feature_store`` and ``bank`` may be shared between calls with the same backbone to reuse
    decoded images and features across settings (e.g. learning-rate grids).
    """
    import time

    from histolens.training.runner import prepare_records

    start = time.perf_counter()
    seed = cfg.data.seed if seed is None else seed
    _, records, _ = prepare_records(cfg)
    folds = group_kfold(records, cfg.data.task, n_splits, seed)
    if bank is None:
        bank = image_bank_for(cfg, progress, records)
    store = feature_store if feature_store is not None else {}
    result = CVResult()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for k, (tr, te) in enumerate(folds):
            train_recs = [records[i] for i in tr]
            test_recs = [records[i] for i in te]
            run_dir = Path(tmp) / f"fold{k}"
            fold = _run_fold(cfg, train_recs, test_recs, seed + k, run_dir, bank, store)
            result.folds.append(fold)
            if progress:
                print(
                    f"  fold {k + 1}/{n_splits}: "
                    + ", ".join(
                        f"{key} {fold[key]:.3f}" for key in HEADLINE_METRICS if key in fold
                    ),
                    flush=True,
                )
    result.seconds = time.perf_counter() - start
    return result
