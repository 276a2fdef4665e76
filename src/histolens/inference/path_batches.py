"""Image files into model-ready batches: decoding and resizing in a thread pool, skipping the
unreadable ones with their reasons, and stacking per-batch logits.

``Predictor.load_input``, ``iter_batches``, ``assess_paths`` and ``logits_for_paths`` are thin
methods over these functions, which need only the checkpoint's ``Preprocess``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from histolens.data.imageio import load_rgb
from histolens.data.records import Skipped
from histolens.errors import ImageLoadError
from histolens.models.transforms import Preprocess

__all__ = ["iter_image_batches", "load_input", "stack_logits"]


def load_input(preprocess: Preprocess, path: str | os.PathLike) -> torch.Tensor | Skipped:
    """One image file -> resized uint8 tensor (3, H, W), or Skipped with the reason."""
    try:
        return preprocess.resize(load_rgb(path))
    except ImageLoadError as exc:
        return Skipped(str(path), exc.reason)


def iter_image_batches(
    load: Callable[[str], torch.Tensor | Skipped],
    paths: Sequence[str | os.PathLike],
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    workers: int = 2,
) -> Iterable[tuple[list[str], torch.Tensor | None, list[Skipped]]]:
    """Load images with ``load`` in a thread pool; yield (paths, uint8 batch, skipped) batches."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i in range(0, len(paths), batch_size):
            chunk = [str(p) for p in paths[i : i + batch_size]]
            results = list(pool.map(load, chunk))
            ok = [
                (p, r) for p, r in zip(chunk, results, strict=True) if isinstance(r, torch.Tensor)
            ]
            skipped = [r for r in results if isinstance(r, Skipped)]
            batch = torch.stack([r for _, r in ok]) if ok else None
            yield [p for p, _ in ok], batch, skipped
            if progress:
                progress(len(chunk))


def stack_logits(chunks: Sequence[torch.Tensor], n_classes: int) -> torch.Tensor:
    """Per-batch logits as one tensor; when no image was readable, an empty one of the head's
    width (one logit for two classes, else one per class)."""
    if chunks:
        return torch.cat(list(chunks))
    return torch.zeros(0, 1 if n_classes == 2 else n_classes)
