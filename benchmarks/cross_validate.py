"""Patient-level (stratified group) 5-fold cross-validation suites on real BreakHis images.

Frozen ImageNet EfficientNet-Lite0 (offline weights) with the original project's head. Images are
decoded once and features computed once per image and view, shared by the settings of a suite.

Suites:
  defaults  learning rates, optimisers and augmentation: how histolens's defaults were chosen
  stain     no normalisation, Macenko, Reinhard, stain augmentation, Macenko + augmentation
  headline  the default recipe (on 100X, as the evaluation issue asks)

Run: .venv/bin/python benchmarks/cross_validate.py --suite stain [--magnification all]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import CV_HEADERS, cv_rows, print_table, require_real_data, setup  # noqa: E402

SUITES: dict[str, dict[str, dict]] = {
    "defaults": {
        "original: SGD lr 1e-4 (+aug)": {"train.optimizer": "sgd", "train.lr": 1e-4},
        "SGD lr 1e-3 (+aug)": {"train.optimizer": "sgd", "train.lr": 1e-3},
        "SGD lr 1e-2 (+aug)": {"train.optimizer": "sgd", "train.lr": 1e-2},
        "SGD lr 3e-2 (+aug)": {"train.optimizer": "sgd", "train.lr": 3e-2},
        "Adam lr 1e-3 (+aug)": {"train.optimizer": "adam", "train.lr": 1e-3},
        "SGD lr 1e-2, no aug": {
            "train.optimizer": "sgd",
            "train.lr": 1e-2,
            "augment.enabled": False,
        },
        "SGD lr 1e-2, wd 1e-3 (+aug)": {
            "train.optimizer": "sgd",
            "train.lr": 1e-2,
            "train.weight_decay": 1e-3,
        },
    },
    "stain": {
        "no normalisation": {"stain.method": "none"},
        "Macenko": {"stain.method": "macenko"},
        "Reinhard": {"stain.method": "reinhard"},
        "stain augmentation": {"stain.method": "none", "augment.stain": True},
        "Macenko + stain augmentation": {"stain.method": "macenko", "augment.stain": True},
    },
    "headline": {"default recipe": {}},
}


def main() -> None:
    setup()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--suite", choices=list(SUITES), default="defaults")
    ap.add_argument(
        "--magnification",
        default=None,
        help="default: all for 'defaults' and 'stain', 100 for 'headline'",
    )
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--only", nargs="*", help="only settings containing one of these strings")
    ap.add_argument(
        "--per-fold-reference",
        action="store_true",
        help="choose the stain reference among each fold's training images (as training does; "
        "features are then recomputed per fold) instead of once among all images",
    )
    args = ap.parse_args()
    from histolens.config import RunConfig
    from histolens.training.crossval import cross_validate, image_bank_for

    data = require_real_data()
    mag = args.magnification or ("100" if args.suite == "headline" else "all")
    over = {
        # The MLP head these suites were written for, at the backbone's own input size.
        "model.head": "mlp",
        "model.input_size": None,
        "model.feature_layer": "last",
        "stain.method": "none",
        "train.cv_folds": 0,
        "data.path": str(data),
        "data.magnification": mag,
        "model.backbone": "tf_efficientnet_lite0",
        "model.pretrained": "imagenet",
    }
    if args.epochs:
        over["train.epochs"] = args.epochs
    base = RunConfig().override(over)
    bank = image_bank_for(base, progress=False)
    store: dict = {}
    rows = []
    for name, setting in SUITES[args.suite].items():
        if args.only and not any(o in name for o in args.only):
            continue
        print(f"== {name}", flush=True)
        setting = dict(setting)
        method = setting.get("stain.method", "none")
        if method != "none" and not args.per_fold_reference:
            # The reference is picked without labels, so one pick among all images leaks no
            # label information and lets every fold share the features.
            from histolens.stain.reference import choose_reference

            candidates = list(bank.images)[:: max(1, len(bank.images) // 200)]
            pick = choose_reference([bank.images[p] for p in candidates], method=method)
            setting["stain.reference"] = candidates[pick]
            print(f"   reference: {setting['stain.reference']}", flush=True)
        result = cross_validate(base.override(setting), args.folds, feature_store=store, bank=bank)
        rows.append(cv_rows(name, result))
    print()
    print(
        f"{args.folds}-fold patient-level CV on {data} (magnification {mag}), "
        f"tf_efficientnet_lite0 frozen + original head, {base.train.epochs} epochs; "
        "mean +/- sd over folds"
    )
    print_table(CV_HEADERS, rows)


if __name__ == "__main__":
    main()
