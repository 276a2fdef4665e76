"""Attention MIL against mean pooling on bags of synthetic slide *images* (issue 27's scale).

The product path end to end: ``histolens data synth WORK --slides 60 --patients 30`` (each
patient painted with their own look; half the patients with one lesion of 1%-20% of the tissue
in each slide, the others none) -> ``histolens slide features`` with an ImageNet-pretrained
EfficientNet-Lite0 tile checkpoint (frozen; 112 px tiles at 0.5 um/px; no training on these
slides) -> ``train --slides``'s own
``histolens.training.mil_run.train_slides`` (5-fold patient-level CV of MIL with early stopping
on an inner patient split, against mean pooling + a linear probe on the same folds). Prints slide
AUC with 95% CIs over patients, by lesion-size bin (each bin's positives against all negatives;
sizes are the true planted share of the tissue from ``slides.csv``), the pointing game (is the
most-attended tile's centre, from the model that did not see the slide, on the planted mask?),
each fold's stopped and best epoch, MIL seconds per epoch, the seconds and peak RSS of each step.

Run: flock /tmp/cpu.lock .venv/bin/python benchmarks/bench_mil_slides.py [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BINS = ((0.01, 0.03), (0.03, 0.07), (0.07, 0.201))


def _step(name: str, cmd: list[str]) -> None:
    """Run a histolens command in a child process; print its seconds and the children's peak
    RSS so far (ru_maxrss of the largest child)."""
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "histolens", *cmd], check=True, env=env)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{name}: {time.perf_counter() - start:.0f} s (largest child peak RSS {peak:.0f} MiB)")


def _pointing_game(work: Path, manifest: list[dict], run) -> list[bool]:
    import h5py
    from PIL import Image

    from histolens.slides.synthetic_cohort import pointing_game

    hits = []
    for i, row in enumerate(manifest):
        if row["label"] != "tumour":
            continue
        name = row["slide"].removesuffix(".tiff")
        mask = np.asarray(Image.open(work / "slides" / "masks" / f"{name}.planted.png")) > 0
        with h5py.File(work / "bags" / "h5" / f"{name}.h5", "r") as f:
            coords = f["coords"][:]
            size = tuple(int(v) for v in f.attrs["patch_size_level0"])
        step = int(row["truth_step"])
        hits.append(pointing_game(coords, size, run.cv.attention[i], mask, step))
    return hits


def _report(work: Path, run, seconds: float) -> None:
    with open(work / "slides" / "slides.csv", newline="") as fh:
        manifest = list(csv.DictReader(fh))
    cv = run.cv
    y = cv.targets  # 1 = the class sorted last: "tumour"
    lesion = np.array([r["label"] == "tumour" for r in manifest])
    frac = np.array([float(r["lesion_fraction"]) for r in manifest])
    tiles = [len(a) for a in cv.attention]
    print(
        f"{len(y)} slides, {len(set(cv.patients))} patients, {int(lesion.sum())} with lesions; "
        f"tiles per slide {min(tiles)}-{max(tiles)} (median {int(np.median(tiles))}); "
        f"5-fold patient-level CV, whole MIL run {seconds:.0f} s"
    )
    print(f"{'slides':<16} {'n+':>3} {'MIL AUC (95% CI)':>22} {'mean-pool AUC (95% CI)':>24} diff")
    subsets = [("all", np.ones(len(y), bool))] + [
        (f"lesion {lo:.0%}-{min(hi, 0.2):.0%}", ~lesion | ((frac >= lo) & (frac < hi)))
        for lo, hi in BINS
    ]
    for name, keep in subsets:  # AUC does not depend on which class is called positive
        (a, alo, ahi), (m, mlo, mhi) = cv.table(keep).values()
        print(
            f"{name:<16} {int(lesion[keep].sum()):>3} {a:>8.3f} ({alo:.3f}-{ahi:.3f}) "
            f"{m:>10.3f} ({mlo:.3f}-{mhi:.3f}) {a - m:>+6.3f}"
        )
    hits = _pointing_game(work, manifest, run)
    print(f"pointing game (top-attended tile's centre on the planted mask): {np.mean(hits):.3f} "
          f"of {len(hits)}")  # fmt: skip
    training = run.metrics["training"]
    for f in [*training["folds"], {**training["final"], "fold": "final"}]:
        print(
            f"  fold {f['fold']}: {f['epochs']} epochs, best {f['best_epoch']} "
            f"(val {f['val_slides']} slides of {f['val_patients']} patients)"
        )
    print(f"MIL epoch (incl. validation): {np.mean(cv.epoch_seconds):.3f} s mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="keep the slides, bags and run here")
    parser.add_argument("--slides", type=int, default=60)
    parser.add_argument("--patients", type=int, default=30)
    parser.add_argument("--slide-size", default="6144x6144")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_mil_slides_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}")
    synth = ["data", "synth", str(work), "--slides", str(args.slides)]
    _step("data synth", [*synth, "--patients", str(args.patients),
                         "--slide-size", args.slide_size, "--seed", str(args.seed)])  # fmt: skip

    from histolens.testing import make_checkpoint

    ckpt = make_checkpoint(
        work / "lite0.safetensors", "tf_efficientnet_lite0", pretrained="imagenet",
        input_size=(112, 112),
    )  # fmt: skip
    features = ["slide", "features", str(ckpt), str(work / "slides"), "--out", str(work / "bags")]
    tiling = ["--tile-mpp", "0.5", "--tile-size", "112", "--workers", "1", "--quiet"]
    _step("slide features", [*features, *tiling])

    from histolens.training.mil import MilConfig
    from histolens.training.mil_run import train_slides

    start = time.perf_counter()
    run = train_slides(work / "slides" / "labels.csv", work / "run", MilConfig(seed=args.seed))
    _report(work, run, time.perf_counter() - start)
    print(
        f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
