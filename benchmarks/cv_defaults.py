"""Choose the training defaults by patient-level 5-fold cross-validation on real BreakHis images.

Frozen ImageNet EfficientNet-Lite0 features (offline weights) with the original project's head;
compares the original recipe's learning rate with others, optimisers and augmentation.
Run: .venv/bin/python benchmarks/cv_defaults.py [--magnification all] [--folds 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import CV_HEADERS, cv_rows, print_table, require_real_data, setup  # noqa: E402

SETTINGS = {
    "original: SGD lr 1e-4 (+aug)": {"train.lr": 1e-4},
    "SGD lr 1e-3 (+aug)": {"train.lr": 1e-3},
    "SGD lr 1e-2 (+aug)": {"train.lr": 1e-2},
    "SGD lr 3e-2 (+aug)": {"train.lr": 3e-2},
    "Adam lr 1e-3 (+aug)": {"train.optimizer": "adam", "train.lr": 1e-3},
    "SGD lr 1e-2, no aug": {"train.lr": 1e-2, "augment.enabled": False},
    "SGD lr 1e-2, wd 1e-3 (+aug)": {"train.lr": 1e-2, "train.weight_decay": 1e-3},
}


def main() -> None:
    setup()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--magnification", default="all")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--only", nargs="*", help="run only these settings (substring match)")
    args = ap.parse_args()
    from histolens.config import RunConfig
    from histolens.crossval import cross_validate

    data = require_real_data()
    base = RunConfig().override(
        {
            "data.path": str(data),
            "data.magnification": args.magnification,
            "model.backbone": "tf_efficientnet_lite0",
            "model.pretrained": "imagenet",
            "train.epochs": args.epochs,
            "train.optimizer": "sgd",
        }
    )
    store: dict = {}
    bank = None
    rows = []
    for name, over in SETTINGS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        print(f"== {name}", flush=True)
        cfg = base.override(over)
        if bank is None:
            from histolens.backbones import create_backbone, get_backbone_spec
            from histolens.pipeline import ImageBank
            from histolens.training import prepare_records
            from histolens.transforms import resolve_preprocess

            pre = resolve_preprocess(create_backbone(get_backbone_spec(cfg.model.backbone), "none"))
            bank = ImageBank([r.path for r in prepare_records(cfg)[1]], pre, progress=False)
        result = cross_validate(cfg, args.folds, feature_store=store, bank=bank)
        rows.append(cv_rows(name, result))
    print()
    print(
        f"{args.folds}-fold patient-level CV, {data} (magnification {args.magnification}), "
        "tf_efficientnet_lite0 frozen, original head, mean +/- sd over folds"
    )
    print_table(CV_HEADERS, rows)


if __name__ == "__main__":
    main()
