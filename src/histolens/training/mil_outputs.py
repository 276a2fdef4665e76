"""What a MIL run writes besides its checkpoint: the model card, the evaluation and the report.

The evaluation folder is the tile workflow's (:func:`histolens.evaluation.evaluate.write_evaluation`:
``metrics.json``, ``predictions.csv`` and ``patients.csv`` with one row per slide, the ROC,
reliability and risk-coverage plots), and the report is rendered by
:func:`histolens.report.mil.write_mil_report` from it and the checkpoint's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histolens.training.mil import MilConfig
from histolens.training.mil_decision import MilDecision

__all__ = ["feature_source", "mil_model_card", "write_mil_outputs"]


def feature_source(bags: Sequence) -> dict[str, Any]:
    """The tile features the bags hold: width, and the fingerprint and path of the tile
    checkpoint that extracted them (None when the bags do not say, or do not agree on a path).
    One sentence when the bags come from different backbones or tile checkpoints."""
    from histolens.errors import CheckpointError

    dims = sorted({int(b.features.shape[1]) for b in bags})
    if len(dims) != 1:
        raise CheckpointError(
            f"The bags have features of different widths ({dims}): they come from different "
            "backbones; extract them all with one."
        )
    prints = sorted({b.fingerprint for b in bags if b.fingerprint})
    if len(prints) > 1:
        raise CheckpointError(
            f"The bags were extracted by {len(prints)} different tile checkpoints; extract them "
            "all with one ('histolens slide features CKPT SLIDES --out DIR')."
        )
    sources = sorted({b.checkpoint for b in bags if b.checkpoint})
    return {
        "feature_dim": dims[0],
        "fingerprint": prints[0] if prints else None,
        "checkpoint": sources[0] if len(sources) == 1 else None,
        "tiling": dict(bags[0].tiling),  # how the slides were tiled: new ones are tiled alike
    }


def mil_model_card(
    decision: MilDecision,
    estimate: dict[str, Any],
    slide_auc: dict[str, Any],
    config: MilConfig,
    features: dict[str, Any],
    data: str,
    training: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The model card's paragraphs (plain text, stored in the checkpoint; the report renders
    them with :data:`histolens.report.mil.MODEL_CARD_SECTIONS`)."""
    from histolens.evaluation.estimate import headline_text

    extractor = features.get("checkpoint") or "an unrecorded tile model"
    sets = (
        f"prediction sets at alpha {decision.alpha:g} (patient-weighted split-conformal)"
        if decision.alpha is not None
        else "no prediction sets"
    )
    training = training or {}
    if training.get("early_stopping"):
        schedule = (
            f"epoch {training['best_epoch']} of {training['epochs']} kept (lowest loss on "
            f"{training['val_slides']} held-out slides of {training['val_patients']} patients; "
            f"early stopping patience {config.patience})"
        )
    else:
        schedule = f"{training.get('epochs', config.epochs)} epochs"
    baseline = "; ".join(
        f"{m} slide AUC {r['auc']:.3f} (95% CI {r['ci95'][0]:.2f}-{r['ci95'][1]:.2f})"
        for m, r in slide_auc.items()
    )
    return {
        "intended_use": (
            "Research and education in computational pathology: studying how a slide-level "
            "classifier trained from slide labels behaves and where it looks. Not for diagnosis "
            "and not a medical device; a pathologist's reading of the slide is the reference."
        ),
        "model": (
            f"Gated-attention MIL (Ilse et al. 2018; hidden {config.hidden}, attention "
            f"{config.attention}; {schedule}) on {features['feature_dim']} tile "
            f"features from {extractor}; classes {', '.join(decision.classes)}; temperature "
            f"{decision.temperature:.3f}; decision threshold {decision.threshold:.3f} "
            f"({decision.operating_points.rule.describes}) chosen on the out-of-fold slide "
            f"predictions of every training patient; {sets}."
        ),
        "data": f"{data}; folds split by patient (a patient's slides never straddle a fold).",
        "performance": f"{headline_text(estimate)}. Same folds: {baseline}.",
        "limitations": (
            "Few slides and patients: confidence intervals are wide, and performance on other "
            "labs, scanners, stains and tile models is unknown. The rows of the estimate are "
            "slides ('images' in its wording); read the patient figures. Attention shows which "
            "tiles the slide's answer weighed most, not a segmentation of the lesion."
        ),
    }


def write_mil_outputs(
    run_dir: Path, evaluation, metadata: dict[str, Any], notes: list[str]
) -> Path:
    """The evaluation folder of the out-of-fold slides and ``report.html``; the report's path."""
    from histolens.evaluation.evaluate import write_evaluation
    from histolens.report.mil import write_mil_report
    from histolens.rundir import RunDir

    run = RunDir(run_dir)
    warnings = (metadata.get("estimate") or {}).get("warnings", [])
    write_evaluation(evaluation, run.evaluation.path, notes=[*notes, *warnings], images=False)
    return write_mil_report(run_dir, metadata, notes)


def slide_auc_table(cv) -> dict[str, Any]:
    """{method: {auc, ci95}} of a :class:`~histolens.training.mil_cv.MilCrossValidation`."""
    return {
        m: {"auc": float(a), "ci95": [float(lo), float(hi)]}
        for m, (a, lo, hi) in cv.table().items()
        if np.isfinite(a)
    }
