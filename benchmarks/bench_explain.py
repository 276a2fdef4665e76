"""Seconds per image of every explanation method on every registered backbone, and what
stopping CAM gradients at the target layer saves (VGG16 Grad-CAM, measured side by side).

Random weights (pretrained none): timings do not depend on the weights.

    .venv/bin/python benchmarks/bench_explain.py [--repeats 3] [--methods gradcam,scorecam]
        [--backbones vgg16,resnet50] [--device cpu] [--n-samples 200]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # Score-CAM's per-image progress bars

import torch  # noqa: E402

from histolens.explain import METHODS, Explainer  # noqa: E402
from histolens.inference.predictor import Predictor  # noqa: E402
from histolens.testing import make_checkpoint, make_tissue_image  # noqa: E402

BACKBONES = (
    "vgg16",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "tf_efficientnet_lite0",
    "vit_small_patch16_224",
)


def seconds_per_image(explainer: Explainer, method: str, images, repeats: int) -> float:
    explainer.explain(images[0], method)  # warm-up: CAM object, allocator, lazy imports
    start = time.perf_counter()
    for i in range(repeats):
        explainer.explain(images[i % len(images)], method)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    # The hub models (1B parameters) are left out of the default: add them by name.
    parser.add_argument(
        "--backbones", default=",".join(n for n, s in BACKBONES.items() if s.hub_id is None)
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--ratio-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backbones = [b for b in args.backbones.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]
    images = [make_tissue_image((700, 460), seed=s) for s in range(3)]
    print(
        f"device: {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else ''}"
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}); 700x460 images, "
        f"{args.repeats} repeats, LIME/SHAP {args.n_samples} samples"
    )
    with tempfile.TemporaryDirectory() as tmp:
        predictors = {}
        for bb in backbones:
            predictors[bb] = Predictor.from_checkpoint(
                make_checkpoint(Path(tmp) / f"{bb}.safetensors", backbone=bb), device=args.device
            )
        header = f"{'method':<22}" + "".join(f"{b[:14]:>15}" for b in backbones)
        print("\nseconds per image\n" + header)
        table = {m: {} for m in methods}
        explainers = {bb: Explainer(p, n_samples=args.n_samples) for bb, p in predictors.items()}
        try:
            for m in methods:
                for bb in backbones:
                    table[m][bb] = seconds_per_image(explainers[bb], m, images, args.repeats)
                print(
                    f"{m:<22}" + "".join(f"{table[m][bb]:>15.3f}" for bb in backbones), flush=True
                )
        finally:
            for ex in explainers.values():
                ex.close()

        if "vgg16" in predictors:
            # Two copies of the model: an Explainer sets its model's requires_grad flags.
            p = predictors["vgg16"]
            q = Predictor.from_checkpoint(p.source, device=args.device)
            timing = {}
            # Interleaved rounds so drift (turbo, other load) hits both alike.
            with (
                Explainer(p, truncate_gradients=True) as fast,
                Explainer(q, truncate_gradients=False) as naive,
            ):
                for ex in (fast, naive):
                    ex.explain(images[0], "gradcam")
                for flag in (True, False):
                    timing[flag] = []
                for _ in range(args.ratio_repeats):
                    for flag, ex in ((True, fast), (False, naive)):
                        timing[flag].append(seconds_per_image(ex, "gradcam", images, 1))
            t_fast, t_naive = (sorted(timing[f])[len(timing[f]) // 2] for f in (True, False))
            print(
                f"\nVGG16 Grad-CAM (median of {args.ratio_repeats}): full backward "
                f"{t_naive:.3f} s, truncated at features.29 {t_fast:.3f} s, "
                f"speed-up x{t_naive / t_fast:.2f}"
            )


if __name__ == "__main__":
    main()
