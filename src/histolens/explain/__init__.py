"""Heatmaps that show what a histolens model looked at, and how faithful they are.

``Explainer`` wraps a ``Predictor``: CAM methods through pytorch-grad-cam on the backbone's
registered target layer, LIME / Kernel SHAP over SLIC superpixels and Integrated Gradients
through Captum. Each method is one entry of ``EXPLANATION_METHODS`` (``get_method(name)``),
which every front end reads. The Explainer returns arrays only; ``histolens explain``
(``histolens.cli.explain``) writes files. May import: everything below it (base .. export);
``histolens.report`` reads what explain writes, by file.
"""

from typing import TYPE_CHECKING

# The registry is light (no torch): method menus and --help read it without loading a model.
from histolens.explain import _methods
from histolens.explain._methods import *  # noqa: F403  (re-exported: see ``__all__``)
from histolens.lazy import lazy_getattr

if TYPE_CHECKING:
    from histolens.explain._explainer import Explainer, Explanation
    from histolens.explain._render import overlay_heatmap, render_panel

_LAZY = {
    "Explainer": "_explainer",
    "Explanation": "_explainer",
    "overlay_heatmap": "_render",
    "render_panel": "_render",
}


# Lazy (PEP 562): importing histolens.cli.explain for `histolens --help` must not load torch.
__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = [*_methods.__all__, "Explainer", "Explanation", "overlay_heatmap", "render_panel"]
