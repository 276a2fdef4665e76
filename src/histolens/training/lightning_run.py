"""``histolens train --head mlp``: the steps of a Lightning run.

Prepare (records, split, model, stain normaliser), then the datasets (the frozen backbone's
cached features, or images decoded from disk for fine-tuning), then Lightning's fit (each rank
trains on its share of the training set), then the checkpoint and, on rank 0, its calibration
on the validation patients (threshold, temperature, prediction sets and the out-of-distribution
guard: :func:`histolens.evaluation.evaluate.finalize_run`) and the evaluation.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from histolens.atomic import atomic_write_text
from histolens.checkpoint.io import BEST_CHECKPOINT, CheckpointMetadata, save_checkpoint
from histolens.config import RunConfig
from histolens.data.records import Dataset as Records
from histolens.data.records import ImageRecord
from histolens.data.splits import Split, balanced_class_weights, split_by_patient, targets
from histolens.errors import DataError
from histolens.models.backbones import BackboneSpec, get_backbone_spec
from histolens.models.classifier import HistoClassifier, build_model, resolve_feature_layer
from histolens.models.engine import feature_engine
from histolens.models.feature_cache import FeatureCache
from histolens.models.pipeline import ImageSource, InputPipeline, image_source
from histolens.models.transforms import Augmenter, Preprocess, resolve_preprocess
from histolens.rundir import RunDir
from histolens.training.common import (
    CONFIG_FILE,
    FEATURE_CACHE,
    SPLIT_FILE,
    TrainResult,
    initial_metadata,
)
from histolens.training.data import (
    check_readable,
    fit_stain,
    prepare_records,
    readable_split,
    write_skipped,
)
from histolens.training.distributed import (
    lightning_advice_ignored,
    lightning_devices,
    scoped_matmul_precision,
)
from histolens.training.lightning_module import LAST_CHECKPOINT, ClassifierModule

__all__ = ["RunOptions", "train_lightning"]

log = logging.getLogger("histolens")


@dataclass
class RunOptions:
    """How ``train`` was asked to run the Lightning path (what to train is the config)."""

    resume: bool
    progress: bool
    evaluate: bool
    write_outputs: bool
    epoch_lines: bool
    feature_store: dict[str, FeatureCache] | None


@dataclass
class _LightningRun:
    """What the steps of a Lightning run hand on to each other."""

    cfg: RunConfig
    run_dir: Path
    fabric: Any  # a launched lightning.fabric.Fabric
    spec: BackboneSpec
    dataset: Records
    classes: tuple[str, ...]
    split: Split
    model: HistoClassifier
    preprocess: Preprocess
    images: ImageSource
    pipeline: InputPipeline
    stain_ref: str | None
    notes: list[str]
    cache: FeatureCache | None = None
    metadata: CheckpointMetadata | None = None  # set once the class weights are known

    @property
    def cached(self) -> bool:
        return self.cfg.train.feature_cache and self.cfg.model.unfreeze == 0

    @property
    def main(self) -> bool:
        return self.fabric.is_global_zero


def train_lightning(
    cfg: RunConfig, run_dir: Path, split: Split | None, bank, fabric, opts: RunOptions
) -> TrainResult:
    import lightning as L

    notes: list[str] = []
    if cfg.train.cv_folds:
        notes.append(
            "The MLP head is trained and measured on one held-out split (--val-fraction, "
            "--test-fraction); --cv-folds applies to the linear probe."
        )
        cfg = cfg.override({"train.cv_folds": 0})
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    run = _prepare(cfg, run_dir, split, bank, fabric, notes)
    train_set, val_set = _datasets(run, opts)
    trainer, export, epoch_log = _fit(run, train_set, val_set, opts)
    return _finish(run, trainer, export, epoch_log, opts)


def _prepare(cfg: RunConfig, run_dir: Path, split, bank, fabric, notes) -> _LightningRun:
    """Records, split, model, preprocessing and stain normaliser of a Lightning run."""
    spec = get_backbone_spec(cfg.model.backbone)  # a mistyped name fails before any work
    dataset, records, classes = prepare_records(cfg)
    if split is None:
        split = _held_out_split(cfg, records, notes)
    notes += split.warnings
    if fabric.is_global_zero:
        for n in notes:
            log.warning(n)
    layer = resolve_feature_layer(spec, cfg.model.feature_layer, cfg.model.head)
    model = build_model(
        spec, len(classes), cfg.model.pretrained, cfg.model.head_dims, cfg.model.dropouts, layer
    )
    # Created only now: a mistyped option, bad data or missing weights leave no empty run folder.
    if fabric.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
    preprocess = resolve_preprocess(model.backbone, spec.input_size_for(cfg.model.input_size))
    model.set_trainable(cfg.model.unfreeze)
    images = image_source(bank, preprocess)
    stain, stain_ref = fit_stain(cfg, images, [r.path for r in split.train], preprocess)
    model.to(fabric.device)
    if fabric.device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    pipeline = InputPipeline(
        preprocess, Augmenter(cfg.augment), stain, cfg.train.seed, fabric.device
    )
    return _LightningRun(
        cfg, run_dir, fabric, spec, dataset, classes, split, model, preprocess, images,
        pipeline, stain_ref, notes,
    )  # fmt: skip


def _held_out_split(cfg: RunConfig, records: list[ImageRecord], notes: list[str]) -> Split:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = split_by_patient(
            records,
            cfg.data.task,
            cfg.data.val_fraction,
            cfg.data.test_fraction,
            cfg.data.seed,
            cfg.data.group_by,
        )
    notes[:0] = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return split


def _datasets(run: _LightningRun, opts: RunOptions) -> tuple[Dataset, Dataset | None]:
    """Cached features (frozen backbone) or images from disk, once the unreadable are out."""
    everything = [r.path for r in run.split.train + run.split.val + run.split.test]
    if run.cached:
        run.cache = _feature_cache(run, everything, opts)
    else:  # the backbone trains: every forward pass is PyTorch's
        run.cfg = replace(run.cfg, train=replace(run.cfg.train, engine="torch"))
        check_readable(run.images, everything, run.fabric, opts.progress)
    split = run.split = readable_split(run.split, run.images, run.notes)
    if not split.train:
        raise DataError("No readable training images.")
    if run.main:
        write_skipped(run.run_dir, run.images, run.dataset)
        split.write_csv(run.run_dir / SPLIT_FILE)
    task = run.cfg.data.task
    y_train = torch.tensor(targets(split.train, run.classes, task))
    y_val = torch.tensor(targets(split.val, run.classes, task))
    if not run.cached:
        val_images = _ImageSet(run.images, split.val, y_val) if split.val else None
        return _ImageSet(run.images, split.train, y_train), val_images
    assert run.cache is not None
    train_feats = run.cache.views if run.pipeline.augmenter.active else run.cache.clean
    train_set = TensorDataset(torch.stack([train_feats[r.path] for r in split.train]), y_train)
    if not split.val:
        return train_set, None
    return train_set, TensorDataset(
        torch.stack([run.cache.clean[r.path] for r in split.val]), y_val
    )


def _feature_cache(run: _LightningRun, paths: list[str], opts: RunOptions) -> FeatureCache:
    """The frozen backbone's features of ``paths`` and K augmented views of the training images,
    loaded from the run's cache file (or ``opts.feature_store``) where already computed."""
    run.model.eval()  # the backbone is frozen: batch norm uses its running statistics
    engine = feature_engine(
        run.model,
        run.cfg.train.engine,
        run.preprocess.input_size,
        precision=run.cfg.train.precision,
    )
    # The run's config (and checkpoint) record the engine that computed its features.
    cfg = run.cfg = replace(run.cfg, train=replace(run.cfg.train, engine=engine.name))
    augmented = run.pipeline.augmenter.active
    fingerprint = FeatureCache.fingerprint_of(
        engine=engine.name,  # features of different runtimes never mix
        backbone=run.spec.timm_name,
        feature_layer=run.model.feature_layer,
        pretrained=cfg.model.pretrained,
        preprocess=run.preprocess.to_dict(),
        stain=run.pipeline.stain.cache_key() if run.pipeline.stain is not None else None,
        augment=cfg.augment,
        views=cfg.train.cache_views,
        seed=cfg.train.seed,
    )
    store = opts.feature_store if opts.feature_store is not None else {}
    path = run.run_dir / FEATURE_CACHE
    cache = store.get(fingerprint) or FeatureCache.load(path, fingerprint)
    cache = store[fingerprint] = cache or FeatureCache({}, {}, fingerprint)
    before = (len(cache.clean), len(cache.views))
    view_paths = [r.path for r in run.split.train] if augmented else []
    with run.fabric.autocast():
        cache.extend(
            engine,
            run.images,
            run.pipeline,
            paths,
            view_paths,
            cfg.train.cache_views if augmented else 0,
            cfg.train.batch_size,
            opts.progress,
            fabric=run.fabric,
        )
    changed = (len(cache.clean), len(cache.views)) != before
    if run.main and opts.feature_store is None and changed:
        cache.save(path)
    return cache


class _ImageSet(Dataset):
    """(uint8 image, target, path) of records, decoded when asked for (or from a bank)."""

    def __init__(self, images: ImageSource, records: list[ImageRecord], y: torch.Tensor) -> None:
        self.images, self.paths, self.targets = images, [r.path for r in records], y

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.images.image(self.paths[i]), self.targets[i], self.paths[i]


def _loaders(
    run: _LightningRun, train_set: Dataset, val_set: Dataset | None
) -> tuple[DataLoader, DataLoader | None]:
    """Each rank trains on its share of the (shuffled) training set and scores all validation."""
    t = run.cfg.train
    workers = 0 if run.cached else t.num_workers
    if run.fabric.world_size > 1:
        sampler = DistributedSampler(
            train_set, run.fabric.world_size, run.fabric.global_rank, shuffle=True, seed=t.seed
        )
        order: dict[str, Any] = {"sampler": sampler}
        per_rank = len(sampler)
    else:
        order = {"shuffle": True, "generator": torch.Generator().manual_seed(t.seed)}
        per_rank = len(train_set)
    train_loader = DataLoader(
        train_set,
        batch_size=t.batch_size,
        drop_last=per_rank % t.batch_size == 1,  # no batch of one for batch norm
        num_workers=workers,
        **order,
    )
    if val_set is None:
        return train_loader, None
    return train_loader, DataLoader(val_set, batch_size=max(t.batch_size, 64), num_workers=workers)


def _fit(run: _LightningRun, train_set: Dataset, val_set: Dataset | None, opts: RunOptions):
    """Lightning's fit over the datasets; returns the trainer and the two callbacks read after."""
    import lightning as L

    from histolens.training.lightning_module import atomic_checkpoint_io, run_callbacks

    cfg = run.cfg
    train_loader, val_loader = _loaders(run, train_set, val_set)
    monitor = "val_loss" if val_loader is not None else "train_loss"
    weights = balanced_class_weights(run.split.train, run.classes, cfg.data.task)
    run.metadata = initial_metadata(
        cfg, run.spec, run.classes, run.preprocess, run.pipeline.stain, run.stain_ref,
        run.split, weights, run.dataset,
    )  # fmt: skip
    module = ClassifierModule(run.model, cfg, weights, run.pipeline, run.cached)
    callbacks, loggers, export, epoch_log = run_callbacks(
        run.run_dir, run.metadata, monitor, cfg.train.early_stopping_patience, opts.write_outputs,
        opts.epoch_lines and not opts.progress, len(train_loader) if opts.progress else 0,
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=cfg.train.epochs,
        accelerator=cfg.train.accelerator,
        devices=lightning_devices(cfg.train.devices),
        strategy=cfg.train.strategy,
        num_nodes=cfg.train.num_nodes,
        precision=cfg.train.precision,
        use_distributed_sampler=False,  # _loaders shares the training set out itself
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[atomic_checkpoint_io()],
        enable_progress_bar=opts.progress,
        enable_checkpointing=opts.write_outputs,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, len(train_loader)),
        deterministic=False,
        default_root_dir=str(run.run_dir),
    )
    if run.main:
        atomic_write_text(run.run_dir / CONFIG_FILE, cfg.to_json())
    last = run.run_dir / LAST_CHECKPOINT
    # TF32 matmuls for training on GPUs; the features and the stain reference are computed at
    # full precision, as the Predictor computes them.
    with lightning_advice_ignored(".*exists and is not empty.*"), scoped_matmul_precision("high"):
        trainer.fit(
            module,
            train_loader,
            val_loader,
            ckpt_path=str(last) if opts.resume else None,
            weights_only=False,
        )
    return trainer, export, epoch_log


def _finish(run: _LightningRun, trainer, export, epoch_log, opts: RunOptions) -> TrainResult:
    """The checkpoint (if no epoch improved), the run's result and, on rank 0, its evaluation."""
    stain = run.pipeline.stain
    if stain is not None:
        run.notes.append(
            f"Stain normalisation ({run.cfg.stain.method}) fell back to the unchanged image "
            f"on {stain.fallbacks} of {stain.seen} image passes."
        )
    best = run.run_dir / BEST_CHECKPOINT
    if run.main and not best.exists():
        save_checkpoint(best, run.model, replace(run.metadata, epoch=trainer.current_epoch))
    result = TrainResult(
        run.run_dir,
        best,
        trainer.current_epoch,
        export.best_epoch,
        export.best,
        0.0,
        notes=run.notes,
        first_epoch=epoch_log.first_epoch,
        global_rank=trainer.global_rank,
    )
    if opts.evaluate and run.main:
        from histolens.evaluation.evaluate import finalize_run

        result.metrics = finalize_run(
            run.run_dir,
            run.cfg,
            run.split,
            run.classes,
            bank=run.images,
            cache=run.cache,
            progress=opts.progress,
            notes=run.notes,  # receives the calibration's notes too
            write_outputs=opts.write_outputs,
        )
        if opts.write_outputs:
            from histolens.report.build import write_report

            write_report(run.run_dir, evaluation_dir=RunDir(run.run_dir).evaluation.path)
    return result
