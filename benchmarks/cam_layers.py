"""Which layer(s) should a CAM of the default model explain? Faithfulness by target layer.

The default model reads pooled features at two levels (``blocks.2`` and ``blocks.5`` of Lite0).
For each candidate (each level alone, and both: histolens's default) this prints

- on real images (``--real-run``: a run trained on breakhis-dev; ``--real-images`` of them,
  evenly spread): deletion and insertion AUC of Grad-CAM and Grad-CAM++ against a smooth random
  map (``histolens.explain.faithfulness``; deletion lower, insertion higher is better);
- on synthetic images with lesion masks (``--synthetic-run``: a run trained on
  ``histolens data synth`` output, e.g. ``make demo``'s ``demo-output/run``): the pointing game
  and lesion IoU on ``--lesions`` malignant images (one CAM each, so many images are cheap).

Run:
  .venv/bin/python benchmarks/cam_layers.py --real-run RUN --synthetic-run demo-output/run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, setup  # noqa: E402

METHODS = ("gradcam", "gradcam++")


def candidates(predictor) -> list[str]:
    levels = predictor.model.cam_target_layer.split(",")
    return [*levels, ",".join(levels)] if len(levels) > 1 else levels


def real_rows(run: Path, n_images: int) -> list[list[object]]:
    from histolens.cli.explain import _evenly_spread, _split_paths
    from histolens.explain import Explainer
    from histolens.explain.faithfulness import evaluate_faithfulness
    from histolens.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(run)
    paths = _evenly_spread(_split_paths(run, "all"), n_images)
    rows = []
    for layers in candidates(predictor):
        start = time.perf_counter()
        with Explainer(predictor, layers=layers) as explainer:
            result = evaluate_faithfulness(explainer, paths, METHODS, road=False)
        for r in result:
            rows.append([layers, r.method, r.deletion_auc, r.insertion_auc, r.n])
        print(f"  real, {layers}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows


def synthetic_rows(run: Path, n_lesions: int) -> list[list[object]]:
    from histolens.cli.explain import _evenly_spread, _split_paths
    from histolens.data.imageio import load_rgb
    from histolens.data.synth import mask_path_for
    from histolens.explain import Explainer
    from histolens.explain.faithfulness import (
        _mask_array,
        mask_iou,
        pointing_game,
        random_heatmap,
    )
    from histolens.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(run)
    lesions = []
    for path in _split_paths(run, "all"):
        mask_path = mask_path_for(path)
        if mask_path is not None and "malignant" in Path(path).parts:
            lesions.append(path)
    lesions = _evenly_spread(lesions, n_lesions)
    images = [load_rgb(p) for p in lesions]
    masks = [_mask_array(mask_path_for(p), im.size) for p, im in zip(lesions, images, strict=True)]
    rows = []
    for layers in candidates(predictor):
        with Explainer(predictor, layers=layers) as explainer:
            for method in METHODS:
                maps = [explainer.explain(im, method, "malignant").heatmap for im in images]
                rows.append(_localisation(layers, method, maps, masks, pointing_game, mask_iou))
    maps = [random_heatmap((im.height, im.width), seed=i) for i, im in enumerate(images)]
    rows.append(_localisation("-", "random", maps, masks, pointing_game, mask_iou))
    return rows


def _localisation(layers, method, maps, masks, pointing_game, mask_iou) -> list[object]:
    points = [pointing_game(h, m) for h, m in zip(maps, masks, strict=True)]
    ious = [mask_iou(h, m) for h, m in zip(maps, masks, strict=True)]
    return [layers, method, float(np.nanmean(points)), float(np.nanmean(ious)), len(maps)]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--real-run", type=Path)
    ap.add_argument("--real-images", type=int, default=10)
    ap.add_argument("--synthetic-run", type=Path)
    ap.add_argument("--lesions", type=int, default=24)
    args = ap.parse_args()
    if not (args.real_run or args.synthetic_run):
        ap.error("give --real-run, --synthetic-run or both")
    setup()
    if args.synthetic_run:
        rows = synthetic_rows(args.synthetic_run, args.lesions)
        print(f"\nSynthetic lesion images of {args.synthetic_run} (higher is better):")
        print_table(["CAM layers", "method", "pointing game", "lesion IoU", "images"], rows)
    if args.real_run:
        rows = real_rows(args.real_run, args.real_images)
        print(f"\nReal images of {args.real_run} (deletion: lower is better):")
        print_table(["CAM layers", "method", "deletion AUC", "insertion AUC", "images"], rows)


if __name__ == "__main__":
    main()
