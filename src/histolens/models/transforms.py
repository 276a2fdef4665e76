"""Preprocessing resolved from the backbone's pretrained config, and batched augmentation.

Images are resized (whole field of view, no crop) to the backbone's input size as uint8 tensors;
everything after that (augmentation, stain normalisation, mean/std) runs on batches.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from histolens.config import AugmentConfig

__all__ = [
    "Augmenter",
    "Preprocess",
    "resolve_preprocess",
    "view_generator",
]

_PIL_INTERPOLATION = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class Preprocess:
    """Input size, interpolation and normalisation a backbone's weights expect."""

    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(
            tuple(d["input_size"]),
            tuple(d["mean"]),
            tuple(d["std"]),
            d.get("interpolation", "bicubic"),
        )

    def resize(self, img: Image.Image | np.ndarray) -> torch.Tensor:
        """PIL image, or (H, W, 3) uint8 RGB array -> uint8 tensor (3, H, W) at the model's input
        size. An array already at that size only changes layout (Pillow's resize to the same size
        is a copy): one copy, no image object."""
        h, w = self.input_size
        if isinstance(img, np.ndarray):
            if img.shape[:2] == (h, w):
                return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
            img = Image.fromarray(img)
        resample = _PIL_INTERPOLATION.get(self.interpolation, Image.Resampling.BICUBIC)
        # Reduce huge images cheaply first; the final resample keeps the requested filter.
        if img.width > 4 * w and img.height > 4 * h:
            img = img.reduce(max(1, min(img.width // (2 * w), img.height // (2 * h))))
        arr = np.asarray(img.convert("RGB").resize((w, h), resample), dtype=np.uint8)
        # Channels-first and contiguous here, in the decoding thread: stacking a batch of
        # permuted (strided) views costs the main thread a strided copy per batch.
        return torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C"))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """Float batch in [0, 1] (B, 3, H, W) -> model input."""
        mean = torch.tensor(self.mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1)
        # (batch - mean) / std, dividing the difference in place: one batch-sized copy, not two.
        return (batch - mean).div_(std)


def resolve_preprocess(
    backbone: torch.nn.Module, input_size: Sequence[int] | None = None
) -> Preprocess:
    """Read mean, std, input size and interpolation from the timm model's pretrained config.

    ``input_size`` (height, width) replaces the pretrained input size: a convolutional backbone
    with global pooling takes any size, and a larger input keeps more of the tissue's detail.
    """
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(backbone)
    _, h, w = cfg["input_size"]
    if input_size is not None:
        h, w = input_size
    return Preprocess(
        (int(h), int(w)),
        tuple(float(m) for m in cfg["mean"]),
        tuple(float(s) for s in cfg["std"]),
        str(cfg.get("interpolation", "bicubic")),
    )


def view_generator(seed: int, key: str, view: int) -> torch.Generator:
    """The generator for augmented view ``view`` of the image ``key``: the same in any order.

    Drawing every random number of an augmentation from here is what makes the feature cache
    see exactly the views that live (uncached) training would see.
    """
    digest = zlib.crc32(f"{seed}:{key}:{view}".encode())
    return torch.Generator().manual_seed(digest)


class Augmenter:
    """Keras ImageDataGenerator-style affine augmentation on batches, plus optional HED jitter.

    Rotation, shift, shear, per-axis zoom and flips become one affine grid per image, sampled
    with ``grid_sample``; 'nearest' fill replicates the edge pixels as Keras does.
    """

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config
        self._stain = None
        if config.stain:
            from histolens.stain.augment import StainAugmenter

            self._stain = StainAugmenter(config.stain_sigma, config.stain_bias)

    @property
    def active(self) -> bool:
        return self.config.enabled or self._stain is not None

    def _matrix(self, g: torch.Generator) -> torch.Tensor:
        c = self.config

        def uniform(lo: float, hi: float) -> float:
            return float(lo + (hi - lo) * torch.rand((), generator=g))

        theta = math.radians(uniform(-c.rotation, c.rotation))
        tx, ty = uniform(-c.shift, c.shift) * 2, uniform(-c.shift, c.shift) * 2
        shear = math.radians(uniform(-c.shear, c.shear))
        zx, zy = uniform(1 - c.zoom, 1 + c.zoom), uniform(1 - c.zoom, 1 + c.zoom)
        fx = -1.0 if c.hflip and torch.rand((), generator=g) < 0.5 else 1.0
        fy = -1.0 if c.vflip and torch.rand((), generator=g) < 0.5 else 1.0
        rot = torch.tensor(
            [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
        )
        sh = torch.tensor([[1.0, -math.sin(shear)], [0.0, math.cos(shear)]])
        zoom = torch.tensor([[zx, 0.0], [0.0, zy]])
        flip = torch.tensor([[fx, 0.0], [0.0, fy]])
        a = rot @ sh @ zoom @ flip
        return torch.cat([a, torch.tensor([[tx], [ty]])], dim=1)

    def __call__(self, batch: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Augment a float batch in [0, 1]; image i draws its randomness from ``generators[i]``."""
        out = batch
        if self.config.enabled:
            theta = torch.stack([self._matrix(g) for g in generators]).to(batch)
            # The matrix is drawn in pixels (as Keras does); affine_grid works in coordinates
            # normalised per axis, so a non-square image needs the aspect ratio in the
            # off-diagonal terms, or a rotation would also stretch it.
            h, w = batch.shape[-2:]
            theta[:, 0, 1] *= h / w
            theta[:, 1, 0] *= w / h
            grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
            padding = {"nearest": "border", "reflect": "reflection", "constant": "zeros"}
            out = F.grid_sample(
                batch,
                grid,
                mode="bilinear",
                padding_mode=padding[self.config.fill],
                align_corners=False,
            )
        if self._stain is not None:
            out = torch.cat([self._stain(out[i : i + 1], generators[i]) for i in range(len(out))])
        return out.clamp(0, 1)
