"""The number we steer by: how a training configuration does on patients it has never seen.

Protocol (the generalisation issue): repeated (default 3 seeds) 5-fold stratified group k-fold
over the patient groups of breakhis-dev. Each fold trains on ALL images (every magnification,
both sources) of its training groups, through the same code path as ``histolens train``, and
scores ONLY the 100X original images of its held-out groups. Out-of-fold predictions are pooled
per repeat; the table shows mean +/- sd over repeats, and wall time per configuration.

Each fold's probabilities are read with its temperature undone (a temperature never changes one
model's ranking, but folds with different temperatures would pool on different scales). The
MLP configurations hold 20% of each fold's training groups back for early stopping. The median
stain reference is fitted once over all images (it uses no labels) so that folds share features.

The peer, in the same run: frozen EfficientNet-Lite0 features at 224 px (histolens's own
feature code), StandardScaler, LogisticRegression(C=0.01, class_weight="balanced").

Every backbone forward pass runs on the feature engine (``--engine``, default auto: see
docs/engine.md); ``--engine torch`` gives the PyTorch eager figures.

Run:  .venv/bin/python benchmarks/generalisation.py [--task binary|subtype] [--only NAME ...]
      [--engine auto|torch]
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import mean_sd, print_table, repeated_study_parser, require_real_data, setup  # noqa: E402
from _operating_points_study import HeldOut  # noqa: E402
from _operating_points_study import report as operating_point_report  # noqa: E402

SCORED_MAGNIFICATION = 100
DEFAULT = "default: linear probe, 294x448 tiles, blocks.2+5, Macenko, C=0.003"

# Each lever as config overrides of the default recipe (or of the original recipe).
BASE = {"model.backbone": "tf_efficientnet_lite0", "model.pretrained": "imagenet"}
# The MLP head trained to convergence on the default's features (cached: no augmentation).
MLP = {
    "model.head": "mlp",
    "model.feature_layer": "blocks.2,blocks.5",
    "train.optimizer": "adam",
    "train.lr": 1e-3,
    "augment.enabled": False,
}
CONFIGS: dict[str, tuple[str, dict]] = {
    "previous default: MLP head, SGD 1e-4, 224 px, last layer": (
        "original",
        {**BASE, "train.feature_cache": True},
    ),
    "MLP head, Adam 1e-3, no aug, 294x448 tiles, blocks.2+5, Macenko": (
        "default",
        MLP,
    ),
    "MLP head, Adam 1e-3, no aug, tiles, blocks.2+5, Macenko, + weight decay 1e-4, label "
    "smoothing 0.1": (
        "default",
        {**MLP, "train.weight_decay": 1e-4, "train.label_smoothing": 0.1},
    ),
    "MLP head, Adam 1e-3, no aug, tiles, blocks.2+5, Macenko, + MixUp 0.4 of cached features": (
        "default",
        {**MLP, "train.mixup": 0.4},
    ),
    "fine-tune the last stage (blocks.5) at 224 px, stain + geometric aug, MixUp 0.4 / CutMix "
    "1.0, 5 epochs": (
        "default",
        {
            **MLP,
            "model.unfreeze": 1,
            "model.input_size": None,
            "train.epochs": 5,
            "train.mixup": 0.4,
            "train.cutmix": 1.0,
            "augment.enabled": True,
            "augment.stain": True,
        },
    ),
    "linear probe, 224 px, last layer, no stain": (
        "default",
        {"model.input_size": None, "model.feature_layer": "last", "stain.method": "none"},
    ),
    "linear probe, 294x448 tiles, last layer, no stain": (
        "default",
        {"model.feature_layer": "last", "stain.method": "none"},
    ),
    "linear probe, 294x448 tiles, last layer, Macenko": (
        "default",
        {"model.feature_layer": "last"},
    ),
    "linear probe, 294x448 tiles, blocks.2+5, no stain": ("default", {"stain.method": "none"}),
    "linear probe, 224 px, blocks.2+5, Macenko": ("default", {"model.input_size": None}),
    DEFAULT: ("default", {}),
    "default, but each magnification's threshold chosen on its own images (separate)": (
        "default",
        {"train.magnification_thresholds": "separate"},
    ),
    "default, but each patient weighs the same in the probe's loss": (
        "default",
        {"train.probe_weighting": "patient"},
    ),
    "default, but C chosen by inner patient-level CV": (
        "default",
        {"train.probe_cs": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)},
    ),
    "default + AdaBN on each held-out fold's 100X images (unlabelled)": (
        "default",
        {"bench.adabn": True},
    ),
    "default + test-time augmentation (mean logit of the 4 flips)": (
        "default",
        {"bench.tta": True},
    ),
    "default + probe on the mean of the clean and 4 stain-jittered views": (
        "default",
        {"train.probe_views": 4, "augment.enabled": False, "augment.stain": True},
    ),
    "default, but native resolution: 460x700 (BreakHis's own size), more 224-px tiles": (
        "default",
        {"model.input_size": (460, 700)},
    ),
    "default, but the haematoxylin channel only (macenko-h: Macenko, eosin left out)": (
        "default",
        {"stain.method": "macenko-h"},
    ),
    "default, but EfficientNet-Lite1 (240-px tiles)": (
        "default",
        {"model.backbone": "tf_efficientnet_lite1"},
    ),
    "default, but EfficientNet-Lite2 (260-px tiles)": (
        "default",
        {"model.backbone": "tf_efficientnet_lite2"},
    ),
}


def _records(data: Path, task: str):
    from histolens.data.records import discover, filter_records

    return filter_records(discover(data / "manifest.csv").records, "all", task)


def _folds(records, task: str, seed: int, k: int = 5):
    from sklearn.model_selection import StratifiedGroupKFold

    from histolens.data.records import target_of

    y = np.array([target_of(r, task) for r in records])
    groups = np.array([r.group for r in records])
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return list(splitter.split(np.zeros(len(y)), y, groups))


def _scores(records, probs: dict[str, np.ndarray], classes, task: str) -> dict[str, float]:
    """Pooled out-of-fold metrics over the scored images."""
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from histolens.data.records import target_of
    from histolens.stats.metrics import patient_level_auc, patient_recognition_rate, safe_auc

    scored = [r for r in records if r.path in probs]
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[target_of(r, task)] for r in scored])
    p = np.stack([probs[r.path] for r in scored])
    patients = np.array([r.group for r in scored])
    if task == "binary":
        score = p[:, 1]
        pred = (score >= 0.5).astype(int)
        return {
            "image AUC": safe_auc(y, score),
            "balanced accuracy": balanced_accuracy_score(y, pred),
            "patient recognition rate": patient_recognition_rate(patients, pred == y),
            "patient AUC": patient_level_auc(patients, y, score),
        }
    pred = p.argmax(1)
    present = sorted(set(y))
    return {
        "macro F1": f1_score(y, pred, labels=present, average="macro"),
        "balanced accuracy": balanced_accuracy_score(y, pred),
        "patient recognition rate": patient_recognition_rate(patients, pred == y),
    }


def _peer_features(records):
    """Frozen Lite0 at 224 px: the features histolens itself computes (mean = std = 0.5)."""
    import torch

    from histolens.models.backbones import get_backbone_spec
    from histolens.models.classifier import build_model
    from histolens.models.engine import feature_engine
    from histolens.models.pipeline import ImageBank, InputPipeline
    from histolens.models.transforms import resolve_preprocess

    model = build_model(get_backbone_spec("tf_efficientnet_lite0"), 2, "imagenet").eval()
    preprocess = resolve_preprocess(model.backbone)
    engine = feature_engine(model, None, preprocess.input_size)
    bank = ImageBank([r.path for r in records], preprocess, progress=False)
    pipeline = InputPipeline(preprocess)
    feats = {}
    paths = [r.path for r in records]
    with torch.inference_mode():
        for i in range(0, len(paths), 32):
            chunk = paths[i : i + 32]
            f = engine.features(pipeline.eval_inputs(bank.stack(chunk)))
            feats.update(zip(chunk, f.double().numpy(), strict=True))
    return feats


def run_peer(records, classes, task, seeds, feats) -> list[dict[str, float]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from histolens.data.records import target_of

    index = {c: i for i, c in enumerate(classes)}
    x = np.stack([feats[r.path] for r in records])
    y = np.array([index[target_of(r, task)] for r in records])
    out = []
    for seed in seeds:
        probs: dict[str, np.ndarray] = {}
        for tr, te in _folds(records, task, seed):
            scaler = StandardScaler().fit(x[tr])
            lr = LogisticRegression(C=0.01, class_weight="balanced", max_iter=5000)
            lr.fit(scaler.transform(x[tr]), y[tr])
            te = [i for i in te if records[i].magnification == SCORED_MAGNIFICATION]
            if not te:
                continue
            p = lr.predict_proba(scaler.transform(x[te]))
            full = np.zeros((len(te), len(classes)))
            full[:, lr.classes_] = p
            probs.update({records[i].path: row for i, row in zip(te, full, strict=True)})
        out.append(_scores(records, probs, classes, task))
    return out


def run_config(records, classes, task, seeds, data, recipe, overrides, shared, study=None):
    """Train each fold through histolens.training.runner.train; pool the held-out 100X predictions.

    With ``study`` (an ``_operating_points_study.HeldOut``), the folds also score their held-out
    groups' images of every magnification for it, and one more run of ``train`` (5-fold
    cross-validation over all groups) gives it the estimate a user would be shown."""
    from histolens.config import recipe_config
    from histolens.data.splits import Split
    from histolens.training.runner import train

    overrides = dict(overrides)
    adabn = bool(overrides.pop("bench.adabn", False))
    tta = bool(overrides.pop("bench.tta", False))
    cfg = recipe_config(recipe).override(
        {**overrides, "data.path": str(data / "manifest.csv"), "data.task": task}
    )
    key = ("bank", cfg.model.input_size)
    if key not in shared:
        from histolens.training.crossval import image_bank_for

        shared[key] = image_bank_for(cfg, progress=False, records=records)
    bank = shared[key]
    if cfg.stain.method != "none":
        # The median stain reference is label-free: fitted once over all images, it lets every
        # fold share the features (training fits it on its own training images).
        ref_key = ("stain", cfg.stain.method, cfg.model.input_size)
        if ref_key not in shared:
            from histolens.stain.normalize import StainNormalizer

            paths = list(bank.images)[:: max(1, len(bank.images) // 200)]
            state = StainNormalizer(cfg.stain.method).fit_median([bank.images[p] for p in paths])
            ref = Path(tempfile.mkdtemp()) / "stain.json"
            ref.write_text(json.dumps(state.to_dict()), encoding="utf-8")
            shared[ref_key] = str(ref)
        cfg = cfg.override({"stain.reference": shared[ref_key]})
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            probs: dict[str, np.ndarray] = {}
            for k, (tr, te) in enumerate(_folds(records, task, seed)):
                train_recs = [records[i] for i in tr]
                test_recs = [records[i] for i in te if records[i].magnification == 100]
                if not test_recs:
                    continue
                if study is not None:  # every magnification of the held-out groups
                    test_recs = [records[i] for i in te]
                if cfg.model.head == "mlp":  # early stopping needs validation patients
                    from histolens.data.splits import split_by_patient

                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        inner = split_by_patient(train_recs, task, 0.2, 0.0, seed + k)
                    split = Split(inner.train, inner.val, test_recs, True)
                else:
                    split = Split(train_recs, [], test_recs, True)
                run_dir = Path(tmp) / f"s{seed}f{k}"
                train(
                    cfg,
                    run_dir,
                    split=split,
                    bank=bank,
                    feature_store=shared.setdefault(("store", cfg.model.input_size), {}),
                    progress=False,
                    write_outputs=False,
                )
                # Undo the fold's temperature: a user scores new patients with one model, whose
                # ranking no temperature changes, but pooling folds that each carry their own
                # temperature would mix scales and understate that figure.
                from histolens.checkpoint.io import read_metadata

                if adabn or tta:
                    paths = [r.path for r in test_recs]
                    probs.update(_predictor_probabilities(run_dir, paths, adabn, tta))
                    continue
                temperature = read_metadata(run_dir).temperature
                fold = _read_predictions(run_dir / "predictions.csv", classes, temperature)
                scored = {r.path for r in test_recs if r.magnification == SCORED_MAGNIFICATION}
                probs.update({k: v for k, v in fold.items() if k in scored})
                if study is not None:
                    study.add_fold(run_dir, test_recs, classes[1], seed)
            out.append(_scores(records, probs, classes, task))
        if study is not None:
            from histolens.checkpoint.io import read_metadata

            run_dir = Path(tmp) / "all-groups"
            train(
                cfg.override({"train.cv_folds": 5}),
                run_dir,
                split=Split(list(records), [], [], True),
                bank=bank,
                feature_store=shared.setdefault(("store", cfg.model.input_size), {}),
                progress=False,
            )
            study.estimate = read_metadata(run_dir).estimate
    return out


def _predictor_probabilities(
    run_dir: Path, paths: list[str], adabn: bool, tta: bool
) -> dict[str, np.ndarray]:
    """The fold's model through the Predictor, optionally after AdaBN on the held-out images (no
    labels) or averaging the logits of the four flips; temperature undone."""
    import torch

    from histolens.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(run_dir)
    if adabn:
        predictor.adapt_batchnorm(paths)
    kept, chunks = [], []
    with torch.inference_mode():
        for ok, batch, _ in predictor.iter_batches(paths):
            if batch is None:
                continue
            x = predictor.to_input(batch)
            views = [x, x.flip(-1), x.flip(-2), x.flip(-1, -2)] if tta else [x]
            chunks.append(torch.stack([predictor.model(v) for v in views]).mean(0))
            kept += ok
    logits = torch.cat(chunks)
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0]).numpy()
        rows = np.stack([1 - p, p], axis=1)
    else:
        rows = torch.softmax(logits, dim=1).numpy()
    return dict(zip(kept, rows, strict=True))


def _read_predictions(path: Path, classes, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Class probabilities per image from a predictions.csv, with ``temperature`` undone."""
    rows = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if len(classes) == 2:
                p = np.clip(float(row[f"p_{classes[1]}"]), 1e-12, 1 - 1e-12)
                p = 1 / (1 + np.exp(-np.log(p / (1 - p)) * temperature))
                rows[row["path"]] = np.array([1 - p, p])
            else:
                logp = np.log(np.clip([float(row[f"p_{c}"]) for c in classes], 1e-12, 1))
                z = np.exp((logp - logp.max()) * temperature)
                rows[row["path"]] = z / z.sum()
    return rows


def _summarise(name: str, runs: list[dict[str, float]], seconds: float) -> list[object]:
    cells = [mean_sd([r[k] for r in runs]) for k in runs[0]]
    return [name, *cells, f"{seconds:.0f}"]


def main() -> None:
    setup()
    ap = repeated_study_parser(__doc__)
    ap.add_argument("--only", nargs="*", help="only configurations containing one of these")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument(
        "--operating-points-all",
        action="store_true",
        help="the operating-point study for every configuration run, not only the default",
    )
    ap.add_argument(
        "--engine",
        choices=["auto", "torch", "openvino", "onnxruntime"],
        default=None,
        help="what computes the backbone's features (docs/engine.md; default: auto)",
    )
    args = ap.parse_args()
    if args.engine:
        os.environ["HISTOLENS_ENGINE"] = args.engine
    import logging

    logging.getLogger("histolens").setLevel(logging.ERROR)
    from histolens.data.records import class_names_for

    data = require_real_data()
    records = _records(data, args.task)
    classes = class_names_for(args.task, records)
    seeds = list(range(args.repeats))
    scored = [r for r in records if r.magnification == SCORED_MAGNIFICATION]
    print(
        f"{len(records)} images of {len({r.group for r in records})} patient groups; scored: "
        f"{len(scored)} 100X images of {len({r.group for r in scored})} groups; task {args.task}; "
        f"{len(seeds)} x 5-fold stratified group k-fold",
        flush=True,
    )
    rows = []
    if not args.no_peer:
        start = time.perf_counter()
        peer = run_peer(records, classes, args.task, seeds, _peer_features(records))
        rows.append(
            _summarise(
                "peer: Lite0 224 px + StandardScaler + LR(C=0.01)",
                peer,
                time.perf_counter() - start,
            )
        )
        print("  ".join(map(str, rows[-1])), flush=True)
    shared: dict = {}
    study_lines: list[str] = []
    for name, (recipe, overrides) in CONFIGS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        start = time.perf_counter()
        # The default's decision per magnification and per patient (issue 26), from its folds.
        # AdaBN and test-time augmentation score through the predictor, outside the study.
        outside = overrides.get("bench.adabn") or overrides.get("bench.tta")
        wanted = name == DEFAULT or (args.operating_points_all and not outside)
        study = HeldOut() if wanted and args.task == "binary" else None
        runs = run_config(
            records, classes, args.task, seeds, data, recipe, overrides, shared, study
        )
        rows.append(_summarise(name, runs, time.perf_counter() - start))
        print("  ".join(map(str, rows[-1])), flush=True)
        if study is not None:
            study_lines += [
                *([""] if study_lines else []),
                f"== {name}",
                *operating_point_report(study, study.estimate, SCORED_MAGNIFICATION),
            ]
    keys = (
        ["image AUC", "balanced accuracy", "patient recognition rate", "patient AUC"]
        if args.task == "binary"
        else ["macro F1", "balanced accuracy", "patient recognition rate"]
    )
    print()
    print(
        "Scored on the held-out groups' 100X images only; mean +/- sd over "
        f"{len(seeds)} repeats of 5-fold patient-group CV; seconds = wall time for all folds."
    )
    print_table(["configuration", *keys, "seconds"], rows)
    if study_lines:
        print()
        print("\n".join(study_lines))


if __name__ == "__main__":
    main()
