"""The Explainer: CAM (pytorch-grad-cam) and attribution (Captum) heatmaps for one Predictor.

Which class computes each method, and how it is called, comes from the method registry
(``_methods``). CAM hooks never sit on the model itself: the Explainer keeps one forward hook of
its own on the target layer that acts only inside its own CAM call, on its own thread, and hands
the layer's output to a private identity module (the "tap"); the CAM, made per call, hooks that
tap and is released by the library's own ``release()``. A shared model that also serves
predictions (desktop app, web service) is thus never seen by a CAM. CAM gradients stop at the
target layer: parameters are frozen for the Explainer's lifetime and the hook re-roots the graph
at the target layer's output, so nothing below it is differentiated (the naive way
backpropagates through the whole backbone and its weights).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from PIL import Image

from histolens.errors import ConfigError, check_choice
from histolens.explain._methods import ExplanationMethod, get_method
from histolens.explain._render import heatmap_to_size, overlay_heatmap
from histolens.explain._targets import ClassLogit, class_logits
from histolens.inference.predictor import Prediction, Predictor, probabilities_from_logits
from histolens.models.backbones import resolve_module

__all__ = ["Explainer", "Explanation"]


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

    def __init__(
        self, predictor: Predictor, index: int | None, magnification: int | None = None
    ) -> None:
        self.predictor = predictor
        self.index = index
        self.magnification = magnification
        self.prediction: Prediction | None = None

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if self.prediction is None:
            probs = self.predictor.probabilities(output.detach().reshape(1, -1))[0]
            self.prediction = self.predictor.decide(probs, magnification=self.magnification)
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
        layers: backbone layer(s) the CAMs explain, comma-separated (e.g. ``"blocks.5"``);
            by default the model's own (``HistoClassifier.cam_target_layer``).
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
        layers: str | None = None,
    ) -> None:
        self.predictor = predictor
        self.model = predictor.model
        self.spec = self.model.spec
        # One or more layers (comma-separated): a CAM over several is pytorch-grad-cam's
        # aggregate of each layer's map.
        self.target_layers = [
            resolve_module(self.model.backbone, name.strip())
            for name in (layers or self.model.cam_target_layer).split(",")
        ]
        self.target_layer = self.target_layers[0]
        self.n_samples = int(n_samples)
        self.n_segments = int(n_segments)
        self.ig_steps = int(ig_steps)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.truncate_gradients = truncate_gradients
        self._lock = threading.RLock()
        self._closed = False
        # Set only for the length of one CAM call: the thread making it, and the taps (one per
        # target layer) that the call's CAM hooks, each cleared once the first forward pass has
        # handed it its layer's output.
        self._cam_thread: int | None = None
        self._taps: list[torch.nn.Module | None] = [None] * len(self.target_layers)
        # Weights never need gradients when truncating; the naive way (for comparison) is
        # pytorch-grad-cam's usual one, where every weight requires grad.
        self._saved_requires_grad: list[tuple[torch.nn.Parameter, bool]] = [
            (p, p.requires_grad) for p in self.model.parameters()
        ]
        for p, _ in self._saved_requires_grad:
            p.requires_grad_(not truncate_gradients)
        # prepend: runs before any other hook of the layer, so they see the re-rooted output.
        self._hook_handles = [
            layer.register_forward_hook(partial(self._on_target_output, i), prepend=True)
            for i, layer in enumerate(self.target_layers)
        ]

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Explainer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the Explainer's hook and restore the parameters' ``requires_grad`` flags."""
        with self._lock:
            for handle in self._hook_handles:
                handle.remove()
            self._hook_handles = []
            for p, flag in self._saved_requires_grad:
                p.requires_grad_(flag)
            self._saved_requires_grad = []
            self._closed = True

    def _on_target_output(self, index: int, module, args, output):
        """Hand target layer ``index``'s output to the running CAM's tap; a no-op for anyone
        else."""
        tap = self._taps[index]
        if tap is None or self._cam_thread != threading.get_ident():
            return None
        # Only the CAM's first pass (the unperturbed image) is kept: Score-CAM's hundreds of
        # masked passes would otherwise each store a copy of the activations.
        self._taps[index] = None
        if self.truncate_gradients and torch.is_grad_enabled():
            # A fresh leaf: backward stops here (with several layers, each layer's gradient is
            # then its own direct path to the output). The clone keeps later in-place ops legal.
            output = output.detach().requires_grad_(True).clone()
        return tap(output)

    @contextmanager
    def _cam(self, method: ExplanationMethod):
        """A CAM of ``method`` hooked to a fresh tap, armed for this thread, released after."""
        taps = [torch.nn.Identity() for _ in self.target_layers]
        cam = method.load()(
            model=self.model,
            target_layers=taps,
            reshape_transform=self.model.cam_reshape_transform,
        )
        if method.batched:
            cam.batch_size = self.batch_size  # Score-CAM's masked images per forward pass
        self._taps, self._cam_thread = list(taps), threading.get_ident()
        try:
            yield cam
        finally:
            self._taps, self._cam_thread = [None] * len(self.target_layers), None
            cam.activations_and_grads.release()

    # --- public API -------------------------------------------------------------------------
    def explain(
        self,
        image: Image.Image,
        method: str = "gradcam",
        target_class: str | None = None,
        magnification: int | None = None,
    ) -> Explanation:
        """Explain one PIL image; the class explained is the predicted one unless given. The
        prediction's set is calibrated for ``magnification`` (None: unknown)."""
        entry = get_method(method)
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
            if entry.single_pass:
                target = _PredictedClass(self.predictor, index, magnification)
                small = self._run_cam(entry, x, target)
                prediction = target.prediction
                index = target.index
            else:
                prediction = self._predict(x, magnification)
                if index is None:
                    index = self.predictor.class_names.index(prediction.label)
                if entry.family == "cam":
                    small = self._run_cam(entry, x, ClassLogit(index))
                elif entry.superpixels:
                    small = self._superpixel_attribution(entry, x, uint8, index)
                else:
                    small = self._gradient_attribution(entry, x, index)
            heatmap = heatmap_to_size(_normalise(small), image.size)
            return Explanation(
                heatmap,
                prediction,
                entry.name,
                self.predictor.class_names[index],
                image,
                time.perf_counter() - start,
            )

    # --- internals --------------------------------------------------------------------------
    def _predict(self, x: torch.Tensor, magnification: int | None) -> Prediction:
        with torch.inference_mode():
            probs = self.predictor.probabilities(self.model(x))[0]
        return self.predictor.decide(probs, magnification=magnification)

    def _run_cam(self, method: ExplanationMethod, x: torch.Tensor, target) -> np.ndarray:
        with self._cam(method) as cam:
            maps = cam(input_tensor=x, targets=[target])
        if isinstance(target, _PredictedClass) and target.prediction is None:
            target.prediction = self._predict(x, target.magnification)
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

    def _gradient_attribution(
        self, method: ExplanationMethod, x: torch.Tensor, index: int
    ) -> np.ndarray:
        """Integrated Gradients: per-pixel attribution magnitude, lightly smoothed."""
        from scipy.ndimage import gaussian_filter

        attribution = method.load()(self._forward_scores("logit"), **method.options())
        attr = attribution.attribute(
            x.clone().requires_grad_(True),
            baselines=torch.zeros_like(x),
            target=index,
            n_steps=self.ig_steps,
            internal_batch_size=self.batch_size,
        )
        magnitude = attr.detach().abs().sum(dim=1)[0].cpu().numpy()
        return gaussian_filter(magnitude, sigma=max(1.0, 0.02 * max(magnitude.shape)))

    def _superpixel_attribution(
        self, method: ExplanationMethod, x: torch.Tensor, uint8: torch.Tensor, index: int
    ) -> np.ndarray:
        """LIME / Kernel SHAP: the class probability's response to switching superpixels off."""
        from skimage.segmentation import slic

        segments = slic(
            uint8.permute(1, 2, 0).numpy(),
            n_segments=self.n_segments,
            compactness=10.0,
            start_label=0,
        )
        mask = torch.from_numpy(segments).to(x.device).long()[None, None]
        torch.manual_seed(self.seed)
        attribution = method.load()(self._forward_scores("probability"), **method.options())
        attr = attribution.attribute(
            x,
            baselines=torch.zeros_like(x),
            target=index,
            feature_mask=mask.expand(1, 3, -1, -1),
            n_samples=self.n_samples,
            perturbations_per_eval=self.batch_size,
        )
        return attr.detach()[0, 0].cpu().numpy()
