"""Desktop app: time from opening an image to seeing its Grad-CAM heatmap, per backbone.

Measured through the app's presenter with a real worker thread, as the window runs it: loading the
700x460 PNG, one Grad-CAM pass that also gives the prediction, and blending the overlay. Compared,
image by image, with the naive way (predict, then explain: two forward passes). Random weights
(``make_checkpoint``): speed does not depend on them.

Run: .venv/bin/python benchmarks/bench_gui_open_to_heatmap.py [--backbones vgg16 tf_efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, setup  # noqa: E402


class _View:
    """A view that only records the last overlay shown."""

    heat = None

    def __getattr__(self, name):
        if name == "show_heatmap":
            return lambda overlay, caption: setattr(self, "heat", overlay) if overlay else None
        return lambda *a, **k: None


def _run_until(presenter, done) -> None:
    """Poll the presenter, as the window's event loop does, until ``done()`` and it is idle."""
    while not done() or presenter.busy:
        presenter.poll()
        time.sleep(0.001)


def main() -> None:
    setup()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "vgg16"])
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    from histolens.data.imageio import load_rgb
    from histolens.data.synth import generate_synthetic
    from histolens.gui.presenter import Presenter, find_images
    from histolens.testing import make_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        generate_synthetic(Path(tmp) / "data", n=args.images + 1, seed=0)
        tiles = find_images(Path(tmp) / "data" / "400X")
        for backbone in args.backbones:
            ckpt = make_checkpoint(Path(tmp) / f"{backbone}.safetensors", backbone=backbone)
            view, pool = _View(), ThreadPoolExecutor(1)
            p = Presenter(view, pool)
            t0 = time.perf_counter()
            p.open_checkpoint(ckpt)
            _run_until(p, lambda p=p: p.predictor is not None)
            load_s = time.perf_counter() - t0
            ours, naive = [], []
            for i, path in enumerate(tiles):
                view.heat = None
                t0 = time.perf_counter()
                p.open_image(path)
                _run_until(p, lambda view=view: view.heat is not None)
                elapsed = time.perf_counter() - t0
                if i:  # the first image pays one-off costs
                    ours.append(elapsed)
                explainer = p.explainer

                def naive_job(path=path, explainer=explainer, predictor=p.predictor):
                    img = load_rgb(path)
                    predictor.predict_image(img)
                    return explainer.explain(img, method="gradcam").overlay(0.45)

                t0 = time.perf_counter()
                pool.submit(naive_job).result()
                if i:
                    naive.append(time.perf_counter() - t0)
            p.close()
            p.poll()
            pool.shutdown()
            med, med_naive = statistics.median(ours), statistics.median(naive)
            rows.append(
                [
                    backbone,
                    f"{load_s:.2f}",
                    f"{med:.2f}",
                    f"{min(ours):.2f}",
                    f"{med_naive:.2f}",
                    f"{med_naive / med:.1f}x",
                ]
            )
    print(f"Open image -> heatmap shown, median over {args.images} images (700x460), 2 threads")
    print_table(
        [
            "backbone",
            "checkpoint load s",
            "open-to-heatmap s",
            "min s",
            "naive predict+explain s",
            "ratio",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
