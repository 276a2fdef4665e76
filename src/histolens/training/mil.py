"""Gated-attention MIL (Ilse, Tomczak and Welling, ICML 2018; the ABMIL of CLAM and TRIDENT).

Each tile's feature is standardised (the training tiles' mean and std, kept in the model), embedded
(Linear -> ReLU -> Dropout), and scored by the gated attention ``w^T (tanh(V h) * sigmoid(U h))``;
a softmax over the bag's tiles gives attention weights that sum to 1, the slide embedding is the
attention-weighted mean, and a linear classifier gives the slide's logit.

This module holds the model, its hyper-parameters and prediction; Lightning trains it
(:func:`histolens.training.mil_fit.fit_mil`: one bag per step, data-parallel over processes,
early stopping on an inner patient split).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from histolens.errors import ConfigError

__all__ = [
    "MilConfig",
    "build_mil_model",
    "feature_standardisation",
    "mil_logits",
    "predict_mil",
]


@dataclass(frozen=True)
class MilConfig:
    """Hyper-parameters of the attention MIL model and its loop (defaults as CLAM's ABMIL-small).

    With an inner validation split (``early_stopping`` and enough patients: see
    :mod:`histolens.training.mil_folds`) training runs at most ``max_epochs`` and stops when the
    validation loss has not improved for ``patience`` epochs, keeping the best epoch's weights;
    without one it runs a fixed ``epochs``. The constants were fixed before any benchmark run:
    ``patience`` 20 and a ceiling of 100 epochs follow CLAM (patience 20, up to 200 epochs on
    cohorts of hundreds of slides): the validation loss of ~10 slides jumps from epoch to epoch,
    so a short patience would stop on noise, and a training loss that flattens within ~30 epochs
    on 50 bags leaves a ceiling of 100 ample room. ``epochs`` 30 is the former fixed schedule.
    ``accumulate`` bags make one optimiser step (N processes already step on N bags at once).
    """

    hidden: int = 128
    attention: int = 64
    dropout: float = 0.25
    epochs: int = 30
    lr: float = 5e-4
    weight_decay: float = 1e-4
    seed: int = 0
    early_stopping: bool = True
    max_epochs: int = 100
    patience: int = 20
    accumulate: int = 1

    def __post_init__(self) -> None:
        if min(self.hidden, self.attention, self.epochs, self.max_epochs, self.patience) < 1:
            raise ConfigError(
                "MIL hidden, attention, epochs, max_epochs and patience must be at least 1."
            )
        if self.accumulate < 1:
            raise ConfigError(f"MIL accumulate must be at least 1, not {self.accumulate}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"MIL dropout must be in [0, 1), not {self.dropout}.")
        if self.lr <= 0:
            raise ConfigError(f"MIL learning rate must be positive, not {self.lr}.")

    def to_dict(self) -> dict:
        return asdict(self)


def build_mil_model(in_dim: int, config: MilConfig):
    """The gated-attention MIL module for ``in_dim`` features (torch imported here)."""
    import torch
    from torch import nn

    class GatedAttentionMIL(nn.Module):
        """Tiles (N x D) -> (slide logit, attention weights N summing to 1)."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(in_dim))
            self.register_buffer("std", torch.ones(in_dim))
            self.embed = nn.Sequential(
                nn.Linear(in_dim, config.hidden), nn.ReLU(), nn.Dropout(config.dropout)
            )
            self.attention_v = nn.Linear(config.hidden, config.attention)
            self.attention_u = nn.Linear(config.hidden, config.attention)
            self.attention_w = nn.Linear(config.attention, 1)
            self.classifier = nn.Linear(config.hidden, 1)

        def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.embed((tiles - self.mean) / self.std)
            gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
            weights = torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)
            return self.classifier(weights @ h).squeeze(-1), weights

    return GatedAttentionMIL()


def feature_standardisation(bags: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over all training tiles (std floored: constant features)."""
    total = sum(len(b) for b in bags)
    mean = sum(b.sum(0, dtype=np.float64) for b in bags) / total
    sq = sum(((b - mean) ** 2).sum(0, dtype=np.float64) for b in bags) / total
    return mean.astype(np.float32), np.sqrt(np.maximum(sq, 1e-12)).astype(np.float32)


def mil_logits(model, bags: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Slide logits (before any temperature) and each bag's attention weights."""
    import torch

    logits, attention = [], []
    model.eval()
    with torch.inference_mode():
        for bag in bags:
            logit, weights = model(torch.from_numpy(np.ascontiguousarray(bag, np.float32)))
            logits.append(float(logit))
            attention.append(weights.numpy().astype(np.float64))
    return np.asarray(logits, np.float64), attention


def predict_mil(model, bags: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Slide probabilities (sigmoid of the logit, uncalibrated) and each bag's attention."""
    logits, attention = mil_logits(model, bags)
    return 1.0 / (1.0 + np.exp(-logits)), attention
