"""What every kind of training run shares: its result, its file names, its first metadata.

:func:`histolens.training.runner.train` dispatches to the linear probe
(:mod:`~histolens.training.probe_run`) or Lightning (:mod:`~histolens.training.lightning_run`);
both build on this module, so neither imports the dispatcher back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from histolens.checkpoint.io import CheckpointMetadata, HeadSpec, SplitPart, TrainingData
from histolens.config import RunConfig
from histolens.data.records import Dataset as Records
from histolens.data.splits import Split
from histolens.evaluation.results import Metrics
from histolens.models.classifier import resolve_feature_layer
from histolens.rundir import RunDir

__all__ = ["CONFIG_FILE", "FEATURE_CACHE", "SPLIT_FILE", "TrainResult", "initial_metadata"]

FEATURE_CACHE = RunDir.FEATURE_CACHE
CONFIG_FILE = RunDir.CONFIG
SPLIT_FILE = RunDir.SPLIT


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    checkpoint: Path
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    seconds: float
    metrics: Metrics | None = None  # of the evaluated split (None: not evaluated here)
    notes: list[str] = field(default_factory=list)
    first_epoch: int = 0  # where this invocation started: > 0 for a resumed run
    global_rank: int = 0  # of this process; only rank 0 wrote files and has metrics


def initial_metadata(
    cfg: RunConfig,
    spec,
    classes,
    preprocess,
    stain,
    stain_ref,
    split: Split,
    weights,
    dataset: Records,
) -> CheckpointMetadata:
    """What every run's checkpoint says before training adds its threshold, figures and fits."""
    return CheckpointMetadata(
        model_id=f"{spec.name}-{cfg.data.task}-{time.strftime('%Y%m%d-%H%M%S')}",
        backbone=spec.name,
        timm_name=spec.timm_name,
        licence=spec.licence,  # of the backbone's weights (None: see the timm model card)
        pretrained=cfg.model.pretrained,
        task=cfg.data.task,
        class_names=tuple(classes),
        head=HeadSpec.from_config(cfg.model),
        feature_layer=resolve_feature_layer(spec, cfg.model.feature_layer, cfg.model.head),
        preprocess=preprocess,
        stain=stain.to_dict() if stain is not None else None,
        stain_reference=stain_ref,
        magnification=cfg.data.magnification,
        training_mpp=cfg.data.mpp,
        training_image_size=image_size(dataset) if cfg.data.mpp is not None else None,
        config=cfg.to_dict(),
        class_weights=dict(zip(classes, weights, strict=True)),
        data=TrainingData(
            str(cfg.data.path),
            dataset.layout,
            split.patient_level,
            {name: SplitPart(**part) for name, part in split.summary(cfg.data.task).items()},
        ),
    )


def image_size(dataset: Records, sample: int = 64) -> tuple[int, int] | None:
    """The commonest (width, height) among the first ``sample`` training images (read from
    their headers), the field a model input covered; None when none can be read."""
    from collections import Counter

    from PIL import Image

    sizes: Counter = Counter()
    for record in dataset.records[:sample]:
        try:
            with Image.open(record.path) as img:
                sizes[img.size] += 1
        except (OSError, ValueError):
            continue
    return sizes.most_common(1)[0][0] if sizes else None
