"""Training memory and time against dataset size: streamed images vs the in-memory image bank.

``histolens train`` (frozen backbone, linear probe) streams images through the backbone and keeps
only their features; the naive way decodes every image into memory first (``ImageBank``, still
what cross-validation benchmarks share between folds). Each run is a fresh process; the table
gives its wall time and peak resident memory (``wait4``'s ru_maxrss).

Tiles: a pool of synthetic tiles (``histolens.data.synth``), hard-linked under new names, patients and
a CSV manifest up to N files (decoding still happens per file; the pool keeps set-up fast).

``--ddp-features`` times the expensive step alone, the feature cache, in 1 and 2 processes
(Lightning's DDP launcher, gloo on CPUs): each rank featurises every second image, then the
features are gathered.

Run: .venv/bin/python benchmarks/bench_training_memory.py --sizes 8000 40000 [--bank-too]
     .venv/bin/python benchmarks/bench_training_memory.py --ddp-features 400
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402

POOL = 400  # distinct synthetic tiles
FLAGS = [
    "--head", "linear", "--cv-folds", "0", "--input-size", "pretrained", "--stain-norm", "none",
    "--quiet",
]  # fmt: skip

# The naive way, in a fresh process: every image decoded into memory, then the same training.
BANK_RUN = """
import json, sys
from histolens.config import RunConfig
from histolens.training.crossval import image_bank_for
from histolens.training.runner import train
cfg = RunConfig.from_dict(json.load(open(sys.argv[1])))
train(cfg, sys.argv[2], bank=image_bank_for(cfg, progress=False), progress=False)
"""


def make_tiles(n: int, root: Path, tile: int) -> Path:
    """``root/manifest.csv`` listing ``n`` tiles: copies of a synthetic pool, 20 per patient."""
    from histolens.data.synth import generate_synthetic

    pool = root / "pool"
    if not (pool / "manifest.csv").is_file():
        generate_synthetic(pool, n=POOL, seed=7, size=(tile, tile), n_patients=POOL // 20)
    with open(pool / "manifest.csv", newline="") as fh:
        base = list(csv.DictReader(fh))
    tiles = root / f"tiles-{n}"
    tiles.mkdir(exist_ok=True)
    manifest = root / f"manifest-{n}.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient", "group", "magnification"])
        for i in range(n):
            row, copy = base[i % len(base)], i // len(base)
            name = tiles / f"{i:06d}.png"
            if not name.exists():
                os.link(pool / row["path"], name)
            patient = f"{row['patient']}-{copy}"
            w.writerow([name.as_posix(), row["label"], patient, patient, row["magnification"]])
    return manifest


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{tail}")
    return seconds, usage.ru_maxrss / 1024


def memory_table(args, root: Path, env: dict[str, str]) -> None:
    from histolens.checkpoint.io import read_metadata

    rows, h, w = [], 0, 0
    for n in args.sizes:
        manifest = make_tiles(n, root, args.tile)
        run = root / f"stream-{n}"
        cmd = [sys.executable, "-m", "histolens", "train", "--data", str(manifest)]
        cmd += ["--out", str(run), "--backbone", args.backbone, "--pretrained", "none", *FLAGS]
        seconds, rss = measure(cmd, env)
        h, w = read_metadata(run).to_dict()["preprocess"]["input_size"]
        print(f"streamed, {n} tiles: {seconds:.0f} s, peak RSS {rss:.0f} MB", flush=True)
        row = [n, f"{seconds:.0f}", f"{rss:.0f}", "", ""]
        if args.bank_too:
            bank_cmd = [sys.executable, "-c", BANK_RUN, str(run / "config.json"), str(root / "b")]
            b_seconds, b_rss = measure(bank_cmd, env)
            subprocess.run(["rm", "-rf", str(root / "b")], check=True)
            print(f"bank, {n} tiles: {b_seconds:.0f} s, peak RSS {b_rss:.0f} MB", flush=True)
            row[3:] = [f"{b_seconds:.0f}", f"{b_rss:.0f}"]
        rows.append(row)
        subprocess.run(["rm", "-rf", str(run)], check=True)
    print(
        f"\nfrozen {args.backbone} (random init), linear probe, --cv-folds 0, {args.tile}px tiles "
        f"resized to {h}x{w}; each run a fresh process, 1 thread"
    )
    print_table(["tiles", "streamed s", "streamed MB", "bank s", "bank MB"], rows)


# --- --ddp-features: the feature cache alone, in 1 or 2 processes ----------------------------
def ddp_features(args, root: Path) -> None:
    """Run by the launcher in every rank: time FeatureCache.extend over the tiles."""
    import torch

    from histolens.config import TrainConfig
    from histolens.models.backbones import get_backbone_spec
    from histolens.models.classifier import build_model
    from histolens.models.feature_cache import FeatureCache
    from histolens.models.pipeline import ImageStream, InputPipeline
    from histolens.models.transforms import resolve_preprocess
    from histolens.training.distributed import launch, quiet_lightning

    with open(root / f"manifest-{args.ddp_features}.csv", newline="") as fh:  # ddp_table made it
        paths = [r["path"] for r in csv.DictReader(fh)]
    with quiet_lightning():
        fabric = launch(TrainConfig(accelerator="cpu", devices=str(args.devices), strategy="ddp"))
    torch.manual_seed(0)
    model = build_model(get_backbone_spec(args.backbone), 2, "none").eval()
    model.to(memory_format=torch.channels_last)
    preprocess = resolve_preprocess(model.backbone)
    cache = FeatureCache({}, {}, "bench")
    if fabric.world_size > 1:
        fabric.barrier()
    start = time.perf_counter()
    cache.extend(
        model, ImageStream(preprocess), InputPipeline(preprocess), paths, [], 0, 32, False, fabric
    )
    seconds = time.perf_counter() - start
    if fabric.is_global_zero:
        assert len(cache.clean) == len(paths)
        print(f"RESULT {fabric.world_size} {seconds:.2f}", flush=True)


def ddp_table(args, root: Path, env: dict[str, str]) -> None:
    rows = []
    make_tiles(args.ddp_features, root, args.tile)
    for devices in (1, 2):
        cmd = [sys.executable, __file__, "--ddp-features", str(args.ddp_features)]
        cmd += ["--devices", str(devices), "--root", str(root), "--backbone", args.backbone]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
        if out.returncode or not lines:
            raise SystemExit(out.stderr[-3000:])
        seconds = float(lines[0].split()[2])
        rows.append([devices, f"{seconds:.1f}", f"{args.ddp_features / seconds:.1f}"])
        print(f"{devices} process(es): {seconds:.1f} s", flush=True)
    speedup = float(rows[0][1]) / float(rows[1][1])
    print(
        f"\nfeature cache of {args.ddp_features} tiles ({args.tile}px, resized to the backbone's "
        f"input), {args.backbone} random init, CPU, 1 thread per process; 2 vs 1: {speedup:.2f}x"
    )
    print_table(["processes", "seconds", "images/s"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8000, 40000])
    p.add_argument("--tile", type=int, default=96)
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--bank-too", action="store_true", help="also time the in-memory bank way")
    p.add_argument("--ddp-features", type=int, metavar="N", help="time the feature cache only")
    p.add_argument("--devices", type=int, help=argparse.SUPPRESS)  # set for the launched runs
    p.add_argument("--root", type=Path, help="where tiles and runs go (default: a temp folder)")
    args = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if args.devices is not None:  # one measurement, in the processes the launcher starts
        ddp_features(args, args.root)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.ddp_features:
            ddp_table(args, root, env)
        else:
            memory_table(args, root, env)


if __name__ == "__main__":
    main()
