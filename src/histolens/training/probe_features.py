"""The linear probe's frozen backbone and its features: build the backbone without its head's
gradients, fit the stain reference, and compute every image's pooled features once (cached on
disk, shared out between ranks). A step of :mod:`histolens.training.probe_run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from histolens.config import RunConfig
from histolens.data.splits import Split
from histolens.inference.ood import content_stats
from histolens.models.backbones import BackboneSpec
from histolens.models.classifier import HistoClassifier, build_model, resolve_feature_layer
from histolens.models.engine import FeatureEngine, feature_engine
from histolens.models.feature_cache import FeatureCache
from histolens.models.pipeline import (
    ImageBank,
    ImageSource,
    ImageStream,
    InputPipeline,
    image_source,
)

if TYPE_CHECKING:
    from histolens.models.transforms import Preprocess
    from histolens.stain.normalize import StainNormalizer

__all__ = ["FrozenBackbone", "frozen_features"]


@dataclass
class FrozenBackbone:
    """The frozen backbone, what its inputs were prepared with, and its cached features."""

    spec: BackboneSpec
    model: HistoClassifier
    layer: str | None
    preprocess: Preprocess
    images: ImageSource
    stain: StainNormalizer | None
    stain_ref: str | None
    cache: FeatureCache
    engine: (
        str  # what computed the features (histolens.models.engine), recorded in the run's config
    )
    # (grey-level contrast, H&E-coloured fraction) of the images this process decoded for the
    # features (histolens.inference.ood.content_stats): the input checks then need no decode.
    content: dict[str, tuple[float, float]] = field(default_factory=dict)


def frozen_features(
    cfg: RunConfig,
    spec: BackboneSpec,
    n_classes: int,
    split: Split,
    run_dir: Path,
    bank: ImageBank | None,
    feature_store: dict | None,
    progress: bool,
    write_outputs: bool,
    fabric,
) -> FrozenBackbone:
    """Build the frozen backbone and compute the features of every image of ``split`` once."""
    from histolens.models.transforms import Augmenter, resolve_preprocess
    from histolens.training.data import fit_stain

    layer = resolve_feature_layer(spec, cfg.model.feature_layer, "linear")
    # As the Lightning path's seed_everything: a randomly initialised backbone (--pretrained none)
    # is then the same in every run, so features shared through feature_store match its weights.
    torch.manual_seed(cfg.train.seed)
    model = build_model(spec, n_classes, cfg.model.pretrained, (), (), layer)
    if fabric.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
    size = spec.input_size_for(cfg.model.input_size)
    preprocess = resolve_preprocess(model.backbone, size)
    model.set_trainable(0)
    model.eval().to(fabric.device)
    if fabric.device.type == "cpu":
        model.to(memory_format=torch.channels_last)

    # Streamed from disk (only the features are kept) unless a shared bank holds the images.
    images = image_source(bank, preprocess)
    train_paths = [r.path for r in split.train + split.val]
    stain, stain_ref = fit_stain(cfg, images, train_paths, preprocess, hold=True)
    augmenter = Augmenter(cfg.augment) if cfg.train.probe_views else None
    engine = feature_engine(
        model, cfg.train.engine, preprocess.input_size, precision=cfg.train.precision
    )
    pipeline = InputPipeline(
        preprocess,
        augmenter,
        stain,
        cfg.train.seed,
        fabric.device,
        channels_last=engine.name == "torch",
    )
    paths = [r.path for r in split.train + split.val + split.test]
    content: dict[str, tuple[float, float]] = {}

    def observe(batch_paths: list[str], batch: torch.Tensor) -> None:
        content.update(zip(batch_paths, content_stats(batch), strict=True))

    cache = _features(
        cfg,
        model,
        engine,
        images,
        pipeline,
        paths,
        train_paths,
        run_dir,
        feature_store,
        preprocess,
        progress,
        write_outputs,
        fabric,
        observe,
    )
    if isinstance(images, ImageStream):
        images.hold({})  # what the feature pass did not need (features read from a cache)
    return FrozenBackbone(
        spec, model, layer, preprocess, images, stain, stain_ref, cache, engine.name, content
    )


def _features(
    cfg: RunConfig,
    model,
    engine: FeatureEngine,
    images: ImageSource,
    pipeline: InputPipeline,
    paths: Sequence[str],
    train_paths: Sequence[str],
    run_dir: Path,
    feature_store: dict | None,
    preprocess,
    progress: bool,
    write_outputs: bool,
    fabric,
    on_decoded=None,
) -> FeatureCache:
    """The frozen backbone's features of ``paths`` (and ``cfg.train.probe_views`` augmented
    views of ``train_paths``), computed once (shared out between ranks); ``on_decoded`` sees
    each decoded batch (FeatureCache.extend)."""
    from histolens.training.common import FEATURE_CACHE

    spec = model.spec
    n_views = cfg.train.probe_views
    # Augmented views depend on the augmentation too (only then: other caches keep their key).
    views = {"views": [n_views, repr(cfg.augment)]} if n_views else {}
    fingerprint = FeatureCache.fingerprint_of(
        engine=engine.name,  # features of different runtimes never mix
        backbone=spec.timm_name,
        feature_layer=model.feature_layer,
        pretrained=cfg.model.pretrained,
        preprocess=preprocess.to_dict(),
        stain=pipeline.stain.cache_key() if pipeline.stain is not None else None,
        **views,
    )
    store = feature_store if feature_store is not None else {}
    cache = store.get(fingerprint) or FeatureCache.load(run_dir / FEATURE_CACHE, fingerprint)
    if cache is None:
        cache = FeatureCache({}, {}, fingerprint)
    store[fingerprint] = cache
    before = (len(cache.clean), len(cache.views))
    with fabric.autocast():
        bs = cfg.train.batch_size
        view_paths = train_paths if n_views else []
        cache.extend(
            engine,
            images,
            pipeline,
            paths,
            view_paths,
            n_views,
            bs,
            progress,
            fabric=fabric,
            on_decoded=on_decoded,
        )
    changed = (len(cache.clean), len(cache.views)) != before
    if fabric.is_global_zero and write_outputs and feature_store is None and changed:
        cache.save(run_dir / FEATURE_CACHE)
    return cache
