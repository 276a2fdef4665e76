"""Images/s of a ViT-L/16 (UNI's architecture) with random weights on this CPU.

The pathology foundation models (UNI, Virchow2, H-optimus-0, ...) are ViT-L to ViT-g sized; this
measures what feature extraction through the cache costs per image on a CPU, without weights
(random weights cost the same). Batch 8, 224x224, fp32 and bf16 autocast.

    .venv/bin/python benchmarks/bench_vit_large.py [--threads 2] [--batches 3]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
from _common import print_table, setup


def measure(model: torch.nn.Module, batch: int, batches: int, bf16: bool) -> float:
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(x[:1])  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            model(x)
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    setup(args.threads)
    # UNI's creation arguments (its model card): ViT-L/16, LayerScale init 1e-5, no classifier.
    model = timm.create_model(
        "vit_large_patch16_224", pretrained=False, init_values=1e-5, num_classes=0
    ).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    rows = []
    for bf16 in (False, True):
        ips = measure(model, args.batch, args.batches, bf16)
        rows.append(
            [f"ViT-L/16 {params:.0f} M, {'bf16 autocast' if bf16 else 'fp32'}", ips, 1000 / ips]
        )
    print(
        f"threads {args.threads}, batch {args.batch}, {args.batches} timed batches, random weights"
    )
    print_table(["model", "images/s", "ms per image"], rows)
    print(f"featurising 7,909 BreakHis images (fp32): {7909 / rows[0][1] / 3600:.1f} h")


if __name__ == "__main__":
    main()
