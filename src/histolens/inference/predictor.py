"""Predictor: the one way evaluation, explanations, the desktop app and the service get a model."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histolens.checkpoint.io import CheckpointMetadata
from histolens.data.records import Skipped, magnification_from_path
from histolens.errors import CheckpointError
from histolens.inference.loading import load_model
from histolens.inference.ood import OOD_MESSAGE, OODGuard, image_size
from histolens.inference.path_batches import iter_image_batches, load_input, stack_logits
from histolens.inference.prediction import Prediction
from histolens.models.classifier import HistoClassifier
from histolens.models.pipeline import InputPipeline
from histolens.models.transforms import Preprocess
from histolens.stats.calibration import probabilities_from_logits
from histolens.stats.conformal import ConformalCalibration, centred_probabilities, check_alpha
from histolens.stats.decisions import OperatingPoints

# Prediction lives in histolens.inference.prediction and probabilities_from_logits in
# histolens.stats.calibration; both are importable here too.
__all__ = ["Prediction", "Predictor", "probabilities_from_logits"]

# Checkpoints without a conformal calibration: a probability this close to the decision threshold
# is flagged "review needed".
UNCERTAINTY_MARGIN = 0.1


@dataclass
class Predictor:
    """A model with its preprocessing, stain normalisation, threshold and temperature."""

    model: HistoClassifier
    preprocess: Preprocess
    class_names: tuple[str, ...]
    threshold: float = 0.5
    temperature: float = 1.0
    stain: Any = None
    # What the checkpoint says (None for a Predictor put together by hand).
    metadata: CheckpointMetadata | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    source: str = ""
    # The conformal calibration and the out-of-distribution guard stored by training (None in
    # older checkpoints), and the error level of the prediction sets (None: the training one).
    conformal: ConformalCalibration | None = None
    guard: OODGuard | None = None
    alpha: float | None = None
    # What computes the logits when it is not ``model`` itself: ONNX Runtime for an export.
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None
    # The threshold per magnification (histolens.stats.decisions); None: ``threshold`` for all.
    operating_points: OperatingPoints | None = None

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str = "cpu", runtime: str | None = None
    ) -> Predictor:
        """Rebuild model, preprocessing and calibration from a checkpoint (file or run dir), or
        from an ONNX export (a ``.onnx`` file), which then runs on ``runtime``: 'onnxruntime' or
        'openvino' (None: $HISTOLENS_ONNX_RUNTIME, else 'onnxruntime'). A torch checkpoint
        refuses an explicit ``runtime``."""
        return cls._with_metadata(**load_model(path, device, runtime)._asdict())

    @classmethod
    def _with_metadata(
        cls,
        model: HistoClassifier,
        meta: CheckpointMetadata,
        calibration: tuple[OODGuard | None, ConformalCalibration | None, Any],
        device: torch.device,
        source: str,
        runner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Predictor:
        """A Predictor of ``model`` with the preprocessing, classes, threshold and temperature
        ``meta`` holds and the stored ``calibration`` (guard, conformal, stain)."""
        guard, conformal, stain = calibration
        return cls(
            model,
            meta.preprocess,
            meta.class_names,
            meta.threshold,
            meta.temperature,
            stain,
            meta,
            device,
            source,
            conformal=conformal,
            guard=guard,
            runner=runner,
            operating_points=meta.decision,
        )

    def use_engine(self, setting: str | None = None) -> str:
        """Compute the backbone's forward passes on the feature engine (``histolens.models.engine``:
        ``setting``, else $HISTOLENS_ENGINE, else auto), the head on PyTorch; returns the engine's
        name. An ONNX export keeps its runtime; heatmaps (gradients) still use ``model``."""
        from histolens.models.engine import EngineClassifier, TorchFeatures, feature_engine

        if self.runner is not None and not isinstance(self.runner, EngineClassifier):
            return getattr(self.runner, "runtime", "torch")
        self.model.eval()
        engine = feature_engine(self.model, setting, self.preprocess.input_size)
        self.runner = (
            None if isinstance(engine, TorchFeatures) else EngineClassifier(self.model, engine)
        )
        return engine.name

    # --- properties the front ends show ---------------------------------------------------
    @property
    def task(self) -> str:
        return self.metadata.task if self.metadata is not None else "binary"

    @property
    def is_binary(self) -> bool:
        return len(self.class_names) == 2  # as CheckpointMetadata.is_binary, for hand-made ones

    @property
    def positive_class(self) -> str | None:
        return self.class_names[1] if self.is_binary else None

    @property
    def backbone_name(self) -> str:
        return self.model.spec.name

    @property
    def model_id(self) -> str:
        stored = self.metadata.model_id if self.metadata is not None else None
        return stored or Path(self.source).stem

    @property
    def refer_alpha(self) -> float | None:
        """The error level of the prediction sets: ``alpha`` if set, else the training one."""
        if self.conformal is None:
            return None
        return check_alpha(self.alpha) if self.alpha is not None else self.conformal.alpha

    def threshold_for(self, magnification: Any) -> float:
        """The decision threshold of an image of ``magnification`` (binary): its
        magnification's operating point, else the pooled ``threshold``."""
        if self.operating_points is None:
            return self.threshold
        return self.operating_points.threshold_for(magnification)

    # --- the pipeline -----------------------------------------------------------------------
    def to_input(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Resized uint8 batch (B, 3, H, W) -> normalised model input (stain normalised first),
        through the same ``InputPipeline`` that training evaluates with: one preprocessing path."""
        pipeline = InputPipeline(self.preprocess, stain=self.stain, device=self.device)
        pipeline.channels_last = self.runner is None  # a runtime reads NCHW: no copy each way
        return pipeline.eval_inputs(images_uint8)

    def prepare(self, images: Sequence) -> torch.Tensor:
        """PIL images -> model input batch."""
        return self.to_input(torch.stack([self.preprocess.resize(img) for img in images]))

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return (self.model if self.runner is None else self.runner)(inputs)

    @torch.inference_mode()
    def logits_and_features(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and pooled backbone features of a model-input batch, in one pass."""
        return (self.model if self.runner is None else self.runner).forward_with_features(inputs)

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        return probabilities_from_logits(logits, self.temperature).cpu().numpy()

    def decide(
        self,
        probs: np.ndarray,
        path: str | None = None,
        ood_reason: str | None = None,
        magnification: int | None = None,
    ) -> Prediction:
        """Turn one row of class probabilities into a Prediction (threshold applied if binary),
        with its prediction set; ``ood_reason`` marks an image unlike the training images.
        ``magnification`` picks its calibration (default: what ``path`` says, else unknown)."""
        return self.decide_batch(np.asarray(probs)[None], [path], [ood_reason], [magnification])[0]

    def decide_batch(
        self,
        probs: np.ndarray,
        paths: Sequence[str | None] | None = None,
        ood_reasons: Sequence[str | None] | None = None,
        magnifications: Sequence[int | None] | None = None,
    ) -> list[Prediction]:
        """Predictions for rows of class probabilities (n, C), prediction sets made together,
        each image's from the calibration of its magnification (``magnifications``; where None,
        what its path says; else the most cautious, see ``histolens.stats.conformal``)."""
        n = len(probs)
        given = list(magnifications) if magnifications is not None else [None] * n
        mags = [
            m if m is not None else magnification_from_path(p)
            for m, p in zip(given, paths or [None] * n, strict=True)
        ]
        thresholds = np.array([self.threshold_for(m) for m in mags], dtype=np.float64)
        preds = [
            self._label(p, path, t)
            for p, path, t in zip(probs, paths or [None] * n, thresholds, strict=True)
        ]
        if self.conformal is not None and n:
            alpha = self.refer_alpha
            index = {c: i for i, c in enumerate(self.class_names)}
            centred = centred_probabilities(probs, thresholds if self.is_binary else None)
            predicted = [index[p.label] for p in preds]
            member = self.conformal.prediction_sets(centred, alpha, predicted, mags)
            for pred, row, mag in zip(preds, member, mags, strict=True):
                pred.prediction_set = tuple(
                    c for c, m in zip(self.class_names, row, strict=True) if m
                )
                pred.alpha = alpha
                pred.refer = len(pred.prediction_set) > 1
                if pred.refer:
                    pred.refer_reason = (
                        f"{' and '.join(pred.prediction_set)} are all plausible at alpha {alpha:g}"
                        f"{self.conformal.basis(mag, alpha)}"
                    )
        for pred, reason in zip(preds, ood_reasons or [None] * n, strict=True):
            if reason:
                pred.ood, pred.ood_reason = True, reason
                pred.refer, pred.refer_reason = True, f"{OOD_MESSAGE}: {reason}"
            pred.uncertain = (
                pred.refer if self.conformal is not None else (pred.uncertain or pred.ood)
            )
        return preds

    def _label(self, probs: np.ndarray, path: str | None, threshold: float) -> Prediction:
        scores = {c: float(p) for c, p in zip(self.class_names, probs, strict=True)}
        if self.is_binary:
            p = float(probs[1])
            label = self.class_names[1] if p >= threshold else self.class_names[0]
            return Prediction(
                label,
                scores[label],
                scores,
                p,
                float(threshold),
                abs(p - threshold) < UNCERTAINTY_MARGIN,
                path,
            )
        order = np.argsort(probs)[::-1]
        top, second = float(probs[order[0]]), float(probs[order[1]])
        label = self.class_names[int(order[0])]
        return Prediction(
            label, top, scores, None, None, top - second < 2 * UNCERTAINTY_MARGIN, path
        )

    def predict_batch(
        self,
        images_uint8: torch.Tensor,
        paths: Sequence[str | None] | None = None,
        sizes: Sequence[tuple[int, int] | None] | None = None,
        magnifications: Sequence[int | None] | None = None,
    ) -> list[Prediction]:
        """Predictions for a resized uint8 batch (B, 3, H, W): label, probabilities, prediction
        set, and the out-of-distribution check.

        ``sizes`` are the images' original (width, height), for the "far smaller than the
        model's input" check; by default read from the headers of ``paths``.
        """
        logits, features = self.logits_and_features(self.to_input(images_uint8))
        probs = self.probabilities(logits)
        reasons: list[str | None] = [None] * len(probs)
        if self.guard is not None:
            if sizes is None:
                sizes = [image_size(p) if p else None for p in (paths or [None] * len(probs))]
            reasons = self.guard.reasons(images_uint8, sizes, self.preprocess.input_size, features)
        return self.decide_batch(probs, paths, reasons, magnifications)

    def predict_images(
        self,
        images: Sequence,
        batch_size: int = 32,
        magnifications: Sequence[int | None] | None = None,
    ) -> list[Prediction]:
        """Predictions for PIL RGB images (of ``magnifications``, None where unknown)."""
        mags = list(magnifications) if magnifications is not None else [None] * len(images)
        out: list[Prediction] = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            batch = torch.stack([self.preprocess.resize(img) for img in chunk])
            sizes = [img.size for img in chunk]
            out += self.predict_batch(batch, sizes=sizes, magnifications=mags[i : i + batch_size])
        return out

    def predict_image(self, image) -> Prediction:
        return self.predict_images([image])[0]

    def load_input(self, path: str | os.PathLike) -> torch.Tensor | Skipped:
        """One image file -> resized uint8 tensor (3, H, W), or Skipped with the reason."""
        return load_input(self.preprocess, path)

    def iter_batches(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
        workers: int = 2,
    ) -> Iterable[tuple[list[str], torch.Tensor | None, list[Skipped]]]:
        """Load and resize images in a thread pool; yield (paths, uint8 batch, skipped) batches."""
        return iter_image_batches(self.load_input, paths, batch_size, progress, workers)

    def predict_paths(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[list[Prediction], list[Skipped]]:
        """Predictions for image files, batched; unreadable files are returned with reasons."""
        predictions: list[Prediction] = []
        skipped: list[Skipped] = []
        for ok_paths, batch, bad in self.iter_batches(paths, batch_size, progress):
            skipped += bad
            if batch is not None:
                predictions += self.predict_batch(batch, ok_paths)
        return predictions, skipped

    def adapt_batchnorm(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """AdaBN: re-estimate the backbone's batch-norm statistics on a new cohort's images.

        For images from another lab: no label is used. Returns the number of images used.
        """
        from histolens.models.adapt import adapt_batchnorm
        from histolens.models.engine import EngineClassifier

        engine = self.runner.runtime if isinstance(self.runner, EngineClassifier) else None
        if engine is not None:  # the engine's export holds the old statistics: made anew below
            self.runner = None
        if self.runner is not None:
            raise CheckpointError(
                "AdaBN changes the torch model's batch-norm statistics, which an ONNX export has "
                "fixed in its graph: adapt the torch checkpoint "
                f"{self.metadata.export_source if self.metadata else None} and export it again."
            )
        batches = (
            self.to_input(batch)
            for _, batch, _ in self.iter_batches(paths, batch_size, progress)
            if batch is not None
        )
        n = adapt_batchnorm(self.model, batches)
        if engine is not None:
            self.use_engine(engine)
        if self.metadata is not None:
            self.metadata = replace(self.metadata, adapted_batchnorm={"images": n})
        return n

    def assess_paths(
        self,
        paths: Sequence[str],
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[list[str], torch.Tensor, list[str | None], list[Skipped]]:
        """Raw logits of files and why each is unlike the training images (None: it is not, or
        the checkpoint has no guard), with the paths they belong to (unreadable ones skipped)."""
        kept: list[str] = []
        chunks: list[torch.Tensor] = []
        reasons: list[str | None] = []
        skipped: list[Skipped] = []
        for ok_paths, batch, bad in self.iter_batches(paths, batch_size, progress):
            skipped += bad
            if batch is None:
                continue
            logits, features = self.logits_and_features(self.to_input(batch))
            chunks.append(logits.float().cpu())
            kept += ok_paths
            if self.guard is None:
                reasons += [None] * len(ok_paths)
            else:
                sizes = [image_size(p) for p in ok_paths]
                reasons += self.guard.reasons(batch, sizes, self.preprocess.input_size, features)
        return kept, stack_logits(chunks, len(self.class_names)), reasons, skipped

    def logits_for_paths(
        self,
        paths: Sequence[str],
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[list[str], torch.Tensor, list[Skipped]]:
        """Raw logits for files, with the paths they belong to (unreadable ones skipped)."""
        kept: list[str] = []
        chunks: list[torch.Tensor] = []
        skipped: list[Skipped] = []
        for ok_paths, batch, bad in self.iter_batches(paths, batch_size, progress):
            skipped += bad
            if batch is not None:
                chunks.append(self.logits(self.to_input(batch)).cpu())
                kept += ok_paths
        return kept, stack_logits(chunks, len(self.class_names)), skipped
