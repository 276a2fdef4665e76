"""Gated-attention MIL (Ilse, Tomczak and Welling, ICML 2018; the ABMIL of CLAM and TRIDENT).

Each tile's feature is standardised (the training tiles' mean and std, kept in the model), embedded
(Linear -> ReLU -> Dropout), and scored by the gated attention ``w^T (tanh(V h) * sigmoid(U h))``;
a softmax over the bag's tiles gives attention weights that sum to 1, the slide embedding is the
attention-weighted mean, and a linear classifier gives the slide's logit.

The loop is plain torch, one bag per step: bags differ in size, 60 bags make an epoch of
milliseconds, and Lightning's per-step hooks would cost more than the model; every random draw
(initial weights, dropout, bag order) comes from one seed, so a run is repeatable.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from histolens.errors import ConfigError

__all__ = [
    "MilConfig",
    "MilFit",
    "build_mil_model",
    "fit_mil",
    "mil_logits",
    "predict_mil",
]


@dataclass(frozen=True)
class MilConfig:
    """Hyper-parameters of the attention MIL model and its loop (defaults as CLAM's ABMIL-small,
    with a shorter schedule: the bags are few)."""

    hidden: int = 128
    attention: int = 64
    dropout: float = 0.25
    epochs: int = 30
    lr: float = 5e-4
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.attention < 1 or self.epochs < 1:
            raise ConfigError("MIL hidden, attention and epochs must be at least 1.")
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


@dataclass
class MilFit:
    """A trained model and what its loop measured."""

    model: object
    epoch_seconds: list[float]
    losses: list[float]


def _standardisation(bags: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over all training tiles (std floored: constant features)."""
    total = sum(len(b) for b in bags)
    mean = sum(b.sum(0, dtype=np.float64) for b in bags) / total
    sq = sum(((b - mean) ** 2).sum(0, dtype=np.float64) for b in bags) / total
    return mean.astype(np.float32), np.sqrt(np.maximum(sq, 1e-12)).astype(np.float32)


def fit_mil(
    bags: Sequence[np.ndarray], targets: Sequence[int], config: MilConfig = MilConfig()
) -> MilFit:
    """Train on ``bags`` (each N_i x D) with slide ``targets`` (0/1), one bag per step, Adam,
    binary cross-entropy weighted to balance the classes. Deterministic for a given seed."""
    import torch

    if len(bags) != len(targets) or not bags:
        raise ConfigError("MIL training needs one target per bag and at least one bag.")
    y = np.asarray(targets, np.float32)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = build_mil_model(bags[0].shape[1], config)
    mean, std = _standardisation(bags)
    model.mean.copy_(torch.from_numpy(mean))
    model.std.copy_(torch.from_numpy(std))
    positives = float(y.sum())
    pos_weight = (len(y) - positives) / positives if 0 < positives < len(y) else 1.0
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    tensors = [torch.from_numpy(np.ascontiguousarray(b, np.float32)) for b in bags]
    labels = torch.from_numpy(y)
    seconds, losses = [], []
    model.train()
    for _ in range(config.epochs):
        start, total = time.perf_counter(), 0.0
        for i in rng.permutation(len(tensors)):
            logit, _ = model(tensors[i])
            loss = loss_fn(logit.reshape(1), labels[i].reshape(1))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
        seconds.append(time.perf_counter() - start)
        losses.append(total / len(tensors))
    model.eval()
    return MilFit(model, seconds, losses)


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
