"""Attention MIL against mean pooling + a linear probe on synthetic feature bags (issue 27).

A feature-level simulation of planted lesions (``histolens.training.mil_synthetic``), not bags
extracted from synthetic slide images (``bench_mil_slides.py`` does those): 60 slides of 30
patients (2 each), half the patients with a lesion in each slide covering 1%-20% of the tiles
(log-uniform), 2,000 tiles x 64 features a slide. Prints slide AUC by 5-fold patient-level CV
for both methods on the same folds (95% CI over patients), by lesion-size bin (each bin's
positives against all negatives), the attention pointing game (share of positive slides whose
most-attended tile, from the model that did not see the slide, is a planted lesion tile), each
fold's stopped and best epoch (early stopping on a fifth of the training patients), then the
training time per epoch on all 60 bags of 2,000 tiles (no validation) of the Lightning loop
beside a plain torch loop doing the same steps, and peak RSS.

Run: flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_mil.py [--timing-epochs 10]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from histolens.training.mil import MilConfig, build_mil_model, feature_standardisation
from histolens.training.mil_cv import cross_validate_mil
from histolens.training.mil_fit import MilProcesses, fit_mil
from histolens.training.mil_synthetic import synthetic_bags

BINS = ((0.01, 0.03), (0.03, 0.07), (0.07, 0.201))


def _cv_table(bags, cv) -> None:
    y = np.array([b.target for b in bags])
    frac = np.array([b.lesion_fraction for b in bags])
    print(
        f"{'slides':<22} {'n+':>3} {'MIL AUC (95% CI)':>22} {'mean-pool AUC (95% CI)':>24} {'diff':>6}"
    )
    subsets = [("all", np.ones(len(y), bool))] + [
        (f"lesion {lo:.0%}-{min(hi, 0.2):.0%}", (y == 0) | ((frac >= lo) & (frac < hi)))
        for lo, hi in BINS
    ]
    for name, keep in subsets:
        (a, alo, ahi), (m, mlo, mhi) = cv.table(keep).values()
        print(
            f"{name:<22} {int(y[keep].sum()):>3} {a:>8.3f} ({alo:.3f}-{ahi:.3f}) "
            f"{m:>10.3f} ({mlo:.3f}-{mhi:.3f}) {a - m:>+6.3f}"
        )
    hits = [bags[i].lesion[int(np.argmax(cv.attention[i]))] for i in np.flatnonzero(y)]
    print(f"pointing game (top-attended tile is a lesion tile): {np.mean(hits):.3f} of {len(hits)}")
    for f in cv.fits:
        print(
            f"  fold {f['fold']}: {f['epochs']} epochs, best {f['best_epoch']} "
            f"(val {f['val_slides']} slides of {f['val_patients']} patients)"
        )


def _plain_torch_epochs(x, y, config: MilConfig, epochs: int) -> list[float]:
    """The naive way: the same model, loss, optimiser and one bag a step in a bare torch loop."""
    import torch

    torch.manual_seed(config.seed)
    model = build_mil_model(x[0].shape[1], config)
    mean, std = feature_standardisation(x)
    model.mean.copy_(torch.from_numpy(mean))
    model.std.copy_(torch.from_numpy(std))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    bags = [torch.from_numpy(b) for b in x]
    labels = torch.tensor(y, dtype=torch.float32)
    order = np.random.default_rng(config.seed)
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        for i in order.permutation(len(bags)):
            logit, _ = model(bags[i])
            loss = loss_fn(logit.reshape(1), labels[i].reshape(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=60)
    parser.add_argument("--tiles", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--timing-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bags = synthetic_bags(args.slides, 2, args.tiles, args.dim, seed=args.seed)
    x, y = [b.features for b in bags], np.array([b.target for b in bags])
    config = MilConfig(seed=args.seed)
    start = time.perf_counter()
    cv = cross_validate_mil(x, y, [b.patient for b in bags], config, n_splits=5)
    total = time.perf_counter() - start
    print(
        f"{args.slides} slides, {len({b.patient for b in bags})} patients, {args.tiles} tiles x "
        f"{args.dim} features, seed {args.seed}; 5-fold patient-level CV ({total:.0f} s); MIL "
        f"early stopping patience {config.patience}, at most {config.max_epochs} epochs"
    )
    _cv_table(bags, cv)

    timing = MilConfig(epochs=args.timing_epochs, seed=args.seed)
    one = MilProcesses(accelerator="cpu", devices="1")
    fit = fit_mil(x, y, timing, processes=one)  # no patients: no inner split, every bag trains
    plain = _plain_torch_epochs(x, y, timing, args.timing_epochs)
    # The first epoch of each warms up (allocations, Lightning's loop setup): medians.
    lit, bare = float(np.median(fit.epoch_seconds)), float(np.median(plain))
    print(
        f"MIL epoch on {args.slides} bags of {args.tiles} tiles (median of {args.timing_epochs}): "
        f"Lightning {lit:.3f} s, plain torch loop {bare:.3f} s (x{lit / bare:.2f})"
    )
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
