"""Images per second and peak memory of inference: torch eager fp32 vs torch bf16 (autocast) vs
ONNX Runtime fp32 vs ONNX Runtime int8 (static, QDQ), side by side in one run.

The models are histolens's default classifiers of tf_efficientnet_lite0 and vgg16 (the linear
probe at the default 294x448 input, tiled at 224 inside the model and the ONNX graph) with RANDOM
weights: the figures are of speed and memory only. int8 is calibrated on 8 synthetic H&E-like
images, for the same reason; the accuracy of an int8 export is what ``histolens export``
verifies on the run's own images. Each backend runs in its own process with 2 threads, so the
peak RSS is that backend's: the Python process, torch and histolens imported, the model (torch)
or the ONNX Runtime session, and the batches. It is the process's own high-water mark (VmHWM):
Linux carries ``ru_maxrss`` over from the parent across fork and exec, which would give every
child the parent's peak (``ru_maxrss`` is the fallback where /proc is missing).

OpenVINO (``--backends ...,ov-fp32,ov-int8``; ``pip install 'histolens[openvino]'``, an optional
runtime) runs the same two ONNX files with OpenVINO's CPU plugin at f32 inference precision (by
default it would compute in bf16 on CPUs that have it), as ``--onnx-runtime openvino`` does.

Before the tables it prints the CPU's instruction sets (benchmarks/_cpu.py). Each row's GMAC/s is
its images/s times the model's multiply-accumulates per image, the rate its convolutions ran at:
where eager fp32 already runs near the best fp32 rate, int8 can beat it by little more than the
int8 / fp32 rate ratio the instruction sets allow (about 2x on AVX2 without VNNI).

Run: .venv/bin/python benchmarks/bench_inference.py [--quick] [--models vgg16] [--batches 1,32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, setup  # noqa: E402
from _cpu import conv_gmacs, cpu_summary  # noqa: E402

THREADS = 2
MODELS = ("tf_efficientnet_lite0", "vgg16")
BACKENDS = ("torch-fp32", "torch-bf16", "ort-fp32", "ort-int8")
OPTIONAL_BACKENDS = ("ov-fp32", "ov-int8")  # OpenVINO, when installed


def openvino_forward(onnx: str):
    """A forward function of OpenVINO's CPU plugin on ``onnx`` (f32, 2 threads)."""
    from histolens.models.openvino_core import infer_per_image

    try:
        import openvino as ov
    except ImportError:
        raise SystemExit("openvino is not installed: pip install openvino") from None
    compiled = ov.Core().compile_model(
        onnx,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": THREADS,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        },
    )
    request = compiled.create_infer_request()
    # One image per call, as histolens runs OpenVINO (histolens.models.openvino_core).
    return lambda x: infer_per_image(request, x.numpy(), [compiled.output(0)])


def build(backbone: str):
    """The default probe classifier of ``backbone`` (random weights) and its input size."""
    from histolens.config import RunConfig
    from histolens.models.backbones import get_backbone_spec
    from histolens.models.classifier import build_model, resolve_feature_layer

    cfg = RunConfig()
    spec = get_backbone_spec(backbone)
    layer = resolve_feature_layer(spec, cfg.model.feature_layer, cfg.model.head)
    model = build_model(spec, 2, "none", (), (), layer).eval()
    size = spec.input_size_for(cfg.model.input_size) or (224, 224)
    return model.to(memory_format=torch.channels_last), tuple(size)


def synthetic_inputs(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """``n`` H&E-like images at ``size``, normalised as the models expect (ImageNet mean/std)."""
    from histolens.models.transforms import Preprocess
    from histolens.testing import make_tissue_image

    pre = Preprocess(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    images = [make_tissue_image((size[1], size[0]), seed=seed + i) for i in range(n)]
    return pre.normalize(torch.stack([pre.resize(img) for img in images]).float() / 255)


def export(backbone: str, folder: Path) -> dict[str, str]:
    """fp32 and int8 ONNX files of ``backbone`` in ``folder`` (made once, outside the timings)."""
    from histolens.export.onnx import trace_onnx
    from histolens.export.quantize import fp32_stages, quantize_int8

    model, size = build(backbone)
    fp32, int8 = folder / f"{backbone}.onnx", folder / f"{backbone}-int8.onnx"
    trace_onnx(model, size, fp32)
    calibration = synthetic_inputs(8, size, seed=100)
    batches = [calibration[i : i + 4].numpy() for i in (0, 4)]
    quantize_int8(fp32, int8, batches, fp32_stages(model))  # as ``histolens export`` does
    return {"ort-fp32": str(fp32), "ort-int8": str(int8)}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (see the module docstring)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args: argparse.Namespace) -> dict:
    """One backend, one model, one batch size (run in a child process)."""
    setup(THREADS)
    if args.backend.startswith("ort"):
        from histolens.inference.runtimes import OnnxRunner

        size = tuple(json.loads(args.size))
        forward = OnnxRunner(args.onnx, threads=THREADS)
    elif args.backend.startswith("ov"):
        size = tuple(json.loads(args.size))
        forward = openvino_forward(args.onnx)
    else:
        model, size = build(args.model)
        if args.backend == "torch-bf16":

            def forward(x):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(x)

        else:
            forward = model
    x = synthetic_inputs(min(args.batch, 8), size).repeat((args.batch + 7) // 8, 1, 1, 1)
    x = x[: args.batch].contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(args.warmup):
            forward(x)
        n, start = 0, time.perf_counter()
        while n < args.min_batches or time.perf_counter() - start < args.min_seconds:
            forward(x)
            n += 1
        seconds = time.perf_counter() - start
    return {
        "images_per_s": n * args.batch / seconds,
        "batches": n,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_child(model: str, backend: str, batch: int, onnx: str, size, opts) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--model",
        model,
        "--backend",
        backend,
        "--batch",
        str(batch),
        "--onnx",
        onnx,
        "--size",
        json.dumps(list(size)),
        "--warmup",
        str(opts.warmup),
        "--min-batches",
        str(opts.min_batches),
        "--min-seconds",
        str(opts.min_seconds),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, env=env, check=False, timeout=opts.child_timeout
        )
    except subprocess.TimeoutExpired:
        # A backend this slow is not a contender; say how slow instead of waiting for it.
        seconds = opts.child_timeout
        return {"error": f"stopped after {seconds:.0f} s (under {batch / seconds:.2f} images/s)"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--batches", default="1,32", help="Batch sizes, comma-separated.")
    ap.add_argument("--quick", action="store_true", help="Two timed batches each: a smoke run.")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-batches", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=10.0)
    ap.add_argument(
        "--child-timeout",
        type=float,
        default=240.0,
        help="Seconds one backend may take (warm-up and timed batches) before it is stopped.",
    )
    # Internal: one measurement in a child process.
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--onnx", default="", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="[]", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    if args.quick:
        args.warmup, args.min_batches, args.min_seconds = 1, 2, 0.0
    setup(THREADS)
    import onnxruntime

    batches = [int(b) for b in args.batches.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS) - set(OPTIONAL_BACKENDS))
    if unknown:
        raise SystemExit(
            f"Unknown backend(s) {', '.join(unknown)}; choose from "
            f"{', '.join(BACKENDS + OPTIONAL_BACKENDS)}."
        )
    print(
        f"RANDOM weights (speed and memory only, not accuracy); {THREADS} threads; torch "
        f"{torch.__version__}, onnxruntime {onnxruntime.__version__}; "
        f"{platform.processor() or platform.machine()}; int8 calibrated on 8 synthetic images."
    )
    print(f"CPU: {cpu_summary()}")
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        for model in [m for m in args.models.split(",") if m]:
            net, size = build(model)
            gmacs = conv_gmacs(net, size)
            del net
            t = time.perf_counter()
            onnx_needed = any(b.startswith(("ort", "ov")) for b in backends)
            files = export(model, Path(tmp)) if onnx_needed else {}
            files |= {f"ov-{k[4:]}": v for k, v in files.items()}  # OpenVINO reads the same
            print(
                f"\n{model} at {size[0]}x{size[1]} (export + int8 calibration "
                f"{time.perf_counter() - t:.0f} s); {gmacs:.2f} GMAC per image"
            )
            rows = []
            for batch in batches:
                base = None
                for backend in backends:
                    r = run_child(model, backend, batch, files.get(backend, ""), size, args)
                    if "error" in r:
                        rows.append([backend, batch, "failed", "", "", "", r["error"][:60]])
                        continue
                    if backend == "torch-fp32":
                        base = r["images_per_s"]
                    ratio = f"{r['images_per_s'] / base:.2f}x" if base else "n/a"
                    rows.append(
                        [
                            backend,
                            batch,
                            r["images_per_s"],
                            ratio,
                            f"{r['images_per_s'] * gmacs:.0f}",
                            f"{r['peak_rss_mb']:.0f}",
                            r["batches"],
                        ]
                    )
            print_table(
                [
                    "backend",
                    "batch",
                    "images/s",
                    "vs eager fp32",
                    "GMAC/s",
                    "peak RSS MB",
                    "batches",
                ],
                rows,
            )


if __name__ == "__main__":
    main()
