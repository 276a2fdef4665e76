"""`histolens predict` over thousands of tiles: peak memory and images/s, streamed vs in memory.

For each N, N synthetic H&E tiles are written to a temporary folder (a few hundred rendered ones,
copied under distinct names: decoding costs the same, and rendering 20,000 would take minutes) and
predicted twice, each in its own process:

- streamed: the ``histolens predict`` command (rows appended batch by batch, resumable);
- in memory: the way predict worked before, ``Predictor.predict_paths`` over the whole list, then
  the CSV written at the end.

Peak RSS is the child's own ``ru_maxrss`` (``os.wait4``). The model is a small randomly initialised
timm net (``--backbone``, default ``test_resnet``, 160 px input) so the figures are about the
pipeline, not the network; tiles are ``--tile`` px and resized by the model's preprocessing.

Run: .venv/bin/python benchmarks/bench_predict_scale.py [--n 2000 20000] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table  # noqa: E402

IN_MEMORY = """
import csv, sys
from histolens.data.imageio import is_image_name
from histolens.inference.predictor import Predictor
ckpt, folder, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from pathlib import Path
root = Path(folder)
paths = sorted(p for p in root.rglob("*") if p.is_file() and is_image_name(p))
preds, skipped = Predictor.from_checkpoint(ckpt).predict_paths(paths, batch)
with open(out, "w", newline="", encoding="utf-8") as fh:
    w = None
    for p in preds:
        row = p.as_row()
        if w is None:
            w = csv.DictWriter(fh, fieldnames=list(row))
            w.writeheader()
        w.writerow(row)
"""


def make_tiles(folder: Path, n: int, source: list[Path]) -> None:
    """``n`` tiles in folders of 1,000, copies of the rendered ``source`` tiles in turn."""
    for i in range(n):
        sub = folder / f"part{i // 1000:03d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        shutil.copyfile(source[i % len(source)], sub / f"tile_{i:06d}.png")


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stderr) of one child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{stderr[-2000:]}")
    # ru_maxrss is in KiB on Linux.
    return seconds, usage.ru_maxrss / 1024, stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--tile", type=int, default=64, help="Tile side in pixels.")
    parser.add_argument("--unique", type=int, default=200, help="Tiles actually rendered.")
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="Torch intra-op threads.")
    parser.add_argument("--skip-in-memory", action="store_true")
    args = parser.parse_args()

    from histolens.data.synth import generate_synthetic
    from histolens.testing import make_checkpoint

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="histolens-bench-predict-") as tmp:
        tmp = Path(tmp)
        generate_synthetic(tmp / "src", n=args.unique, seed=0, size=(args.tile, args.tile))
        source = sorted((tmp / "src").rglob("SOB_*.png"))
        source = [p for p in source if "masks" not in p.parts]
        ckpt = make_checkpoint(tmp / "model.safetensors", backbone=args.backbone)
        for n in args.n:
            tiles = tmp / f"tiles-{n}"
            start = time.perf_counter()
            make_tiles(tiles, n, source)
            print(f"== {n} tiles written in {time.perf_counter() - start:.1f} s", flush=True)
            out = tmp / f"streamed-{n}.csv"
            cmd = [sys.executable, "-m", "histolens", "predict", str(ckpt), str(tiles)]
            cmd += ["--out", str(out), "--batch-size", str(args.batch_size)]
            cmd += ["--workers", str(args.workers)]
            seconds, rss, stderr = measure(cmd, env)
            rate = re.findall(r"([\d.]+) images/s", stderr)
            n_rows = out.read_bytes().count(b"\n") - 1
            assert n_rows == n, f"streamed run wrote {n_rows} rows, not {n}"
            rows.append([f"{n} streamed", seconds, float(rate[-1]) if rate else "?", rss])
            print(f"   streamed: {seconds:.1f} s, peak RSS {rss:.0f} MiB", flush=True)
            if not args.skip_in_memory:
                mem_out = tmp / f"in-memory-{n}.csv"
                cmd = [sys.executable, "-c", IN_MEMORY, str(ckpt), str(tiles), str(mem_out)]
                seconds, rss, _ = measure([*cmd, str(args.batch_size)], env)
                same = mem_out.read_bytes() == out.read_bytes()
                rows.append([f"{n} in memory", seconds, n / seconds, rss])
                print(
                    f"   in memory: {seconds:.1f} s, peak RSS {rss:.0f} MiB; "
                    f"same CSV as streamed: {same}",
                    flush=True,
                )
            shutil.rmtree(tiles)
    print(
        f"\n{args.backbone} (random init), {args.tile}x{args.tile} px PNG tiles, batch "
        f"{args.batch_size}, {args.workers} decode threads, {args.threads} torch thread(s); "
        "wall time includes starting Python and loading the model; streamed images/s is the "
        "command's own figure (predicting only), in-memory images/s is over the wall time"
    )
    print_table(["run", "wall s", "images/s", "peak RSS MiB"], rows)


if __name__ == "__main__":
    main()
