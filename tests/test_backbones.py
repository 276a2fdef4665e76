import pytest
import torch

from histolens.errors import ConfigError, PretrainedWeightsError
from histolens.models.backbones import (
    BACKBONES,
    create_backbone,
    get_backbone_spec,
    lite0_package_state_dict,
    resolve_module,
)
from histolens.models.classifier import build_model
from histolens.models.transforms import resolve_preprocess


def test_lite0_package_weights_classify_a_cat():
    """The key mapping is right: ImageNet Lite0 puts a cat class (281-285) in chelsea's top 5."""
    import timm
    from PIL import Image
    from skimage import data

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(lite0_package_state_dict(), strict=True)
    model.eval()
    pre = resolve_preprocess(model)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    img = Image.fromarray(data.chelsea())
    x = pre.normalize(pre.resize(img).float().unsqueeze(0) / 255)
    with torch.no_grad():
        top5 = model(x).topk(5).indices[0].tolist()
    assert any(281 <= c <= 285 for c in top5), top5


@pytest.mark.parametrize("variant", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite1_and_lite2_package_weights_load_strictly_and_classify_a_cat(variant):
    """Lite1/Lite2 ship in Lite0's key layout with deeper stages (1, 3, 3, 4, 4, 5, 1)."""
    import timm
    from PIL import Image
    from skimage import data

    from histolens.models.backbones import lite_package_state_dict

    model = timm.create_model(variant, pretrained=False)
    model.load_state_dict(lite_package_state_dict(variant), strict=True)
    pre = resolve_preprocess(model)
    x = pre.normalize(pre.resize(Image.fromarray(data.chelsea())).float().unsqueeze(0) / 255)
    with torch.no_grad():
        top5 = model.eval()(x).topk(5).indices[0].tolist()
    assert any(281 <= c <= 285 for c in top5), top5
    # The registry builds it with these weights offline (no hub), without the classifier.
    backbone = create_backbone(get_backbone_spec(variant), "imagenet")
    assert torch.equal(backbone.conv_stem.weight, model.conv_stem.weight)


def test_offline_imagenet_error_names_the_remedies(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = get_backbone_spec("resnet50")
    with pytest.raises(PretrainedWeightsError, match="--pretrained FILE.*--pretrained none"):
        create_backbone(spec, "imagenet")


def test_local_weight_files(tmp_path):
    from safetensors.torch import save_file

    spec = get_backbone_spec("test_resnet")
    src = create_backbone(spec, "none")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        loaded = create_backbone(spec, str(tmp_path / f))
        for k, v in src.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), (f, k)
    wrong = create_backbone(get_backbone_spec("test_efficientnet"), "none")
    save_file(
        {k: v.contiguous() for k, v in wrong.state_dict().items()}, tmp_path / "x.safetensors"
    )
    with pytest.raises(PretrainedWeightsError, match="does not match this backbone"):
        create_backbone(spec, str(tmp_path / "x.safetensors"))
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(PretrainedWeightsError, match="Cannot read weights"):
        create_backbone(spec, str(tmp_path / "bad.pth"))
    with pytest.raises(ConfigError, match="Did you mean 'imagenet'"):
        create_backbone(spec, "imagnet")


def test_pickled_code_is_not_executed(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(PretrainedWeightsError):
        create_backbone(get_backbone_spec("test_resnet"), str(tmp_path / "evil.pth"))


def test_unknown_backbone_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'vgg16'"):
        get_backbone_spec("vgg61")


@pytest.mark.slow
# Hub foundation models (up to 1.1B parameters) are built on the meta device in
# test_hub_backbones.py.
@pytest.mark.parametrize("name", [n for n, s in BACKBONES.items() if s.hub_id is None])
def test_registry_entries_build(name):
    spec = get_backbone_spec(name)
    model = build_model(spec, 2, "none")
    resolve_module(model.backbone, spec.target_layer)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1)
    assert len(model.backbone_stages()) >= 5


def test_head_width_follows_backbone():
    """The head's input width is read from the backbone, not fixed: two backbones, two widths."""
    widths = {}
    for name in ("test_resnet", "test_efficientnet"):
        m = build_model(get_backbone_spec(name), 8, "none")
        m.eval()
        with torch.no_grad():
            features = m.features(torch.zeros(2, 3, 64, 64))
            assert m(torch.zeros(2, 3, 64, 64)).shape == (2, 8)
        assert features.shape == (2, m.feature_dim)
        assert m.head.body[0].in_features == m.feature_dim == m.backbone.num_features
        widths[name] = m.feature_dim
    assert widths == {"test_resnet": 96, "test_efficientnet": 256}
