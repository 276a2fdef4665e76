"""Milliseconds per image of stain normalisation: histolens's batched code vs torchstain's loop.

Uses 64 real BreakHis tiles (breakhis-dev) resized to 224x224, 2 threads, best of N repeats.
Run: .venv/bin/python benchmarks/bench_stain_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, require_real_data, setup  # noqa: E402


def best_ms(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) / n_images * 1e3


def main() -> None:
    setup()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    import torchstain

    from histolens.data.imageio import load_rgb
    from histolens.data.records import discover
    from histolens.models.transforms import Preprocess
    from histolens.stain.augment import StainAugmenter
    from histolens.stain.normalize import StainNormalizer
    from histolens.stain.reference import choose_reference

    pre = Preprocess((224, 224), (0.5,) * 3, (0.5,) * 3, "bicubic")
    records = discover(require_real_data("100X")).records[: args.n]
    u8 = torch.stack([pre.resize(load_rgb(r.path)) for r in records])
    batch = u8.float() / 255
    ref_idx = choose_reference(list(u8), "macenko")
    ref = u8[ref_idx]
    n = len(u8)
    rows = []
    for method, ts_cls in (
        ("macenko", torchstain.normalizers.MacenkoNormalizer),
        ("reinhard", torchstain.normalizers.ReinhardNormalizer),
    ):
        ours = StainNormalizer(method).fit(ref)
        theirs = ts_cls(backend="torch")
        theirs.fit(ref)

        def loop(theirs=theirs, method=method):
            for x in u8:
                try:
                    if method == "macenko":
                        theirs.normalize(x, stains=False)
                    else:
                        theirs.normalize(x)
                except Exception:  # torchstain raises on some tiles; histolens falls back
                    pass

        t_ours = best_ms(lambda ours=ours: ours(batch), n, args.repeats)
        t_loop = best_ms(loop, n, args.repeats)
        ours.reset_counts()
        ours(batch)
        rows.append(
            [
                method,
                f"{t_ours:.2f}",
                f"{t_loop:.2f}",
                f"{t_loop / t_ours:.1f}x",
                f"{ours.fallbacks}/{ours.seen}",
            ]
        )
    aug = StainAugmenter()
    g = torch.Generator().manual_seed(0)
    rows.append(
        [
            "HED augmentation",
            f"{best_ms(lambda: aug(batch, g), n, args.repeats):.2f}",
            "-",
            "-",
            "-",
        ]
    )
    start = time.perf_counter()
    choose_reference(list(u8), "macenko")
    print(
        f"{n} real BreakHis 100X tiles at 224x224, 2 threads, best of {args.repeats}; "
        f"choosing the reference among them took {time.perf_counter() - start:.2f} s"
    )
    print_table(
        [
            "method",
            "histolens ms/img (batched)",
            "torchstain ms/img (loop)",
            "speed-up",
            "fallbacks",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
