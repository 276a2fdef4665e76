"""How faithful are the heatmaps? Deletion / insertion AUC, ROAD, pointing game and mask IoU.

Deletion and insertion follow RISE (Petsiuk et al., 2018): pixels are removed from (replaced by
the mean colour) or revealed on (a heavily blurred copy of) the image most important first, and
the area under the explained class's probability curve is reported; lower deletion and higher
insertion are better. ROAD is pytorch-grad-cam's ``ROADCombined`` computation (LeRF minus MoRF
with noisy linear imputation, averaged over percentiles; higher is better). On
synthetic data with lesion masks the pointing game (is the heatmap's maximum inside the lesion?)
and the IoU of the heatmap's top pixels with the lesion (as many pixels as the lesion has) test
localisation. Every metric is also computed for a smooth random heatmap, the bar to beat.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histolens.data.imageio import load_rgb
from histolens.explain._explainer import Explainer
from histolens.explain._methods import get_method
from histolens.explain._render import heatmap_to_size
from histolens.explain._targets import ClassProbability

__all__ = [
    "COLUMNS",
    "FaithfulnessRow",
    "RANDOM",
    "deletion_insertion_auc",
    "evaluate_faithfulness",
    "mask_iou",
    "pointing_game",
    "random_heatmap",
    "road_score",
]

RANDOM = "random"  # the smooth random heatmap every method is compared with
METRICS = ("deletion_auc", "insertion_auc", "road", "pointing_game", "iou")
COLUMNS = ("method", *METRICS, "n", "n_masks")  # of a FaithfulnessRow, in order


@dataclass
class FaithfulnessRow:
    """Mean metrics of one method over the evaluated images (None where not measurable)."""

    method: str
    deletion_auc: float | None
    insertion_auc: float | None
    road: float | None
    pointing_game: float | None
    iou: float | None
    n: int
    n_masks: int

    def as_dict(self) -> dict:
        """The row keyed by ``COLUMNS``, metrics rounded to 4 decimals."""
        row = dict(zip(COLUMNS, astuple(self), strict=True))
        for key in METRICS:
            row[key] = None if row[key] is None else round(float(row[key]), 4)
        return row


def random_heatmap(shape: tuple[int, int], seed: int, grid: int = 7) -> np.ndarray:
    """A smooth random map (a random ``grid`` x ``grid`` field, upsampled) of ``shape`` (H, W).

    Smooth like a CAM, so the comparison is about *where* a map points, not its texture.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.random((grid, grid)).astype(np.float32)
    return heatmap_to_size(coarse, (shape[1], shape[0]))


def _ranked_masks(heatmap: np.ndarray, steps: int, seed: int) -> torch.Tensor:
    """(steps + 1, 1, H, W) masks; mask k is 1 on the top k/steps of pixels by ``heatmap``."""
    h, w = heatmap.shape
    jitter = np.random.default_rng(seed).random(h * w) * 1e-6  # break ties (flat regions)
    order = np.argsort(-(heatmap.ravel().astype(np.float64) + jitter), kind="stable")
    rank = np.empty(h * w, dtype=np.int64)
    rank[order] = np.arange(h * w)
    counts = np.round(np.linspace(0, h * w, steps + 1)).astype(np.int64)
    masks = rank[None, :] < counts[:, None]
    return torch.from_numpy(masks.reshape(steps + 1, 1, h, w).astype(np.float32))


def deletion_insertion_auc(
    model: torch.nn.Module,
    x: torch.Tensor,
    heatmap: np.ndarray,
    score: Callable[[torch.Tensor], torch.Tensor],
    steps: int = 20,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[float, float]:
    """RISE deletion and insertion AUCs of one image ``x`` (1, 3, H, W) for a (H, W) heatmap."""
    from torchvision.transforms.functional import gaussian_blur

    heatmap = heatmap_to_size(heatmap, (x.shape[-1], x.shape[-2]))
    masks = _ranked_masks(heatmap, steps, seed).to(x.device)
    blurred = gaussian_blur(x, kernel_size=[51, 51], sigma=[15.0, 15.0])
    deleted = x * (1 - masks)  # the mean colour is 0 in normalised space
    inserted = blurred * (1 - masks) + x * masks

    def curve(batch: torch.Tensor) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, batch.shape[0], batch_size):
                out.append(score(model(batch[i : i + batch_size].contiguous())).float().cpu())
        return torch.cat(out).numpy()

    dx = 1.0 / steps
    return (float(np.trapezoid(curve(deleted), dx=dx)), float(np.trapezoid(curve(inserted), dx=dx)))


def _fast_imputer():
    """pytorch-grad-cam's NoisyLinearImputer with its equation system built vectorised.

    Same system, same solution; the original fills a ``lil_matrix`` entry by entry, which at
    224 x 224 takes longer than solving it.
    """
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from scipy.sparse import coo_matrix

    class FastNoisyLinearImputer(NoisyLinearImputer):
        @staticmethod
        def setup_sparse_system(mask, img, neighbors_weights):
            h, w = mask.shape
            flat_mask = mask.ravel()
            flat_img = img.reshape(img.shape[0], -1)
            unknown = np.flatnonzero(flat_mask == 0)
            var_index = np.zeros(flat_mask.size, dtype=np.int64)
            var_index[unknown] = np.arange(unknown.size)
            n = unknown.size
            r0, c0 = unknown // w, unknown % w
            rows, cols, vals = [], [], []
            b = np.zeros((n, img.shape[0]))
            diag = np.ones(n)
            for (dr, dc), weight in neighbors_weights:
                rr, cc = r0 + dr, c0 + dc
                inside = (rr >= 0) & (cc >= 0) & (rr < h) & (cc < w)
                diag[~inside] -= weight
                ids = np.flatnonzero(inside)
                nb = rr[inside] * w + cc[inside]
                known = flat_mask[nb] > 0.5
                np.subtract.at(b, ids[known], weight * flat_img[:, nb[known]].T)
                rows.append(ids[~known])
                cols.append(var_index[nb[~known]])
                vals.append(np.full(int((~known).sum()), weight))
            rows.append(np.arange(n))
            cols.append(np.arange(n))
            vals.append(-diag)
            a = coo_matrix(
                (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
            )
            return a.tocsc(), b

    return FastNoisyLinearImputer()


def road_score(
    model: torch.nn.Module,
    x: torch.Tensor,
    heatmap: np.ndarray,
    target,
    percentiles: Sequence[int] = (20, 50, 80),
) -> float:
    """ROAD (pytorch-grad-cam's metric: LeRF minus MoRF, averaged); higher is better."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )

    heatmap = heatmap_to_size(heatmap, (x.shape[-1], x.shape[-2]))[None]
    x = x.contiguous()
    imputer = _fast_imputer()
    scores = []
    for q in percentiles:
        lerf = PerturbationConfidenceMetric(RemoveLeastRelevantFirst(q, imputer))
        morf = PerturbationConfidenceMetric(RemoveMostRelevantFirst(q, imputer))
        scores.append((lerf(x, heatmap, [target], model) - morf(x, heatmap, [target], model)) / 2)
    return float(np.mean(scores))


def _mask_array(mask_path: Path, size: tuple[int, int]) -> np.ndarray:
    mask = Image.open(mask_path).convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return np.asarray(mask) > 127


def pointing_game(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """1.0 when the heatmap's maximum lies inside the lesion mask, else 0.0; NaN when the image
    has no lesion (an empty mask: nothing to point at, so not a miss)."""
    if not mask.any():
        return float("nan")
    return float(mask.ravel()[int(np.argmax(heatmap))])


def mask_iou(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the lesion with the heatmap's top pixels, as many as the lesion has."""
    k = int(mask.sum())
    if k == 0:
        return float("nan")
    top = np.zeros(heatmap.size, dtype=bool)
    top[np.argsort(-heatmap.ravel(), kind="stable")[:k]] = True
    flat = mask.ravel()
    return float((top & flat).sum() / (top | flat).sum())


def _mask_class(path: Path, class_names: Sequence[str], predicted: str) -> str:
    """The class a lesion mask belongs to: the image's folder name when it is a class."""
    for part in reversed(path.parts[:-1]):
        if part in class_names:
            return part
    return predicted


def _score_map(
    explainer: Explainer,
    image: Image.Image,
    x: torch.Tensor,
    method: str,
    predicted: str,
    steps: int,
    seed: int,
    road_percentiles: Sequence[int],
    road: bool,
) -> tuple[dict[str, float], np.ndarray, str]:
    """Deletion, insertion (and ROAD) of ``method``'s map of the predicted class on one image,
    with the map and the class it explains."""
    predictor = explainer.predictor
    if method == RANDOM:
        heat, label = random_heatmap((image.height, image.width), seed), predicted
    else:
        explanation = explainer.explain(image, method)
        heat, label = explanation.heatmap, explanation.target_class
    target = ClassProbability(predictor.class_names.index(label), predictor.temperature)
    d_auc, i_auc = deletion_insertion_auc(predictor.model, x, heat, target, steps, seed=seed)
    scores = {"deletion_auc": d_auc, "insertion_auc": i_auc}
    if road:
        scores["road"] = road_score(predictor.model, x, heat, target, road_percentiles)
    return scores, heat, label


def _localisation(
    explainer: Explainer,
    image: Image.Image,
    path: Path,
    method: str,
    mask: np.ndarray,
    heat: np.ndarray,
    label: str,
) -> dict[str, float]:
    """Pointing game and IoU of the map of the lesion's class (explained anew if ``heat`` is of
    another class, ``label``)."""
    lesion_class = _mask_class(path, explainer.predictor.class_names, label)
    if method != RANDOM and lesion_class != label:
        heat = explainer.explain(image, method, lesion_class).heatmap
    return {"pointing_game": pointing_game(heat, mask), "iou": mask_iou(heat, mask)}


def evaluate_faithfulness(
    explainer: Explainer,
    paths: Sequence[str | os.PathLike],
    methods: Sequence[str],
    *,
    steps: int = 20,
    road_percentiles: Sequence[int] = (20, 50, 80),
    road: bool = True,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[FaithfulnessRow]:
    """Mean faithfulness metrics per method (and the random baseline) over image files.

    Deletion, insertion and ROAD follow the predicted class. Where ``mask_path_for`` finds a
    lesion mask, the map of the mask's class (its folder, e.g. malignant) is scored by the
    pointing game and IoU, whatever the prediction was.
    """
    try:
        from histolens.data.synth import mask_path_for
    except ImportError:  # synthetic data support not installed: no masks

        def mask_path_for(_path):
            return None

    predictor = explainer.predictor
    names = [get_method(m).name for m in methods] + [RANDOM]
    sums: dict[str, dict[str, list[float]]] = {m: {k: [] for k in METRICS} for m in names}
    n_images = n_masks = 0
    for i, raw in enumerate(paths):
        path = Path(raw)
        image = load_rgb(path)
        mask_path = mask_path_for(path)
        mask = _mask_array(mask_path, image.size) if mask_path is not None else None
        if mask is not None and not mask.any():
            mask = None  # a lesion-free image (benign): no localisation to score
        x = predictor.to_input(predictor.preprocess.resize(image)[None])
        n_images += 1
        n_masks += mask is not None
        predicted = predictor.predict_images([image])[0].label
        for method in names:
            scores, heat, label = _score_map(
                explainer, image, x, method, predicted, steps, seed + i, road_percentiles, road
            )
            if mask is not None:
                scores |= _localisation(explainer, image, path, method, mask, heat, label)
            for key, value in scores.items():
                sums[method][key].append(value)
        if progress:
            progress(1)

    def mean(values: list[float]) -> float | None:
        values = [v for v in values if np.isfinite(v)]
        return float(np.mean(values)) if values else None

    return [
        FaithfulnessRow(m, *(mean(sums[m][k]) for k in METRICS), n_images, n_masks) for m in names
    ]
