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

from histolens.checkpoint.io import CheckpointMetadata, HeadSpec, TrainingData, save_checkpoint
from histolens.data.records import BINARY_CLASSES
from histolens.inference.ood import OODGuard
from histolens.models.backbones import get_backbone_spec
from histolens.models.classifier import build_model
from histolens.models.transforms import resolve_preprocess
from histolens.stats.conformal import ConformalCalibration

__all__ = [
    "flat_calibration",
    "make_checkpoint",
    "make_tissue_image",
    "plain_onnx",
    "unverified_onnx_export",
    "stratified_calibration",
    "tiny_config",
]


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
    conformal: ConformalCalibration | None = None,
    guard: OODGuard | None = None,
    pretrained: str = "none",
    input_size: tuple[int, int] | None = None,
) -> Path:
    """A checkpoint of a randomly initialised model (timm's tiny ``test_*`` nets by default),
    with a conformal calibration and an out-of-distribution guard if given (as training stores
    them), so that front ends can show prediction sets and flags without training.
    ``pretrained`` gives the backbone its offline weights (a feature extractor for benchmarks)
    and ``input_size`` the model input, instead of the backbone's own."""
    torch.manual_seed(seed)
    spec = get_backbone_spec(backbone)
    model = build_model(spec, len(class_names), pretrained)
    # Random BatchNorm statistics make outputs depend on the input, as a trained head would.
    with torch.no_grad():
        for m in model.head.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    meta = CheckpointMetadata(
        backbone=spec.name,
        class_names=tuple(class_names),
        preprocess=resolve_preprocess(model.backbone, input_size),
        task="binary" if len(class_names) == 2 else "subtype",
        head=HeadSpec(),
        model_id=f"test-{backbone}",
        timm_name=spec.timm_name,
        licence=licence if licence is not None else spec.licence,
        pretrained=pretrained,
        stain=stain,
        threshold=threshold,
        temperature=temperature,
        metrics=metrics or {},
        data=TrainingData(path="synthetic", layout="test fixture"),
        conformal=conformal.to_dict() if conformal is not None else None,
        ood=guard.to_dict() if guard is not None else None,
    )
    state = {**model.state_dict(), **(guard.state_dict() if guard is not None else {})}
    return save_checkpoint(path, state, meta)


def flat_calibration(
    score: float,
    classes: Sequence[str] = BINARY_CLASSES,
    n_patients: int = 20,
    alpha: float = 0.1,
) -> ConformalCalibration:
    """A conformal calibration whose every score is ``score`` (one image per patient).

    At any alpha from 1 / (``n_patients`` + 1) the quantile is ``score``: a class joins an
    image's set when its (threshold-centred) probability is at least 1 - ``score``. So 0.99
    refers nearly every image and 0.01 none, whatever an untrained model answers.
    """
    n = int(n_patients)
    labels = np.arange(n) % len(classes)
    return ConformalCalibration(
        np.full(n, float(score)), labels, np.arange(n), tuple(classes), alpha
    )


def stratified_calibration(
    hard: str = "100", easy: str = "200", n_patients: int = 20, alpha: float = 0.1
) -> ConformalCalibration:
    """A per-magnification calibration on which ``hard``-X patients were hard (every score
    0.99: both classes stay in an image's set) and ``easy``-X patients easy (0.01: an image's
    set is its label), ``n_patients`` of each; an unknown magnification gets the hard one's."""
    n = int(n_patients)
    return ConformalCalibration(
        np.r_[np.full(n, 0.99), np.full(n, 0.01)],
        np.arange(2 * n) % 2,
        np.arange(2 * n),
        BINARY_CLASSES,
        alpha,
        strata=np.array([hard] * n + [easy] * n, dtype=object),
    )


def plain_onnx(path: str | os.PathLike) -> Path:
    """A valid ONNX model that is not a histolens export (one Identity node), at ``path``."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(path))
    return Path(path)


def unverified_onnx_export(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The fp32 ONNX export of ``checkpoint`` at ``out``, with its histolens metadata but without
    ``export_onnx``'s verification (seconds instead of minutes); the traced graph is written
    next to it as ``graph.onnx``."""
    from dataclasses import replace

    import onnx

    from histolens.checkpoint.io import load_checkpoint
    from histolens.export.onnx import attach_metadata, trace_onnx
    from histolens.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint)
    graph = Path(out).with_name("graph.onnx")
    trace_onnx(predictor.model, predictor.preprocess.input_size, graph)
    _, meta = load_checkpoint(checkpoint)
    meta = replace(meta, export={"format": "onnx", "quantization": "none"})
    onnx.save(attach_metadata(graph, meta, {}), str(out))
    return Path(out)


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
