"""Heatmaps that show what a histolens model looked at, and how faithful they are.

``Explainer`` wraps a ``Predictor``: CAM methods through pytorch-grad-cam on the backbone's
registered target layer, LIME / Kernel SHAP over SLIC superpixels and Integrated Gradients
through Captum. It returns arrays only; ``histolens explain`` (``explain.cli``) writes files.
"""

from histolens.explain._explainer import (
    ATTRIBUTION_METHODS,
    CAM_METHODS,
    METHODS,
    Explainer,
    Explanation,
)
from histolens.explain._render import overlay_heatmap

__all__ = [
    "ATTRIBUTION_METHODS",
    "CAM_METHODS",
    "METHODS",
    "Explainer",
    "Explanation",
    "overlay_heatmap",
]
