"""The flat layout's module paths still import: ``histolens.predictor`` is
``histolens.inference.predictor``, with a DeprecationWarning that names the new path.

histolens moved its modules into packages by responsibility (docs/architecture.md). Code
written against the old paths, such as ``from histolens.predictor import Predictor``, keeps
working through a finder at the end of ``sys.meta_path``. The finder answers only for names
that no longer exist. An old module that became a package of the same name (``histolens.data``,
now ``histolens.data.records``) is the package: import its names from the new module.
"""

# rewrite_imports: skip (this module names the old paths on purpose)

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType

__all__ = ["MOVED", "install"]

# Old path -> new path, both under ``histolens.``.
MOVED: dict[str, str] = {
    "metrics": "stats.metrics",
    "calibration": "stats.calibration",
    "conformal": "stats.conformal",
    "conformal_metrics": "stats.conformal_metrics",
    "imageio": "data.imageio",
    "imagefiles": "data.imagefiles",
    "splits": "data.splits",
    "summary": "data.summary",
    "synth": "data.synth",
    "_synth_paint": "data._synth_paint",
    "_synth_shapes": "data._synth_shapes",
    "audit": "data.audit",
    "_audit_facts": "data._audit_facts",
    "_audit_scoring": "data._audit_scoring",
    "stain_augment": "stain.augment",
    "stain_math": "stain.math",
    "stain_reference": "stain.reference",
    "backbones": "models.backbones",
    "_backbone_registry": "models.registry",
    "_hub_backbones": "models.hub",
    "_weights": "models.weights",
    "model": "models.classifier",
    "transforms": "models.transforms",
    "adapt": "models.adapt",
    "pipeline": "models.pipeline",
    "feature_cache": "models.feature_cache",
    "checkpoint_metadata": "checkpoint.metadata",
    "checkpoint_parts": "checkpoint.parts",
    "predictor": "inference.predictor",
    "predictor_loading": "inference.loading",
    "onnx_backend": "inference.runtimes",
    "ood": "inference.ood",
    "prediction": "inference.prediction",
    "predictions_csv": "inference.predictions_csv",
    "batch_predict": "inference.batch",
    "predict_progress": "inference.progress",
    "predict_resume": "inference.resume",
    "evaluation_metrics": "evaluation.metrics",
    "evaluation_records": "evaluation.records",
    "evaluation_referral": "evaluation.referral",
    "estimate": "evaluation.estimate",
    "performance": "evaluation.performance",
    "plots": "evaluation.plots",
    "training_data": "training.data",
    "lightning_callbacks": "training.lightning_callbacks",
    "lightning_module": "training.lightning_module",
    "lightning_run": "training.lightning_run",
    "probe": "training.probe",
    "probe_run": "training.probe_run",
    "probe_validation": "training.probe_validation",
    "probe_evaluation": "training.probe_evaluation",
    "crossval": "training.crossval",
    "mixing": "training.mixing",
    "distributed": "training.distributed",
    "export_quantize": "export.quantize",
    "export_verify": "export.verify",
    "report_estimate": "report.estimate",
    "report_html": "report.markup",
    "report_metrics": "report.metrics",
    "cli_data": "cli.data",
    "cli_options": "cli.options",
    "cli_train": "cli.train",
    "explain.cli": "cli.explain",
    "gui.cli": "cli.gui",
    "web.cli": "cli.web",
}


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module at its new path (the same module object)."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return None  # a placeholder that exec_module replaces in sys.modules

    def exec_module(self, module: ModuleType) -> None:
        warnings.warn(
            f"{module.__name__} is {self.new} now; import it from there.",
            DeprecationWarning,
            stacklevel=2,
        )
        # The import system returns what sys.modules holds under the old name once this returns.
        sys.modules[module.__name__] = importlib.import_module(self.new)


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if not name.startswith("histolens."):
            return None
        new = MOVED.get(name[len("histolens.") :])
        return (
            None
            if new is None
            else importlib.util.spec_from_loader(name, _Alias(f"histolens.{new}"))
        )


def install() -> None:
    """Answer old module paths (once per process; ``import histolens`` calls this)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
