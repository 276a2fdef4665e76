"""Explainer API: maps of the right shape for every backbone family, both binary classes
explained, hooks released, thread-safe use, overlays, and the method registry."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from histolens.errors import ConfigError
from histolens.explain import (
    CAM_METHODS,
    EXPLANATION_METHODS,
    METHODS,
    Explainer,
    get_method,
    overlay_heatmap,
)
from histolens.explain._targets import ClassLogit
from histolens.inference.predictor import Predictor
from histolens.testing import make_checkpoint, make_tissue_image

IMAGE_SIZE = (140, 92)  # W, H: not square and not the model's input size


def _forward_hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def predictors(tmp_path_factory) -> dict[str, Predictor]:
    root = tmp_path_factory.mktemp("explain")
    # seed 1: random test_efficientnet weights whose Grad-CAM is not all-negative on our images
    return {
        bb: Predictor.from_checkpoint(
            make_checkpoint(root / f"{bb}.safetensors", backbone=bb, seed=1)
        )
        for bb in ("test_resnet", "test_efficientnet", "test_vit")
    }


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return make_tissue_image(IMAGE_SIZE, seed=1)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_vit"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_map_at_the_image_size(predictors, image, backbone, method):
    with Explainer(predictors[backbone], n_samples=40, ig_steps=8) as ex:
        e = ex.explain(image, method)
        other = "benign" if e.target_class == "malignant" else "malignant"
        e_other = ex.explain(image, method, target_class=other)
    assert e.overlay(0.5).size == IMAGE_SIZE
    assert e.heatmap.shape == (IMAGE_SIZE[1], IMAGE_SIZE[0])
    assert e.heatmap.dtype == np.float32
    assert np.isfinite(e.heatmap).all()
    assert e.heatmap.min() >= 0.0 and e.heatmap.max() <= 1.0
    # A random model can have no positive evidence for one class (Grad-CAM's ReLU then gives a
    # zero map), but with one logit the two classes' evidence is opposite: one map shows it.
    assert max(e.heatmap.std(), e_other.heatmap.std()) > 1e-3, "maps are constant"
    assert e_other.heatmap.shape == e.heatmap.shape
    assert e.method == method
    assert e.target_class == e.prediction.label  # the predicted class by default
    assert e.prediction.label in ("benign", "malignant")


def test_heatmap_is_at_the_original_breakhis_resolution(predictors):
    big = make_tissue_image((700, 460), seed=2)
    with Explainer(predictors["test_resnet"]) as ex:
        e = ex.explain(big, "gradcam")
    assert e.heatmap.shape == (460, 700)
    assert e.overlay(0.4).size == (700, 460)


def test_benign_is_explained_through_the_negated_logit(predictors, image):
    """One sigmoid logit: benign's map must not be the malignant map (grad-cam issue #428)."""
    p = predictors["test_resnet"]
    out = torch.tensor([[1.5]])
    assert ClassLogit(0)(out).item() == -1.5 and ClassLogit(1)(out).item() == 1.5
    with Explainer(p) as ex:
        benign = ex.explain(image, "gradcam", target_class="benign")
        malignant = ex.explain(image, "gradcam", target_class="malignant")
        hires_b = ex.explain(image, "hirescam", target_class="benign")
        hires_m = ex.explain(image, "hirescam", target_class="malignant")
    assert (benign.target_class, malignant.target_class) == ("benign", "malignant")
    assert benign.prediction.label == malignant.prediction.label  # same image, same prediction
    assert np.abs(benign.heatmap - malignant.heatmap).mean() > 0.05
    # HiResCAM is linear in the gradient: before its ReLU the two maps are exact negatives, so
    # after it they are anti-correlated.
    assert np.corrcoef(hires_b.heatmap.ravel(), hires_m.heatmap.ravel())[0, 1] < -0.3


def test_both_predicted_classes_get_explained(tmp_path):
    """Thresholds 0 and 1 force each binary prediction; each explains its own class."""
    img = make_tissue_image(IMAGE_SIZE, seed=1)
    labels = {}
    for thr in (0.0, 1.0):
        p = Predictor.from_checkpoint(
            make_checkpoint(tmp_path / f"t{thr}.safetensors", threshold=thr)
        )
        with Explainer(p) as ex:
            e = ex.explain(img, "gradcam")
        labels[thr] = (e.prediction.label, e.target_class)
    assert labels[0.0] == ("malignant", "malignant")
    assert labels[1.0] == ("benign", "benign")


def test_multiclass_checkpoint(tmp_path, image):
    classes = ("adenosis", "fibroadenoma", "ductal_carcinoma", "lobular_carcinoma")
    p = Predictor.from_checkpoint(make_checkpoint(tmp_path / "m.safetensors", class_names=classes))
    with Explainer(p) as ex:
        e = ex.explain(image, "gradcam")
        other = next(c for c in classes if c != e.prediction.label)
        e2 = ex.explain(image, "gradcam++", target_class=other)
    assert e.target_class == e.prediction.label in classes
    assert e2.target_class == other
    assert e.heatmap.shape == e2.heatmap.shape == (IMAGE_SIZE[1], IMAGE_SIZE[0])


def test_hooks_are_released_and_grad_flags_restored(predictors, image):
    p = predictors["test_vit"]
    before = _forward_hook_count(p.model)
    flags = [q.requires_grad for q in p.model.parameters()]
    ex = Explainer(p, n_samples=20, ig_steps=4)
    for method in METHODS:
        ex.explain(image, method)
        # The Explainer's own gate is the only hook on the model: every CAM hooks a private
        # tap and is released after its call, so nothing piles up between calls.
        assert _forward_hook_count(p.model) == before + 1, method
    ex.close()
    assert _forward_hook_count(p.model) == before
    assert [q.requires_grad for q in p.model.parameters()] == flags
    with pytest.raises(ConfigError, match="closed"):
        ex.explain(image, "gradcam")


def test_gradient_truncation_gives_the_same_maps(predictors, image):
    p = predictors["test_resnet"]
    maps = {}
    for truncate in (True, False):
        with Explainer(p, truncate_gradients=truncate) as ex:
            maps[truncate] = [
                ex.explain(image, m).heatmap for m in ("gradcam", "gradcam++", "layercam")
            ]
    for a, b in zip(maps[True], maps[False], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_unknown_method_names_the_valid_ones(predictors, image):
    with (
        Explainer(predictors["test_resnet"]) as ex,
        pytest.raises(ConfigError, match=r"gradcam.*Did you mean 'gradcam'"),
    ):
        ex.explain(image, "gradcma")
    with (
        Explainer(predictors["test_resnet"]) as ex,
        pytest.raises(ConfigError, match="benign, malignant"),
    ):
        ex.explain(image, "gradcam", target_class="cancer")


def test_one_explainer_from_several_threads(predictors, image):
    p = predictors["test_resnet"]
    with Explainer(p) as ex:
        expected = ex.explain(image, "gradcam").heatmap
        results, errors = [], []

        def work():
            try:
                results.append(ex.explain(image, "gradcam").heatmap)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-5)


def test_overlay_blends_with_the_given_opacity():
    img = Image.new("RGB", (20, 10), (255, 255, 255))
    heat = np.zeros((10, 20), np.float32)
    assert overlay_heatmap(img, heat, alpha=0.0).getpixel((0, 0)) == (255, 255, 255)
    full = overlay_heatmap(img, heat, alpha=1.0).getpixel((0, 0))
    assert full[2] > 100 and full[0] < 50  # jet's cold end is blue
    half = overlay_heatmap(img, np.ones((5, 5), np.float32), alpha=0.5)
    assert half.size == (20, 10)
    r, g, b = half.getpixel((10, 5))
    assert r > 180 and b < 160  # white half-covered by jet's hot (red) end
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(img, heat, alpha=1.5)


def test_method_registry_agrees_with_the_libraries():
    """Each entry names a real class, and its gradient flag is the library's own."""
    from captum.attr import Attribution, GradientAttribution
    from pytorch_grad_cam.base_cam import BaseCAM

    assert tuple(EXPLANATION_METHODS) == METHODS
    assert set(METHODS) == {
        "gradcam",
        "gradcam++",
        "hirescam",
        "scorecam",
        "eigencam",
        "layercam",
        "lime",
        "kernelshap",
        "integrated_gradients",
    }
    assert CAM_METHODS == ("gradcam", "gradcam++", "hirescam", "scorecam", "eigencam", "layercam")
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    for entry in EXPLANATION_METHODS.values():
        cls = entry.load()
        if entry.family == "cam":
            assert issubclass(cls, BaseCAM), entry.name
            cam = cls(model=tiny, target_layers=[tiny[0]])
            assert cam.uses_gradients == entry.needs_gradients, entry.name
            cam.activations_and_grads.release()
        else:
            assert issubclass(cls, Attribution), entry.name
            assert issubclass(cls, GradientAttribution) == entry.needs_gradients, entry.name
    assert {m for m in METHODS if get_method(m).single_pass} == {
        "gradcam",
        "gradcam++",
        "hirescam",
        "layercam",
    }
    assert len({m.display_name for m in EXPLANATION_METHODS.values()}) == len(METHODS)
    with pytest.raises(ConfigError, match=r"'scorcam'; choose one of: gradcam.*'scorecam'\?"):
        get_method("scorcam")


@pytest.mark.parametrize(
    "name",
    [
        "vgg16",
        "densenet121",
        "resnet50",
        "efficientnet_b0",
        "tf_efficientnet_lite0",
        "vit_small_patch16_224",
    ],
)
def test_registry_target_layers_resolve(name):
    """Every registered backbone's CAM target layer exists (construction only, no weights)."""
    import timm

    from histolens.models.backbones import BACKBONES, resolve_module

    spec = BACKBONES[name]
    with torch.device("meta"):
        backbone = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
    seen = []
    resolve_module(backbone, spec.target_layer).register_forward_hook(
        lambda module, args, output: seen.append(output)
    )
    with torch.device("meta"):
        backbone.forward_features(torch.zeros(1, 3, 224, 224))
    # The layer runs in the forward pass, and what a CAM weighs there is a spatial map of
    # channels (a ViT's tokens after its reshape transform): 7x7 or finer at 224 px.
    assert len(seen) == 1
    cam_input = spec.reshape_transform(seen[0]) if spec.reshape_transform else seen[0]
    assert cam_input.dim() == 4 and cam_input.shape[1] >= 256
    assert min(cam_input.shape[-2:]) >= 7


def test_a_prediction_on_another_thread_during_a_cam_call_is_left_alone(predictors, image):
    """A shared model keeps serving predictions: one made while a CAM runs must neither reach
    the CAM nor be changed by it."""
    p = predictors["test_resnet"]
    other = make_tissue_image(IMAGE_SIZE, seed=5, dark=True)
    expected_scores = p.predict_image(other).scores
    with Explainer(p) as ex:
        expected_map = ex.explain(image, "gradcam").heatmap
        served = []

        def predict_elsewhere(module, args):
            # Just before the CAM's own pass reaches the target layer, another thread runs a
            # whole prediction through it (its own pass comes here too; the list stops that).
            if not served:
                served.append(None)
                worker = threading.Thread(target=lambda: served.append(p.predict_image(other)))
                worker.start()
                worker.join()

        handle = ex.target_layer.register_forward_pre_hook(predict_elsewhere)
        try:
            heatmap = ex.explain(image, "gradcam").heatmap
        finally:
            handle.remove()
    assert served[1].scores == pytest.approx(expected_scores, abs=1e-6)
    np.testing.assert_allclose(heatmap, expected_map, atol=1e-5)


def test_a_cam_over_several_feature_levels_hooks_each_level_and_releases_them(predictors, image):
    """A multi-level model (pooled blocks.1 and blocks.2 read by a linear head) is explained at
    both levels: one gate per level while the Explainer lives, none after; its map is neither
    level's alone."""
    from dataclasses import replace

    from histolens.models.backbones import get_backbone_spec
    from histolens.models.classifier import build_model

    torch.manual_seed(1)
    spec = get_backbone_spec("test_efficientnet")
    model = build_model(spec, 2, "none", (), (), "blocks.1,blocks.2").eval()
    p = replace(predictors["test_efficientnet"], model=model)
    before = _forward_hook_count(model)
    with Explainer(p) as ex:
        assert ex.target_layers == [model.backbone.blocks[1], model.backbone.blocks[2]]
        assert _forward_hook_count(model) == before + 2
        maps = {m: ex.explain(image, m).heatmap for m in ("gradcam", "gradcam++", "eigencam")}
        assert _forward_hook_count(model) == before + 2
    assert _forward_hook_count(model) == before
    for heatmap in maps.values():
        assert heatmap.shape == (IMAGE_SIZE[1], IMAGE_SIZE[0]) and np.isfinite(heatmap).all()
    for layer in ("blocks.1", "blocks.2"):
        with Explainer(p, layers=layer) as single:
            assert len(single.target_layers) == 1
            alone = single.explain(image, "gradcam").heatmap
        assert not np.allclose(maps["gradcam"], alone, atol=1e-3), layer
