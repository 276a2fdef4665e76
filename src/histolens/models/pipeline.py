"""From image files to model inputs.

An image source gives decoded, resized uint8 batches: ``ImageStream`` reads them from disk as
they are needed (a run's memory then does not grow with its dataset), ``ImageBank`` keeps them
all in memory (for cross-validation folds that read the same images again and again).
``InputPipeline`` turns uint8 batches into model inputs (stain normalisation, seeded
augmentation, mean/std) exactly as the Predictor does. The frozen backbone's features are kept
by ``histolens.models.feature_cache.FeatureCache``.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from histolens.data.imageio import load_rgb
from histolens.data.records import Skipped
from histolens.errors import ImageLoadError
from histolens.models.transforms import Augmenter, Preprocess, view_generator

__all__ = ["ImageBank", "ImageSource", "ImageStream", "InputPipeline"]


def _progress(total: int, desc: str, enabled: bool):
    from histolens.progress import progress_bar

    return progress_bar(total, desc, "img", enabled=enabled, leave=False)


def _decoder_threads() -> int:
    # Decoding and resizing release the GIL; the backbone wants the remaining cores.
    return max(2, min(4, (os.cpu_count() or 2) // 2))


def _decode(preprocess: Preprocess, path: str) -> torch.Tensor | Skipped:
    try:
        return preprocess.resize(load_rgb(path))
    except ImageLoadError as exc:
        return Skipped(path, exc.reason)


class ImageSource(Protocol):
    """Decoded, resized uint8 images (3, H, W) by path; unreadable files listed in ``skipped``."""

    preprocess: Preprocess
    skipped: list[Skipped]

    def __contains__(self, path: object) -> bool:
        """False for a file known to be unreadable."""
        ...

    def image(self, path: str) -> torch.Tensor: ...

    def stack(self, paths: Sequence[str]) -> torch.Tensor: ...

    def each(self, paths: Sequence[str]) -> list[torch.Tensor]:
        """The readable images of ``paths``, one tensor each, as decoded."""
        ...

    def batches(
        self, paths: Sequence[str], batch_size: int
    ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(readable paths, their images stacked) of consecutive chunks of ``paths``."""
        ...

    def add_skipped(self, skipped: Iterable[Skipped]) -> None: ...


class ImageStream:
    """Images read from disk when asked for, never kept: memory is bounded by a few batches.

    ``batches`` decodes the next batches in threads while the caller works on the current one.
    A file that fails to decode is listed in ``skipped`` and is no longer ``in`` the stream.
    """

    def __init__(self, preprocess: Preprocess, workers: int | None = None) -> None:
        self.preprocess = preprocess
        self.workers = workers or _decoder_threads()
        self.skipped: list[Skipped] = []
        self._unreadable: set[str] = set()
        self._held: dict[str, torch.Tensor] = {}

    def hold(self, images: dict[str, torch.Tensor]) -> None:
        """Keep these decoded images (by path) until their next pass through ``batches`` or
        ``each``, which takes them instead of decoding the files again; ``hold({})`` drops
        the images still held. Used for the few images a run decodes before its feature pass
        (the stain reference's)."""
        self._held = dict(images)

    def __contains__(self, path: object) -> bool:
        return path not in self._unreadable

    def add_skipped(self, skipped: Iterable[Skipped]) -> None:
        for s in skipped:
            if s.path not in self._unreadable:
                self._unreadable.add(s.path)
                self.skipped.append(s)

    def image(self, path: str) -> torch.Tensor:
        """One decoded image; raises ImageLoadError for an unreadable file."""
        return self.preprocess.resize(load_rgb(path))

    def stack(self, paths: Sequence[str]) -> torch.Tensor:
        """The images of ``paths`` (all readable, else ImageLoadError), decoded in threads."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return torch.stack(list(pool.map(self.image, paths)))

    def each(self, paths: Sequence[str]) -> list[torch.Tensor]:
        return [im for _, kept, decoded in self._chunks(paths, 32) for im in decoded]

    def batches(
        self, paths: Sequence[str], batch_size: int
    ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(readable paths, images) per chunk of ``paths``, the next chunks decoding meanwhile."""
        for _, kept, decoded in self._chunks(paths, batch_size):
            if kept:
                yield kept, torch.stack(decoded)

    def _chunks(
        self, paths: Sequence[str], batch_size: int, ahead: int = 2
    ) -> Iterator[tuple[list[str], list[str], list[torch.Tensor]]]:
        """(chunk, its readable paths, their images) for every chunk of ``paths``."""
        paths = list(paths)
        starts = iter(range(0, len(paths), batch_size))
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            window: deque[tuple[list[str], list[Future]]] = deque()

            def submit_next() -> None:
                i = next(starts, None)
                if i is not None:
                    chunk = paths[i : i + batch_size]
                    futures = [self._held_or_decode(pool, p) for p in chunk]
                    window.append((chunk, futures))

            for _ in range(ahead):
                submit_next()
            while window:
                chunk, futures = window.popleft()
                submit_next()
                results = [f.result() for f in futures]
                self.add_skipped(r for r in results if isinstance(r, Skipped))
                kept = [(p, r) for p, r in zip(chunk, results, strict=True) if torch.is_tensor(r)]
                yield chunk, [p for p, _ in kept], [r for _, r in kept]

    def _held_or_decode(self, pool: ThreadPoolExecutor, path: str) -> Future:
        held = self._held.pop(path, None)
        if held is None:
            return pool.submit(_decode, self.preprocess, path)
        done: Future = Future()
        done.set_result(held)
        return done

    def check(self, paths: Sequence[str], progress: bool = False) -> None:
        """Decode every image once (and drop it) to list the unreadable ones in ``skipped``."""
        with _progress(len(paths), "Checking images", progress) as bar:
            for chunk, _, _ in self._chunks(paths, 32):
                bar.update(len(chunk))


class ImageBank:
    """Decoded, resized uint8 images kept in memory, keyed by path; unreadable files skipped."""

    def __init__(
        self,
        paths: Sequence[str],
        preprocess: Preprocess,
        progress: bool = True,
        workers: int | None = None,
    ) -> None:
        self.preprocess = preprocess
        self.images: dict[str, torch.Tensor] = {}
        stream = ImageStream(preprocess, workers)
        unique = list(dict.fromkeys(str(p) for p in paths))
        with _progress(len(unique), "Reading images", progress) as bar:
            for chunk, kept, decoded in stream._chunks(unique, 32):
                self.images.update(zip(kept, decoded, strict=True))
                bar.update(len(chunk))
        self.skipped: list[Skipped] = stream.skipped

    def __contains__(self, path: object) -> bool:
        return path in self.images

    def add_skipped(self, skipped: Iterable[Skipped]) -> None:
        known = {s.path for s in self.skipped}
        self.skipped += [s for s in skipped if s.path not in known and s.path not in self.images]

    def image(self, path: str) -> torch.Tensor:
        return self.images[path]

    def stack(self, paths: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.images[p] for p in paths])

    def each(self, paths: Sequence[str]) -> list[torch.Tensor]:
        return [self.images[p] for p in paths if p in self.images]

    def batches(
        self, paths: Sequence[str], batch_size: int
    ) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(paths held, their images) per chunk of ``paths``; paths not held are left out."""
        for i in range(0, len(paths), batch_size):
            chunk = [p for p in paths[i : i + batch_size] if p in self.images]
            if chunk:
                yield chunk, self.stack(chunk)


def image_source(bank: ImageBank | None, preprocess: Preprocess) -> ImageSource:
    """``bank`` when it holds images preprocessed as ``preprocess``, else a stream from disk."""
    if bank is not None and bank.preprocess == preprocess:
        return bank
    return ImageStream(preprocess)


@dataclass
class InputPipeline:
    """uint8 batch -> model input; the training side adds seeded augmentation per (image, view)."""

    preprocess: Preprocess
    augmenter: Augmenter | None = None
    stain: object | None = None  # a fitted histolens.stain.normalize.StainNormalizer
    seed: int = 42
    device: torch.device = torch.device("cpu")
    # PyTorch's CPU convolutions want channels-last inputs; an exported engine reads NCHW, so
    # converting for it would cost a copy there and another back.
    channels_last: bool = True

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        # A fresh float copy (copy=True: even a float input), divided in place.
        x = images.to(self.device, torch.float32, copy=True).div_(255.0)
        if self.stain is not None:
            x, _ = self.stain(x, inplace=True)  # x is this call's own tensor
        return x

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        # Preprocess.normalize's (x - mean) / std, over x (this pipeline's own tensor): two
        # batch-sized allocations less, each tens of MB paged in anew once the heap is trimmed.
        mean, std = (
            torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            for v in (self.preprocess.mean, self.preprocess.std)
        )
        x = x.sub_(mean).div_(std)
        if self.channels_last and x.device.type == "cpu":
            return x.contiguous(memory_format=torch.channels_last)
        return x

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
