"""Tiled inputs, multi-level features and CAM stitching in the classifier, on timm's tiny test
nets (pretrained input 160 x 160, random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from histolens.checkpoint.io import save_checkpoint, update_metadata
from histolens.errors import ConfigError
from histolens.explain import Explainer
from histolens.inference.predictor import Predictor
from histolens.models.backbones import BACKBONES, create_backbone, get_backbone_spec
from histolens.models.classifier import build_model, resolve_feature_layer, tile_starts
from histolens.models.transforms import resolve_preprocess
from histolens.testing import make_checkpoint, make_tissue_image

TILE = 160  # timm's test nets' pretrained input size


@pytest.fixture(scope="module")
def effnet():
    torch.manual_seed(0)
    model = build_model(get_backbone_spec("test_efficientnet"), 2, "none")
    return model.eval()


def _features(model, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.features(x)


# ------------------------------------------------------------------------------ tile_starts


@pytest.mark.parametrize(
    ("length", "starts"),
    [
        (294, [0, 70]),  # two tiles overlapping by 154 px
        (448, [0, 224]),  # two tiles side by side
        (224, [0]),
        (100, [0]),  # smaller than a tile: one
        (240, [8]),  # a margin under 15% of a tile is cropped: one centred tile
        (260, [0, 36]),  # a larger margin gets a second tile
        (700, [0, 238, 476]),  # three tiles spread over the whole length
    ],
)
def test_tile_starts(length, starts):
    assert tile_starts(length, 224) == starts
    assert all(0 <= s <= max(0, length - 224) for s in starts)


def test_test_nets_have_the_tile_size_the_tests_assume(effnet):
    assert effnet.tile_size == (TILE, TILE)


# ------------------------------------------------------------------------------ tiled features


@pytest.mark.parametrize(("height", "width"), [(160, 320), (200, 300)])
def test_features_of_a_large_input_are_the_mean_of_its_tiles(effnet, height, width):
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    ys, xs = tile_starts(height, TILE), tile_starts(width, TILE)
    assert len(ys) * len(xs) > 1
    tiles = [x[:, :, y : y + TILE, c : c + TILE] for y in ys for c in xs]
    expected = torch.stack([_features(effnet, t) for t in tiles]).mean(0)
    got = _features(effnet, x)
    assert got.shape == (2, effnet.feature_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Image-major: each image's features are its own, whatever else is in the batch.
    torch.testing.assert_close(_features(effnet, x[1:]), got[1:], atol=1e-5, rtol=1e-5)


def test_an_input_of_the_tile_size_is_not_tiled(effnet):
    x = torch.randn(1, 3, TILE, TILE, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain = effnet.pool(effnet.backbone.forward_features(x))
    torch.testing.assert_close(_features(effnet, x), plain)
    assert effnet._grid is None


def test_a_slightly_wider_input_is_centre_cropped(effnet):
    x = torch.randn(1, 3, 120, 176, generator=torch.Generator().manual_seed(3))
    # 176 is 10% wider than a tile: one tile at offset 8; 120 is shorter than a tile: whole.
    torch.testing.assert_close(_features(effnet, x), _features(effnet, x[:, :, :, 8:168]))


def test_vit_inputs_are_never_tiled():
    vit = build_model(get_backbone_spec("test_vit"), 2, "none")
    assert vit.tile_size is None


# ------------------------------------------------------------------------------ stitching


def test_stitch_tiles_places_each_tile_and_averages_overlaps(effnet):
    x = torch.zeros(2, 3, TILE, 240)  # tiles at x = 0 and 80: they overlap by half
    _features(effnet, x)
    # Tile maps of 8 x 8 cells (20 px each): image b, tile t holds 10 * b + t + 1.
    maps = torch.stack(
        [torch.full((1, 8, 8), 10.0 * b + t + 1) for b in range(2) for t in range(2)]
    )
    stitched = effnet.stitch_tiles(maps)
    assert stitched.shape == (2, 1, 8, 12)  # 240 px wide = 12 cells
    for b in range(2):
        first, second = 10.0 * b + 1, 10.0 * b + 2
        row = stitched[b, 0, 0]
        torch.testing.assert_close(row[:4], torch.full((4,), first))
        torch.testing.assert_close(row[4:8], torch.full((4,), (first + second) / 2))
        torch.testing.assert_close(row[8:], torch.full((4,), second))
        assert (stitched[b, 0] == row).all()  # every row alike: one row of tiles


def test_stitch_tiles_of_a_two_by_two_grid(effnet):
    x = torch.zeros(1, 3, 2 * TILE, 2 * TILE)
    _features(effnet, x)
    maps = torch.stack([torch.full((3, 5, 5), float(t)) for t in range(4)])
    stitched = effnet.stitch_tiles(maps)
    assert stitched.shape == (1, 3, 10, 10)
    corners = stitched[0, :, ::5, ::5]  # the top-left cell of each tile
    assert corners[0].tolist() == [[0.0, 1.0], [2.0, 3.0]]  # row-major tile order


def test_stitch_tiles_leaves_untiled_maps_alone(effnet):
    _features(effnet, torch.zeros(1, 3, TILE, TILE))
    maps = torch.randn(1, 4, 5, 5)
    assert effnet.stitch_tiles(maps) is maps
    assert effnet.cam_reshape_transform(maps) is maps


def _halves_swapped(image: Image.Image) -> Image.Image:
    a = np.asarray(image)
    half = a.shape[1] // 2
    return Image.fromarray(np.concatenate([a[:, half:], a[:, :half]], axis=1))


def test_gradcam_explains_a_tiled_image_as_a_whole(tmp_path):
    path = make_checkpoint(tmp_path / "eff.safetensors", backbone="test_efficientnet", seed=1)
    meta = update_metadata(path, preprocess={**_preprocess(path), "input_size": [TILE, 2 * TILE]})
    assert meta.preprocess.input_size == (TILE, 2 * TILE)
    predictor = Predictor.from_checkpoint(path)
    image = make_tissue_image((2 * TILE, TILE), seed=4)  # two tiles side by side
    with Explainer(predictor) as explainer:
        e = explainer.explain(image, "gradcam")
        swapped = explainer.explain(_halves_swapped(image), "gradcam")
    assert e.heatmap.shape == (TILE, 2 * TILE)
    assert np.ptp(e.heatmap) > 0.5
    # The image's features are the mean of its tiles', so swapping the halves swaps their maps:
    # each tile's map sits where that tile lies (compared away from the seam and the edges).
    inner = slice(32, 128)
    left, right = e.heatmap[:, :TILE], e.heatmap[:, TILE:]
    np.testing.assert_allclose(swapped.heatmap[:, TILE:][:, inner], left[:, inner], atol=1e-4)
    np.testing.assert_allclose(swapped.heatmap[:, :TILE][:, inner], right[:, inner], atol=1e-4)
    assert not np.allclose(left[:, inner], right[:, inner], atol=0.05)


def _preprocess(path) -> dict:
    from histolens.checkpoint.io import read_metadata

    return read_metadata(path).preprocess.to_dict()


# ------------------------------------------------------------------------------ feature layers


def test_multi_level_features_concatenate_pooled_blocks():
    spec = get_backbone_spec("test_efficientnet")
    torch.manual_seed(0)
    model = build_model(spec, 2, "none", (), (), "blocks.1,blocks.2").eval()
    torch.manual_seed(0)
    reference = create_backbone(spec, "none").eval()  # same weights, not cut
    x = torch.randn(2, 3, TILE, TILE, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        h = reference.bn1(reference.conv_stem(x))
        pooled = []
        for i, block in enumerate(reference.blocks):
            h = block(h)
            if i in (1, 2):
                pooled.append(h.mean(dim=(2, 3)))
    expected = torch.cat(pooled, dim=1)
    channels = [f["num_chs"] for f in reference.feature_info][1:3]
    assert model.feature_dim == sum(channels) == expected.shape[1]
    assert model.head.out.in_features == model.feature_dim
    torch.testing.assert_close(_features(model, x), expected, atol=1e-5, rtol=1e-5)
    assert len(model.backbone.blocks) == 3  # cut after the deepest block read
    assert model.cam_target_layer == "blocks.1,blocks.2"  # a CAM over both levels


def test_one_feature_level_keeps_the_registry_cam_target():
    spec = get_backbone_spec("test_efficientnet")
    model = build_model(spec, 2, "none", (), (), "blocks.2")
    assert model.feature_dim == 32
    assert model.cam_target_layer == spec.target_layer == "bn2"
    assert isinstance(model.backbone.bn2, torch.nn.Identity)  # the CAM sees blocks.2's output


@pytest.mark.parametrize(
    ("backbone", "layer", "message"),
    [
        ("test_efficientnet", "layer3", r"use 'blocks\.N'"),
        ("test_efficientnet", "blocks.1,stem", r"use 'blocks\.N'"),
        ("test_resnet", "blocks.1", r"'blocks\.1' is not supported for this backbone"),
        ("test_efficientnet", "blocks.7", "the backbone has 5 blocks"),
    ],
)
def test_unsupported_feature_layers_are_refused(backbone, layer, message):
    with pytest.raises(ConfigError, match=message):
        build_model(get_backbone_spec(backbone), 2, "none", (), (), layer)


def test_resolve_feature_layer():
    lite0 = BACKBONES["tf_efficientnet_lite0"]
    assert resolve_feature_layer(lite0, "auto", "linear") == "blocks.2,blocks.5"
    assert resolve_feature_layer(lite0, "auto", "mlp") is None
    assert resolve_feature_layer(lite0, "last", "linear") is None
    assert resolve_feature_layer(lite0, None, "linear") is None
    assert resolve_feature_layer(lite0, "blocks.3", "mlp") == "blocks.3"
    assert resolve_feature_layer(get_backbone_spec("test_resnet"), "auto", "linear") is None


def test_checkpoint_with_feature_layer_and_tiles_reloads_with_identical_outputs(tmp_path):
    spec = get_backbone_spec("test_efficientnet")
    torch.manual_seed(0)
    model = build_model(spec, 2, "none", (), (), "blocks.1,blocks.2").eval()
    with torch.no_grad():
        model.head.out.weight.normal_()
    preprocess = resolve_preprocess(model.backbone, (TILE, 2 * TILE))
    meta = {
        "model_id": "test-multilevel",
        "backbone": spec.name,
        "timm_name": spec.timm_name,
        "pretrained": "none",
        "task": "binary",
        "class_names": ["benign", "malignant"],
        "head": {"dims": [], "dropouts": []},
        "feature_layer": "blocks.1,blocks.2",
        "preprocess": preprocess.to_dict(),
        "stain": None,
        "magnification": "all",
        "threshold": 0.5,
        "temperature": 1.0,
        "metrics": {},
        "data": {"path": "synthetic", "layout": "test fixture"},
    }
    path = save_checkpoint(tmp_path / "multilevel.safetensors", model, meta)
    predictor = Predictor.from_checkpoint(path)
    assert predictor.model.feature_layer == "blocks.1,blocks.2"
    assert predictor.preprocess.input_size == (TILE, 2 * TILE)
    image = make_tissue_image((300, 140), seed=6)
    x = predictor.prepare([image])
    assert x.shape == (1, 3, TILE, 2 * TILE)
    with torch.inference_mode():
        expected = model(x)
    torch.testing.assert_close(predictor.logits(x), expected, atol=1e-6, rtol=1e-6)
    with Explainer(predictor) as explainer:
        e = explainer.explain(image, "gradcam")
    assert e.heatmap.shape == (140, 300) and np.isfinite(e.heatmap).all()


# ------------------------------------------------------------------------------ preprocessing


def test_resolve_preprocess_takes_the_input_size_and_keeps_the_rest():
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    pretrained = resolve_preprocess(backbone)
    assert pretrained.input_size == (TILE, TILE)
    larger = resolve_preprocess(backbone, (294, 448))
    assert larger.input_size == (294, 448)
    assert (larger.mean, larger.std, larger.interpolation) == (
        pretrained.mean,
        pretrained.std,
        pretrained.interpolation,
    )
    assert tuple(larger.resize(make_tissue_image((700, 460))).shape) == (3, 294, 448)
