"""Adapting batch-norm statistics to a new cohort (AdaBN, Li et al. 2016), for images from a new lab.

A frozen backbone normalises each layer with the running mean and variance of ImageNet. Images
from another scanner or stain protocol shift those statistics; AdaBN re-estimates them on the new
cohort's own unlabelled images, so that every layer sees inputs on the scale it was trained on.
No label is used and no weight changes: only the BatchNorm buffers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from histolens.errors import DataError

__all__ = ["MIN_ADAPT_IMAGES", "adapt_batchnorm", "batchnorm_layers"]

# Below this many images the re-estimated variances are noisier than ImageNet's are wrong.
MIN_ADAPT_IMAGES = 16


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``model`` that keeps running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace the running statistics of every BatchNorm in ``model`` by those of ``batches``.

    ``batches`` are model inputs (already preprocessed) of the new cohort. Statistics are the
    exact average over all batches (momentum None), not an exponential one, so the batch order
    does not matter. Returns the number of images used; the model is left in eval mode.

    Raises:
        DataError: the model has no BatchNorm layer, or fewer than MIN_ADAPT_IMAGES images came.
    """
    layers = batchnorm_layers(getattr(model, "backbone", model))  # a trained head stays as fitted
    if not layers:
        raise DataError("This model has no batch-norm layer to adapt (AdaBN needs one).")
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over all batches
    model.eval()
    for m in layers:
        m.train()
    n = 0
    try:
        for x in batches:
            if x.shape[0] < 2:  # BatchNorm cannot estimate a variance from one sample
                continue
            model(x)
            n += x.shape[0]
    finally:
        for m, (momentum, _, _) in zip(layers, saved, strict=True):
            m.momentum = momentum
        model.eval()
    if n < MIN_ADAPT_IMAGES:
        for m, (_, mean, var) in zip(layers, saved, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        raise DataError(
            f"Adapting batch-norm statistics needs at least {MIN_ADAPT_IMAGES} readable images of "
            f"the new cohort; got {n}."
        )
    return n
