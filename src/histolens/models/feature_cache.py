"""A frozen backbone's pooled features, computed once per image (and augmented view) and kept.

Images stream through the backbone batch by batch (decoded, stain-normalised, augmented, then
dropped), so a run holds its features, never its images. Across several processes each rank
computes every ``world_size``-th image and the shares are gathered, so all ranks end with the
whole cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from histolens.models.engine import FeatureEngine
    from histolens.models.pipeline import ImageSource, InputPipeline

__all__ = ["FeatureCache"]


def _progress(total: int, desc: str, enabled: bool):
    from histolens.progress import progress_bar

    return progress_bar(total, desc, "img", enabled=enabled, leave=False)


def _duration(seconds: float) -> str:
    """'45 s', '12 min', '2 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


class _ThroughputEstimate:
    """Advances the progress bar; after the first batch, says how long the whole job will take.

    A large backbone on a CPU (a pathology foundation model: a few images/s) makes feature
    extraction the long part of a run. The estimate goes above the progress bar, or, without
    one, to the log as a warning when it exceeds a minute.
    """

    def __init__(self, total: int, bar, progress: bool) -> None:
        self.total, self.bar, self.progress = total, bar, progress
        self.start: float | None = time.perf_counter()

    def __call__(self, n: int) -> None:
        self.bar.update(n)
        if self.start is None:
            return
        seconds = time.perf_counter() - self.start
        self.start = None
        if n >= self.total:
            return
        rate = n / max(seconds, 1e-9)
        estimate = self.total / rate
        message = (
            f"Backbone features: {rate:.1f} images/s on the first batch, so about "
            f"{_duration(estimate)} for all {self.total} images and views."
        )
        if self.progress:
            self.bar.write(message, file=sys.stderr)
        elif estimate > 60:
            logging.getLogger("histolens").warning(message)


class FeatureCache:
    """Pooled backbone features: one clean view per image and K augmented views of train images."""

    def __init__(
        self, clean: dict[str, torch.Tensor], views: dict[str, torch.Tensor], fingerprint: str
    ) -> None:
        self.clean = clean
        self.views = views
        self.fingerprint = fingerprint

    @staticmethod
    def fingerprint_of(**parts: object) -> str:
        blob = json.dumps(parts, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        images: ImageSource,
        pipeline: InputPipeline,
        clean_paths: Sequence[str],
        view_paths: Sequence[str],
        n_views: int,
        fingerprint: str,
        batch_size: int = 32,
        progress: bool = True,
    ) -> FeatureCache:
        """Run the frozen backbone once over every clean image and every augmented view."""
        cache = cls({}, {}, fingerprint)
        cache.extend(
            model, images, pipeline, clean_paths, view_paths, n_views, batch_size, progress
        )
        return cache

    @torch.inference_mode()
    def extend(
        self,
        model: torch.nn.Module | FeatureEngine,
        images: ImageSource,
        pipeline: InputPipeline,
        clean_paths: Sequence[str],
        view_paths: Sequence[str],
        n_views: int,
        batch_size: int = 32,
        progress: bool = True,
        fabric: Any = None,
        on_decoded: Callable[[list[str], torch.Tensor], None] | None = None,
    ) -> None:
        """Compute features only for the images (and views) not cached yet.

        ``model`` is the classifier or a feature engine (``histolens.models.engine.feature_engine``):
        whatever has ``features(x)``. Each image is decoded once, for its clean view and all its
        augmented views; unreadable files end in ``images.skipped`` and stay out of the cache.
        With a launched ``lightning.fabric.Fabric`` of several processes, every rank must call
        this with the same arguments: each computes its share and all receive the whole result.
        ``on_decoded(paths, uint8 batch)`` sees every batch this rank decodes, so that other
        per-image work on the pixels (the input checks) needs no second decode.
        """
        if isinstance(model, torch.nn.Module):
            model.eval()
        clean_todo = [p for p in dict.fromkeys(clean_paths) if p in images and p not in self.clean]
        view_todo = [p for p in dict.fromkeys(view_paths) if p in images and p not in self.views]
        view_todo = view_todo if n_views else []
        todo = list(dict.fromkeys(clean_todo + view_todo))
        if not todo:
            return
        rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
        mine = todo[rank::world]
        wanted_clean, wanted_views = set(clean_todo), set(view_todo)
        total = sum((p in wanted_clean) + n_views * (p in wanted_views) for p in mine)
        clean: dict[str, torch.Tensor] = {}
        views: dict[str, torch.Tensor] = {}
        with _progress(total, "Backbone features", progress) as bar:
            done = _ThroughputEstimate(total, bar, progress)
            for paths, batch in images.batches(mine, batch_size):
                if on_decoded is not None:
                    on_decoded(paths, batch)
                keep = [i for i, p in enumerate(paths) if p in wanted_clean]
                if keep:
                    x = pipeline.eval_inputs(batch[keep])
                    feats = model.features(x).float().cpu()
                    clean.update(zip([paths[i] for i in keep], feats, strict=True))
                    done(len(keep))
                keep = [i for i, p in enumerate(paths) if p in wanted_views]
                if keep:
                    chosen = [paths[i] for i in keep]
                    per_view = []
                    for v in range(n_views):
                        x = pipeline.train_inputs(batch[keep], chosen, v)
                        per_view.append(model.features(x).float().cpu())
                        done(len(keep))
                    views.update(zip(chosen, torch.stack(per_view, 1), strict=True))
        if world > 1:
            clean, views = _gather(clean, views, images, world)
        self.clean.update(clean)
        self.views.update(views)

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache atomically: a killed save leaves the previous file (or none)."""
        from safetensors.torch import save_file

        from histolens.atomic import atomic_path

        keys = sorted(self.clean)
        vkeys = sorted(self.views)
        tensors = {}
        if keys:
            tensors["clean"] = torch.stack([self.clean[k] for k in keys])
        if vkeys:
            tensors["views"] = torch.stack([self.views[k] for k in vkeys])
        meta = {
            "fingerprint": self.fingerprint,
            "clean": json.dumps(keys),
            "views": json.dumps(vkeys),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: str) -> FeatureCache | None:
        """The cache saved at ``path`` if it was built with the same settings, else None.

        Every entry is one image's finished features (``save`` is atomic and only ever writes
        whole tensors), so a cache that lacks some images is valid: ``extend`` adds them.
        """
        from safetensors import safe_open

        if not Path(path).is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("fingerprint") != fingerprint:
                    return None
                keys, vkeys = json.loads(meta["clean"]), json.loads(meta["views"])
                clean = dict(zip(keys, fh.get_tensor("clean"), strict=True)) if keys else {}
                views = dict(zip(vkeys, fh.get_tensor("views"), strict=True)) if vkeys else {}
        except Exception:  # a damaged or inconsistent cache is rebuilt, never trusted
            return None
        return cls(clean, views, fingerprint)


def _stacked(features: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor | None]:
    keys = list(features)
    return keys, torch.stack([features[k] for k in keys]) if keys else None


def _gather(
    clean: dict[str, torch.Tensor], views: dict[str, torch.Tensor], images, world: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every rank's share of the features (one stacked tensor each) and unreadable files."""
    import torch.distributed as dist

    mine = (_stacked(clean), _stacked(views), images.skipped)
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, mine)
    all_clean: dict[str, torch.Tensor] = {}
    all_views: dict[str, torch.Tensor] = {}
    for (ckeys, cfeats), (vkeys, vfeats), skipped in shares:
        if ckeys:
            all_clean.update(zip(ckeys, cfeats, strict=True))
        if vkeys:
            all_views.update(zip(vkeys, vfeats, strict=True))
        images.add_skipped(skipped)
    return all_clean, all_views
