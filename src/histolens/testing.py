"""Small, fast fixtures for histolens's own tests and for users' tests of their integrations.

``make_checkpoint`` writes a real (untrained, tiny-backbone) checkpoint in well under a second,
so front ends and explainers can be tested without training or downloads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histolens.backbones import get_backbone_spec
from histolens.checkpoint import save_checkpoint
from histolens.data import BINARY_CLASSES
from histolens.model import build_model
from histolens.transforms import resolve_preprocess

__all__ = ["make_checkpoint", "make_tissue_image", "tiny_config"]


def make_checkpoint(
    path: str | os.PathLike,
    backbone: str = "test_resnet",
    class_names: Sequence[str] = BINARY_CLASSES,
    threshold: float = 0.5,
    temperature: float = 1.0,
    stain: dict | None = None,
    seed: int = 0,
    metrics: dict | None = None,
    licence: str | None = None,
) -> Path:
    """A checkpoint of a randomly initialised model (timm's tiny ``test_*`` nets by default)."""
    torch.manual_seed(seed)
    spec = get_backbone_spec(backbone)
    model = build_model(spec, len(class_names), "none")
    # Random BatchNorm statistics make outputs depend on the input, as a trained head would.
    with torch.no_grad():
        for m in model.head.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    preprocess = resolve_preprocess(model.backbone)
    meta = {
        "model_id": f"test-{backbone}",
        "backbone": spec.name,
        "timm_name": spec.timm_name,
        "licence": licence if licence is not None else spec.licence,
        "pretrained": "none",
        "task": "binary"
        if tuple(class_names) == BINARY_CLASSES or len(class_names) == 2
        else "subtype",
        "class_names": list(class_names),
        "head": {"dims": [512, 256], "dropouts": [0.5, 0.3]},
        "preprocess": preprocess.to_dict(),
        "stain": stain,
        "magnification": "all",
        "threshold": threshold,
        "temperature": temperature,
        "metrics": metrics or {},
        "data": {"path": "synthetic", "layout": "test fixture"},
    }
    return save_checkpoint(path, model, meta)


def make_tissue_image(
    size: tuple[int, int] = (96, 64), seed: int = 0, dark: bool = False
) -> Image.Image:
    """A small H&E-coloured RGB image (pink stroma, purple blobs) for tests."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    conc_h = np.zeros((h, w))
    for _ in range(12 if dark else 5):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 8)
        conc_h += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2)) * (1.6 if dark else 0.9)
    conc_e = 0.35 + 0.1 * rng.random((h, w))
    v_h = np.array([0.65, 0.70, 0.29])
    v_e = np.array([0.07, 0.99, 0.11])
    od = conc_h[..., None] * v_h + conc_e[..., None] * v_e
    rgb = np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def tiny_config(data: str | os.PathLike, **overrides):
    """A training config that runs in seconds: tiny timm backbone, random init, 2 epochs of the
    MLP head on one held-out split (override ``model.head``/``train.cv_folds`` for the probe)."""
    from histolens.config import RunConfig

    base = {
        "data.path": str(data),
        "data.val_fraction": 0.25,
        "data.test_fraction": 0.25,
        "model.backbone": "test_resnet",
        "model.pretrained": "none",
        # The Lightning path (MLP head, one held-out split) at the backbone's own input size;
        # tests of the default linear probe override these three.
        "model.head": "mlp",
        "model.input_size": None,
        "train.cv_folds": 0,
        "stain.method": "none",
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.cache_views": 2,
        "train.lr": 0.01,
    }
    base.update(overrides)
    return RunConfig().override(base)
