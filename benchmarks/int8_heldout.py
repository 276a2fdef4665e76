"""int8 against fp32 on patients the model never saw, side by side in one run.

Protocol: 5-fold stratified group k-fold over the patient groups of breakhis-dev (seed 0, as
``generalisation.py``). Each fold trains the default model (``histolens train``'s code path) on
all images of its training groups; its fp32 ONNX graph is then quantised to int8 by each recipe
below, calibrated on 64 of the fold's training images (as ``histolens export`` does), and every
graph scores the 100X images of the fold's held-out groups. Out-of-fold logits are pooled over
the folds (on the raw logit scale, as the protocol does); the table gives the image AUC of each
graph, its drop from the fp32 graph with a 95% CI over patients (bootstrap of patient groups),
the patient AUC, the largest and the mean probability change from fp32 (each fold's own
temperature), the balanced accuracy at each fold's threshold and how many images changed side
of it, and the seconds per image each graph took here.

Recipes: 'before' is the export up to this change (every operator ONNX Runtime can quantise,
the stem and the stages up to the shallowest feature level kept fp32, full-range weights);
'after' is the export now (only the convolutions quantised, the same stages kept fp32, 7-bit
weights: ``reduce_range``); 'convolutions only' is the lever between them. A run on this
machine also measured the whole backbone quantised (convolutions only: drop 0.071) and 256
calibration images (no change); see docs/int8-guard.md.

Run:  PYTHONPATH=src flock /tmp/cpu.lock .venv/bin/python benchmarks/int8_heldout.py
      [--folds K] [--work DIR]   (DIR keeps each fold's trained checkpoint for a rerun)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import print_table, require_real_data, setup  # noqa: E402

SCORED_MAGNIFICATION = 100
CALIBRATION_IMAGES = 64
N_BOOT = 2000

# name -> (operator types quantised (None: all), keep the early stages fp32, reduce_range,
# calibration images)
RECIPES: dict[str, tuple[tuple[str, ...] | None, bool, bool, int]] = {
    "before: every operator int8": (None, True, False, CALIBRATION_IMAGES),
    "convolutions only": (("Conv",), True, False, CALIBRATION_IMAGES),
    "after: convolutions only, reduce_range": (("Conv",), True, True, CALIBRATION_IMAGES),
}


def _folds(records, k: int, seed: int = 0):
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.array([r.label == "malignant" for r in records])
    groups = np.array([r.group for r in records])
    splitter = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return list(splitter.split(np.zeros(len(y)), y, groups))[:k]


def _stain_reference(cfg, bank) -> str:
    """The label-free median stain reference over all images, so that folds share features."""
    from histolens.stain.normalize import StainNormalizer

    paths = list(bank.images)[:: max(1, len(bank.images) // 200)]
    state = StainNormalizer(cfg.stain.method).fit_median([bank.images[p] for p in paths])
    ref = Path(tempfile.mkdtemp()) / "stain.json"
    ref.write_text(json.dumps(state.to_dict()), encoding="utf-8")
    return str(ref)


def _inputs(predictor, records) -> tuple[list, torch.Tensor]:
    from histolens.export.verify import model_inputs

    kept, chunks = [], []
    for recs, x in model_inputs(predictor, records, 16):
        kept += recs
        chunks.append(x)
    return kept, torch.cat(chunks)


def _score(graph: Path, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits of ``graph`` on ``x`` and the seconds per image it took."""
    from histolens.inference.runtimes import OnnxRunner

    runner = OnnxRunner(graph)
    start = time.perf_counter()
    logits = torch.cat([runner(x[i : i + 16]) for i in range(0, len(x), 16)])
    return logits, (time.perf_counter() - start) / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folds", type=int, default=5, help="how many of the 5 folds to run")
    ap.add_argument("--work", type=Path, default=None, help="keep fold checkpoints here")
    args = ap.parse_args()
    setup()
    data = require_real_data()
    from histolens.config import recipe_config
    from histolens.data.records import discover, filter_records
    from histolens.data.splits import Split
    from histolens.export.onnx import trace_onnx
    from histolens.export.quantize import fp32_stages, quantize_int8
    from histolens.export.verify import model_inputs, spread_evenly
    from histolens.inference.predictor import Predictor
    from histolens.stats.metrics import bootstrap_ci, patient_level_auc, safe_auc
    from histolens.training.crossval import image_bank_for
    from histolens.training.runner import train

    start = time.perf_counter()
    records = filter_records(discover(data / "manifest.csv").records, "all", "binary")
    cfg = recipe_config("default").override({"data.path": str(data / "manifest.csv")})
    bank = image_bank_for(cfg, progress=False, records=records)
    cfg = cfg.override({"stain.reference": _stain_reference(cfg, bank)})
    store: dict = {}
    work = args.work or Path(tempfile.mkdtemp(prefix="int8-heldout-"))
    names = ["fp32", *RECIPES]
    logits: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    probs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    decisions: dict[str, list[np.ndarray]] = {n: [] for n in names}
    scored: list = []
    for k, (tr, te) in enumerate(_folds(records, args.folds)):
        train_recs = [records[i] for i in tr]
        test_recs = [records[i] for i in te if records[i].magnification == SCORED_MAGNIFICATION]
        run_dir = work / f"fold{k}"
        if not (run_dir / "best.safetensors").is_file():
            split = Split(train_recs, [], test_recs, True)
            train(cfg, run_dir, split=split, bank=bank, feature_store=store, progress=False)
        predictor = Predictor.from_checkpoint(run_dir)
        kept, x = _inputs(predictor, test_recs)
        scored += kept
        fp32 = run_dir / "fp32.onnx"
        trace_onnx(predictor.model, predictor.preprocess.input_size, fp32)
        graphs = {"fp32": fp32}
        for i, (name, (ops, early_fp32, reduce, n_cal)) in enumerate(RECIPES.items()):
            graphs[name] = run_dir / f"int8-{i}.onnx"
            keep = fp32_stages(predictor.model) if early_fp32 else ()
            chosen = spread_evenly(train_recs, n_cal)
            batches = (x.numpy() for _, x in model_inputs(predictor, chosen, 16))
            quantize_int8(fp32, graphs[name], batches, keep, op_types=ops, reduce_range=reduce)
        for name, graph in graphs.items():
            z, s = _score(graph, x)
            logits[name].append(z)
            probs[name].append(predictor.probabilities(z)[:, 1])
            decisions[name].append(predictor.probabilities(z)[:, 1] >= predictor.threshold)
            seconds[name].append(s)
        print(f"fold {k}: {len(kept)} held-out 100X images", flush=True)

    y = np.array([r.label == "malignant" for r in scored], dtype=int)
    patients = np.array([r.group for r in scored])
    score = {n: torch.cat(v)[:, 0].double().numpy() for n, v in logits.items()}
    prob = {n: np.concatenate(v) for n, v in probs.items()}
    decided = {n: np.concatenate(v) for n, v in decisions.items()}
    base = safe_auc(y, score["fp32"])
    rows = []
    for name in names:
        auc = safe_auc(y, score[name])
        mean_change = float(np.abs(prob[name] - prob["fp32"]).mean())
        flipped = int((decided[name] != decided["fp32"]).sum())
        from sklearn.metrics import balanced_accuracy_score

        balanced = balanced_accuracy_score(y, decided[name])
        if name == "fp32":
            drop_cell, change = "", 0.0
        else:

            def drop(idx: np.ndarray, name: str = name) -> float:
                return safe_auc(y[idx], score["fp32"][idx]) - safe_auc(y[idx], score[name][idx])

            lo, hi = bootstrap_ci(drop, patients, N_BOOT)
            drop_cell = f"{base - auc:+.4f} [{lo:+.4f}, {hi:+.4f}]"
            change = float(np.abs(prob[name] - prob["fp32"]).max())
        rows.append(
            [
                name,
                f"{auc:.4f}",
                drop_cell,
                f"{patient_level_auc(patients, y, score[name]):.4f}",
                f"{change:.4f}",
                f"{mean_change:.4f}",
                f"{balanced:.4f}",
                str(flipped),
                f"{1000 * np.mean(seconds[name]):.0f}",
            ]
        )
    n_groups, n_benign = len(set(patients)), len(set(patients[y == 0]))
    print(
        f"\n{len(y)} held-out 100X images of {n_groups} patient groups ({n_benign} benign), "
        f"{len(logits['fp32'])} folds; ONNX Runtime {torch.get_num_threads()} threads"
    )
    headers = [
        "graph",
        "image AUC",
        "AUC drop [95% CI]",
        "patient AUC",
        "max dp",
        "mean dp",
        "bal. acc",
        "decisions changed",
        "ms/image",
    ]
    print_table(headers, rows)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
