"""Cached vs uncached training of a frozen backbone: wall time for 50 epochs, and validation AUC.

The uncached way (the original project's) runs the frozen backbone on every image every epoch;
histolens computes the features of K augmented views once and trains the head on them. Both runs
use the same data, split, recipe and seed; early stopping is off so both do every epoch.
For slow backbones, ``--uncached-epochs N`` times 1 and N uncached epochs and extrapolates the
wall time to the full run from the per-epoch difference (every frozen epoch costs the same);
the table marks it.

One validation split of a few patients is too small to tell whether both ways reach the same AUC,
so ``--cv-folds 5`` also runs patient-level (stratified group) cross-validation both ways with the
default recipe (early stopping on) and prints mean +/- sd of the held-out metrics.

Run: .venv/bin/python benchmarks/bench_feature_cache.py [--backbones vgg16 tf_efficientnet_lite0]
         [--cv-folds 5 --cv-backbone tf_efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import CV_HEADERS, cv_rows, print_table, require_real_data, setup  # noqa: E402

MLP_HEAD = {  # the MLP head these measurements are about, at the backbone's own input size
    "model.head": "mlp",
    "model.input_size": None,
    "model.feature_layer": "last",
    "stain.method": "none",
    "train.cv_folds": 0,
}


def run(backbone: str, cached: bool, epochs: int, data: Path, tmp: Path, pretrained: str):
    from histolens.config import RunConfig
    from histolens.stats.metrics import safe_auc
    from histolens.training.runner import train

    cfg = RunConfig().override(
        {
            **MLP_HEAD,
            "data.path": str(data),
            "model.backbone": backbone,
            "model.pretrained": pretrained,
            "train.epochs": epochs,
            "train.early_stopping_patience": 10_000,
            "train.feature_cache": cached,
            "train.cache_views": 4,
        }
    )
    start = time.perf_counter()
    result = train(
        cfg,
        tmp / f"{backbone}-{'cached' if cached else 'uncached'}-{epochs}",
        progress=False,
        write_outputs=False,
    )
    seconds = time.perf_counter() - start
    # Validation AUC of the best checkpoint on the validation split.
    from histolens.data.splits import load_split_csv
    from histolens.evaluation.evaluate import _logits_for
    from histolens.inference.predictor import Predictor

    run_dir = result.run_dir
    predictor = Predictor.from_checkpoint(run_dir)
    val = load_split_csv(run_dir / "split.csv").val
    _, logits, _ = _logits_for(predictor, val)
    y = [int(r.label == "malignant") for r in val]
    return seconds, safe_auc(y, logits[:, 0].numpy())


def cross_validated(backbone: str, folds: int, data: Path, pretrained: str) -> None:
    """Held-out metrics of cached and uncached training over the same patient-level folds."""
    from histolens.config import RunConfig
    from histolens.training.crossval import cross_validate, image_bank_for

    base = RunConfig().override(
        {
            **MLP_HEAD,
            "data.path": str(data),
            "model.backbone": backbone,
            "model.pretrained": pretrained,
        }
    )
    bank = image_bank_for(base, progress=False)  # decoded once for both ways
    rows = []
    for cached in (True, False):
        name = "cached (4 views)" if cached else "uncached (fresh views every epoch)"
        print(f"== {backbone}: {folds}-fold CV, {name}", flush=True)
        cfg = base.override({"train.feature_cache": cached})
        result = cross_validate(cfg, folds, feature_store={}, bank=bank)
        rows.append(cv_rows(name, result))
    print()
    print(
        f"{folds}-fold patient-level CV on {data}, {backbone} ({pretrained}) frozen, default "
        "recipe (early stopping on); mean +/- sd over folds; seconds include feature caching"
    )
    print_table(CV_HEADERS, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbones", nargs="*", default=["tf_efficientnet_lite0", "vgg16"])
    ap.add_argument("--data", default=None, help="default: breakhis-dev/100X")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument(
        "--extrapolate",
        nargs="*",
        default=["vgg16"],
        help="backbones whose uncached run is timed for --uncached-epochs and extrapolated",
    )
    ap.add_argument(
        "--uncached-epochs",
        type=int,
        default=None,
        help="time only this many uncached epochs and extrapolate (slow backbones)",
    )
    ap.add_argument(
        "--pretrained",
        default="imagenet",
        help="vgg16 ImageNet weights need the hub cache; 'none' times the same work",
    )
    ap.add_argument("--cv-folds", type=int, default=0, help="also cross-validate both ways")
    ap.add_argument("--cv-backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    setup(args.threads)
    data = Path(args.data) if args.data else require_real_data("100X")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            pretrained = args.pretrained
            if backbone != "tf_efficientnet_lite0" and pretrained == "imagenet":
                try:
                    from histolens.models.backbones import create_backbone, get_backbone_spec

                    create_backbone(get_backbone_spec(backbone), "imagenet")
                except Exception as exc:  # offline: time the same computation, random weights
                    print(f"{backbone}: {exc} Timing with --pretrained none.", flush=True)
                    pretrained = "none"
            print(f"== {backbone}: cached", flush=True)
            t_c, auc_c = run(backbone, True, args.epochs, data, Path(tmp), pretrained)
            n_unc = args.epochs
            if args.uncached_epochs and backbone in args.extrapolate:
                n_unc = args.uncached_epochs
            print(f"== {backbone}: uncached ({n_unc} epochs)", flush=True)
            t_u, auc_u = run(backbone, False, n_unc, data, Path(tmp), pretrained)
            note, auc_u_s = "", f"{auc_u:.3f}"
            if n_unc != args.epochs:
                t_1, _ = run(backbone, False, 1, data, Path(tmp), pretrained)
                per_epoch = (t_u - t_1) / max(1, n_unc - 1)
                t_u = t_1 + per_epoch * (args.epochs - 1)
                note = f" (extrapolated: {per_epoch:.0f} s/epoch)"
                auc_u_s = f"{auc_u:.3f} after {n_unc} epochs"
            rows.append(
                [
                    backbone,
                    pretrained,
                    f"{t_c:.0f}",
                    f"{t_u:.0f}{note}",
                    f"{t_u / t_c:.1f}x",
                    f"{auc_c:.3f}",
                    auc_u_s,
                ]
            )
            print("   " + " | ".join(str(c) for c in rows[-1]), flush=True)
    print()
    print(
        f"{args.epochs} epochs, frozen backbone, {data}, {args.threads} thread(s); wall time includes reading "
        "images and computing the cache"
    )
    print_table(
        [
            "backbone",
            "weights",
            "cached s",
            "uncached s",
            "speed-up",
            "val AUC cached",
            "val AUC uncached",
        ],
        rows,
    )
    if args.cv_folds:
        print()
        cross_validated(args.cv_backbone, args.cv_folds, data, "imagenet")


if __name__ == "__main__":
    main()
