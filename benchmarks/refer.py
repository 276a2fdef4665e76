"""Knowing when not to answer: which nonconformity score refers the right images, and does the
coverage promised at alpha hold on patients the model has never seen?

Protocol: the generalisation protocol (benchmarks/generalisation.py): repeated 5-fold stratified
group k-fold over the patient groups of breakhis-dev; each fold trains the default recipe on
ALL images of its training groups through ``histolens.training.runner.train``. Every image of the
held-out groups is predicted by its fold's model (pooled out-of-fold predictions); the figures
are on the held-out 100X images.

Nonconformity scores compared (histolens.stats.conformal.SCORES), each from the fold's calibrated
probabilities, centred on its threshold:

- probability: one minus the calibrated probability of the class (what histolens ships);
- tta: the four flips' mean probability, plus their spread (test-time augmentation);
- ensemble: five probes, each fitted on four fifths of the fold's training patients (their
  inner folds), mean plus spread.

The label is always the shipped one (one view, the fold's threshold); a score only decides which
images are referred first. Columns:

- AURC: area under risk (1 - accuracy of the images kept) against coverage, referring the least
  confident first; lower is better.
- coverage at alpha (0.05, 0.1, 0.2): of the held-out 100X images' true classes, averaged over
  patients (what the guarantee is about), with sets calibrated on the OTHER folds' out-of-fold
  predictions (all magnifications) and tested on this fold's patients; "refer" is the fraction
  referred (sets of both classes).
- per magnification: the probability score calibrated per magnification (Mondrian: each held-out
  image judged by the quantile of the other folds' images of its own magnification);
- calibrated on 100X only: the same, calibrated on the other folds' 100X images alone;
- shipped: the same coverage with the calibration each fold's checkpoint stores (its training
  patients' inner out-of-fold predictions, per magnification), as ``histolens predict`` would
  use it.

Run:  .venv/bin/python benchmarks/refer.py [--task binary|subtype] [--repeats 3] [--quick]
``--quick`` is a smoke check: one repeat of 3 folds on the 100X images only, at 224 px, no stain
normalisation (minutes on a CPU), not a measurement.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import mean_sd, print_table, repeated_study_parser, require_real_data, setup  # noqa: E402
from generalisation import SCORED_MAGNIFICATION, _folds, _records  # noqa: E402

ALPHAS = (0.05, 0.1, 0.2)
QUICK = {"model.input_size": None, "stain.method": "none"}
N_MEMBERS = 5


def study_config(data: Path, task: str, quick: bool, records, shared: dict):
    """The default recipe on ``data``, with the image bank and (label-free) median stain reference
    shared by every fold, as the generalisation benchmark does."""
    from histolens.config import recipe_config
    from histolens.training.crossval import image_bank_for

    cfg = recipe_config("default").override(
        {**(QUICK if quick else {}), "data.path": str(data / "manifest.csv"), "data.task": task}
    )
    if "bank" not in shared:
        shared["bank"] = image_bank_for(cfg, progress=False, records=records)
    if cfg.stain.method != "none":
        if "stain" not in shared:
            from histolens.stain.normalize import StainNormalizer

            images = shared["bank"].images
            paths = list(images)[:: max(1, len(images) // 200)]
            state = StainNormalizer(cfg.stain.method).fit_median([images[p] for p in paths])
            ref = Path(tempfile.mkdtemp()) / "stain.json"
            ref.write_text(json.dumps(state.to_dict()), encoding="utf-8")
            shared["stain"] = str(ref)
        cfg = cfg.override({"stain.reference": shared["stain"]})
    return cfg


def train_folds(
    cfg, records, task: str, seed: int, k: int, shared: dict, work: Path
) -> Iterator[tuple[int, list, list, Path]]:
    """Train each fold of one repeat on all images of its training groups; yield (fold, training
    records, held-out records (every magnification), run directory)."""
    from histolens.data.splits import Split
    from histolens.training.runner import train

    for fold, (tr, te) in enumerate(_folds(records, task, seed, k)):
        train_recs = [records[i] for i in tr]
        test_recs = [records[i] for i in te]
        run_dir = work / f"s{seed}f{fold}"
        train(
            cfg,
            run_dir,
            split=Split(train_recs, [], test_recs, True),
            bank=shared["bank"],
            feature_store=shared.setdefault("store", {}),
            progress=False,
            write_outputs=False,
        )
        yield fold, train_recs, test_recs, run_dir


def view_features(predictor, bank, paths: list[str], cache: dict) -> None:
    """Pooled features of the four flips of each image (identity first), once per image: every
    fold shares the frozen backbone, preprocessing and stain reference."""
    import torch

    todo = [p for p in paths if p not in cache]
    with torch.inference_mode():
        for i in range(0, len(todo), 16):
            chunk = todo[i : i + 16]
            x = predictor.to_input(bank.stack(chunk))
            views = [x, x.flip(-1), x.flip(-2), x.flip(-1, -2)]
            f = torch.stack([predictor.model.features(v) for v in views], dim=1)
            cache.update(zip(chunk, f.double().cpu().numpy(), strict=True))


def centred(predictor, logits: np.ndarray) -> np.ndarray:
    """The fold's calibrated probabilities of logits (..., n_out), centred on its threshold."""
    import torch

    from histolens.inference.predictor import probabilities_from_logits
    from histolens.stats.conformal import centred_probabilities

    flat = torch.as_tensor(logits.reshape(-1, logits.shape[-1]), dtype=torch.float32)
    p = probabilities_from_logits(flat, predictor.temperature).numpy()
    p = centred_probabilities(p, predictor.threshold if predictor.is_binary else None)
    return p.reshape(*logits.shape[:-1], p.shape[-1])


def fold_probabilities(predictor, train_recs, test_recs, feats: dict, classes, task, seed):
    """Centred probabilities of the held-out images: one view (n, C), the four flips (n, 4, C)
    and the ensemble of inner-fold probes (n, 2, C), see below."""
    from histolens.data.records import target_of
    from histolens.training.probe import fit_linear_probe, group_folds

    w = predictor.model.head.out.weight.detach().double().numpy()
    b = predictor.model.head.out.bias.detach().double().numpy()
    views = np.stack([feats[r.path] for r in test_recs])  # (n, 4, D)
    one = centred(predictor, views[:, 0] @ w.T + b)
    tta = centred(predictor, views @ w.T + b)
    index = {c: i for i, c in enumerate(classes)}
    x = np.stack([feats[r.path][0] for r in train_recs])
    y = np.array([index[target_of(r, task)] for r in train_recs])
    g = np.array([r.group for r in train_recs])
    C = predictor.metadata.probe.C
    members = []
    for tr, _ in group_folds(y, g, N_MEMBERS, seed):
        fit = fit_linear_probe(
            x[tr],
            y[tr],
            g[tr],
            len(classes),
            (C,),
            2,
            seed,
            predictor.metadata.run_config.train.probe_weighting,
        )
        members.append(centred(predictor, fit.logits(views[:, 0])))
    # Folds with few patients of a class have fewer members; (mean - sd, mean + sd) has the same
    # mean and spread as the members, so every fold's ensemble stacks as two "views".
    m = np.stack(members, axis=1)
    mean, sd = m.mean(1), m.std(1)
    return one, tta, np.stack([mean - sd, mean + sd], axis=1)


def cross_fitted(
    probs, score: str, y, pred, fold, patients, scored, cal_mask, classes, mags=None
) -> dict:
    """Coverage and referral at each alpha on the scored images, each fold's sets calibrated on
    the other folds' images where ``cal_mask`` holds (per magnification with ``mags``)."""
    from histolens.stats.conformal import ConformalCalibration
    from histolens.stats.conformal_metrics import coverage

    row = {}
    for alpha in ALPHAS:
        member = np.zeros(probs.shape[:1] + probs.shape[-1:], dtype=bool)
        for k in np.unique(fold):
            cal_idx, test_idx = (fold != k) & cal_mask, (fold == k) & scored
            cal_mags, test_mags = (None, None) if mags is None else (mags[cal_idx], mags[test_idx])
            cal = ConformalCalibration.fit(
                probs[cal_idx], y[cal_idx], patients[cal_idx], classes, alpha, score, cal_mags
            )
            member[test_idx] = cal.prediction_sets(
                probs[test_idx], alpha, pred[test_idx], test_mags
            )
        cov = coverage(member[scored], y[scored], patients[scored])
        row[f"coverage {alpha:g}"] = cov["patients"]
        row[f"refer {alpha:g}"] = float((member[scored].sum(1) > 1).mean())
    return row


def score_repeat(pool: dict, classes) -> dict[str, dict[str, float]]:
    """AURC and cross-fitted coverage/referral of each score over one repeat's pooled images."""
    from histolens.stats.conformal import SCORES
    from histolens.stats.conformal_metrics import coverage, risk_coverage

    y, pred, fold, patients = (np.asarray(pool[k]) for k in ("y", "pred", "fold", "patient"))
    mags = np.asarray(pool["mag"], dtype=object)
    scored = mags == SCORED_MAGNIFICATION
    every = np.ones_like(scored)
    folds = (y, pred, fold, patients, scored)
    out: dict[str, dict[str, float]] = {}
    for name in ("probability", "tta", "ensemble"):
        probs = np.concatenate(pool[name])
        class_scores = SCORES[name](probs)
        own = class_scores[np.arange(len(pred)), pred]
        row = {"AURC": risk_coverage((pred == y)[scored], 1 - own[scored])["aurc"]}
        out[name] = row | cross_fitted(probs, name, *folds, every, classes)
    # The same score calibrated only on the other folds' 100X images: is a calibration set of
    # every magnification and source (the shipped one) exchangeable with new 100X images?
    probs = np.concatenate(pool["probability"])
    out["probability, per magnification"] = {"AURC": out["probability"]["AURC"]} | cross_fitted(
        probs, "probability", *folds, every, classes, mags
    )
    out[f"probability, calibrated on {SCORED_MAGNIFICATION}X only"] = {
        "AURC": out["probability"]["AURC"]
    } | cross_fitted(probs, "probability", *folds, scored, classes)
    shipped = {"AURC": out["probability"]["AURC"]}
    for alpha in ALPHAS:
        member = np.concatenate(pool[f"shipped {alpha:g}"])
        cov = coverage(member[scored], y[scored], patients[scored])
        shipped[f"coverage {alpha:g}"] = cov["patients"]
        shipped[f"refer {alpha:g}"] = float((member[scored].sum(1) > 1).mean())
    out["probability, shipped calibration"] = shipped
    return out


def run(args) -> None:
    import logging

    from histolens.data.records import class_names_for, target_of
    from histolens.inference.predictor import Predictor

    logging.getLogger("histolens").setLevel(logging.ERROR)
    data = require_real_data()
    records = _records(data, args.task)
    if args.quick:
        records = [r for r in records if r.magnification == SCORED_MAGNIFICATION]
    classes = class_names_for(args.task, records)
    index = {c: i for i, c in enumerate(classes)}
    repeats = 1 if args.quick else args.repeats
    k = 3 if args.quick else 5
    scored = [r for r in records if r.magnification == SCORED_MAGNIFICATION]
    print(
        f"{len(records)} images of {len({r.group for r in records})} patient groups; scored: "
        f"{len(scored)} {SCORED_MAGNIFICATION}X images of {len({r.group for r in scored})} "
        f"groups; task {args.task}; {repeats} x {k}-fold stratified group k-fold"
        + (" (--quick smoke check)" if args.quick else ""),
        flush=True,
    )
    shared: dict = {}
    cfg = study_config(data, args.task, args.quick, records, shared)
    feats: dict = {}
    results = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(repeats):
            pool: dict = {"y": [], "pred": [], "fold": [], "patient": [], "mag": []}
            for fold, train_recs, test_recs, run_dir in train_folds(
                cfg, records, args.task, seed, k, shared, Path(tmp)
            ):
                predictor = Predictor.from_checkpoint(run_dir)
                view_features(predictor, shared["bank"], [r.path for r in records], feats)
                one, tta, members = fold_probabilities(
                    predictor, train_recs, test_recs, feats, classes, args.task, seed
                )
                # The shipped label: centring put the fold's threshold at 0.5.
                labels = (one[:, 1] >= 0.5).astype(int) if one.shape[1] == 2 else one.argmax(1)
                pool["y"] += [index[target_of(r, args.task)] for r in test_recs]
                pool["pred"] += labels.tolist()
                pool["fold"] += [fold] * len(test_recs)
                pool["patient"] += [r.group for r in test_recs]
                pool["mag"] += [r.magnification for r in test_recs]
                pool.setdefault("probability", []).append(one)
                pool.setdefault("tta", []).append(tta)
                pool.setdefault("ensemble", []).append(members)
                for alpha in ALPHAS:
                    mags = [r.magnification for r in test_recs]
                    sets = predictor.conformal.prediction_sets(one, alpha, labels, mags)
                    pool.setdefault(f"shipped {alpha:g}", []).append(sets)
            results.append(score_repeat(pool, classes))
            print(f"repeat {seed + 1}/{repeats} done ({time.perf_counter() - start:.0f} s)")
    keys = ["AURC"] + [f"{m} {a:g}" for a in ALPHAS for m in ("coverage", "refer")]
    rows = []
    for name in results[0]:
        rows.append([name, *(mean_sd([r[name][key] for r in results]) for key in keys)])
    print()
    print(
        f"Held-out {SCORED_MAGNIFICATION}X images, mean +/- sd over {repeats} repeat(s); target "
        "coverage is 1 - alpha (averaged over patients); AURC lower is better; "
        f"{time.perf_counter() - start:.0f} s in all."
    )
    print_table(["score", *keys], rows)


def main() -> None:
    setup()
    ap = repeated_study_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="smoke check, not a measurement")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
