"""Desktop app: does the slide window stay responsive while it analyses a 20,000-tile slide?

A synthetic slide (``histolens.slides.synthetic``, 0.5 um/px) is cut into tiles small enough
(``--tile-size`` pixels, each resized to the model's input) that it holds at least ``--tiles``
tissue tiles, and the real Tk slide window analyses it with the tiny test model on its worker
thread, in the window's own main loop. Meanwhile a 10 ms ``after()`` tick measures how late the
main loop runs: its lateness (p50, p99, max) is the lag a user feels. The naive way, the same
analysis run on the UI thread, would freeze the window for the whole analysis: that is the
figure it is compared with. Then the UI-thread work on the finished analysis is timed: the
heatmap layer painted and drawn, the layer toggled, a click (3 x 3 tiles) and a box over the
whole slide (every tile found, the 500 best listed).

Run: xvfb-run -a .venv/bin/python benchmarks/bench_gui_slide.py [--tiles 20000] [--side 4096]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, setup  # noqa: E402


def make_slide(folder: Path, side: int, want: int) -> tuple[Path, int, int]:
    """A synthetic slide and the largest tile size (level-0 px) giving ``want`` tiles."""
    from histolens.gui.slide_analysis import open_for_display
    from histolens.slides.synthetic import make_synthetic_slide, write_pyramid_tiff
    from histolens.slides.tissue import tile_grid

    path = write_pyramid_tiff(
        make_synthetic_slide(side, side, 0.5, n_lesions=3, seed=0), folder / "big.tiff", levels=3
    )
    opened = open_for_display(path)
    for size in range(64, 7, -2):
        n = len(tile_grid(opened.dimensions, (size, size), opened.mask, 0.5))
        if n >= want:
            return path, size, n
    raise SystemExit(f"A {side} px slide cannot hold {want} tiles; raise --side.")


def time_ui(root, fn) -> float:
    """Milliseconds the UI thread spends on ``fn`` and the redraw it causes."""
    t0 = time.perf_counter()
    fn()
    root.update()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    setup()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiles", type=int, default=20000)
    ap.add_argument("--side", type=int, default=4096, help="slide width and height, px")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    import tkinter as tk

    from histolens.gui.slide_window import SlideWindow
    from histolens.gui.style import apply_style
    from histolens.slides.predict import SlideOptions
    from histolens.testing import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        slide, size, n = make_slide(folder, args.side, args.tiles)
        print(
            f"slide {args.side} x {args.side} px, {n:,} tiles of {size} px, written and "
            f"counted in {time.perf_counter() - t0:.0f} s"
        )
        ckpt = make_checkpoint(folder / "model.safetensors")
        options = SlideOptions(tile_mpp=0.5, tile_size=size, batch_size=64, workers=args.workers)
        root = tk.Tk()
        root.geometry("1400x860+0+0")
        apply_style(root)
        root.withdraw()
        window = SlideWindow(root, lambda: str(ckpt), options, folder / "cache")
        window.top.geometry("1400x860+0+0")
        p = window.presenter
        lateness: list[float] = []
        when: list[tuple[float, str]] = []  # seconds since the start, and the analysis' state
        shown = [0]
        show = window.show_analysis

        def counted(analysis) -> None:
            shown[0] += analysis.state == "running"
            show(analysis)

        window.show_analysis = counted

        def tick(due: float) -> None:
            now = time.perf_counter()
            lateness.append(max(0.0, now - due) * 1000)
            when.append((now - started, p.analysis.state))
            if p.analysis.state in ("done", "failed", "cancelled") and p.results is not None:
                root.quit()
                return
            root.after(10, tick, time.perf_counter() + 0.010)

        started = time.perf_counter()
        window.open_slide(slide)
        root.after(10, tick, time.perf_counter() + 0.010)
        root.mainloop()
        seconds = time.perf_counter() - started
        if p.analysis.state != "done":
            raise SystemExit(f"the analysis ended {p.analysis.state}: {window.error_message}")
        lat = np.asarray(lateness)
        print(
            f"\nanalysis of {len(p.results):,} tiles: {seconds:.1f} s "
            f"({len(p.results) / seconds:.0f} tiles/s), {shown[0]} progress updates shown\n"
        )
        print_table(
            ["main loop during the analysis", "p50 ms", "p99 ms", "max ms", "ticks"],
            [
                [
                    "worker thread (the app)",
                    float(np.percentile(lat, 50)),
                    float(np.percentile(lat, 99)),
                    float(lat.max()),
                    str(len(lat)),
                ],
                ["UI thread (naive)", "-", "-", f"{seconds * 1000:.0f}", "0"],
            ],
        )
        print(f"ratio of the worst lags, naive / app: {seconds * 1000 / lat.max():.0f}x")
        worst = np.argsort(-lat)[:3]
        print(
            "worst lags: "
            + ", ".join(f"{lat[i]:.0f} ms at {when[i][0]:.1f} s ({when[i][1]})" for i in worst)
            + "\n"
        )
        w, h = p.slide.dimensions
        centre = p.results.coords[len(p.results) // 2] + size // 2
        t0 = time.perf_counter()
        layer = p.results.layer(p.slide)
        paint_ms = (time.perf_counter() - t0) * 1000
        rows = [
            ["paint the heatmap layer (worker)", paint_ms],
            ["draw it on the canvas", time_ui(root, lambda: window.show_layer("heatmap", layer))],
            ["hide the heatmap", time_ui(root, lambda: p.set_layer_visible("heatmap", False))],
            ["show it again", time_ui(root, lambda: p.set_layer_visible("heatmap", True))],
            ["click: 3 x 3 tiles listed", time_ui(root, lambda: p.click(*centre))],
            ["box over the whole slide", time_ui(root, lambda: p.select_region(0, 0, w, h))],
        ]
        found, listed = len(p.results.tiles_in((0, 0, w, h))), len(p.rows)
        times = [time_ui(root, lambda: p.click(*centre)) for _ in range(5)]
        rows.append(["click again (median of 5)", statistics.median(times)])
        print_table(["UI work on the finished analysis", "ms"], rows)
        print(f"(the box found {found:,} tiles and listed {listed}, the best first)")
        window.close()
        root.destroy()


if __name__ == "__main__":
    main()
