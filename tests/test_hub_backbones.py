"""Backbones from the Hugging Face hub: pathology foundation models and any timm hub model.

No test reaches the network. A tiny timm ViT (and a tiny DINOv2 in transformers' layout, made by
transformers itself: tests/data/dinov2_tiny) is written into a temporary Hugging Face cache, read
offline exactly as a user's populated cache is; a local HTTP server plays a hub that refuses a
gated licence.
"""

from __future__ import annotations

import csv
import http.server
import json
import shutil
import socket
import threading
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from histolens.errors import ConfigError, PretrainedWeightsError
from histolens.models.backbones import (
    BACKBONES,
    create_backbone,
    get_backbone_spec,
    hub_id_of,
    resolve_module,
)
from histolens.models.classifier import build_model

TINY_VIT = "histolens-test/tiny-vit"
TINY_DINOV2 = "histolens-test/tiny-dinov2"
DINOV2_FILES = Path(__file__).parent / "data" / "dinov2_tiny"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _snapshot(cache: Path, repo: str) -> Path:
    """The folder of ``repo``'s main revision in a Hugging Face cache, as hf_hub_download leaves it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and home (no login token), offline.

    huggingface_hub reads HF_HUB_OFFLINE, HF_HUB_CACHE and its token path once, at import; a
    fresh process started with these variables would hold the values patched here.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    return cache


@pytest.fixture()
def tiny_vit_repo(hub):
    """A timm ViT (32 wide, 2 blocks, 2 register tokens, 64 px) saved by timm's own hub exporter,
    with preprocessing of its own in its config.json."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    args = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64, "reg_tokens": 2}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    pretrained_cfg = {"mean": [0.6, 0.5, 0.7], "std": [0.2, 0.25, 0.2], "license": "mit"}
    save_for_hf(
        model,
        _snapshot(hub, TINY_VIT),
        model_config={"pretrained_cfg": pretrained_cfg},
        model_args=args,
        safe_serialization=True,
    )
    return model


@pytest.fixture()
def tiny_midnight(hub, monkeypatch):
    """A registry entry built as Midnight's (transformers DINOv2 layout, CLS + mean patch token,
    MIT), small, with its weights in the cache."""
    snapshot = _snapshot(hub, TINY_DINOV2)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(DINOV2_FILES / name, snapshot / name)
    spec = replace(
        BACKBONES["midnight"],
        name="tiny-midnight",
        timm_name=f"hf-hub:{TINY_DINOV2}",
        target_layer="blocks.1.norm1",
        create_kwargs={"embed_dim": 24, "depth": 2, "num_heads": 2, "img_size": 28},
        hub_id=TINY_DINOV2,
        preprocess={**BACKBONES["midnight"].preprocess, "input_size": (3, 28, 28)},
    )
    monkeypatch.setitem(BACKBONES, spec.name, spec)
    return spec


def _expected(name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(DINOV2_FILES / "expected.safetensors")[name]


# --- the registry -------------------------------------------------------------------------------

# name: (parameters in millions, pooled feature width, prefix tokens, licence, gated)
MODEL_CARDS = {
    "uni": (303, 1024, 1, "CC-BY-NC-ND-4.0", True),
    "uni2-h": (681, 1536, 9, "CC-BY-NC-ND-4.0", True),
    "virchow2": (631, 2560, 5, "CC-BY-NC-ND-4.0", True),
    "h-optimus-0": (1135, 1536, 5, "Apache-2.0", True),
    "midnight": (1135, 3072, 1, "MIT", False),
}


@pytest.mark.parametrize("name", sorted(MODEL_CARDS))
def test_foundation_model_entries_build_the_architectures_of_their_cards(name):
    """Built with the entry's arguments (shapes only, on the meta device), each model has the
    size its card states, the pooled width the head reads, and a CAM layer whose tokens make a
    square 16x16 or 14x14 grid once the CLS and register tokens are dropped."""
    millions, width, prefix, licence, gated = MODEL_CARDS[name]
    spec = BACKBONES[name]
    with torch.device("meta"):
        model = build_model(spec, 2, "none")
        features = model.features(torch.zeros(2, 3, 224, 224))
        tokens = model.backbone.forward_features(torch.zeros(1, 3, 224, 224))
    assert round(sum(p.numel() for p in model.backbone.parameters()) / 1e6) == millions
    assert model.feature_dim == width and features.shape == (2, width)
    assert model.backbone.num_prefix_tokens == spec.num_prefix_tokens == prefix
    resolve_module(model.backbone, spec.target_layer)
    grid = spec.reshape_transform(tokens)
    assert grid.shape[-2:] in ((16, 16), (14, 14))
    assert (spec.licence, spec.gated) == (licence, gated)
    assert spec.hub_id and spec.timm_name == f"hf-hub:{spec.hub_id}"


def test_h_optimus_0_preprocessing_is_its_own():
    with torch.device("meta"):
        backbone = build_model(BACKBONES["h-optimus-0"], 2, "none").backbone
    from histolens.models.transforms import resolve_preprocess

    pre = resolve_preprocess(backbone)
    assert pre.mean == (0.707223, 0.578729, 0.703617)
    assert pre.std == (0.211883, 0.230117, 0.177517)
    assert pre.input_size == (224, 224)


def test_hub_ids_find_registered_entries_in_any_case():
    spec = get_backbone_spec("hf-hub:mahmoodlab/UNI2-H")
    assert spec.name == "uni2-h" and spec.num_prefix_tokens == 9
    assert spec.timm_name == "hf-hub:mahmoodlab/UNI2-H"  # the user's spelling names the cache
    assert get_backbone_spec("hf_hub:paige-ai/Virchow2").pooled == "cls+mean"
    assert hub_id_of("hf-hub:kaiko-ai/midnight@main") == "kaiko-ai/midnight@main"
    assert hub_id_of("vit_small_patch16_224") is None
    with pytest.raises(ConfigError, match="write hf-hub:ORG/NAME"):
        get_backbone_spec("hf-hub:no slash here")
    with pytest.raises(ConfigError, match=r"or hf-hub:ORG/NAME\).*Did you mean 'virchow2'"):
        get_backbone_spec("virchow")


# --- weights from the cache, offline --------------------------------------------------------------


def test_dinov2_in_transformers_layout_matches_transformers(tiny_midnight):
    """Midnight is stored for transformers; renamed into timm's ViT it gives transformers' own
    last hidden state (made by transformers 5.24 for tests/data), and the pooled feature is its
    card's CLS token and mean patch token."""
    model = build_model(tiny_midnight, 2, "imagenet").eval()
    expected = _expected("last_hidden_state_28")  # position grid resampled 4x4 -> 2x2
    with torch.no_grad():
        tokens = model.backbone.forward_features(_expected("input_28"))
        pooled = model.features(_expected("input_28"))
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
    card = torch.cat([expected[:, 0], expected[:, 1:].mean(1)], dim=-1)
    torch.testing.assert_close(pooled, card, atol=1e-5, rtol=1e-5)

    native = replace(tiny_midnight, create_kwargs={**tiny_midnight.create_kwargs, "img_size": 56})
    backbone = create_backbone(native, "imagenet").eval()
    with torch.no_grad():
        tokens = backbone.forward_features(_expected("input_56"))
    torch.testing.assert_close(tokens, _expected("last_hidden_state_56"), atol=1e-5, rtol=1e-5)


def test_sharded_transformers_weights_are_read_whole(hub, tiny_midnight):
    """A repository too large for one file holds shards and an index, as transformers saves it."""
    from safetensors.torch import load_file, save_file

    repo = "histolens-test/tiny-dinov2-sharded"
    snapshot = _snapshot(hub, repo)
    state = load_file(DINOV2_FILES / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, snapshot / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    backbone = create_backbone(replace(tiny_midnight, hub_id=repo), "imagenet").eval()
    with torch.no_grad():
        tokens = backbone.forward_features(_expected("input_28"))
    torch.testing.assert_close(tokens, _expected("last_hidden_state_28"), atol=1e-5, rtol=1e-5)


def test_checkpoint_of_a_hub_model_rebuilds_without_the_hub(tmp_path, hub, tiny_midnight):
    """A registered hub model's checkpoint holds its backbone: predicting needs no hub files,
    and the licence travels in its metadata to the model card."""
    from histolens.checkpoint.io import read_metadata
    from histolens.explain import Explainer
    from histolens.inference.predictor import Predictor
    from histolens.report.build import write_report
    from histolens.testing import make_checkpoint, make_tissue_image

    ckpt = make_checkpoint(tmp_path / "run" / "best.safetensors", backbone="tiny-midnight")
    shutil.rmtree(hub)
    hub.mkdir()
    predictor = Predictor.from_checkpoint(ckpt)
    assert predictor.model.feature_dim == 48  # CLS + mean patch token of a 24-wide ViT
    assert predictor.preprocess.mean == (0.5, 0.5, 0.5)
    prediction = predictor.predict_image(make_tissue_image())
    assert 0.0 <= prediction.probability <= 1.0
    with Explainer(predictor) as explainer:  # the token grid without CLS: 2x2, to image size
        heatmap = explainer.explain(make_tissue_image(), "gradcam").heatmap
    assert heatmap.shape == (64, 96) and np.isfinite(heatmap).all()
    assert read_metadata(ckpt).licence == "MIT"
    report = write_report(tmp_path / "run").read_text()
    assert "tiny-midnight weights are licensed MIT" in report


@pytest.mark.slow
def test_cli_trains_predicts_and_explains_a_cached_hub_model(tmp_path, synth_small, tiny_vit_repo):
    """``--backbone hf-hub:ORG/NAME`` with the model in the local cache and HF_HUB_OFFLINE=1."""
    from histolens.checkpoint.io import read_metadata
    from histolens.cli.commands import main

    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["train", "--data", str(synth_small), "--backbone", f"hf-hub:{TINY_VIT}"]
        + ["--out", str(run), "--quiet"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    meta = read_metadata(run)
    assert meta.backbone == meta.timm_name == f"hf-hub:{TINY_VIT}"
    assert meta.licence == "mit"
    assert meta.preprocess.mean == (0.6, 0.5, 0.7)  # the hub config's, not ImageNet's
    assert meta.preprocess.input_size == (64, 64)  # a ViT keeps its pretrained size

    image = next(iter(sorted(synth_small.rglob("SOB_*.png"))))
    out_csv = tmp_path / "predictions.csv"
    result = runner.invoke(
        main, ["predict", str(run), str(image), "--out", str(out_csv), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 1 and rows[0]["prediction"] in meta.class_names

    result = runner.invoke(main, ["explain", str(run), str(image), "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    heatmap = np.load(next((tmp_path / "x").glob("*_gradcam_heatmap.npy")))
    # 2 register tokens + CLS dropped, 4x4 tokens upsampled: a real map, not a constant.
    assert heatmap.ndim == 2 and float(heatmap.max() - heatmap.min()) > 0


# --- errors that name the remedy --------------------------------------------------------------


def _error_lines(output: str) -> list[str]:
    """The CLI's error lines (notes about the data may come before them), the last line last."""
    lines = output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert lines and lines[-1] in errors, output
    return errors


def test_uncached_model_offline_is_one_sentence(tmp_path, hub, synth_small):
    from histolens.cli.commands import main

    with pytest.raises(
        PretrainedWeightsError,
        match=r"^kaiko-ai/midnight is not in the local Hugging Face cache and the hub cannot be "
        r"reached \(HF_HUB_OFFLINE=1 is set\): run once with a network, or copy the cache",
    ):
        create_backbone(BACKBONES["midnight"], "imagenet")
    with pytest.raises(PretrainedWeightsError, match="^MahmoodLab/uni is not in the local"):
        create_backbone(replace(BACKBONES["uni"], gated=False), "imagenet")

    run = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        ["train", "--data", str(synth_small), "--backbone", "hf-hub:someone/absent-model"]
        + ["--out", str(run)],
    )
    assert result.exit_code == 1
    assert _error_lines(result.output) == [
        "error: someone/absent-model is not in the local Hugging Face cache and the hub cannot "
        "be reached (HF_HUB_OFFLINE=1 is set): run once with a network, or copy the cache "
        "(HF_HUB_CACHE)."
    ]
    assert not run.exists()


def test_gated_model_without_a_token_names_licence_and_login(tmp_path, hub, synth_small):
    """Nothing cached, nobody logged in: said before any download is tried."""
    from histolens.cli.commands import main

    run = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", "--data", str(synth_small), "--backbone", "uni2-h", "--out", str(run)]
    )
    assert result.exit_code == 1
    assert _error_lines(result.output) == [
        "error: MahmoodLab/UNI2-h is gated: accept its licence at "
        "https://huggingface.co/MahmoodLab/UNI2-h and run 'hf auth login' (or set HF_TOKEN)."
    ]
    assert not run.exists()


class _GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a gated repository without access."""

    def _refuse(self) -> None:
        self.send_response(403 if self.headers.get("authorization") else 401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to this model is restricted.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _refuse

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def online(hub, monkeypatch):
    """The hub at a local address (HF_ENDPOINT), with offline mode off; yields set_endpoint."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def set_endpoint(url: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            url + "/{repo_id}/resolve/{revision}/{filename}",
        )

    return set_endpoint


@pytest.fixture()
def gated_hub(online):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    online(f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


def test_refused_licence_with_a_token_says_where_to_accept_it(gated_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
    with pytest.raises(
        PretrainedWeightsError,
        match=r"^MahmoodLab/UNI2-h is gated and your Hugging Face token has no access yet: accept "
        r"its licence at https://huggingface\.co/MahmoodLab/UNI2-h with the account of that token",
    ):
        create_backbone(BACKBONES["uni2-h"], "imagenet")


def test_unregistered_gated_hub_model_without_a_token(gated_hub):
    with pytest.raises(
        PretrainedWeightsError,
        match=r"^bioptimus/H-optimus-1 is gated: accept its licence at "
        r"https://huggingface\.co/bioptimus/H-optimus-1 and run 'hf auth login'",
    ):
        get_backbone_spec("hf-hub:bioptimus/H-optimus-1")


def test_no_network_is_one_sentence(online, monkeypatch):
    from huggingface_hub.utils import _http

    # The hub client retries a refused connection five times, waiting 23 s in all and making a
    # new HTTP client each time; the sentence is the same without the waits.
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None), False)
    monkeypatch.setattr(_http, "close_session", lambda: None, False)
    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    online(f"http://127.0.0.1:{port}")
    with pytest.raises(
        PretrainedWeightsError,
        match=r"^kaiko-ai/midnight is not in the local Hugging Face cache and the hub cannot be "
        r"reached \(no network\)",
    ):
        create_backbone(BACKBONES["midnight"], "imagenet")


# --- the feature cache says how long the backbone will take -----------------------------------


def test_feature_extraction_prints_its_expected_duration(tmp_path, capsys):
    from histolens.models.feature_cache import FeatureCache
    from histolens.models.pipeline import ImageBank, InputPipeline
    from histolens.models.transforms import resolve_preprocess
    from histolens.testing import make_tissue_image

    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"{i}.png"))
        make_tissue_image(seed=i).save(paths[-1])
    model = build_model(get_backbone_spec("test_vit"), 2, "none")
    preprocess = resolve_preprocess(model.backbone)
    bank = ImageBank(paths, preprocess, progress=False)
    cache = FeatureCache({}, {}, "test")
    cache.extend(model, bank, InputPipeline(preprocess), paths, [], 0, 2, progress=True)
    err = capsys.readouterr().err
    assert "images/s on the first batch, so about" in err and "for all 5 images" in err
    assert len(cache.clean) == 5

    capsys.readouterr()
    more = [*paths, str(tmp_path / "extra.png")]
    make_tissue_image(seed=9).save(more[-1])
    bank = ImageBank(more, preprocess, progress=False)
    cache.extend(model, bank, InputPipeline(preprocess), more, [], 0, 2, progress=True)
    assert "first batch" not in capsys.readouterr().err  # one batch: nothing left to estimate
    assert json.dumps(sorted(cache.clean)) == json.dumps(sorted(more))
