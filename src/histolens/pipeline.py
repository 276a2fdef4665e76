"""From image files to model inputs and cached backbone features.

``ImageBank`` decodes and resizes each image once; ``InputPipeline`` turns uint8 batches into
model inputs (stain normalisation, seeded augmentation, mean/std) exactly as the Predictor does;
``FeatureCache`` holds a frozen backbone's features for K augmented views of each image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from histolens.data import Skipped
from histolens.errors import ImageLoadError
from histolens.imageio import load_rgb
from histolens.transforms import Augmenter, Preprocess, view_generator

__all__ = ["FeatureCache", "ImageBank", "InputPipeline"]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


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


class ImageBank:
    """Decoded, resized uint8 images kept in memory, keyed by path; unreadable files skipped."""

    def __init__(
        self, paths: Sequence[str], preprocess: Preprocess, progress: bool = True, workers: int = 2
    ) -> None:
        self.preprocess = preprocess
        self.images: dict[str, torch.Tensor] = {}
        self.skipped: list[Skipped] = []

        def load(path: str) -> torch.Tensor | Skipped:
            try:
                return preprocess.resize(load_rgb(path))
            except ImageLoadError as exc:
                return Skipped(path, exc.reason)

        unique = list(dict.fromkeys(str(p) for p in paths))
        with (
            ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
            _progress(len(unique), "Reading images", progress) as bar,
        ):
            for path, result in zip(unique, pool.map(load, unique), strict=True):
                if isinstance(result, Skipped):
                    self.skipped.append(result)
                else:
                    self.images[path] = result
                bar.update(1)

    def __contains__(self, path: str) -> bool:
        return path in self.images

    def stack(self, paths: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.images[p] for p in paths])


@dataclass
class InputPipeline:
    """uint8 batch -> model input; the training side adds seeded augmentation per (image, view)."""

    preprocess: Preprocess
    augmenter: Augmenter | None = None
    stain: object | None = None  # a fitted histolens.stain.StainNormalizer
    seed: int = 42
    device: torch.device = torch.device("cpu")

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32) / 255.0
        if self.stain is not None:
            x, _ = self.stain(x)
        return x

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x

    def eval_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What the Predictor feeds the model: stain normalisation, then mean/std."""
        return self._finish(self._to_float(images))

    def train_inputs(self, images: torch.Tensor, keys: Sequence[str], view: int) -> torch.Tensor:
        """Augmented view ``view`` of each image; image ``k`` draws from view_generator(seed, k, view)."""
        x = self._to_float(images)
        if self.augmenter is not None and self.augmenter.active:
            gens = [view_generator(self.seed, k, view) for k in keys]
            x = self.augmenter(x, gens)
        return self._finish(x)


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
        bank: ImageBank,
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
        cache.extend(model, bank, pipeline, clean_paths, view_paths, n_views, batch_size, progress)
        return cache

    @torch.inference_mode()
    def extend(
        self,
        model: torch.nn.Module,
        bank: ImageBank,
        pipeline: InputPipeline,
        clean_paths: Sequence[str],
        view_paths: Sequence[str],
        n_views: int,
        batch_size: int = 32,
        progress: bool = True,
    ) -> None:
        """Compute features only for the images (and views) not cached yet."""
        model.eval()
        clean_todo = [p for p in dict.fromkeys(clean_paths) if p in bank and p not in self.clean]
        view_todo = [p for p in dict.fromkeys(view_paths) if p in bank and p not in self.views]
        total = len(clean_todo) + len(view_todo) * n_views
        if not total:
            return
        new_views: dict[str, list[torch.Tensor]] = {p: [] for p in view_todo}
        with _progress(total, "Backbone features", progress) as bar:
            done = _ThroughputEstimate(total, bar, progress)
            for i in range(0, len(clean_todo), batch_size):
                chunk = clean_todo[i : i + batch_size]
                feats = model.features(pipeline.eval_inputs(bank.stack(chunk))).float().cpu()
                self.clean.update(zip(chunk, feats, strict=True))
                done(len(chunk))
            for v in range(n_views):
                for i in range(0, len(view_todo), batch_size):
                    chunk = view_todo[i : i + batch_size]
                    x = pipeline.train_inputs(bank.stack(chunk), chunk, v)
                    feats = model.features(x).float().cpu()
                    for p, f in zip(chunk, feats, strict=True):
                        new_views[p].append(f)
                    done(len(chunk))
        self.views.update({p: torch.stack(v) for p, v in new_views.items()})

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
