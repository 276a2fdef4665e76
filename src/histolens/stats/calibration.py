"""Temperature scaling and decision-threshold choice, both fitted on the validation split."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from histolens.errors import ConfigError

__all__ = ["MAX_TEMPERATURE", "MIN_TEMPERATURE", "choose_threshold", "fit_temperature"]

MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising validation NLL of logits / T (Guo et al., 2017).

    Binary models have one logit column (sigmoid), others one per class (softmax). Optimised in
    log T so T stays positive, then clipped to [0.05, 20]; 1.0 when there is nothing to fit.
    """
    logits = logits.detach().float().clone()  # may come from inference mode
    if len(logits) < 2:
        return 1.0
    targets = targets.detach().clone()
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        opt.zero_grad()
        scaled = logits / log_t.exp()
        if logits.shape[1] == 1:
            loss = F.binary_cross_entropy_with_logits(scaled[:, 0], targets.float())
        else:
            loss = F.cross_entropy(scaled, targets.long())
        loss.backward()
        return loss

    opt.step(nll)
    t = float(log_t.detach().exp())
    if not np.isfinite(t):
        return 1.0
    # Separable validation data drive T towards 0 (ever more confident); keep it in a sane range.
    return float(np.clip(t, MIN_TEMPERATURE, MAX_TEMPERATURE))


def choose_threshold(
    y: np.ndarray,
    p: np.ndarray,
    method: str = "youden",
    target_sensitivity: float = 0.95,
    weights: np.ndarray | None = None,
) -> float:
    """Decision threshold on validation probabilities of the positive class.

    'youden' maximises sensitivity + specificity - 1; 'sensitivity' is the highest threshold whose
    sensitivity reaches the target; 'fixed' is 0.5. Falls back to 0.5 with one class only.
    ``weights`` (one per row) weight the rates, e.g. so that every patient counts once.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y).astype(int)
    p = np.asarray(p, float)
    if method == "fixed" or len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p, sample_weight=weights)
    finite = np.isfinite(thr)
    fpr, tpr, thr = fpr[finite], tpr[finite], thr[finite]
    if method == "youden":
        best = int(np.argmax(tpr - fpr))
        # Midway to the next lower score keeps the threshold off a validation point.
        lower = p[p < thr[best]]
        return float((thr[best] + lower.max()) / 2) if len(lower) else float(thr[best])
    if method == "sensitivity":
        ok = np.flatnonzero(tpr >= target_sensitivity)
        return float(thr[ok[0]]) if len(ok) else float(thr[-1])
    raise ConfigError(f"Unknown threshold method '{method}'; choose youden, sensitivity or fixed.")


def probabilities_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities (B, C) from logits (B, 1) [binary, sigmoid] or (B, C) [softmax]."""
    scaled = logits.float() / float(temperature)
    if scaled.shape[1] == 1:
        p = torch.sigmoid(scaled[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(scaled, dim=1)
