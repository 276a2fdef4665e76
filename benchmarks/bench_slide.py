"""Whole-slide throughput: ``histolens slide predict`` against the same model on tiles already in
memory, for torch eager, ONNX Runtime and OpenVINO, with peak RSS at two slide sizes.

A synthetic pyramidal slide (``histolens.slides.synthetic``, 0.5 um/px, JPEG tiles) is written
once with at least ``--tiles`` tissue tiles, and a small one with ``--small-tiles``. The model is
histolens's classifier of ``--backbone`` (random weights: the figures are of speed and memory
only), tiled at ``--tile-mpp`` so that one tile is one model input. Each measurement runs in its
own process with 2 threads, so its peak RSS (VmHWM) is its own; DataLoader workers are separate
processes: their peak RSS is sampled and reported apart, with the peak of main + worker RSS
summed (an upper bound: the forked worker's RSS counts pages it shares with the main process)
and of their PSS summed (shared pages split: the memory the pipeline holds).

Per row: tiles/s of the whole pipeline (read, mask, tile, stain, infer, write), the same
Predictor's rate on tiles already in memory (what ``bench_inference.py`` measures), their ratio
(the target is >= 0.8: reading hidden behind inference), the share of the main process's time
spent waiting for tiles, in stain normalisation + normalisation, and in the model, the masking
time, peak RSS, and tissue area per minute.

``ov-fp32`` is the same ONNX export run by OpenVINO (``HISTOLENS_ONNX_RUNTIME=openvino``), the
fastest exported runtime for EfficientNet-Lite0 on the CPUs measured (``bench_inference.py``).
``--threads`` sets the model's threads (both measurements): with fewer threads than cores, the
reading worker has a core of its own, as it has on a machine with more cores than 2.
``--reading both`` also runs each slide with every region read through OpenSlide
(``HISTOLENS_TIFF_TILES=0``) beside histolens's reader of decoded TIFF tiles, side by side in
each round. ``--repeat N`` runs N rounds (each runtime's in-memory rate and both slides, the runtimes taking
turns) and prints each ratio's median: on a shared host one round's ratio can move by 0.15.

Run: .venv/bin/python benchmarks/bench_slide.py [--tiles 20000] [--small-tiles 2000]
     [--runtimes torch,ort-fp32,ov-fp32] [--threads 2] [--workers 1] [--repeat 1]
     [--reading tiles|openslide|both] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, setup  # noqa: E402
from _cpu import cpu_summary  # noqa: E402

from histolens.slides.reader import TIFF_TILES_ENV  # noqa: E402

# The exported runtimes run the same ONNX file; OpenVINO is chosen as users choose it.
RUNTIME_ENV = {"ov-fp32": {"HISTOLENS_ONNX_RUNTIME": "openvino"}}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_mb(pid: int | str, key: str, name: str = "status") -> float:
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class MemorySampler(threading.Thread):
    """Samples the RSS and PSS of this process and its children (the reading workers) every
    0.2 s. A forked child's VmHWM and ru_maxrss start at the parent's peak (the kernel copies it
    at fork), so the workers' own peak is sampled; PSS splits the pages they share with the main
    process, so summed PSS is the memory the pipeline holds."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.worker_rss = self.total_rss = self.total_pss = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.wait(0.2):
            kids = []
            for p in Path("/proc").iterdir():
                try:
                    if p.name.isdigit() and int((p / "stat").read_text().split()[3]) == me:
                        kids.append(p.name)
                except (OSError, IndexError, ValueError):
                    continue
            rss = [_proc_mb(k, "VmRSS") for k in kids]
            pss = [_proc_mb(k, "Pss", "smaps_rollup") for k in ["self", *kids]]
            self.worker_rss = max(self.worker_rss, max(rss, default=0.0))
            self.total_rss = max(self.total_rss, _proc_mb("self", "VmRSS") + sum(rss))
            self.total_pss = max(self.total_pss, sum(pss))

    def stop(self) -> None:
        self._halt.set()
        self.join()


def make_model(folder: Path, backbone: str) -> dict[str, str]:
    """A checkpoint of ``backbone`` and its fp32 ONNX graph with the histolens metadata."""
    from histolens.testing import make_checkpoint, unverified_onnx_export

    ckpt = make_checkpoint(folder / "model.safetensors", backbone=backbone)
    unverified_onnx_export(ckpt, folder / "model.onnx")
    onnx = str(folder / "model.onnx")
    return {"torch": str(ckpt), "ort-fp32": onnx, "ov-fp32": onnx}


def make_slide(path: Path, tiles: int, tile_px: int, seed: int) -> Path:
    """A square synthetic slide at 0.5 um/px holding at least ``tiles`` tissue tiles."""
    from histolens.slides.synthetic import make_synthetic_slide, write_pyramid_tiff

    # Tissue is about 80% of the frame, less where the lobes overlap; edge tiles of under half
    # tissue are skipped (measured: about 63% of the frame is tiled).
    side = math.ceil(math.sqrt(tiles / 0.6) * tile_px)
    slide = make_synthetic_slide(side, side, 0.5, n_lesions=3, seed=seed, tissue_fraction=0.8)
    return write_pyramid_tiff(slide, path, levels=4)


def child(args: argparse.Namespace) -> dict:
    """One measurement in this process: 'slide' (the pipeline) or 'memory' (tiles in memory)."""
    setup(args.threads)
    import numpy as np
    import torch

    from histolens.inference.predictor import Predictor
    from histolens.slides.predict import SlideOptions, SlideRun
    from histolens.slides.reader import open_slide
    from histolens.slides.tiles import StageTimes, score_batch

    predictor = Predictor.from_checkpoint(args.model)
    options = SlideOptions(
        tile_mpp=args.tile_mpp, batch_size=args.batch, workers=args.workers, min_tissue=0.5
    )
    if args.what == "memory":
        # The tiles the pipeline would read, read once into memory, then timed through the
        # same Predictor steps (stain, model, guard) as the pipeline's batches.
        run = SlideRun(predictor, Path(args.out), options, progress=False)
        with open_slide(args.slide) as reader:
            size0 = run.scale.level0_size(reader.mpp)
            step = size0[0] / run.scale.input_size[0]
            tiles = [
                predictor.preprocess.resize(reader.read_field(x, y, *size0, step))
                for x in range(size0[0] * 4, size0[0] * 12, size0[0])
                for y in range(size0[1] * 4, size0[1] * 12, size0[1])
            ]
        batch = torch.stack((tiles * (args.batch // len(tiles) + 1))[: args.batch])
        with torch.inference_mode():
            score_batch(predictor, batch)
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                score_batch(predictor, batch, StageTimes())
                n += len(batch)
        return {"tiles_per_s": n / (time.perf_counter() - start), "peak_rss_mb": peak_rss_mb()}
    run = SlideRun(predictor, Path(args.out), options, progress=False)
    sampler = MemorySampler()
    sampler.start()
    start = time.perf_counter()
    summary = run.predict_slide(Path(args.slide))
    seconds = time.perf_counter() - start
    sampler.stop()
    t = run.times
    busy = t.reading + t.stain + t.inference
    return {
        "tiles": summary.tiles_scored,
        "seconds": seconds,
        "tiles_per_s": summary.tiles_scored / seconds,
        "reading_share": t.reading / busy,
        "stain_share": t.stain / busy,
        "inference_share": t.inference / busy,
        "masking_s": run.masking_seconds,
        "tissue_mm2": summary.tissue_mm2,
        "mm2_per_min": summary.tissue_mm2 / (seconds / 60),
        "peak_rss_mb": peak_rss_mb(),
        "worker_peak_rss_mb": sampler.worker_rss,
        "total_peak_rss_mb": max(sampler.total_rss, peak_rss_mb()),
        "total_peak_pss_mb": sampler.total_pss,
        "score_mean": float(np.float32(summary.score_mean)),
    }


def run_child(
    what: str, runtime: str, model: str, slide: str, out: str, opts, env_extra: dict | None = None
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        what,
        "--model",
        model,
        "--slide",
        slide,
        "--out",
        out,
        "--batch",
        str(opts.batch),
        "--workers",
        str(opts.workers),
        "--tile-mpp",
        str(opts.tile_mpp),
        "--seconds",
        str(opts.seconds),
        "--threads",
        str(opts.threads),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "HF_HUB_OFFLINE": "1"}
    env.pop("HISTOLENS_ONNX_RUNTIME", None)
    env.update(RUNTIME_ENV.get(runtime, {}))
    env.update(env_extra or {})
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiles", type=int, default=20000)
    ap.add_argument("--small-tiles", type=int, default=2000)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--runtimes", default="torch,ort-fp32,ov-fp32")
    ap.add_argument("--threads", type=int, default=2, help="the model's threads")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader processes reading tiles")
    ap.add_argument("--tile-mpp", type=float, default=0.5, help="um/px of the model input")
    ap.add_argument("--seconds", type=float, default=20.0, help="of the in-memory timing")
    ap.add_argument(
        "--reading",
        default="tiles",
        help="tiles (histolens's reader), openslide (every region through OpenSlide), or both",
    )
    ap.add_argument("--quick", action="store_true", help="2,000 and 500 tiles: a smoke run")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of (in memory, large, small) per runtime; the median ratio is printed",
    )
    ap.add_argument("--child", default=None)
    ap.add_argument("--model", default="")
    ap.add_argument("--slide", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.reading == "both":
        args.reading = "tiles,openslide"
    if args.child:
        args.what = args.child
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.tiles, args.small_tiles, args.seconds = 2000, 500, 5.0
    setup(args.threads)
    from histolens.inference.predictor import Predictor

    print(cpu_summary())

    with tempfile.TemporaryDirectory(prefix="bench-slide-") as tmp:
        folder = Path(tmp)
        models = make_model(folder, args.backbone)
        input_w = Predictor.from_checkpoint(models["torch"]).preprocess.input_size[1]
        tile_px = round(input_w * args.tile_mpp / 0.5)
        t0 = time.perf_counter()
        big = make_slide(folder / "big.tiff", args.tiles, tile_px, 1)
        small = make_slide(folder / "small.tiff", args.small_tiles, tile_px, 2)
        print(
            f"Slides written in {time.perf_counter() - t0:.0f} s: {big.stat().st_size / 1e6:.0f}"
            f" MB and {small.stat().st_size / 1e6:.0f} MB; {args.backbone} at {input_w} px, "
            f"{args.threads} model thread(s), batch {args.batch}, {args.workers} reading worker(s)."
        )
        rows, ratios = [], {}
        readings = args.reading.split(",")
        rounds = [(runtime, i) for i in range(args.repeat) for runtime in args.runtimes.split(",")]
        for runtime, i in rounds:
            model = models[runtime]
            memory = run_child(
                "memory", runtime, model, str(big), str(folder / f"m-{runtime}-{i}"), args
            )
            cases = [(m, n, sl) for m in readings for n, sl in (("large", big), ("small", small))]
            for reading, name, slide in cases:
                label = runtime if reading == "tiles" else f"{runtime} (openslide)"
                out = folder / f"{runtime}-{reading}-{name}-{i}"
                env = {TIFF_TILES_ENV: "1" if reading == "tiles" else "0"}
                r = run_child("slide", runtime, model, str(slide), str(out), args, env)
                if "error" in r or "error" in memory:
                    rows.append([label, name, r.get("error", memory.get("error"))])
                    continue
                ratio = r["tiles_per_s"] / memory["tiles_per_s"]
                ratios.setdefault((label, name), []).append(ratio)
                rows.append(
                    [
                        label,
                        name,
                        r["tiles"],
                        r["tiles_per_s"],
                        memory["tiles_per_s"],
                        ratio,
                        r["reading_share"],
                        r["stain_share"],
                        r["inference_share"],
                        r["masking_s"],
                        r["peak_rss_mb"],
                        r["worker_peak_rss_mb"],
                        r["total_peak_rss_mb"],
                        r["total_peak_pss_mb"],
                        memory["peak_rss_mb"],
                        r["mm2_per_min"],
                    ]
                )
        headers = [
            "runtime",
            "slide",
            "tiles",
            "tiles/s",
            "in-memory/s",
            "ratio",
            "read",
            "stain",
            "infer",
            "mask s",
            "RSS MB",
            "worker RSS",
            "main+worker RSS",
            "PSS",
            "mem RSS",
            "mm2/min",
        ]
        width = len(headers)
        print_table(headers, [r + [""] * (width - len(r)) for r in rows])
        if args.repeat > 1:
            # Rounds alternate the runtimes, so a slow spell of a shared host falls on each.
            for (runtime, name), values in ratios.items():
                listed = ", ".join(f"{v:.3f}" for v in values)
                print(f"{runtime} {name}: median ratio {statistics.median(values):.3f} ({listed})")


if __name__ == "__main__":
    main()
