"""Evaluation that cannot misalign predictions and labels, with patient-level metrics and CIs.

Every prediction travels as a row with its path, patient and label; metrics are computed from
those rows only. Threshold and temperature are fitted on the validation split and stored in the
checkpoint, so every front end uses them.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histolens.atomic import atomic_open, atomic_write_text
from histolens.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    choose_threshold,
    fit_temperature,
)
from histolens.data import ImageRecord, target_of
from histolens.errors import DataError
from histolens.metrics import (
    HEADLINE_METRICS,
    binary_metrics,
    bootstrap_ci,
    multiclass_metrics,
    patient_level_auc,
    patient_recognition_rate,
    safe_auc,
)
from histolens.predictor import Predictor, probabilities_from_logits

__all__ = [
    "EvalResult",
    "PredictionRow",
    "compute_metrics",
    "evaluate_checkpoint",
    "finalize_run",
    "rows_from_logits",
    "write_evaluation",
]


@dataclass(frozen=True)
class PredictionRow:
    """One image's prediction with everything that identifies it."""

    path: str
    patient: str
    magnification: int | None
    label: str
    target: int
    probs: tuple[float, ...]
    probs_uncalibrated: tuple[float, ...]
    # Knowing when not to answer (histolens.conformal, histolens.ood): the classes not ruled out
    # (empty: no calibration), whether a person should decide, and whether the image is unlike
    # the training images, with the reason.
    prediction_set: tuple[str, ...] = ()
    refer: bool = False
    ood: bool = False
    ood_reason: str = ""

    def score(self) -> float:
        """Positive-class probability (binary) or the top probability."""
        return self.probs[1] if len(self.probs) == 2 else max(self.probs)


@dataclass
class EvalResult:
    rows: list[PredictionRow]
    classes: tuple[str, ...]
    task: str
    threshold: float
    temperature: float
    metrics: dict[str, Any] = field(default_factory=dict)
    # The error level of the rows' prediction sets and how they were calibrated (None: no sets).
    alpha: float | None = None
    refer_method: str = ""

    def predicted(self, row: PredictionRow) -> int:
        if len(self.classes) == 2:
            return int(row.probs[1] >= self.threshold)
        return int(np.argmax(row.probs))


def rows_from_logits(
    records: Sequence[ImageRecord],
    logits: torch.Tensor,
    classes: Sequence[str],
    task: str,
    temperature: float,
) -> list[PredictionRow]:
    """Pair each record with its own logits; raises if the counts differ."""
    if len(records) != len(logits):
        raise ValueError(f"{len(records)} records but {len(logits)} logits.")
    index = {c: i for i, c in enumerate(classes)}
    calibrated = probabilities_from_logits(logits, temperature).numpy()
    raw = probabilities_from_logits(logits, 1.0).numpy()
    rows = []
    for r, pc, pr in zip(records, calibrated, raw, strict=True):
        label = target_of(r, task)
        if label not in index:
            raise DataError(
                f"{r.path} is labelled '{label}', which the model does not know "
                f"(classes: {', '.join(classes)}); is this checkpoint for another task?"
            )
        rows.append(
            PredictionRow(
                r.path,
                r.group or r.patient or r.path,
                r.magnification,
                label,
                index[label],
                tuple(map(float, pc)),
                tuple(map(float, pr)),
            )
        )
    return rows


def with_referrals(
    result: EvalResult,
    member: np.ndarray | None,
    ood_reasons: Sequence[str | None] | None,
    alpha: float | None,
    method: str,
) -> EvalResult:
    """Give each row its prediction set (``member``: (n, C) booleans) and out-of-distribution
    reason; an image is referred when its set holds several classes or it is out of distribution."""
    import dataclasses

    rows = []
    for i, r in enumerate(result.rows):
        s = (
            tuple(c for c, m in zip(result.classes, member[i], strict=True) if m)
            if member is not None
            else ()
        )
        reason = (ood_reasons[i] if ood_reasons is not None else None) or ""
        rows.append(
            dataclasses.replace(
                r,
                prediction_set=s,
                refer=len(s) > 1 or bool(reason),
                ood=bool(reason),
                ood_reason=reason,
            )
        )
    result.rows = rows
    result.alpha = alpha if member is not None else None
    result.refer_method = method
    return result


def refer_metrics(result: EvalResult) -> dict[str, Any] | None:
    """Coverage of the prediction sets, referrals of images and patients, and the images unlike
    the training images (counted apart: the coverage and accuracy figures leave them out)."""
    from histolens.conformal import centred_probabilities, coverage, patient_referrals
    from histolens.conformal import risk_coverage as rc_curve

    rows = result.rows
    n_ood = sum(r.ood for r in rows)
    if result.alpha is None and not n_ood:
        return None
    out: dict[str, Any] = {"n_ood": n_ood, "ood_rate": n_ood / len(rows) if rows else 0.0}
    reasons: dict[str, int] = {}
    for r in rows:
        if r.ood:
            kind = r.ood_reason.split(" (")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
    out["ood_reasons"] = reasons
    ind = [r for r in rows if not r.ood]
    y = np.array([r.target for r in ind], dtype=int)
    pred = np.array([result.predicted(r) for r in ind], dtype=int)
    patients = np.array([r.patient for r in ind])
    probs = np.array([r.probs for r in ind]).reshape(len(ind), len(result.classes))
    thr = result.threshold if len(result.classes) == 2 else None
    confidence = centred_probabilities(probs, thr)[np.arange(len(ind)), pred] if len(ind) else pred
    curve = rc_curve(pred == y, confidence)
    out["aurc"] = curve["aurc"]
    out["curve"] = {
        "referred": [round(float(v), 4) for v in curve["referred"]],
        "accuracy": [round(float(v), 4) for v in curve["accuracy"]],
    }
    if result.alpha is not None and ind:
        index = {c: i for i, c in enumerate(result.classes)}
        member = np.zeros((len(ind), len(result.classes)), dtype=bool)
        for i, r in enumerate(ind):
            member[i, [index[c] for c in r.prediction_set]] = True
        refer = np.array([r.refer for r in ind])
        cov = coverage(member, y, patients)
        kept = ~refer
        out.update(
            alpha=result.alpha,
            method=result.refer_method,
            target_coverage=1 - result.alpha,
            coverage=cov["patients"],
            coverage_images=cov["images"],
            mean_set_size=float(member.sum(1).mean()),
            refer_rate=float(refer.mean()),
            accuracy_kept=float((pred == y)[kept].mean()) if kept.any() else float("nan"),
            accuracy_referred=float((pred == y)[refer].mean()) if refer.any() else float("nan"),
        )
    all_patients = np.array([r.patient for r in rows])
    decided = patient_referrals([r.refer for r in rows], all_patients)
    out["n_patients"] = len(decided)
    out["patients_referred"] = sorted(p for p, v in decided.items() if v)
    # A patient not referred is called by the majority of its kept images.
    correct = []
    for p, referred in decided.items():
        if referred:
            continue
        mine = [r for r in rows if r.patient == p and not r.refer]
        votes = np.bincount([result.predicted(r) for r in mine], minlength=len(result.classes))
        truth = np.bincount([r.target for r in mine], minlength=len(result.classes)).argmax()
        correct.append(bool(votes.argmax() == truth))
    out["patient_accuracy_kept"] = float(np.mean(correct)) if correct else float("nan")
    return out


def _binary_block(y, p, patients, threshold, n_boot, seed) -> dict[str, Any]:
    out = binary_metrics(y, p, threshold)
    correct = (p >= threshold).astype(int) == y
    out["patient_recognition_rate"] = patient_recognition_rate(patients, correct)
    out["patient_auc"] = patient_level_auc(patients, y, p)
    out["n_patients"] = int(len(np.unique(patients)))
    positive = p >= threshold

    def rate(i: np.ndarray, cls: int) -> float:
        of_class = y[i] == cls
        return float((positive[i][of_class] == bool(cls)).mean()) if of_class.any() else np.nan

    stats = {
        "roc_auc": lambda i: safe_auc(y[i], p[i]),
        "accuracy": lambda i: float(correct[i].mean()),
        "balanced_accuracy": lambda i: float(np.mean([rate(i, 1), rate(i, 0)])),
        "sensitivity": lambda i: rate(i, 1),
        "specificity": lambda i: rate(i, 0),
        "patient_recognition_rate": lambda i: patient_recognition_rate(patients[i], correct[i]),
        "patient_auc": lambda i: patient_level_auc(patients[i], y[i], p[i]),
    }
    if n_boot:
        out["ci95"] = {k: bootstrap_ci(f, patients, n_boot, seed) for k, f in stats.items()}
    return out


def compute_metrics(result: EvalResult, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Image- and patient-level metrics of ``result`` with bootstrap CIs over patients."""
    rows = result.rows
    if not rows:
        raise DataError("Nothing to evaluate: no readable images in this split.")
    y = np.array([r.target for r in rows])
    patients = np.array([r.patient for r in rows])
    probs = np.array([r.probs for r in rows])
    out: dict[str, Any] = {
        "n_images": len(rows),
        "n_patients": int(len(np.unique(patients))),
        "threshold": result.threshold,
        "temperature": result.temperature,
    }
    if len(result.classes) == 2:
        p = probs[:, 1]
        out["image"] = _binary_block(y, p, patients, result.threshold, n_boot, seed)
        out["image_at_0.5"] = binary_metrics(y, p, 0.5)
        p_raw = np.array([r.probs_uncalibrated[1] for r in rows])
        out["uncalibrated"] = {
            "brier": binary_metrics(y, p_raw, 0.5)["brier"],
            "ece": binary_metrics(y, p_raw, 0.5)["ece"],
        }
        mags = sorted({r.magnification for r in rows if r.magnification})
        if len(mags) > 1:
            out["per_magnification"] = {}
            for m in mags:
                idx = np.array([r.magnification == m for r in rows])
                out["per_magnification"][f"{m}X"] = _binary_block(
                    y[idx], p[idx], patients[idx], result.threshold, 0, seed
                )
    else:
        mc = multiclass_metrics(y, probs, result.classes)
        pred = probs.argmax(1)
        correct = pred == y
        mc["patient_recognition_rate"] = patient_recognition_rate(patients, correct)
        if n_boot:
            mc["ci95"] = {
                "accuracy": bootstrap_ci(
                    lambda i: float(correct[i].mean()), patients, n_boot, seed
                ),
                "patient_recognition_rate": bootstrap_ci(
                    lambda i: patient_recognition_rate(patients[i], correct[i]),
                    patients,
                    n_boot,
                    seed,
                ),
            }
        out["image"] = mc
    refer = refer_metrics(result)
    if refer is not None:
        out["refer"] = refer
    return out


def _logits_for(
    predictor: Predictor,
    records: Sequence[ImageRecord],
    bank=None,
    cache=None,
    progress: bool = False,
) -> tuple[list[ImageRecord], torch.Tensor, list]:
    """Logits for records, from cached features, an image bank, or the files themselves."""
    if not records:
        n_out = 1 if predictor.is_binary else len(predictor.class_names)
        return [], torch.zeros(0, n_out), []
    if cache is not None and all(r.path in cache.clean for r in records):
        with torch.inference_mode():
            feats = torch.stack([cache.clean[r.path] for r in records]).to(predictor.device)
            return list(records), predictor.model.head(feats).float().cpu(), []
    if bank is not None and all(r.path in bank for r in records):
        chunks = []
        for i in range(0, len(records), 32):
            batch = bank.stack([r.path for r in records[i : i + 32]])
            chunks.append(predictor.logits(predictor.to_input(batch)).float().cpu())
        return list(records), torch.cat(chunks), []
    from tqdm.auto import tqdm

    by_path = {r.path: r for r in records}
    with tqdm(
        total=len(records), desc="Predicting", unit="img", disable=not progress, leave=False
    ) as bar:
        kept, logits, skipped = predictor.logits_for_paths(
            [r.path for r in records], progress=bar.update
        )
    return [by_path[p] for p in kept], logits, skipped


def _assess_records(
    predictor: Predictor, records: Sequence[ImageRecord], progress: bool
) -> tuple[list[ImageRecord], torch.Tensor, list[str | None], list]:
    """Logits and out-of-distribution reasons of records' files (Predictor.assess_paths)."""
    from tqdm.auto import tqdm

    by_path = {r.path: r for r in records}
    with tqdm(
        total=len(records), desc="Predicting", unit="img", disable=not progress, leave=False
    ) as bar:
        kept, logits, reasons, skipped = predictor.assess_paths(
            [r.path for r in records], progress=bar.update
        )
    return [by_path[p] for p in kept], logits, reasons, skipped


def finalize_run(
    run_dir: str | os.PathLike,
    cfg,
    split,
    classes: Sequence[str],
    bank=None,
    cache=None,
    progress: bool = True,
    notes: Sequence[str] = (),
    write_outputs: bool = True,
) -> dict[str, Any]:
    """After training: fit temperature and threshold on validation, evaluate on test, report."""
    from histolens.checkpoint import update_metadata

    run_dir = Path(run_dir)
    predictor = Predictor.from_checkpoint(run_dir)
    task = cfg.data.task
    val_records, val_logits, _ = _logits_for(predictor, split.val, bank, cache)
    temperature, threshold = 1.0, 0.5
    if val_records:
        idx = {c: i for i, c in enumerate(classes)}
        y_val = torch.tensor([idx[target_of(r, task)] for r in val_records])
        temperature = fit_temperature(val_logits, y_val)
        if predictor.is_binary:
            p_val = probabilities_from_logits(val_logits, temperature)[:, 1].numpy()
            threshold = choose_threshold(
                y_val.numpy(), p_val, cfg.train.threshold_method, cfg.train.target_sensitivity
            )
    predictor.temperature, predictor.threshold = temperature, threshold
    notes = list(notes)
    if temperature in (MIN_TEMPERATURE, MAX_TEMPERATURE):
        notes.append(
            f"The calibration temperature reached its bound ({temperature:g}): the validation "
            "patients are "
            + ("perfectly separated" if temperature == MIN_TEMPERATURE else "barely separable")
            + ", so the probabilities' calibration is not well determined."
        )
    test_part = "test" if split.test else "val"
    records = split.test or split.val
    kept, logits, _ = _logits_for(predictor, records, bank, cache)
    result = EvalResult(
        rows_from_logits(kept, logits, classes, task, temperature),
        tuple(classes),
        task,
        threshold,
        temperature,
    )
    result.metrics = compute_metrics(
        result, n_boot=1000 if write_outputs else 0, seed=cfg.data.seed
    )
    result.metrics["split"] = test_part
    summary = _headline(result.metrics)
    estimate = None
    # Validation patients chose the epoch, threshold and temperature: not an unseen-patient figure.
    if write_outputs and test_part == "test" and len({r.target for r in result.rows}) > 1:
        from histolens.estimate import build_estimate

        estimate = build_estimate(
            result,
            f"the held-out {test_part} split of patients (one split, no cross-validation)",
            f"{result.metrics['n_images']} images of {result.metrics['n_patients']} patient "
            f"groups in {Path(str(cfg.data.path)).name} (magnification {cfg.data.magnification})",
            seed=cfg.data.seed,
        )
        notes = notes + [w for w in estimate["warnings"] if w not in notes]
    update_metadata(
        run_dir / "best.safetensors",
        temperature=temperature,
        threshold=threshold,
        metrics={"split": test_part, **summary},
        threshold_method=cfg.train.threshold_method,
        **({"estimate": estimate} if estimate else {}),
    )
    if write_outputs:
        write_evaluation(
            result,
            run_dir / "evaluation",
            logs_dir=run_dir / "logs",
            report_dir=run_dir,
            notes=notes,
        )
    else:
        write_predictions_csv(result, run_dir / "predictions.csv")
    return result.metrics


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline metrics, and the secondary and calibration figures, kept in the checkpoint."""
    img = metrics["image"]
    keys = (*HEADLINE_METRICS, "pr_auc", "f1", "brier", "ece", "roc_auc_ovr")
    return {k: img[k] for k in keys if k in img} | {
        "n_images": metrics["n_images"],
        "n_patients": metrics["n_patients"],
    }


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    records: Sequence[ImageRecord],
    n_boot: int = 1000,
    progress: bool = True,
    seed: int = 0,
    alpha: float | None = None,
) -> tuple[EvalResult, list]:
    """Evaluate a checkpoint on records, with its stored threshold, temperature, conformal
    calibration (at ``alpha``, default the training one) and out-of-distribution guard."""
    predictor = Predictor.from_checkpoint(checkpoint)
    predictor.alpha = alpha
    reasons = None
    if predictor.guard is None:
        kept, logits, skipped = _logits_for(predictor, records, progress=progress)
    else:
        kept, logits, reasons, skipped = _assess_records(predictor, records, progress)
    result = EvalResult(
        rows_from_logits(
            kept, logits, predictor.class_names, predictor.task, predictor.temperature
        ),
        predictor.class_names,
        predictor.task,
        predictor.threshold,
        predictor.temperature,
    )
    if predictor.conformal is not None or reasons is not None:
        member = None
        if predictor.conformal is not None and result.rows:
            from histolens.conformal import centred_probabilities

            probs = np.array([r.probs for r in result.rows])
            thr = predictor.threshold if predictor.is_binary else None
            predicted = [result.predicted(r) for r in result.rows]
            member = predictor.conformal.prediction_sets(
                centred_probabilities(probs, thr), predictor.refer_alpha, predicted
            )
        with_referrals(
            result,
            member,
            reasons,
            predictor.refer_alpha,
            "the checkpoint's calibration (out-of-fold predictions of its training patients)",
        )
    result.metrics = compute_metrics(result, n_boot=n_boot, seed=seed)
    return result, skipped


def write_predictions_csv(result: EvalResult, path: str | os.PathLike) -> Path:
    """path, patient, magnification, label, probability (positive or per class), prediction,
    correct, then prediction_set (classes joined by ';'), refer, ood and ood_reason."""
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        binary = len(result.classes) == 2
        prob_cols = ["probability"] if binary else [f"p_{c}" for c in result.classes]
        w.writerow(
            ["path", "patient", "magnification", "label", *prob_cols, "prediction", "correct"]
            + ["prediction_set", "refer", "ood", "ood_reason"]
        )
        for r in result.rows:
            pred = result.classes[result.predicted(r)]
            probs = [f"{r.probs[1]:.6f}"] if binary else [f"{q:.6f}" for q in r.probs]
            w.writerow(
                [
                    r.path,
                    r.patient,
                    r.magnification or "",
                    r.label,
                    *probs,
                    pred,
                    int(pred == r.label),
                    ";".join(r.prediction_set),
                    int(r.refer),
                    int(r.ood),
                    r.ood_reason,
                ]
            )
    return Path(path)


def write_evaluation(
    result: EvalResult,
    out_dir: str | os.PathLike,
    logs_dir: str | os.PathLike | None = None,
    report_dir: str | os.PathLike | None = None,
    notes: Sequence[str] = (),
    checkpoint: str | os.PathLike | None = None,
) -> Path:
    """metrics.json, predictions.csv and the plots in ``out_dir`` (training curves from
    ``logs_dir`` when given); then ``report.html`` in ``report_dir`` (default ``out_dir``)."""
    from histolens import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(result.metrics, indent=2, default=float))
    write_predictions_csv(result, out / "predictions.csv")
    # Kept beside the metrics so that `histolens report` later shows the same warnings.
    atomic_write_text(out / "notes.json", json.dumps(list(notes), indent=2))
    y = np.array([r.target for r in result.rows])
    pred = np.array([result.predicted(r) for r in result.rows])
    plots.plot_confusion_matrix(y, pred, result.classes, out / "confusion_matrix.png")
    if len(result.classes) == 2:
        p = np.array([r.probs[1] for r in result.rows])
        p_raw = np.array([r.probs_uncalibrated[1] for r in result.rows])
        plots.plot_roc_pr(y, p, result.threshold, out / "roc_pr.png")
        plots.plot_probability_distribution(
            y, p, result.classes, result.threshold, out / "probability_distribution.png"
        )
        plots.plot_reliability(y, p_raw, p, result.temperature, out / "reliability.png")
    wrong = [
        (
            r.path,
            r.label,
            result.classes[result.predicted(r)],
            max(r.probs)
            if len(result.classes) > 2
            else (r.probs[1] if result.predicted(r) else r.probs[0]),
        )
        for r in result.rows
        if result.predicted(r) != r.target
    ]
    wrong.sort(key=lambda t: -t[3])  # the most confident mistakes first
    plots.plot_misclassified(wrong, out / "misclassified.png")
    refer = result.metrics.get("refer") or {}
    if refer.get("curve", {}).get("referred"):
        plots.plot_risk_coverage(refer, out / "risk_coverage.png")
    if logs_dir is not None:
        plots.plot_training_curves(logs_dir, out / "training_curves.png")
    from histolens.report import write_report

    write_report(report_dir or out, evaluation_dir=out, checkpoint=checkpoint)  # notes.json
    return out


def records_for_evaluation(
    checkpoint: str | os.PathLike,
    data_path: str | os.PathLike | None,
    split_name: str,
    magnification: str | int | None = None,
) -> tuple[Path, list[ImageRecord], str]:
    """The records to evaluate a checkpoint on, and a phrase saying where they came from.

    A run's own ``split.csv`` is used when the data are the run's; other data are split the same
    way (the checkpoint's seed and fractions) or used whole with ``split_name='all'``.

    Args:
        magnification: keep only the images of this magnification (40, 100, 200, 400 or 'all').
            None: the run's own split as it is, or of other data the magnification the model was
            trained on ('all' for a model trained on every magnification).
    """
    from histolens.checkpoint import read_metadata, resolve_checkpoint_path
    from histolens.data import discover, filter_records
    from histolens.splits import load_split_csv, split_by_patient

    ckpt = resolve_checkpoint_path(checkpoint)
    meta = read_metadata(ckpt)
    cfg = meta.run_config
    trained_on = meta.data.path
    split_csv = ckpt.parent / "split.csv"
    same_data = data_path is None or (
        trained_on is not None and Path(data_path).resolve() == Path(trained_on).resolve()
    )
    if same_data and split_csv.is_file():
        records = load_split_csv(split_csv).side(split_name)
        where = f"{split_name} split of the run's split.csv"
        if split_name == "all":
            where += ", including the patients the model was trained on"
        if not records:
            raise DataError(
                f"The run's split.csv has no {split_name} images (under cross-validation every "
                "patient trains the model; its estimate is in the run's report); evaluate other "
                "data with --data PATH --split all."
            )
        part = "the run's split.csv" if split_name == "all" else f"the {where}"
        records = _of_magnification(records, magnification, part)
        return ckpt, records, where + _magnification_phrase(magnification)
    path = data_path or trained_on
    if path is None:
        raise DataError("Give --data: the checkpoint does not say what it was trained on.")
    mag = meta.magnification if magnification is None else magnification
    records = _of_magnification(discover(path).records, mag, str(path))
    records = filter_records(records, "all", meta.task)
    if split_name == "all":
        return ckpt, records, f"all images of {path}{_magnification_phrase(mag)}"
    split = split_by_patient(
        records,
        meta.task,
        cfg.data.val_fraction,
        cfg.data.test_fraction,
        cfg.data.seed,
        cfg.data.group_by,
    )
    return (
        ckpt,
        split.parts()[split_name],
        f"{split_name} split of {path} (seed {cfg.data.seed}){_magnification_phrase(mag)}",
    )


def _magnification_phrase(magnification: str | int | None) -> str:
    if magnification is None or str(magnification).lower() == "all":
        return ""
    return f", magnification {str(magnification).upper().rstrip('X')}X"


def _of_magnification(
    records: Sequence[ImageRecord], magnification: str | int | None, where: str
) -> list[ImageRecord]:
    """The records of one magnification (None or 'all': every record); one sentence if none."""
    from histolens.data import MAGNIFICATIONS
    from histolens.errors import check_choice

    if magnification is None or str(magnification).lower() == "all":
        return list(records)
    mag = str(magnification).upper().rstrip("X")
    check_choice("magnification", mag, [str(m) for m in MAGNIFICATIONS] + ["all"])
    kept = [r for r in records if r.magnification == int(mag)]
    if not kept:
        found = sorted({r.magnification for r in records if r.magnification})
        has = (
            "its images are at " + ", ".join(f"{m}X" for m in found)
            if found
            else "no image there names its magnification (file name or manifest column)"
        )
        raise DataError(f"No {mag}X image was found in {where}; {has}.")
    return kept
