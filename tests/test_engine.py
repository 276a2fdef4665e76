"""The feature engine: exported backbones give PyTorch's features, are cached once, chosen once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histolens.errors import ConfigError
from histolens.models.backbones import get_backbone_spec
from histolens.models.classifier import build_model
from histolens.models.engine import (
    FEATURE_RTOL,
    EngineClassifier,
    ExportedFeatures,
    TorchFeatures,
    feature_difference,
    feature_engine,
    resolve_engine,
)
from histolens.models.pipeline import InputPipeline
from histolens.models.transforms import resolve_preprocess
from histolens.testing import make_tissue_image

SIZE = (294, 448)  # the default input: 2 x 2 tiles of 224 px


def _runtimes() -> list[str]:
    out = ["onnxruntime"]
    try:
        import openvino  # noqa: F401

        out.insert(0, "openvino")
    except ImportError:
        pass
    return out


@pytest.fixture(scope="module")
def lite0():
    """The default probe backbone: offline ImageNet Lite0, blocks.2 + blocks.5, eval mode."""
    spec = get_backbone_spec("tf_efficientnet_lite0")
    return build_model(spec, 2, "imagenet", (), (), "blocks.2,blocks.5").eval()


@pytest.fixture(scope="module")
def tissue_inputs(lite0):
    """Model inputs of four H&E-like images at the default size, as training computes them."""
    preprocess = resolve_preprocess(lite0.backbone, SIZE)
    images = torch.stack(
        [
            preprocess.resize(make_tissue_image((448, 294), seed=i, dark=i % 2 == 1))
            for i in range(4)
        ]
    )
    return InputPipeline(preprocess).eval_inputs(images)


@pytest.mark.parametrize("runtime", _runtimes())
def test_exported_features_equal_pytorchs_within_fp32_rounding(
    lite0, tissue_inputs, runtime, tmp_path
):
    engine = ExportedFeatures(lite0, runtime, tmp_path)
    with torch.inference_mode():
        ref = lite0.features(tissue_inputs)
        got = engine.features(tissue_inputs)
    assert got.shape == ref.shape == (4, lite0.feature_dim)
    # FEATURE_RTOL (1e-3) is derived from fp32 arithmetic in histolens.models.engine: eps32 * sqrt(K)
    # per dot product, times ~20 conv layers, times BN's rescaling; this machine measures ~1e-6.
    difference = feature_difference(ref, got)
    print(f"{runtime}: largest feature difference {difference:.2e} of the largest feature")
    assert difference <= FEATURE_RTOL
    # The head's logits follow: the linear probe on top changes nothing.
    logits = EngineClassifier(lite0, engine)(tissue_inputs)
    with torch.inference_mode():
        assert torch.allclose(
            logits, lite0(tissue_inputs), rtol=0, atol=1e-3 * float(ref.abs().max())
        )


def test_the_export_is_made_once_per_weights_and_reused(lite0, tissue_inputs, tmp_path):
    runtime = _runtimes()[0]
    first = ExportedFeatures(lite0, runtime, tmp_path)
    first.prepare(SIZE)
    files = list(tmp_path.glob("*.onnx"))
    assert [f.name for f in files] == [first.path(SIZE).name]
    stamp = files[0].stat().st_mtime_ns
    again = feature_engine(lite0, runtime, SIZE, cache_dir=tmp_path)
    assert again.name == runtime
    assert [f.stat().st_mtime_ns for f in tmp_path.glob("*.onnx")] == [stamp]  # not re-exported
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no temporary file is left
    # Other weights (AdaBN moves batch-norm statistics) get another file, never the old one.
    other = build_model(lite0.spec, 2, "imagenet", (), (), "blocks.2,blocks.5").eval()
    other.backbone.bn1.running_mean += 0.5
    assert ExportedFeatures(other, runtime, tmp_path).key(SIZE) != first.key(SIZE)
    # And another input size another file.
    assert first.key((224, 224)) != first.key(SIZE)


def test_auto_is_the_default_and_torch_can_be_forced(lite0, monkeypatch, tmp_path):
    monkeypatch.delenv("HISTOLENS_ENGINE", raising=False)
    assert resolve_engine(None) == "auto"
    monkeypatch.setenv("HISTOLENS_ENGINE", "torch")
    assert resolve_engine(None) == "torch"
    assert isinstance(feature_engine(lite0, None, SIZE, cache_dir=tmp_path), TorchFeatures)
    assert resolve_engine("auto") == "auto"  # the flag wins over the variable
    assert feature_engine(lite0, "auto", SIZE, cache_dir=tmp_path).name == _runtimes()[0]
    monkeypatch.setenv("HISTOLENS_ENGINE", "opnevino")
    with pytest.raises(ConfigError, match=r"HISTOLENS_ENGINE.*Did you mean 'openvino'"):
        resolve_engine(None)


def test_auto_keeps_pytorch_where_an_export_cannot_help(lite0, tmp_path):
    # Reduced precision asks for PyTorch's autocast, which an fp32 graph would not honour.
    assert feature_engine(lite0, "auto", SIZE, precision="bf16-mixed").name == "torch"
    with pytest.raises(ConfigError, match="cannot run here"):
        feature_engine(lite0, "onnxruntime", SIZE, precision="bf16-mixed")
    lite0.train()
    try:
        assert feature_engine(lite0, "auto", SIZE, cache_dir=tmp_path).name == "torch"
    finally:
        lite0.eval()


def test_a_probe_run_records_its_engine_and_keys_its_cache_by_it(synth_small, tmp_path):
    from histolens.config import RunConfig
    from histolens.testing import tiny_config
    from histolens.training.runner import train

    cfg = tiny_config(
        synth_small,
        **{"model.head": "linear", "train.cv_folds": 2, "model.feature_layer": "last"},
    )
    runs = {}
    for engine in ("torch", "onnxruntime"):
        run = tmp_path / engine
        train(cfg.override({"train.engine": engine}), run, progress=False)
        saved = RunConfig.from_dict(__import__("json").loads((run / "config.json").read_text()))
        assert saved.train.engine == engine
        runs[engine] = run
    from safetensors import safe_open

    prints = []
    for run in runs.values():
        with safe_open(str(run / "features.safetensors"), framework="pt") as fh:
            prints.append(fh.metadata()["fingerprint"])
    assert prints[0] != prints[1]  # torch and exported features never share a cache


def test_line_progress_prints_whole_lines_without_carriage_returns():
    import io

    from histolens.progress import progress_bar

    stream = io.StringIO()
    with progress_bar(10, "Synthesising", "img", stream=stream, interval=0) as bar:
        for _ in range(5):
            bar.update(2)
    text = stream.getvalue()
    assert "\r" not in text
    assert text.splitlines() == [
        line for line in text.splitlines() if line.startswith("Synthesising: ")
    ]
    assert [line.split(" img")[0] for line in text.splitlines()] == [
        f"Synthesising: {n}/10" for n in (2, 4, 6, 8, 10)
    ]
    quiet = io.StringIO()
    with progress_bar(10, "x", stream=quiet, enabled=False) as bar:
        bar.update(10)
    assert quiet.getvalue() == "" and bar.n == 10


def test_line_progress_is_throttled_but_always_ends_with_the_total():
    import io

    from histolens.progress import LineProgress

    stream = io.StringIO()
    with LineProgress(100, "Backbone features", "img", stream, interval=3600) as bar:
        for _ in range(100):
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the first step, then the end (the hour never passed)
    assert lines[-1].startswith("Backbone features: 100/100 img (100%)")


def test_data_synth_into_a_log_writes_lines_not_redraws(tmp_path):
    from click.testing import CliRunner

    from histolens.cli.commands import main

    result = CliRunner().invoke(main, ["data", "synth", str(tmp_path / "d"), "--n", "12"])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    assert "Synthesising: 12/12 img (100%)" in result.output


def test_feature_difference_is_relative_to_the_largest_feature():
    a = torch.tensor([[10.0, -20.0]])
    assert feature_difference(a, a + 0.02) == pytest.approx(0.001, rel=1e-3)  # fp32 of 0.02
    assert np.isfinite(feature_difference(torch.zeros(1, 2), torch.zeros(1, 2)))


def test_a_predictor_on_the_engine_gives_pytorchs_logits(tiny_checkpoint, tmp_path, monkeypatch):
    from histolens.inference.predictor import Predictor

    monkeypatch.setenv("HISTOLENS_CACHE", str(tmp_path))
    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    x = predictor.prepare([make_tissue_image(seed=i) for i in range(3)])
    ref_logits, ref_features = predictor.logits_and_features(x)
    runtime = _runtimes()[-1]
    assert predictor.use_engine(runtime) == runtime
    logits, features = predictor.logits_and_features(x)
    assert feature_difference(ref_features, features) <= FEATURE_RTOL
    # A logit moves by at most sum|w| times the largest feature change (the head is linear
    # after the features, or a fixed eval-mode MLP whose first layer bounds it the same way
    # up to its Lipschitz constant): bound it by the head's weights and FEATURE_RTOL.
    head = predictor.model.head
    lipschitz = 1.0
    for layer in head.modules():
        if isinstance(layer, torch.nn.Linear):
            lipschitz *= float(layer.weight.detach().abs().sum(1).max())
        elif isinstance(layer, torch.nn.BatchNorm1d):
            scale = layer.weight.detach().abs() / torch.sqrt(layer.running_var + layer.eps)
            lipschitz *= float(scale.max())
    bound = lipschitz * FEATURE_RTOL * float(ref_features.abs().max())
    assert float((logits - ref_logits).abs().max()) <= bound
    # AdaBN changes the backbone's statistics: the engine is exported anew, not reused stale.
    before = set(tmp_path.rglob("*.onnx"))
    folder = tmp_path / "cohort"
    folder.mkdir()
    for i in range(16):  # AdaBN's minimum
        make_tissue_image(seed=10 + i).save(folder / f"{i}.png")
    predictor.adapt_batchnorm([str(p) for p in sorted(folder.glob("*.png"))])
    assert predictor.runner is not None and predictor.runner.runtime == runtime
    predictor.logits(x)
    assert len(set(tmp_path.rglob("*.onnx")) - before) == 1
