"""Every file of a run directory, named once.

``histolens train --out RUN`` writes a run directory; evaluate, explain, report and the front
ends read it. ``RunDir(path)`` gives each file's path; the class attributes give the names
relative to the run (what error messages and the docs quote). The files of the run's
``evaluation/`` and ``explanations/`` folders are named here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EvaluationFiles", "ExplanationFiles", "RunDir"]


def _file(name: str | Path) -> property:
    """A property: ``name`` inside the folder at ``self.path``."""
    return property(lambda self: self.path / name, doc=f"``{name}`` in this folder.")


@dataclass(frozen=True)
class _Folder:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))


class EvaluationFiles(_Folder):
    """What ``write_evaluation`` writes into an evaluation folder (``RUN/evaluation`` or
    ``histolens evaluate --out``)."""

    METRICS = "metrics.json"
    PREDICTIONS = "predictions.csv"
    NOTES = "notes.json"
    PATIENTS = "patients.csv"

    metrics = _file(METRICS)
    predictions = _file(PREDICTIONS)
    notes = _file(NOTES)
    patients = _file(PATIENTS)


class ExplanationFiles(_Folder):
    """What ``histolens explain`` writes into its output folder (default ``RUN/explanations``)."""

    INDEX = "index.csv"
    FAITHFULNESS = "faithfulness.json"

    index = _file(INDEX)
    faithfulness = _file(FAITHFULNESS)


class RunDir(_Folder):
    """A training run's directory and the path of each of its files."""

    CHECKPOINT = "best.safetensors"
    CONFIG = "config.json"
    SPLIT = "split.csv"
    FEATURE_CACHE = "features.safetensors"
    SKIPPED = "skipped.csv"
    PREDICTIONS = "predictions.csv"  # a run trained without writing its evaluation
    REPORT = "report.html"
    EVALUATION = "evaluation"
    EXPLANATIONS = "explanations"
    LOGS = "logs"
    LAST_CHECKPOINT = Path("lightning") / "last.ckpt"
    # One row per epoch; under logs/version_0 where Lightning's CSVLogger used to write it.
    EPOCH_LOG = Path("logs") / "version_0" / "metrics.csv"

    checkpoint = _file(CHECKPOINT)
    config = _file(CONFIG)
    split = _file(SPLIT)
    feature_cache = _file(FEATURE_CACHE)
    skipped = _file(SKIPPED)
    predictions = _file(PREDICTIONS)
    report = _file(REPORT)
    logs = _file(LOGS)
    last_checkpoint = _file(LAST_CHECKPOINT)
    epoch_log = _file(EPOCH_LOG)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> RunDir:
        """The run a checkpoint file belongs to (a directory is the run itself)."""
        p = Path(checkpoint)
        return cls(p if p.is_dir() else p.parent)

    @property
    def evaluation(self) -> EvaluationFiles:
        return EvaluationFiles(self.path / self.EVALUATION)

    @property
    def explanations(self) -> ExplanationFiles:
        return ExplanationFiles(self.path / self.EXPLANATIONS)
