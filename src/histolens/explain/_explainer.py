"""The Explainer: CAM (pytorch-grad-cam) and attribution (Captum) heatmaps for one Predictor.

Everything that holds hooks (the CAM objects) is made once per Explainer and released by
``close()``, because pytorch-grad-cam leaks activations when a CAM is built per image. CAM
gradients stop at the target layer: parameters are frozen for the Explainer's lifetime and a
forward hook re-roots the graph at the target layer's output, so nothing below it is
differentiated (the naive way backpropagates through the whole backbone and its weights).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from histolens.backbones import resolve_module
from histolens.errors import ConfigError, check_choice
from histolens.explain._render import heatmap_to_size, overlay_heatmap
from histolens.explain._targets import ClassLogit, class_logits
from histolens.predictor import Prediction, Predictor, probabilities_from_logits

__all__ = ["ATTRIBUTION_METHODS", "CAM_METHODS", "METHODS", "Explainer", "Explanation"]

# method name -> pytorch-grad-cam class name
_CAM_CLASSES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "scorecam": "ScoreCAM",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
}
CAM_METHODS: tuple[str, ...] = tuple(_CAM_CLASSES)
ATTRIBUTION_METHODS: tuple[str, ...] = ("lime", "kernelshap", "integrated_gradients")
METHODS: tuple[str, ...] = CAM_METHODS + ATTRIBUTION_METHODS
# CAMs whose weights come from gradients of the target (the others never call the target).
_GRADIENT_CAMS = frozenset({"gradcam", "gradcam++", "hirescam", "layercam"})


@dataclass
class Explanation:
    """One image's heatmap, at the image's own size, and the prediction it explains."""

    heatmap: np.ndarray  # float32 (H, W) in [0, 1]
    prediction: Prediction
    method: str
    target_class: str
    image: Image.Image = field(repr=False)
    seconds: float = 0.0

    def overlay(self, alpha: float = 0.5) -> Image.Image:
        """The image with the heatmap (jet) blended over it at opacity ``alpha``."""
        return overlay_heatmap(self.image, self.heatmap, alpha)


class _PredictedClass:
    """A target that decides the class from the very forward pass the CAM makes.

    Gradient CAMs call their targets exactly once, on the unperturbed image's output, so the
    prediction needs no forward pass of its own; ``index`` fixed up front overrides it.
    """

    def __init__(self, predictor: Predictor, index: int | None) -> None:
        self.predictor = predictor
        self.index = index
        self.prediction: Prediction | None = None

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if self.prediction is None:
            probs = self.predictor.probabilities(output.detach().reshape(1, -1))[0]
            self.prediction = self.predictor.decide(probs)
            if self.index is None:
                self.index = self.predictor.class_names.index(self.prediction.label)
        return class_logits(output)[..., self.index]


def _normalise(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(np.asarray(values, dtype=np.float32))
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


class Explainer:
    """Heatmaps for a Predictor's model; use as a context manager (or call ``close()``).

    Args:
        predictor: the model to explain (``Predictor.from_checkpoint``).
        truncate_gradients: stop CAM gradients at the target layer (faster, same maps).
        n_samples: perturbed images per LIME / Kernel SHAP explanation.
        n_segments: SLIC superpixels (the LIME / Kernel SHAP features).
        ig_steps: Integrated Gradients steps.
        batch_size: images per forward pass for Score-CAM, LIME, Kernel SHAP and IG.
        seed: seed of the sampling in LIME and Kernel SHAP.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        truncate_gradients: bool = True,
        n_samples: int = 200,
        n_segments: int = 60,
        ig_steps: int = 32,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        self.predictor = predictor
        self.model = predictor.model
        self.spec = self.model.spec
        self.target_layer = resolve_module(self.model.backbone, self.model.cam_target_layer)
        self.n_samples = int(n_samples)
        self.n_segments = int(n_segments)
        self.ig_steps = int(ig_steps)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.truncate_gradients = truncate_gradients
        self._lock = threading.RLock()
        self._cams: dict[str, Any] = {}
        self._closed = False
        self._cam_thread: int | None = None  # the thread inside a CAM call, if any
        self._reroot_handle = None
        # Weights never need gradients when truncating; the naive way (for comparison) is
        # pytorch-grad-cam's usual one, where every weight requires grad.
        self._saved_requires_grad: list[tuple[torch.nn.Parameter, bool]] = [
            (p, p.requires_grad) for p in self.model.parameters()
        ]
        for p, _ in self._saved_requires_grad:
            p.requires_grad_(not truncate_gradients)
        if truncate_gradients:
            # prepend: runs before the CAM's own hooks, so they see the re-rooted output.
            self._reroot_handle = self.target_layer.register_forward_hook(
                self._reroot_at_target, prepend=True
            )

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and restore the parameters' ``requires_grad`` flags."""
        with self._lock:
            for cam in self._cams.values():
                cam.activations_and_grads.release()
            self._cams.clear()
            if self._reroot_handle is not None:
                self._reroot_handle.remove()
                self._reroot_handle = None
            for p, flag in self._saved_requires_grad:
                p.requires_grad_(flag)
            self._saved_requires_grad = []
            self._closed = True

    def _gated(self, hook):
        """``hook`` run only for forward passes of this Explainer's own CAM call and thread."""

        def gated(module, args, output):
            if self._cam_thread == threading.get_ident():
                return hook(module, args, output)
            return None

        return gated

    def _reroot_at_target(self, module, args, output):
        if self._cam_thread != threading.get_ident() or not torch.is_grad_enabled():
            return None
        # A fresh leaf: backward stops here. The clone keeps later in-place ops legal.
        return output.detach().requires_grad_(True).clone()

    def _cam(self, method: str):
        cam = self._cams.get(method)
        if cam is None:
            import pytorch_grad_cam

            cls = getattr(pytorch_grad_cam, _CAM_CLASSES[method])
            cam = cls(
                model=self.model,
                target_layers=[self.target_layer],
                reshape_transform=self.model.cam_reshape_transform,
            )
            if method == "scorecam":
                cam.batch_size = self.batch_size
            # Re-register the CAM's hooks behind a gate: a shared model also serves predictions
            # (desktop app, web service), and ungated hooks would pile up their activations.
            hooks = cam.activations_and_grads
            for handle in hooks.handles:
                handle.remove()
            hooks.handles = [
                self.target_layer.register_forward_hook(self._gated(hooks.save_activation)),
                self.target_layer.register_forward_hook(self._gated(hooks.save_gradient)),
            ]
            self._cams[method] = cam
        return cam

    # --- public API -------------------------------------------------------------------------
    def explain(
        self, image: Image.Image, method: str = "gradcam", target_class: str | None = None
    ) -> Explanation:
        """Explain one PIL image; the class explained is the predicted one unless given."""
        check_choice("explanation method", method, METHODS)
        if target_class is not None:
            check_choice("target class", target_class, self.predictor.class_names)
        with self._lock:
            if self._closed:
                raise ConfigError("This Explainer is closed; make a new one.")
            start = time.perf_counter()
            image = image.convert("RGB")
            uint8 = self.predictor.preprocess.resize(image)
            x = self.predictor.to_input(uint8.unsqueeze(0))
            index = None if target_class is None else self.predictor.class_names.index(target_class)
            if method in _GRADIENT_CAMS:
                target = _PredictedClass(self.predictor, index)
                small = self._run_cam(method, x, target)
                prediction = target.prediction
                index = target.index
            else:
                prediction = self._predict(x)
                if index is None:
                    index = self.predictor.class_names.index(prediction.label)
                if method in CAM_METHODS:
                    small = self._run_cam(method, x, ClassLogit(index))
                else:
                    small = self._attribute(method, x, uint8, index)
            heatmap = heatmap_to_size(_normalise(small), image.size)
            return Explanation(
                heatmap,
                prediction,
                method,
                self.predictor.class_names[index],
                image,
                time.perf_counter() - start,
            )

    # --- internals --------------------------------------------------------------------------
    def _predict(self, x: torch.Tensor) -> Prediction:
        with torch.inference_mode():
            probs = self.predictor.probabilities(self.model(x))[0]
        return self.predictor.decide(probs)

    def _run_cam(self, method: str, x: torch.Tensor, target) -> np.ndarray:
        cam = self._cam(method)
        self._cam_thread = threading.get_ident()
        try:
            maps = cam(input_tensor=x, targets=[target])
        finally:
            self._cam_thread = None
            cam.activations_and_grads.clear()
        if isinstance(target, _PredictedClass) and target.prediction is None:
            target.prediction = self._predict(x)
        return maps[0]

    def _forward_scores(self, kind: str):
        """Captum's forward function: class probabilities (no grad) or per-class logits."""
        model, temperature = self.model, self.predictor.temperature

        def probabilities(inputs: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return probabilities_from_logits(model(inputs), temperature)

        def logits(inputs: torch.Tensor) -> torch.Tensor:
            return class_logits(model(inputs))

        return probabilities if kind == "probability" else logits

    def _attribute(
        self, method: str, x: torch.Tensor, uint8: torch.Tensor, index: int
    ) -> np.ndarray:
        if method == "integrated_gradients":
            from captum.attr import IntegratedGradients

            ig = IntegratedGradients(self._forward_scores("logit"))
            attr = ig.attribute(
                x.clone().requires_grad_(True),
                baselines=torch.zeros_like(x),
                target=index,
                n_steps=self.ig_steps,
                internal_batch_size=self.batch_size,
            )
            magnitude = attr.detach().abs().sum(dim=1)[0].cpu().numpy()
            from scipy.ndimage import gaussian_filter

            return gaussian_filter(magnitude, sigma=max(1.0, 0.02 * max(magnitude.shape)))
        from skimage.segmentation import slic

        segments = slic(
            uint8.permute(1, 2, 0).numpy(),
            n_segments=self.n_segments,
            compactness=10.0,
            start_label=0,
        )
        mask = torch.from_numpy(segments).to(x.device).long()[None, None]
        forward = self._forward_scores("probability")
        torch.manual_seed(self.seed)
        if method == "lime":
            from captum._utils.models.linear_model import SkLearnRidge
            from captum.attr import Lime

            # Ridge, as the original LIME: Captum's default Lasso zeroes every superpixel
            # when the probability moves by less than its penalty.
            explainer = Lime(forward, interpretable_model=SkLearnRidge(alpha=1.0))
        else:
            from captum.attr import KernelShap

            explainer = KernelShap(forward)
        attr = explainer.attribute(
            x,
            baselines=torch.zeros_like(x),
            target=index,
            feature_mask=mask.expand(1, 3, -1, -1),
            n_samples=self.n_samples,
            perturbations_per_eval=self.batch_size,
        )
        return attr.detach()[0, 0].cpu().numpy()
