"""Load test of ``histolens serve``: throughput and latency with and without micro-batching.

Starts the service twice in subprocesses on 127.0.0.1 (free ports) for a checkpoint, one with
micro-batching and one with it off (max_batch=1), and sends POST /v1/predict requests from 1, 4
and 16 concurrent clients, the two modes taking turns in short rounds (4 requests per client)
so that both see the same machine load. Each cell sends at most --requests requests and stops early after --max-seconds.
Loopback only; nothing leaves the machine.

    python benchmarks/bench_web_load.py --checkpoint runs/x/model.safetensors --requests 200

With ``--against FILE`` (for example the run's ONNX export, ``histolens export``) the two servers
are instead the checkpoint and FILE, both micro-batched: a backend compared with today's torch one
under the same alternating load.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

SERVER = """
import sys, uvicorn
from histolens.web.app import create_app
app = create_app(sys.argv[1], max_batch=int(sys.argv[2]), batch_wait_ms=float(sys.argv[3]),
                 max_queue=1024)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[4]), log_level="warning", access_log=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The service in its own process, so client threads do not share its interpreter lock."""

    def __init__(self, checkpoint: Path, max_batch: int, batch_wait_ms: float) -> None:
        self.checkpoint = checkpoint
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SERVER,
                str(checkpoint),
                str(max_batch),
                str(batch_wait_ms),
                str(self.port),
            ],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited during startup")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("the server did not start within 120 s")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_cell(url: str, image: bytes, clients: int, total: int, max_seconds: float) -> dict:
    """``total`` requests from ``clients`` threads (or fewer if ``max_seconds`` runs out)."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    issued = 0
    deadline = time.monotonic() + max_seconds

    def take() -> bool:
        nonlocal issued
        with lock:
            if issued >= total or time.monotonic() > deadline:
                return False
            issued += 1
            return True

    def client() -> None:
        nonlocal errors
        with httpx.Client(base_url=url, timeout=300) as http:
            while take():
                start = time.perf_counter()
                try:
                    ok = (
                        http.post(
                            "/v1/predict", files={"file": ("tile.png", image, "image/png")}
                        ).status_code
                        == 200
                    )
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - start
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        errors += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors, "wall": time.perf_counter() - start}


def summarise(chunks: list[dict]) -> dict:
    latencies = [x for c in chunks for x in c["latencies"]]
    wall = sum(c["wall"] for c in chunks)
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "done": len(latencies),
        "errors": sum(c["errors"] for c in chunks),
        "rps": len(latencies) / wall,
        "wall": wall,
        "p50": np.percentile(ms, 50),
        "p95": np.percentile(ms, 95),
        "p99": np.percentile(ms, 99),
    }


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def default_image() -> bytes:
    from histolens.testing import make_tissue_image

    buf = io.BytesIO()
    make_tissue_image((700, 460), seed=0).save(buf, format="PNG")  # BreakHis tile size
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=200, help="requests per cell (at most)")
    parser.add_argument("--image", type=Path, help="image to send (default: a 700x460 tile)")
    parser.add_argument("--concurrency", default="1,4,16", help="client counts, comma-separated")
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="time bound per cell (mode x concurrency)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="alternating rounds per cell, so both modes see the same load",
    )
    parser.add_argument("--max-batch", type=int, default=16, help="micro-batch size when on")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument(
        "--against",
        type=Path,
        help="a second model file (e.g. an ONNX export) served micro-batched beside the checkpoint",
    )
    args = parser.parse_args(argv)

    image = args.image.read_bytes() if args.image else default_image()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.against is None:
        modes = [("batched", args.max_batch, args.checkpoint), ("unbatched", 1, args.checkpoint)]
    else:
        modes = [
            (args.checkpoint.suffix.lstrip(".") or "torch", args.max_batch, args.checkpoint),
            (args.against.suffix.lstrip(".") or "other", args.max_batch, args.against),
        ]
        if modes[0][0] == modes[1][0]:
            modes = [("first",) + modes[0][1:], ("second",) + modes[1][1:]]
    # Both servers run side by side and the modes take turns in short rounds, so that both see
    # the same machine load (an idle server costs no CPU).
    servers = {}
    try:
        for mode, max_batch, model_file in modes:
            servers[mode] = Server(model_file, max_batch, args.batch_wait_ms)
            run_cell(servers[mode].url, image, 2, 4, 120)  # warm-up
        print(f"load average before: {load_average()}", file=sys.stderr)
        chunks: dict[tuple[str, int], list[dict]] = {}
        for clients in levels:
            # Short rounds (a few requests per client), modes alternating and swapping who goes
            # first: a burst of load from elsewhere on the machine hits both modes alike.
            per_round = max(8, 4 * clients)
            sent = {mode: 0 for mode, *_ in modes}
            spent = {mode: 0.0 for mode, *_ in modes}
            round_ = 0
            while any(sent[m] < args.requests and spent[m] < args.max_seconds for m in sent):
                for mode, *_ in modes if round_ % 2 == 0 else modes[::-1]:
                    n = min(per_round, args.requests - sent[mode])
                    if n <= 0 or spent[mode] >= args.max_seconds:
                        continue
                    chunk = run_cell(
                        servers[mode].url, image, clients, n, args.max_seconds - spent[mode]
                    )
                    chunks.setdefault((mode, clients), []).append(chunk)
                    sent[mode] += n
                    spent[mode] += chunk["wall"]
                round_ += 1
            for mode, *_ in modes:
                r = summarise(chunks[mode, clients])
                print(
                    f"  {mode:9s} {clients:2d} clients: {r['done']} ok in {r['wall']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.close()
    results = {key: summarise(value) for key, value in chunks.items()}

    served = "   ".join(f"{mode}: {f}" for mode, _, f in modes)
    print(
        f"\n{served}   image: {len(image) / 1024:.0f} KB   "
        f"max_batch={args.max_batch} batch_wait_ms={args.batch_wait_ms}   "
        f"cpus: {os.cpu_count()}   load average after: {load_average()}\n"
    )
    header = (
        f"{'mode':10s} {'clients':>7s} {'ok':>5s} {'errors':>6s} {'req/s':>7s} "
        f"{'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s}"
    )
    print(header)
    print("-" * len(header))
    for mode, *_ in modes:
        for clients in levels:
            r = results[mode, clients]
            print(
                f"{mode:10s} {clients:7d} {r['done']:5d} {r['errors']:6d} {r['rps']:7.2f} "
                f"{r['p50']:8.0f} {r['p95']:8.0f} {r['p99']:8.0f}"
            )
    first, second = modes[0][0], modes[1][0]
    print(f"\n{first} / {second}:")
    for clients in levels:
        b, u = results[first, clients], results[second, clients]
        if not (b["done"] and u["done"]):
            print(f"  {clients:2d} clients: n/a (a mode completed no request; see errors)")
            continue
        print(
            f"  {clients:2d} clients: throughput x{b['rps'] / u['rps']:.2f}, "
            f"p50 latency x{b['p50'] / u['p50']:.2f}, p99 latency x{b['p99'] / u['p99']:.2f}"
        )


if __name__ == "__main__":
    main()
