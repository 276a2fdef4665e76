"""Does the out-of-distribution guard tell real histology of new patients from everything else?

Protocol: the generalisation protocol's folds (benchmarks/generalisation.py; repeated 5-fold
stratified group k-fold over breakhis-dev's patient groups). Each fold trains the default recipe
on all images of its training groups through ``histolens.training.runner.train``, which stores the guard
(cheap input checks, and the Mahalanobis distance of pooled features with its limit set on the
training groups' own held-out patients). The guard then scores:

- real: the 100X images of the fold's held-out groups (never seen, nor their patients);
- not histology: scikit-image's sample photos (the cat, the astronaut, coins, text pages, ...),
  white, black, grey and uniform pink tiles, screenshots of text rendered with Pillow, noise
  (uniform RGB, pink Gaussian), and H&E-like synthetic tiles from ``histolens data synth``.

Figures per repeat (each real image scored once, by its own fold; non-histology by every fold):
AUROC of the guard's score (an image failing a cheap check counts as infinitely far, else its
distance over the limit) for real against non-histology (target >= 0.99), the same for the
distance alone, the false-flag rate on real held-out histology (target < 2%), and the share of
each non-histology kind flagged.

Run:  .venv/bin/python benchmarks/ood_guard.py [--repeats 3] [--quick]
``--quick`` is a smoke check: one repeat of 3 folds on the 100X images only, at 224 px, no stain
normalisation, fewer synthetic tiles; not a measurement.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, repeated_study_parser, require_real_data, setup  # noqa: E402
from generalisation import SCORED_MAGNIFICATION, _records  # noqa: E402
from refer import study_config, train_folds  # noqa: E402

SIZE = (700, 460)  # BreakHis's tile size (width, height)
# A cheap check's flag outranks any distance.
CHEAP_FLAG = 1e6


def sample_photos() -> list:
    """scikit-image's sample images shipped with the package (none needs a download)."""
    import skimage.data
    from PIL import Image

    names = [
        "astronaut", "brick", "camera", "cat", "checkerboard", "clock", "coffee", "coins",
        "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
        "logo", "microaneurysms", "moon", "page", "retina", "rocket", "text",
    ]  # fmt: skip
    photos = []
    for name in names:
        try:
            a = np.asarray(getattr(skimage.data, name)())
        except Exception:  # not in this version, or it would need a download
            continue
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        if a.ndim == 3 and a.shape[-1] in (3, 4):
            photos.append((name, Image.fromarray(a[..., :3].astype(np.uint8))))
    return photos


def blank_tiles() -> list:
    from PIL import Image

    colours = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (240, 240, 240)}
    colours["pink"] = (226, 160, 200)  # the mean colour of eosin, and nothing else
    return [(name, Image.new("RGB", SIZE, c)) for name, c in colours.items()]


def text_screenshots(n: int = 4) -> list:
    from PIL import Image, ImageDraw, ImageFont

    out = []
    for i in range(n):
        bg, fg = [("white", "black"), ("#1e1e1e", "#d4d4d4"), ("#f5f0e6", "#202020")][i % 3]
        img = Image.new("RGB", SIZE, bg)
        draw = ImageDraw.Draw(img)
        font = ImageFont.load_default(size=12 + 4 * i)
        for line in range(0, SIZE[1], 18 + 4 * i):
            draw.text(
                (10, line), f"{line:04d}  def predict(image): return model(image)  # {i}", fg, font
            )
        out.append((f"text {i}", img))
    return out


def noise_tiles(n: int = 3, seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        uniform = rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
        pink = np.clip(rng.normal((200, 140, 190), 30, (SIZE[1], SIZE[0], 3)), 0, 255)
        out += [(f"uniform noise {i}", Image.fromarray(uniform))]
        out += [(f"pink noise {i}", Image.fromarray(pink.astype(np.uint8)))]
    return out


def synthetic_tiles(n: int, work: Path) -> list:
    """H&E-like tiles from ``histolens data synth`` (the generator behind the command)."""
    from histolens.data.imageio import load_rgb
    from histolens.data.synth import generate_synthetic

    generate_synthetic(work / "synth", n=n, seed=7, size=SIZE)
    return [(p.name, load_rgb(p)) for p in sorted((work / "synth").glob("*X/*/*.png"))]


def guard_inputs(predictor, images: list) -> tuple[np.ndarray, list]:
    """Pooled features and cheap-check reasons of PIL images (the same for every fold)."""
    import torch

    feats, reasons = [], []
    with torch.inference_mode():
        for i in range(0, len(images), 16):
            chunk = images[i : i + 16]
            batch = torch.stack([predictor.preprocess.resize(img) for img in chunk])
            feats.append(predictor.model.features(predictor.to_input(batch)).double().numpy())
            reasons += predictor.guard.input_reasons(
                batch, [img.size for img in chunk], predictor.preprocess.input_size
            )
    return np.concatenate(feats), reasons


def guard_score(guard, feats: np.ndarray, reasons: list) -> np.ndarray:
    """Cheap-check flags as CHEAP_FLAG, else the distance over the guard's limit."""
    score = guard.features.distance(feats) / guard.features.threshold
    return np.where([r is not None for r in reasons], CHEAP_FLAG, score)


def run(args) -> None:
    import logging

    from sklearn.metrics import roc_auc_score

    from histolens.data.imageio import load_rgb
    from histolens.inference.predictor import Predictor

    logging.getLogger("histolens").setLevel(logging.ERROR)
    data = require_real_data()
    records = _records(data, "binary")
    if args.quick:
        records = [r for r in records if r.magnification == SCORED_MAGNIFICATION]
    repeats = 1 if args.quick else args.repeats
    k = 3 if args.quick else 5
    start = time.perf_counter()
    shared: dict = {}
    cfg = study_config(data, "binary", args.quick, records, shared)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        kinds = {
            "photos": sample_photos(),
            "blank tiles": blank_tiles(),
            "text screenshots": text_screenshots(),
            "noise": noise_tiles(),
            "synthetic tiles": synthetic_tiles(8 if args.quick else 40, work),
        }
        names = [(kind, name) for kind, items in kinds.items() for name, _ in items]
        print(
            f"real: the held-out {SCORED_MAGNIFICATION}X images of {repeats} x {k}-fold "
            f"patient-group CV ({len(records)} training images in all); not histology: "
            + ", ".join(f"{len(v)} {kind}" for kind, v in kinds.items())
            + (" (--quick smoke check)" if args.quick else ""),
            flush=True,
        )
        ood_feats = ood_reasons = None
        real_cache: dict[str, tuple[np.ndarray, str | None]] = {}
        for seed in range(repeats):
            real_scores, real_flags, ood_scores, ood_dist, real_dist = [], [], [], [], []
            for _, _, test_recs, run_dir in train_folds(
                cfg, records, "binary", seed, k, shared, work / "runs"
            ):
                predictor = Predictor.from_checkpoint(run_dir)
                guard = predictor.guard
                if ood_feats is None:  # the frozen backbone is the same in every fold
                    ood_feats, ood_reasons = guard_inputs(
                        predictor, [img for items in kinds.values() for _, img in items]
                    )
                real = [r for r in test_recs if r.magnification == SCORED_MAGNIFICATION]
                todo = [r.path for r in real if r.path not in real_cache]
                if todo:
                    f, why = guard_inputs(predictor, [load_rgb(p) for p in todo])
                    real_cache.update(zip(todo, zip(f, why, strict=True), strict=True))
                f = np.stack([real_cache[r.path][0] for r in real])
                why = [real_cache[r.path][1] for r in real]
                real_scores.append(guard_score(guard, f, why))
                real_flags.append(real_scores[-1] > 1)
                real_dist.append(guard.features.distance(f) / guard.features.threshold)
                ood_scores.append(guard_score(guard, ood_feats, ood_reasons))
                ood_dist.append(guard.features.distance(ood_feats) / guard.features.threshold)
            real_s, ood_s = np.concatenate(real_scores), np.stack(ood_scores)
            y = np.r_[np.zeros(len(real_s)), np.ones(ood_s.size)]
            flagged = ood_s > 1  # (folds, images)
            row = {
                "AUROC": roc_auc_score(y, np.r_[real_s, ood_s.ravel()]),
                "AUROC, distance only": roc_auc_score(
                    y, np.r_[np.concatenate(real_dist), np.stack(ood_dist).ravel()]
                ),
                "false flags on real": float(np.concatenate(real_flags).mean()),
                "real images": len(real_s),
            }
            for kind in kinds:
                cols = [i for i, (kk, _) in enumerate(names) if kk == kind]
                row[f"{kind} flagged"] = float(flagged[:, cols].mean())
            missed = sorted({names[i][1] for i in np.where(~flagged.all(0))[0]})
            row["missed"] = ", ".join(missed) or "none"
            results.append(row)
            print(f"repeat {seed + 1}/{repeats} done ({time.perf_counter() - start:.0f} s)")
    print()
    print(
        f"Mean +/- sd over {repeats} repeat(s); targets: AUROC >= 0.99, false flags on real "
        f"held-out histology < 0.02; {time.perf_counter() - start:.0f} s in all."
    )
    rows = []
    for key in results[0]:
        if key in ("missed", "real images"):
            continue
        v = np.array([r[key] for r in results], float)
        sd = np.std(v, ddof=1) if len(v) > 1 else 0.0
        rows.append([key, f"{v.mean():.4f} +/- {sd:.4f}"])
    print_table(["figure", "value"], rows)
    for i, r in enumerate(results):
        print(f"repeat {i + 1}: not flagged by some fold: {r['missed']}")


def main() -> None:
    setup()
    ap = repeated_study_parser(__doc__, task=False)
    ap.add_argument("--quick", action="store_true", help="smoke check, not a measurement")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
