"""``histolens train`` on breakhis-dev with the backbone on PyTorch eager vs the feature engine.

Each engine trains the default model (frozen Lite0, blocks.2 + blocks.5 of 294x448 tiles, linear
probe, 5-fold patient-level estimate) in its own fresh ``histolens train`` process, one after the
other in the same run, from an empty run directory (no feature cache) and, for ``auto``, an empty
engine cache (its one-time export and check are in its time). Prints the wall times, their ratio
and both estimates, which should agree (docs/engine.md).

Run: .venv/bin/python benchmarks/bench_train_engine.py [--data MANIFEST] [--engines torch auto]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, require_real_data  # noqa: E402

METRICS = ("ROC AUC", "patient AUC", "balanced accuracy")


def train_once(engine: str, data: Path, tmp: Path) -> tuple[float, dict[str, str], str]:
    """Wall time, estimate lines and recorded engine of one ``histolens train`` process."""
    run = tmp / f"run-{engine}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HISTOLENS_CACHE": str(tmp / f"cache-{engine}")}
    command = [sys.executable, "-m", "histolens", "train", "--data", str(data)]
    command += ["--out", str(run), "--engine", engine, "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"histolens train --engine {engine} failed:\n{done.stderr[-2000:]}")
    estimate = {}
    for name in METRICS:
        match = re.search(rf"^\s*{re.escape(name)}: (\S+ \(95% CI [^)]*\))", done.stdout, re.M)
        estimate[name] = match.group(1) if match else "-"
    recorded = json.loads((run / "config.json").read_text())["train"]["engine"]
    return seconds, estimate, recorded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=None, help="manifest (default: breakhis-dev)")
    ap.add_argument("--engines", nargs="+", default=["torch", "auto"])
    args = ap.parse_args()
    data = args.data or require_real_data() / "manifest.csv"
    print(f"histolens train --data {data} (default model); {os.cpu_count()} CPUs", flush=True)
    rows, times = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            seconds, estimate, recorded = train_once(engine, data, Path(tmp))
            times[engine] = seconds
            rows.append([f"--engine {engine}", recorded, f"{seconds:.1f}", *estimate.values()])
            print("  ".join(rows[-1]), flush=True)
    base = times.get("torch")
    for row, engine in zip(rows, args.engines, strict=True):
        row.insert(3, f"{base / times[engine]:.2f}x" if base else "-")
    print()
    print_table(["engine", "computed by", "seconds", "speed-up", *METRICS], rows)


if __name__ == "__main__":
    main()
