"""Label smoothing, MixUp and CutMix for the MLP head's training loss: pure functions on tensors.

MixUp (Zhang et al., 2018) blends each sample with another of the batch, CutMix (Yun et al.,
2019) pastes a box of another image into it; either way the targets blend by the same share.
Every random number of a batch is drawn from :func:`batch_generator`, so a resumed run mixes
its batches exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "Mixed",
    "batch_generator",
    "mix_batch",
    "mix_labelled_batch",
    "soft_target_loss",
    "soft_targets",
]


class Mixed(NamedTuple):
    """A mixed batch: sample ``i`` keeps the share ``lam`` of itself and takes ``1 - lam`` of
    sample ``perm[i]``; ``box`` (top, bottom, left, right) is CutMix's pasted box, else None."""

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor | None
    lam: float
    perm: torch.Tensor
    box: tuple[int, int, int, int] | None


def batch_generator(seed: int, epoch: int, batch_idx: int) -> torch.Generator:
    """The generator of one training batch's mixing: the same for the same run, epoch and batch."""
    digest = zlib.crc32(f"mix:{seed}:{epoch}:{batch_idx}".encode())
    return torch.Generator().manual_seed(digest)


def soft_targets(y: torch.Tensor, n_outputs: int, smoothing: float = 0.0) -> torch.Tensor:
    """Class labels as smoothed probability targets for a head of ``n_outputs`` logits.

    One output (a sigmoid head): the probability of class 1, ``y * (1 - s) + s / 2``, shape (B,).
    Several: one-hot rows moved towards uniform, ``(1 - s) * onehot + s / C``, shape (B, C), the
    targets ``F.cross_entropy(..., label_smoothing=s)`` uses.
    """
    if n_outputs == 1:
        return y.float() * (1 - smoothing) + smoothing / 2
    return F.one_hot(y.long(), n_outputs).float() * (1 - smoothing) + smoothing / n_outputs


def soft_target_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy against probability targets, each class's share weighted by its class
    weight: for a one-logit head ``-(w1 t log p + w0 (1 - t) log(1 - p))``, the binary form of
    ``F.cross_entropy(logits, targets, weight=class_weights)`` used for several logits. A mixed
    pair of classes is thus pulled towards the rarer class, as the two unmixed samples would be.
    ``sample_weights`` (one-logit head, no class weights) multiply each sample's loss instead."""
    if logits.shape[1] > 1:
        return F.cross_entropy(logits, targets, weight=class_weights)
    z = logits[:, 0]
    if class_weights is None:
        return F.binary_cross_entropy_with_logits(z, targets, weight=sample_weights)
    w0, w1 = class_weights[0], class_weights[1]
    return -(w1 * targets * F.logsigmoid(z) + w0 * (1 - targets) * F.logsigmoid(-z)).mean()


def mix_batch(
    x: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None,
    mixup: float,
    cutmix: float,
    generator: torch.Generator,
) -> Mixed | None:
    """MixUp or CutMix of one batch (each with probability 0.5 when both are on), or None when
    neither is on or the batch has one sample.

    ``mixup`` and ``cutmix`` are the Beta(alpha, alpha) concentrations of the share ``lam``
    (0: off). MixUp blends ``x`` of any shape (images or pooled features); CutMix needs images
    (B, C, H, W) and corrects ``lam`` to the area the box really covers once clipped to the image.
    ``targets`` (probabilities) and per-sample ``weights`` blend by ``lam`` too.
    """
    if len(x) < 2 or not (mixup > 0 or cutmix > 0):
        return None
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(1, generator=generator).item() < 0.5)
    lam = _beta(cutmix if use_cutmix else mixup, generator)
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    box = None
    if use_cutmix:
        if x.dim() != 4:
            raise ValueError(f"CutMix needs images (B, C, H, W), got shape {tuple(x.shape)}.")
        box, lam = _cutmix_box(x.shape[-2], x.shape[-1], lam, generator)
        top, bottom, left, right = box
        mixed = x.clone()
        mixed[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
    else:
        mixed = lam * x + (1 - lam) * x[perm]
    perm_t = perm.to(targets.device)
    targets = lam * targets + (1 - lam) * targets[perm_t]
    if weights is not None:
        weights = lam * weights + (1 - lam) * weights[perm_t]
    return Mixed(mixed, targets, weights, float(lam), perm, box)


def mix_labelled_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    n_outputs: int,
    smoothing: float,
    mixup: float,
    cutmix: float,
    generator: torch.Generator,
) -> Mixed | None:
    """:func:`mix_batch` of a labelled batch: the labels become smoothed probability targets,
    mixed with the inputs. Class weights stay per class: :func:`soft_target_loss` weights each
    class's share of a mixed target."""
    if len(x) < 2 or not (mixup > 0 or cutmix > 0):
        return None
    targets = soft_targets(y, n_outputs, smoothing)
    return mix_batch(x, targets, None, mixup, cutmix, generator)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha), by its inverse CDF of a uniform from ``generator``
    (torch's own Beta sampler cannot take a generator)."""
    from scipy.special import betaincinv

    u = torch.rand(1, generator=generator, dtype=torch.float64).item()
    return float(betaincinv(alpha, alpha, u))


def _cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator
) -> tuple[tuple[int, int, int, int], float]:
    """CutMix's box and corrected ``lam``, with timm's geometry (``timm.data.mixup.rand_bbox``:
    sides ``sqrt(1 - lam)`` of the image's, centre uniform, clipped to the image), but the
    centre drawn from ``generator`` (timm draws it from NumPy's global random state)."""
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, (1,), generator=generator))
    cx = int(torch.randint(width, (1,), generator=generator))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    area = (bottom - top) * (right - left)
    return (top, bottom, left, right), 1 - area / (height * width)
