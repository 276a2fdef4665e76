"""The explanation methods: one registry entry per method, read by every module that needs one.

An entry names the class that computes the map (a pytorch-grad-cam CAM or a Captum
attribution) and the few facts that differ between methods: whether the target is
differentiated, whether it makes many forward passes, what the user sees it called. Adding a
method is adding an entry. Importing this module loads neither torch nor the libraries, so the
CLI's ``--help`` and the front ends' method menus stay instant.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from histolens.errors import ConfigError, did_you_mean

__all__ = [
    "ATTRIBUTION_METHODS",
    "CAM_METHODS",
    "EXPLANATION_METHODS",
    "METHODS",
    "ExplanationMethod",
    "get_method",
]


def _no_options() -> dict[str, Any]:
    return {}


def _ridge_surrogate() -> dict[str, Any]:
    # Ridge, as the original LIME: Captum's default Lasso zeroes every superpixel when the
    # probability moves by less than its penalty.
    from captum._utils.models.linear_model import SkLearnRidge

    return {"interpretable_model": SkLearnRidge(alpha=1.0)}


@dataclass(frozen=True)
class ExplanationMethod:
    """What histolens knows about one explanation method.

    Attributes:
        name: the name users type (``--method gradcam``).
        display_name: how front ends show it ("Grad-CAM").
        family: "cam" (a map over the backbone's target layer, pytorch-grad-cam) or
            "attribution" (a map over input pixels, Captum).
        implementation: "module:Class" of the object that computes the map, imported on use.
        needs_gradients: the map is built from gradients of the explained class's score.
        batched: it makes many forward passes, batched by ``Explainer.batch_size``.
        superpixels: its features are SLIC superpixels (perturbation methods), not pixels.
        options: keyword arguments for the implementation's constructor, made on use.
    """

    name: str
    display_name: str
    family: Literal["cam", "attribution"]
    implementation: str
    needs_gradients: bool
    batched: bool = False
    superpixels: bool = False
    options: Callable[[], dict[str, Any]] = field(default=_no_options, repr=False)

    @property
    def single_pass(self) -> bool:
        """One forward pass gives both the prediction and the map (a gradient CAM calls its
        target once, on the unperturbed image's output), so no separate prediction is needed."""
        return self.family == "cam" and self.needs_gradients

    def load(self) -> type:
        """The implementing class, imported now (pytorch-grad-cam or Captum)."""
        module, _, name = self.implementation.partition(":")
        return getattr(importlib.import_module(module), name)


EXPLANATION_METHODS: Mapping[str, ExplanationMethod] = {
    m.name: m
    for m in (
        ExplanationMethod("gradcam", "Grad-CAM", "cam", "pytorch_grad_cam:GradCAM", True),
        ExplanationMethod(
            "gradcam++", "Grad-CAM++", "cam", "pytorch_grad_cam:GradCAMPlusPlus", True
        ),
        ExplanationMethod("hirescam", "HiResCAM", "cam", "pytorch_grad_cam:HiResCAM", True),
        ExplanationMethod(
            "scorecam", "Score-CAM", "cam", "pytorch_grad_cam:ScoreCAM", False, batched=True
        ),
        ExplanationMethod("eigencam", "Eigen-CAM", "cam", "pytorch_grad_cam:EigenCAM", False),
        ExplanationMethod("layercam", "LayerCAM", "cam", "pytorch_grad_cam:LayerCAM", True),
        ExplanationMethod(
            "lime",
            "LIME",
            "attribution",
            "captum.attr:Lime",
            False,
            batched=True,
            superpixels=True,
            options=_ridge_surrogate,
        ),
        ExplanationMethod(
            "kernelshap",
            "Kernel SHAP",
            "attribution",
            "captum.attr:KernelShap",
            False,
            batched=True,
            superpixels=True,
        ),
        ExplanationMethod(
            "integrated_gradients",
            "Integrated Gradients",
            "attribution",
            "captum.attr:IntegratedGradients",
            True,
            batched=True,
        ),
    )
}

METHODS: tuple[str, ...] = tuple(EXPLANATION_METHODS)
CAM_METHODS: tuple[str, ...] = tuple(
    m.name for m in EXPLANATION_METHODS.values() if m.family == "cam"
)
ATTRIBUTION_METHODS: tuple[str, ...] = tuple(
    m.name for m in EXPLANATION_METHODS.values() if m.family == "attribution"
)


def get_method(name: str) -> ExplanationMethod:
    """The registry entry of ``name``; an unknown name is a ConfigError naming the valid ones."""
    try:
        return EXPLANATION_METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"Unknown explanation method '{name}'; choose one of: {', '.join(METHODS)}."
            + did_you_mean(name, METHODS)
        ) from None
