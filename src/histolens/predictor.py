"""Predictor: the one way evaluation, explanations, the desktop app and the service get a model."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histolens.backbones import get_backbone_spec
from histolens.checkpoint import load_checkpoint, resolve_checkpoint_path
from histolens.data import Skipped
from histolens.errors import CheckpointError, ImageLoadError
from histolens.imageio import load_rgb
from histolens.model import HistoClassifier, build_model
from histolens.transforms import Preprocess

__all__ = ["Prediction", "Predictor", "probabilities_from_logits"]

# A probability this close to the decision threshold is flagged "review needed".
UNCERTAINTY_MARGIN = 0.1


def probabilities_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities (B, C) from logits (B, 1) [binary, sigmoid] or (B, C) [softmax]."""
    scaled = logits.float() / float(temperature)
    if scaled.shape[1] == 1:
        p = torch.sigmoid(scaled[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(scaled, dim=1)


@dataclass
class Prediction:
    """One image's prediction. ``probability`` is that of ``label``; ``scores`` has every class."""

    label: str
    probability: float
    scores: dict[str, float]
    positive_probability: float | None  # binary: calibrated probability of the positive class
    threshold: float | None
    uncertain: bool
    path: str | None = None

    def as_row(self) -> dict[str, Any]:
        row = {
            "path": self.path,
            "prediction": self.label,
            "probability": round(self.probability, 6),
            "uncertain": self.uncertain,
        }
        row.update({f"p_{k}": round(v, 6) for k, v in self.scores.items()})
        return row


@dataclass
class Predictor:
    """A model with its preprocessing, stain normalisation, threshold and temperature."""

    model: HistoClassifier
    preprocess: Preprocess
    class_names: tuple[str, ...]
    threshold: float = 0.5
    temperature: float = 1.0
    stain: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    source: str = ""

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu") -> Predictor:
        """Rebuild model, preprocessing and calibration from a checkpoint (file or run dir)."""
        state, meta = load_checkpoint(path)
        try:
            spec = get_backbone_spec(meta["backbone"])
            classes = tuple(meta["class_names"])
            head = meta.get("head", {})
            model = build_model(
                spec,
                len(classes),
                "none",
                head.get("dims", (512, 256)),
                head.get("dropouts", (0.5, 0.3)),
                meta.get("feature_layer"),
            )
            preprocess = Preprocess.from_dict(meta["preprocess"])
        except KeyError as exc:
            raise CheckpointError(f"Checkpoint {path} lacks the metadata field {exc}.") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"Checkpoint {path} does not fit a {meta['backbone']} model "
                f"({len(missing)} missing, {len(unexpected)} unexpected tensors)."
            )
        stain = None
        if meta.get("stain"):
            from histolens.stain import StainNormalizer

            stain = StainNormalizer.from_dict(meta["stain"])
        dev = torch.device(device)
        model.to(dev).eval()
        if dev.type == "cpu":
            model.to(memory_format=torch.channels_last)
        return cls(
            model,
            preprocess,
            classes,
            float(meta.get("threshold", 0.5)),
            float(meta.get("temperature", 1.0)),
            stain,
            meta,
            dev,
            str(resolve_checkpoint_path(path)),
        )

    # --- properties the front ends show ---------------------------------------------------
    @property
    def task(self) -> str:
        return self.metadata.get("task", "binary")

    @property
    def is_binary(self) -> bool:
        return len(self.class_names) == 2

    @property
    def positive_class(self) -> str | None:
        return self.class_names[1] if self.is_binary else None

    @property
    def backbone_name(self) -> str:
        return self.model.spec.name

    @property
    def model_id(self) -> str:
        return self.metadata.get("model_id") or Path(self.source).stem

    # --- the pipeline -----------------------------------------------------------------------
    def to_input(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Resized uint8 batch (B, 3, H, W) -> normalised model input (stain normalised first)."""
        x = images_uint8.to(self.device, torch.float32) / 255.0
        if self.stain is not None:
            x, _ = self.stain(x)
        x = self.preprocess.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x

    def prepare(self, images: Sequence) -> torch.Tensor:
        """PIL images -> model input batch."""
        return self.to_input(torch.stack([self.preprocess.resize(img) for img in images]))

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        return probabilities_from_logits(logits, self.temperature).cpu().numpy()

    def decide(self, probs: np.ndarray, path: str | None = None) -> Prediction:
        """Turn one row of class probabilities into a Prediction (threshold applied if binary)."""
        scores = {c: float(p) for c, p in zip(self.class_names, probs, strict=True)}
        if self.is_binary:
            p = float(probs[1])
            label = self.class_names[1] if p >= self.threshold else self.class_names[0]
            return Prediction(
                label,
                scores[label],
                scores,
                p,
                self.threshold,
                abs(p - self.threshold) < UNCERTAINTY_MARGIN,
                path,
            )
        order = np.argsort(probs)[::-1]
        top, second = float(probs[order[0]]), float(probs[order[1]])
        label = self.class_names[int(order[0])]
        return Prediction(
            label, top, scores, None, None, top - second < 2 * UNCERTAINTY_MARGIN, path
        )

    def predict_images(self, images: Sequence, batch_size: int = 32) -> list[Prediction]:
        """Predictions for PIL RGB images."""
        out: list[Prediction] = []
        for i in range(0, len(images), batch_size):
            probs = self.probabilities(self.logits(self.prepare(images[i : i + batch_size])))
            out += [self.decide(p) for p in probs]
        return out

    def predict_image(self, image) -> Prediction:
        return self.predict_images([image])[0]

    def iter_batches(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
        workers: int = 2,
    ) -> Iterable[tuple[list[str], torch.Tensor | None, list[Skipped]]]:
        """Load and resize images in a thread pool; yield (paths, uint8 batch, skipped) batches."""

        def load(p: str) -> torch.Tensor | Skipped:
            try:
                return self.preprocess.resize(load_rgb(p))
            except ImageLoadError as exc:
                return Skipped(str(p), exc.reason)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i in range(0, len(paths), batch_size):
                chunk = [str(p) for p in paths[i : i + batch_size]]
                results = list(pool.map(load, chunk))
                ok = [
                    (p, r)
                    for p, r in zip(chunk, results, strict=True)
                    if isinstance(r, torch.Tensor)
                ]
                skipped = [r for r in results if isinstance(r, Skipped)]
                batch = torch.stack([r for _, r in ok]) if ok else None
                yield [p for p, _ in ok], batch, skipped
                if progress:
                    progress(len(chunk))

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
            if batch is None:
                continue
            probs = self.probabilities(self.logits(self.to_input(batch)))
            predictions += [self.decide(p, path) for p, path in zip(probs, ok_paths, strict=True)]
        return predictions, skipped

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
        n_out = 1 if self.is_binary else len(self.class_names)
        return kept, (torch.cat(chunks) if chunks else torch.zeros(0, n_out)), skipped
