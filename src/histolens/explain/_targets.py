"""Target callables: which scalar of the model output an explanation follows.

A binary histolens model has one logit (sigmoid; positive class = ``class_names[1]``). Asking
pytorch-grad-cam for ``ClassifierOutputTarget(0)`` on that logit always explains the positive
class (pytorch-grad-cam issue #428), so the negative class is explained through ``-logit``.
"""

from __future__ import annotations

import torch

from histolens.inference.predictor import probabilities_from_logits

__all__ = ["ClassLogit", "ClassProbability", "class_logits"]


def class_logits(output: torch.Tensor) -> torch.Tensor:
    """Per-class scores (..., C): a single logit ``l`` becomes ``[-l, l]``, others pass through."""
    if output.shape[-1] == 1:
        return torch.cat([-output, output], dim=-1)
    return output


class ClassLogit:
    """The logit of class ``index`` (``-logit`` for class 0 of a single-logit model)."""

    def __init__(self, index: int) -> None:
        self.index = int(index)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return class_logits(output)[..., self.index]

    def __repr__(self) -> str:
        return f"ClassLogit({self.index})"


class ClassProbability:
    """The (temperature-scaled) probability of class ``index``, as the Predictor reports it."""

    def __init__(self, index: int, temperature: float = 1.0) -> None:
        self.index = int(index)
        self.temperature = float(temperature)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        batched = output if output.dim() == 2 else output.unsqueeze(0)
        probs = probabilities_from_logits(batched, self.temperature)[:, self.index]
        return probs if output.dim() == 2 else probs[0]

    def __repr__(self) -> str:
        return f"ClassProbability({self.index})"
