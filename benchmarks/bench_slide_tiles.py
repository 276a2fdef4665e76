"""Load check of the slide viewer's Deep Zoom tiles: 16 clients panning for 30 s.

Starts ``histolens serve`` (its app, under uvicorn) in a subprocess on 127.0.0.1 with a slide
folder holding one synthetic pyramidal slide (or the slide given with --slide), then 16 client
threads each pan: from a random tile of one of the three most detailed Deep Zoom levels they
request the neighbouring tiles row by row, as a viewer does when dragged, each client bounded by
--max-requests and all stopping after --seconds. Prints p50/p99/max tile latency, requests per
second and the number of 5xx (and any other non-200) answers. Loopback only.

    python benchmarks/bench_slide_tiles.py                # synthetic 8192 x 8192 slide
    python benchmarks/bench_slide_tiles.py --slide CMU-1-Small-Region.svs
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import numpy as np

SERVER = """
import sys, uvicorn
from histolens.web.app import create_app
app = create_app(sys.argv[1], slides=sys.argv[2], slide_cache=sys.argv[3])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[4]), log_level="warning", access_log=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_folder(work: Path, slide: Path | None) -> Path:
    """A slide folder: a link to --slide, or one synthetic 8192 x 8192 slide at 0.5 um/px."""
    folder = work / "slides"
    folder.mkdir()
    if slide is not None:
        (folder / slide.name).symlink_to(slide.resolve())
        return folder
    from histolens.slides.synthetic import TextureBank, make_synthetic_slide, write_pyramid_tiff

    synthetic = make_synthetic_slide(
        8192, 8192, 0.5, n_lesions=3, seed=1, bank=TextureBank.paint(seed=0, k=2)
    )
    write_pyramid_tiff(synthetic, folder / "synthetic.tiff", levels=4)
    return folder


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited while starting")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start")


def pan(base: str, levels: dict[int, tuple[int, int]], end: float, max_requests: int, seed: int):
    """One client: rows of neighbouring tiles from random starts; (latencies in s, statuses)."""
    rng = random.Random(seed)
    latencies, statuses = [], []
    top = sorted(levels)[-3:]
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < end and len(latencies) < max_requests:
            level = rng.choice(top)
            cols, rows = levels[level]
            col, row = rng.randrange(cols), rng.randrange(rows)
            for dc in range(min(4, cols)):  # a short drag: four tiles along the row
                if time.monotonic() >= end or len(latencies) >= max_requests:
                    break
                t0 = time.perf_counter()
                r = client.get(f"{base}_files/{level}/{(col + dc) % cols}_{row}.jpeg")
                latencies.append(time.perf_counter() - t0)
                statuses.append(r.status_code)
    return latencies, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, default=None, help="a slide file (default synthetic)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-requests", type=int, default=20_000, help="per client")
    args = parser.parse_args()

    from histolens.testing import make_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-slide-tiles-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = None
    try:
        checkpoint = make_checkpoint(work / "tiny.safetensors")
        folder = make_folder(work, args.slide)
        cmd = [sys.executable, "-c", SERVER, str(checkpoint), str(folder), str(work / "cache")]
        proc = subprocess.Popen([*cmd, str(port)], env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wait_up(url, proc)
        [slide] = httpx.get(url + "/v1/slides").json()["slides"]
        base = f"{url}/v1/slides/{slide['id']}"
        root = ET.fromstring(httpx.get(base + ".dzi").text)
        size = root.find("{*}Size")
        width, height = int(size.get("Width")), int(size.get("Height"))
        tile = int(root.get("TileSize"))
        levels = {}
        top = int(np.ceil(np.log2(max(width, height))))
        for level in range(top + 1):
            scale = 2 ** (top - level)
            w, h = max(1, -(-width // scale)), max(1, -(-height // scale))
            levels[level] = (-(-w // tile), -(-h // tile))

        end = time.monotonic() + args.seconds
        results: list = [None] * args.clients
        start = time.perf_counter()

        def client(i: int) -> None:
            results[i] = pan(base, levels, end, args.max_requests, seed=i)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        latencies = np.concatenate([np.asarray(r[0]) for r in results]) * 1000
        statuses = np.concatenate([np.asarray(r[1]) for r in results])
        print(f"slide {slide['name']} {width} x {height}, {args.clients} clients, {elapsed:.1f} s")
        print(f"tiles requested {len(latencies)} ({len(latencies) / elapsed:.1f}/s)")
        print(
            f"latency ms: p50 {np.percentile(latencies, 50):.1f}  "
            f"p99 {np.percentile(latencies, 99):.1f}  max {latencies.max():.1f}"
        )
        print(
            f"5xx {int((statuses >= 500).sum())}  other non-200 {int(((statuses != 200) & (statuses < 500)).sum())}"
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
