"""``histolens slide predict`` against TIAToolbox's ``PatchPredictor``: the same slide, the same
model, the same tiles, in one run.

The model is histolens's classifier of ``--backbone`` (random weights: the figures are of speed
and of agreement, not accuracy) with a Macenko stain normaliser fitted on the CMU test slide, as
``histolens train`` makes by default. Both tools tile at the same scale and size (one tile is one
model input, read at the slide's own resolution, so neither resamples), with the same batch size
and the same number of DataLoader workers, 2 threads each, on the CPU; each run is a process of
its own, timed from the slide's path to its outputs on disk (model loading and imports left out).

- histolens: the ``histolens slide predict`` command, with the torch checkpoint (PyTorch eager,
  which is what TIAToolbox runs) and with its ONNX export (ONNX Runtime, the faster runtime we
  ship for the CPU). Seconds and tiles are the slide's ``summaries/<slide>.json``.
- TIAToolbox: ``PatchPredictor.run(patch_mode=False)`` (its WSI mode: its own tissue mask, its
  ``WSIPatchDataset``, zarr output) with the same histolens model wrapped as a TIAToolbox
  ``ModelABC``, two ways (``VARIANTS``): "per patch", TIAToolbox's way of adding stain
  normalisation (the histolens resize, Macenko and mean/std normalisation as the wrapper's
  ``preproc_func``, run on each patch in its loader workers; ``infer_batch`` runs the model on
  the batch and applies the checkpoint's temperature), and "histolens batch" (``preproc_func``
  the resize only, ``infer_batch`` histolens's own batch step, ``score_batch``, as ``histolens
  slide predict`` runs it), so that TIAToolbox's engine is the only difference.

Agreement: tiles are matched by level-0 coordinates (both grids start at 0 with a stride of one
tile). The two tile sets differ only by the tissue masks and rules (histolens keeps tiles at
least half tissue by its mask; TIAToolbox any tile touching tissue by its mask): every tile one
keeps and the other does not must lie where that explains it. Matched tiles must get the same
probabilities to within float32 rounding (see PROBABILITY_ATOL).

TIAToolbox is not a histolens dependency (2.1.3 pins torch<2.13, numpy<2.4.4, pillow<12.2): the
script imports it from ``--tiatoolbox-path``, a folder it was installed into beside the venv:

    .venv/bin/python -m pip install --no-deps --target /tmp/tia_pkgs tiatoolbox
    (then the dependencies the venv lacks the same way; docs/slides.md, "Against TIAToolbox")

Run: .venv/bin/python benchmarks/bench_tiatoolbox.py --tiatoolbox-path /tmp/tia_pkgs
     [--tiles 3000] [--workers 1] [--batch 32] [--no-cmu]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, setup  # noqa: E402

THREADS = 2
REPO = Path(__file__).resolve().parents[1]
CMU = REPO / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"
# The same tile through the same model in two processes differs only by float32 rounding: the
# convolutions sum their K <= ~1,000 products in another order (other batch sizes: 8 tiles at a
# time in histolens, 32 in TIAToolbox; 1 thread in a loader worker for the stain normalisation,
# 2 in the main process), about eps * sqrt(K) ~ 4e-6 relative per layer, and over ~20 layers with
# BatchNorm's rescaling up to ~1e-3 relative on the features (histolens.models.engine_export's
# FEATURE_RTOL); a softmax probability moves by at most 1/4 of its logit difference's change.
PROBABILITY_ATOL = 1e-3
INSTALL_HINT = (
    "TIAToolbox could not be imported from {path}: install it beside the venv without its pins "
    "(it pins torch<2.13, numpy<2.4.4 and pillow<12.2, which conflict with ours), e.g. "
    "'.venv/bin/python -m pip install --no-deps --target /tmp/tia_pkgs tiatoolbox' plus the "
    "dependencies the venv lacks (docs/slides.md lists them), then pass --tiatoolbox-path "
    "/tmp/tia_pkgs."
)


# --- the model and the slides -------------------------------------------------------------------
def make_models(folder: Path, backbone: str) -> dict[str, str]:
    """A checkpoint of ``backbone`` with a Macenko normaliser fitted on the CMU slide, and its
    fp32 ONNX export."""
    from histolens.slides.reader import open_slide
    from histolens.stain.normalize import StainNormalizer
    from histolens.testing import make_checkpoint, unverified_onnx_export

    with open_slide(CMU) as reader:
        reference = reader.read_field(800, 1200, 512, 512, 1.0)
    stain = StainNormalizer("macenko").fit(reference).to_dict()
    ckpt = make_checkpoint(folder / "model.safetensors", backbone=backbone, stain=stain)
    unverified_onnx_export(ckpt, folder / "model.onnx")
    return {"torch": str(ckpt), "ort-fp32": str(folder / "model.onnx")}


def make_slide(path: Path, tiles: int, tile_px: int) -> Path:
    """A square synthetic pyramidal slide at 0.5 um/px holding about ``tiles`` tissue tiles,
    written as an Aperio SVS: TIAToolbox opens a generic multi-page TIFF as one in-memory image
    (its ``VirtualWSIReader``, without a scale), an SVS with OpenSlide, as histolens does."""
    from histolens.slides.synthetic import make_synthetic_slide, write_pyramid_tiff

    # About 60% of the frame is tiled (bench_slide.make_slide's measurement).
    side = math.ceil(math.sqrt(tiles / 0.6) * tile_px)
    slide = make_synthetic_slide(side, side, 0.5, n_lesions=3, seed=1, tissue_fraction=0.8)
    return write_pyramid_tiff(slide, path, levels=4, aperio=True)


def slide_mpp(path: Path) -> float:
    from histolens.slides.reader import open_slide

    with open_slide(path) as reader:
        return float(reader.mpp)


# --- histolens: the command line ----------------------------------------------------------------
def run_histolens(model: str, slide: Path, out: Path, tile_mpp: float, opts) -> dict:
    """``histolens slide predict`` in its own process; its summary's seconds and tiles."""
    cmd = [
        sys.executable,
        "-m",
        "histolens.cli",
        "slide",
        "predict",
        model,
        str(slide),
        "--out",
        str(out),
        "--tile-mpp",
        repr(tile_mpp),
        "--batch-size",
        str(opts.batch),
        "--workers",
        str(opts.workers),
        "--quiet",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"histolens slide predict failed: {_last_line(done.stderr)}")
    summary = json.loads((out / "summaries" / f"{slide.stem}.json").read_text())
    return {
        "tiles": summary["tiles_scored"],
        "seconds": summary["seconds"],
        "h5": str(out / "h5" / f"{slide.stem}.h5"),
    }


def read_histolens(h5: str) -> tuple:
    """Level-0 coordinates (N, 2) and probabilities (N, C) of a finished slide file."""
    import h5py
    import numpy as np

    with h5py.File(h5, "r") as f:
        return np.asarray(f["coords"][:], np.int64), np.asarray(f["probabilities"][:], np.float64)


# --- TIAToolbox, in its own process -------------------------------------------------------------
# How the wrapper splits the histolens steps between TIAToolbox's loader workers and its
# infer_batch: "per patch", TIAToolbox's way (preproc_func: resize, stain and mean/std
# normalisation of each patch in the workers; the model on the batch), or "histolens batch"
# (preproc_func: the resize; infer_batch: histolens's own batch step, score_batch, as in
# ``histolens slide predict``), which leaves TIAToolbox's engine the only difference.
VARIANTS = ("per patch", "histolens batch")


def tia_model(model_abc, predictor, variant: str):
    """The histolens Predictor's model and preprocessing as a TIAToolbox ``ModelABC``."""
    import numpy as np
    import torch
    from PIL import Image

    from histolens.slides.tiles import score_batch

    class HistolensPatchModel(model_abc):
        """A histolens classifier for TIAToolbox's engines (see VARIANTS)."""

        def __init__(self) -> None:
            super().__init__()
            self.net = predictor.model.eval()
            self.predictor = predictor
            self.per_patch = variant == "per patch"
            self.preproc_func = self.to_model_input if self.per_patch else self.resize

        @staticmethod
        def resize(patch: np.ndarray) -> torch.Tensor:
            # histolens's resize of a tile read at the model's scale (TileDataset's step).
            return predictor.preprocess.resize(Image.fromarray(np.ascontiguousarray(patch)))

        def to_model_input(self, patch: np.ndarray) -> torch.Tensor:
            with torch.inference_mode():
                return predictor.to_input(self.resize(patch).unsqueeze(0))[0]

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        @staticmethod
        def infer_batch(model, batch_data, *, device: str = "cpu") -> np.ndarray:
            with torch.inference_mode():
                if not model.per_patch:
                    return score_batch(model.predictor, batch_data).probabilities
                return model.predictor.probabilities(model(batch_data.to(device)))

    return HistolensPatchModel()


def tia_child(args: argparse.Namespace) -> dict:
    """TIAToolbox's PatchPredictor on one slide; writes its coordinates and probabilities."""
    setup(THREADS)
    sys.path.append(args.tiatoolbox_path)  # appended: our numpy, torch and Pillow stay first
    step = "import"
    try:
        import tiatoolbox
        from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig
        from tiatoolbox.models.engine.patch_predictor import PatchPredictor
        from tiatoolbox.models.models_abc import ModelABC

        from histolens.inference.predictor import Predictor

        step = "model"
        predictor = Predictor.from_checkpoint(args.model)
        h, w = predictor.preprocess.input_size
        model = tia_model(ModelABC, predictor, args.variant)
        ioconfig = IOPatchPredictorConfig(
            input_resolutions=[{"units": "mpp", "resolution": args.tile_mpp}],
            patch_input_shape=(h, w),
            stride_shape=(h, w),
        )
        engine = PatchPredictor(
            model=model, batch_size=args.batch, num_workers=args.workers, verbose=False
        )
        step = "run"
        out = Path(args.out)
        start = time.perf_counter()
        saved = engine.run(
            [Path(args.slide)],
            patch_mode=False,
            ioconfig=ioconfig,
            save_dir=out / "tia",
            output_type="zarr",
            return_probabilities=True,
            device="cpu",
        )
        seconds = time.perf_counter() - start
        step = "output"
        import numpy as np
        import zarr

        group = zarr.open(str(next(iter(saved.values()))), mode="r")
        probs = np.asarray(group["probabilities"][:], np.float64)
        boxes = np.asarray(group["coordinates"][:], np.float64)
    except Exception as exc:
        return {"failed": _failure(exc, step)}
    np.savez(out / "tia.npz", probabilities=probs, boxes=boxes)
    return {
        "tiles": int(len(probs)),
        "seconds": seconds,
        "npz": str(out / "tia.npz"),
        "version": tiatoolbox.__version__,
    }


def _failure(exc: BaseException, step: str) -> dict:
    """Where an exception came from: our own code (this script or the histolens package raised
    it) or TIAToolbox (it, or a library under it, raised it)."""
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1].filename if frames else str(REPO)
    ours = str(REPO) in last or f"{os.sep}histolens{os.sep}" in last
    return {"ours": ours, "step": step, "reason": f"{type(exc).__name__}: {exc}".splitlines()[0]}


def run_tia(model: str, slide: Path, out: Path, tile_mpp: float, variant: str, opts) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--model",
        model,
        "--slide",
        str(slide),
        "--out",
        str(out),
        "--tile-mpp",
        repr(tile_mpp),
        "--batch",
        str(opts.batch),
        "--workers",
        str(opts.workers),
        "--tiatoolbox-path",
        opts.tiatoolbox_path,
        "--variant",
        variant,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), check=False)
    if done.returncode != 0:
        failed = {"ours": True, "step": "process", "reason": _last_line(done.stderr)}
        return {"failed": failed}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["(no message)"])[-1]


# --- agreement ----------------------------------------------------------------------------------
def agreement(ours_h5: str, tia_npz: str, tile_mpp: float, mpp: float) -> dict:
    """Tiles kept by both / only one, and the largest probability difference on shared tiles."""
    import numpy as np

    coords, probs = read_histolens(ours_h5)
    tia = np.load(tia_npz)
    # TIAToolbox's boxes are [x0, y0, x1, y1] at the requested resolution; to level 0:
    tia_xy = np.rint(tia["boxes"][:, :2] * (tile_mpp / mpp)).astype(np.int64)
    ours_at = {tuple(c): i for i, c in enumerate(coords.tolist())}
    tia_at = {tuple(c): i for i, c in enumerate(tia_xy.tolist())}
    shared = sorted(set(ours_at) & set(tia_at))
    diff = max(
        (float(np.abs(probs[ours_at[k]] - tia["probabilities"][tia_at[k]]).max()) for k in shared),
        default=math.nan,
    )
    return {
        "shared": len(shared),
        "only_ours": sorted(set(ours_at) - set(tia_at)),
        "only_tia": sorted(set(tia_at) - set(ours_at)),
        "max_diff": diff,
    }


def explain_sets(slide: Path, only_ours: list, only_tia: list, size0: int) -> dict:
    """Checks each tile kept by one tool only against the rules and masks that decide it:
    histolens drops a tile under half tissue by its mask (``tile_grid``'s share), TIAToolbox one
    that no pixel of its mask touches (its mask made as its ``WSIPatchDataset`` makes it, the
    box scaled and truncated to mask pixels as its ``filter_coordinates`` does). Counts the
    tiles that a mask explains and lists those none does."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():  # its vendored requests' note on a missing charset package
        warnings.simplefilter("ignore")
        from tiatoolbox.wsicore.wsireader import WSIReader

    from histolens.slides.reader import open_slide
    from histolens.slides.tissue import MASK_MPP, tile_grid, tissue_mask

    with open_slide(slide) as reader:
        dims = reader.dimensions
        thumb = reader.thumbnail(MASK_MPP)
        ours_mask = tissue_mask(thumb, reader.mpp * dims[0] / thumb.size[0])
    grid = tile_grid(dims, (size0, size0), ours_mask, min_tissue=0.0)
    ours_share = {
        tuple(c): float(s) for c, s in zip(grid.coords.tolist(), grid.tissue, strict=True)
    }
    wsi = WSIReader.open(slide)
    try:
        tia_mask = wsi.tissue_mask(resolution=1.25, units="power").img
    except ValueError:
        tia_mask = wsi.tissue_mask(resolution=6.0, units="mpp").img
    tia_mask = np.asarray(tia_mask) > 0
    fy, fx = tia_mask.shape[0] / dims[1], tia_mask.shape[1] / dims[0]

    def tia_touches(xy: tuple) -> bool:
        x0, y0 = int(xy[0] * fx), int(xy[1] * fy)
        x1, y1 = int((xy[0] + size0) * fx), int((xy[1] + size0) * fy)
        return bool(tia_mask[y0:y1, x0:x1].any())

    unexplained = [("histolens only", xy) for xy in only_ours if tia_touches(xy)]
    unexplained += [("TIAToolbox only", xy) for xy in only_tia if ours_share[xy] >= 0.5]
    return {
        "only_tia_under_half": sum(1 for xy in only_tia if 0.0 < ours_share[xy] < 0.5),
        "only_tia_no_tissue": sum(1 for xy in only_tia if ours_share[xy] == 0.0),
        "unexplained": unexplained,
    }


# --- the run ------------------------------------------------------------------------------------
def compare_slide(name: str, slide: Path, models: dict, folder: Path, opts) -> tuple[list, bool]:
    """Both tools on one slide: table rows (tiles, seconds, tiles/s, and the rate against each
    TIAToolbox variant), and whether the tools agreed (False only for a fault of ours)."""
    tile_mpp = slide_mpp(slide)  # the slide's own scale: neither tool resamples a tile
    runs = {
        f"histolens slide predict|{runtime}": run_histolens(
            model, slide, folder / f"{name}-{runtime}", tile_mpp, opts
        )
        for runtime, model in models.items()
    }
    tia = {}
    for variant in VARIANTS:
        out = folder / f"{name}-tia-{variant.replace(' ', '-')}"
        result = run_tia(models["torch"], slide, out, tile_mpp, variant, opts)
        if "failed" in result:
            f = result["failed"]
            print(
                f"{name}: TIAToolbox's PatchPredictor ({variant}) did not finish "
                f"({'our wrapper' if f['ours'] else 'TIAToolbox'}, at {f['step']}): "
                f"{f['reason']}"
            )
            if f["ours"]:
                return [], False
            continue
        tia[variant] = result
        runs[f"TIAToolbox {result['version']} PatchPredictor, {variant}|torch"] = result
    rates = {v: r["tiles"] / r["seconds"] for v, r in tia.items()}
    rows = []
    for label, r in runs.items():
        pipeline, runtime = label.split("|")
        rate = r["tiles"] / r["seconds"]
        versus = [rate / rates[v] if v in rates else "" for v in VARIANTS]
        rows.append([name, pipeline, runtime, r["tiles"], r["seconds"], rate, *versus])
    ok = True
    ours = runs["histolens slide predict|torch"]["h5"]
    for variant, result in tia.items():
        agree = agreement(ours, result["npz"], tile_mpp, tile_mpp)
        sets = explain_sets(slide, agree["only_ours"], agree["only_tia"], opts.side)
        agreed = agree["max_diff"] <= PROBABILITY_ATOL and not sets["unexplained"]
        ok &= agreed
        print(
            f"{name}, TIAToolbox {variant}: {agree['shared']} tiles scored by both; "
            f"{len(agree['only_ours'])} by histolens only (no pixel of TIAToolbox's mask on "
            f"them), {len(agree['only_tia'])} by TIAToolbox only "
            f"({sets['only_tia_under_half']} under half tissue by histolens's mask, "
            f"{sets['only_tia_no_tissue']} with none); unexplained by the masks: "
            f"{len(sets['unexplained'])} {sets['unexplained'][:3]}; largest probability "
            f"difference on shared tiles {agree['max_diff']:.2e} (tolerance "
            f"{PROBABILITY_ATOL:g}): {'agree' if agreed else 'DISAGREE'}."
        )
    return rows, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tiatoolbox-path", default=None, help="folder TIAToolbox is installed in")
    ap.add_argument("--tiles", type=int, default=3000, help="tissue tiles of the synthetic slide")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader processes reading tiles")
    ap.add_argument("--no-cmu", action="store_true", help="leave out the CMU-1-Small-Region slide")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--slide", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--tile-mpp", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, default=VARIANTS[0], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(tia_child(args)))
        return
    import importlib.util

    if args.tiatoolbox_path:
        sys.path.append(str(Path(args.tiatoolbox_path).resolve()))
    if not args.tiatoolbox_path or importlib.util.find_spec("tiatoolbox") is None:
        print(INSTALL_HINT.format(path=args.tiatoolbox_path or "the venv"))
        sys.exit(2)
    setup(THREADS)
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-tia-") as tmp:
        folder = Path(tmp)
        models = make_models(folder, args.backbone)
        from histolens.inference.predictor import Predictor

        args.side = side = Predictor.from_checkpoint(models["torch"]).preprocess.input_size[1]
        t0 = time.perf_counter()
        slides = {"synthetic": make_slide(folder / "synthetic.svs", args.tiles, side)}
        if not args.no_cmu:
            slides["CMU-1-Small-Region"] = CMU
        print(
            f"Synthetic slide written in {time.perf_counter() - t0:.0f} s; {args.backbone} at "
            f"{side} px with Macenko stain normalisation, {THREADS} threads, batch {args.batch}, "
            f"{args.workers} loader worker(s), tiles at each slide's own um/px."
        )
        rows = []
        for name, slide in slides.items():
            slide_rows, agreed = compare_slide(name, slide, models, folder, args)
            rows += slide_rows
            ok &= agreed
        headers = ["slide", "pipeline", "runtime", "tiles", "seconds", "tiles/s"]
        headers += [f"x TIA {v}" for v in VARIANTS]
        print_table(headers, [r + [""] * (len(headers) - len(r)) for r in rows])
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
