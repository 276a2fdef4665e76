"""Tile reading for DataLoader workers, and scoring tile batches through the Predictor.

An OpenSlide handle cannot be pickled, so :class:`TileDataset` carries only the slide's path and
opens it lazily, once in each DataLoader worker (or once in the main process without workers).
Scoring goes through the same :class:`~histolens.inference.predictor.Predictor` steps as ``histolens
predict``: its resize, stain normalisation and normalisation (``to_input``), the model or ONNX
export, temperature, threshold, prediction sets and the out-of-distribution guard.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from histolens.models.transforms import Preprocess
from histolens.slides.memory import model_chunk
from histolens.slides.reader import SlideReader, open_slide

__all__ = ["BatchScores", "StageTimes", "TileDataset", "score_batch"]


class TileDataset(Dataset):
    """Tiles of one slide as resized uint8 tensors (3, H, W) in the model's input size.

    Args:
        path: the slide; opened on first use in each process.
        mpp: the slide's level-0 microns per pixel as resolved by the main process.
        coords: level-0 top-left corners (N, 2).
        size: level-0 tile (width, height).
        preprocess: the checkpoint's preprocessing (its ``resize`` is the one ``predict`` uses).
    """

    def __init__(
        self,
        path: Path,
        mpp: float,
        coords: np.ndarray,
        size: tuple[int, int],
        preprocess: Preprocess,
    ) -> None:
        self.path = Path(path)
        self.mpp = mpp
        self.coords = np.asarray(coords, np.int64)
        self.size = size
        self.preprocess = preprocess
        self.downsample = size[0] / preprocess.input_size[1]
        self._reader: SlideReader | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._reader is None:
            self._reader = open_slide(self.path, self.mpp)
        x, y = (int(v) for v in self.coords[i])
        return self.preprocess.resize(
            self._reader.read_field_rgb(x, y, *self.size, self.downsample)
        )

    def __getstate__(self) -> dict:
        # Workers get the recipe, never an open handle.
        return {**self.__dict__, "_reader": None}

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``n`` for the block (None: left as it is), then
    restored."""
    before = torch.get_num_threads()
    if n is None or before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class StageTimes:
    """Seconds spent waiting for tiles, stain-normalising, and in the model (main process)."""

    reading: float = 0.0
    stain: float = 0.0
    inference: float = 0.0

    def add(self, other: StageTimes) -> None:
        self.reading += other.reading
        self.stain += other.stain
        self.inference += other.inference


@dataclass
class BatchScores:
    """One batch's class probabilities (B, C), OOD flags, referral flags and pooled features."""

    probabilities: np.ndarray
    ood: np.ndarray
    refer: np.ndarray
    features: np.ndarray | None = field(default=None, repr=False)


def score_batch(
    predictor,
    batch: torch.Tensor,
    times: StageTimes | None = None,
    magnification: int | None = None,
    single_threaded_input: bool = False,
) -> BatchScores:
    """Score a uint8 tile batch (B, 3, H, W) exactly as ``Predictor.predict_batch`` does, as
    images of ``magnification`` (its threshold and prediction sets; None: unknown), keeping the
    pooled features (for --save-features) and timing stain normalisation and the model.

    ``single_threaded_input``: compute the model input (uint8 -> float, stain normalisation,
    mean/std) on one PyTorch thread. While reading workers share the CPU, a multi-threaded
    elementwise step waits at its end for whichever thread a worker preempted; one thread does
    not wait (the slide benchmark's share of this step fell from 12-14% to 5%, OpenVINO's
    tiles/s rose 5-8%). The same operations on one thread give the same numbers.
    """
    t0 = time.perf_counter()
    with _torch_threads(1 if single_threaded_input else None):
        inputs = predictor.to_input(batch)
    t1 = time.perf_counter()
    chunk = model_chunk(predictor)
    if chunk is None or len(inputs) <= chunk:
        logits, features = predictor.logits_and_features(inputs)
    else:  # a few tiles at a time keep ONNX Runtime's arena small (histolens.slides.memory)
        parts = [predictor.logits_and_features(part) for part in inputs.split(chunk)]
        logits = torch.cat([p[0] for p in parts])
        features = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    probs = predictor.probabilities(logits)
    reasons: list[str | None] = [None] * len(probs)
    if predictor.guard is not None:
        h, w = predictor.preprocess.input_size
        reasons = predictor.guard.reasons(
            batch, [(w, h)] * len(probs), predictor.preprocess.input_size, features
        )
    preds = predictor.decide_batch(
        probs, ood_reasons=reasons, magnifications=[magnification] * len(probs)
    )
    t2 = time.perf_counter()
    if times is not None:
        times.stain += t1 - t0
        times.inference += t2 - t1
    feats = torch.as_tensor(features).float().cpu().numpy() if features is not None else None
    return BatchScores(
        np.asarray(probs, np.float32),
        np.array([p.ood for p in preds], bool),
        np.array([bool(p.refer) for p in preds], bool),
        feats,
    )
