"""``histolens export``: an ONNX file of the whole classifier, verified against PyTorch before it
is written, that the Predictor (and so predict, evaluate, serve, explain) takes like a checkpoint."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from histolens.checkpoint.io import read_metadata, save_checkpoint
from histolens.cli.commands import main
from histolens.data.records import BINARY_CLASSES, discover
from histolens.data.splits import Split, load_split_csv, split_by_patient
from histolens.errors import CheckpointError, ConfigError
from histolens.export import onnx as export_module
from histolens.export.onnx import FP32_TOLERANCE, ExportError, export_onnx
from histolens.inference.ood import FeatureGuard, OODGuard
from histolens.inference.predictor import Predictor
from histolens.inference.runtimes import OnnxRunner
from histolens.models.backbones import get_backbone_spec
from histolens.models.classifier import build_model
from histolens.models.transforms import resolve_preprocess
from histolens.stain.normalize import StainNormalizer
from histolens.stats.metrics import safe_auc
from histolens.testing import make_tissue_image, plain_onnx

TILE = 160  # timm's test nets' pretrained input size
INPUT_SIZE = (TILE, 2 * TILE)  # two tiles side by side: the tiling must be inside the graph


def _features(predictor: Predictor, paths: list[str]) -> np.ndarray:
    chunks = []
    for _, batch, _ in predictor.iter_batches(paths, 16):
        with torch.inference_mode():
            chunks.append(predictor.model.features(predictor.to_input(batch)))
    return torch.cat(chunks).numpy()


@pytest.fixture(scope="module")
def run(synth_small, tmp_path_factory) -> Path:
    """A run directory, made in about a second: a test EfficientNet at 160x320 (two tiles),
    Reinhard stain normalisation, a linear head fitted to the synthetic labels, an
    out-of-distribution feature guard, a temperature, and the run's split.csv."""
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(0)
    spec = get_backbone_spec("test_efficientnet")
    model = build_model(spec, 2, "none", (), ()).eval()
    preprocess = replace(resolve_preprocess(model.backbone), input_size=INPUT_SIZE)
    stain = StainNormalizer("reinhard").fit(make_tissue_image((160, 160), seed=9))
    split = split_by_patient(discover(synth_small).records, "binary", 0.25, 0.25, 0)
    torch_view = Predictor(model, preprocess, BINARY_CLASSES, stain=stain)
    train = [r.path for r in split.train]
    x = _features(torch_view, train)
    y = np.array([r.label == "malignant" for r in split.train], dtype=int)
    # The random backbone's features are tiny (std ~3e-4): fit on standardised features and fold
    # the standardisation into the head.
    mean, scale = x.mean(0), x.std(0) + 1e-12
    fit = LogisticRegression(C=1.0, max_iter=2000).fit((x - mean) / scale, y)
    weight = fit.coef_[0] / scale
    with torch.no_grad():
        model.head.out.weight.copy_(torch.from_numpy(weight).float()[None])
        model.head.out.bias.fill_(float(fit.intercept_[0] - weight @ mean))
    guard = FeatureGuard.fit(x)
    guard = replace(guard, threshold=float(np.median(guard.distance(x))))  # flags about half
    ood = OODGuard(features=guard)
    run_dir = tmp_path_factory.mktemp("export") / "run"
    run_dir.mkdir()
    meta = {
        "model_id": "export-test",
        "backbone": spec.name,
        "timm_name": spec.timm_name,
        "pretrained": "none",
        "task": "binary",
        "class_names": list(BINARY_CLASSES),
        "head": {"kind": "linear", "dims": [], "dropouts": []},
        "preprocess": preprocess.to_dict(),
        "stain": stain.to_dict(),
        "magnification": "all",
        "threshold": 0.45,
        "temperature": 1.5,
        "ood": ood.to_dict(),
        "metrics": {},
        "data": {"path": str(synth_small), "layout": "test fixture"},
    }
    save_checkpoint(run_dir / "best.safetensors", {**model.state_dict(), **ood.state_dict()}, meta)
    split.write_csv(run_dir / "split.csv")
    return run_dir


@pytest.fixture(scope="module")
def fp32(run):
    """The default export of the run: run/best.onnx."""
    return export_onnx(run)


@pytest.fixture(scope="module")
def predictors(run, fp32) -> tuple[Predictor, Predictor]:
    return Predictor.from_checkpoint(run), Predictor.from_checkpoint(fp32.path)


def _images(run: Path, n: int = 12) -> list[str]:
    """``n`` of the run's images, spread over both classes and every side of the split."""
    records = load_split_csv(run / "split.csv").side("all")
    return [records[int(i)].path for i in np.linspace(0, len(records) - 1, n).round()]


def test_fp32_export_matches_torch_and_is_written_beside_the_checkpoint(run, fp32):
    val = load_split_csv(run / "split.csv").val
    assert fp32.path == run / "best.onnx" and fp32.path.is_file()
    assert fp32.quantization == "none" and fp32.auc_drop is None
    assert fp32.n_images == len(val) > 0
    assert "val split of the run's split.csv" in fp32.images_from
    assert 0 <= fp32.max_probability_change <= FP32_TOLERANCE
    # The graph takes any batch at the model's input size: the tiling is inside it.
    graph = onnx.load(str(fp32.path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, *INPUT_SIZE]
    assert [o.name for o in graph.output] == ["logits", "features"]


def test_the_onnx_predictor_predicts_as_torch_does_on_onnx_runtime(run, predictors):
    torch_p, onnx_p = predictors
    assert isinstance(onnx_p.runner, OnnxRunner) and torch_p.runner is None
    paths = _images(run)
    expected, _ = torch_p.predict_paths(paths, batch_size=5)
    got, skipped = onnx_p.predict_paths(paths, batch_size=5)
    assert not skipped and len(got) == len(expected) == len(paths)
    assert [g.label for g in got] == [e.label for e in expected]
    assert len({e.label for e in expected}) == 2  # a model that tells the classes apart
    np.testing.assert_allclose(
        [g.positive_probability for g in got],
        [e.positive_probability for e in expected],
        atol=FP32_TOLERANCE,
    )
    # The guard's statistics travelled inside the file: the same images are flagged.
    assert onnx_p.guard.features.threshold == torch_p.guard.features.threshold
    assert [g.ood for g in got] == [e.ood for e in expected]
    assert 0 < sum(g.ood for g in got) < len(got)
    assert (onnx_p.threshold, onnx_p.temperature) == (0.45, 1.5)
    assert onnx_p.stain is not None and onnx_p.backbone_name == "test_efficientnet"
    # None of that needed the torch model.
    assert onnx_p.model._module is None


def test_batch_of_one_and_of_five_give_the_same_logits(run, predictors):
    _, onnx_p = predictors
    batch = torch.stack([onnx_p.load_input(p) for p in _images(run, 5)])
    x = onnx_p.to_input(batch)
    five = onnx_p.logits(x)
    ones = torch.cat([onnx_p.logits(x[i : i + 1]) for i in range(5)])
    assert five.shape == (5, 1)
    torch.testing.assert_close(ones, five, atol=1e-5, rtol=1e-5)


def test_the_export_carries_the_checkpoints_metadata(run, fp32):
    theirs, ours = read_metadata(run), read_metadata(fp32.path)
    for key in ("model_id", "saved_at", "class_names", "preprocess", "stain", "ood"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert (ours.threshold, ours.temperature) == (0.45, 1.5)
    export = ours.export
    assert export["quantization"] == "none"
    assert export["source_checkpoint"] == str((run / "best.safetensors").resolve())
    assert export["verification"]["max_probability_change"] == fp32.max_probability_change
    assert export["versions"]["onnxruntime"]


def test_cli_export_writes_the_file_and_predict_accepts_it(run, predictors, tmp_path):
    out = tmp_path / "model.onnx"
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert out.is_file()
    assert f"Wrote {out}" in r.output and "largest probability change" in r.output
    csv_path = tmp_path / "predictions.csv"
    images = [Path(p) for p in _images(run, 6)]
    r = CliRunner().invoke(
        main, ["predict", str(out), *map(str, images), "--out", str(csv_path), "--quiet"]
    )
    assert r.exit_code == 0, r.output
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = {row["path"]: row for row in csv.DictReader(fh) if not row["path"].startswith("#")}
    expected, _ = predictors[0].predict_paths(images)
    assert {p: rows[p]["prediction"] for p in rows} == {e.path: e.label for e in expected}


def test_the_web_service_serves_the_onnx_model(fp32, predictors, tmp_path):
    pytest.importorskip("fastapi", reason="the web extra (fastapi) is not installed")
    from fastapi.testclient import TestClient

    from histolens.web.app import create_app

    image = make_tissue_image((2 * TILE, TILE), seed=5)
    image.save(tmp_path / "tile.png")
    expected = predictors[0].predict_image(image)
    with TestClient(create_app(fp32.path)) as client:
        files = {"file": ("tile.png", (tmp_path / "tile.png").read_bytes(), "image/png")}
        r = client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["class"] == expected.label
    assert r.json()["probability"] == pytest.approx(expected.probability, abs=FP32_TOLERANCE)


def test_evaluate_runs_the_onnx_model_on_the_runs_split(run, fp32, predictors, tmp_path):
    args = ["evaluate", str(fp32.path), "--split", "val", "--n-boot", "0", "--quiet"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    val = load_split_csv(run / "split.csv").val
    predictions, _ = predictors[0].predict_paths([r.path for r in val])
    y = np.array([r.label == "malignant" for r in val])
    expected = safe_auc(y, np.array([p.positive_probability for p in predictions]))
    assert metrics["n_images"] == len(val) == fp32.n_images
    assert metrics["image"]["roc_auc"] == pytest.approx(expected, abs=0.01)


# The int8 guard's accept and refuse paths are decided here by the limit, never by int8
# rounding (which depends on the CPU's int8 kernels): an AUC drop lies in [-1, 1], so a limit of
# 1.0 accepts any int8 export and a limit of -1.0 refuses any whose drop is above -1 (which needs
# the fp32 AUC 0 and the int8 AUC 1). tests/test_export_guard.py checks the decision itself on
# known probabilities.
ACCEPT_ANY, REFUSE_ANY = 1.0, -1.0


def _held_out(run: Path) -> list:
    split = load_split_csv(run / "split.csv")
    return split.val + split.test


def test_int8_export_quantises_the_convolutions_and_keeps_the_rest_fp32(run, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "INT8_AUC_TOLERANCE", ACCEPT_ANY)
    out = tmp_path / "int8.onnx"
    result = export_onnx(run, out, "int8", calibration_images=8)
    held = _held_out(run)
    assert result.quantization == "int8" and result.n_calibration == 8
    check = result.int8_check
    assert check is not None and result.auc_drop == check.drop
    # Checked on the run's held-out patients only, never on its training images.
    assert result.n_images == check.n_images == len(held)
    assert check.n_patients == len({r.patient for r in held})
    assert "held-out (validation and test) patients" in check.images_from
    assert 0.0 <= check.auc_fp32 <= 1.0 and 0.0 <= check.auc_int8 <= 1.0
    graph = onnx.load(str(out)).graph
    int8_weights = [w for w in graph.initializer if w.data_type == onnx.TensorProto.INT8]
    assert sum(np.prod(w.dims) for w in int8_weights) > 10_000  # the convolutions' weights
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(n.input[1] in dequantized for n in convs)
    # The tiles' crops, the pooling, the mean over tiles and the head read fp32 tensors.
    fp32_ops = [n for n in graph.node if n.op_type in ("Slice", "ReduceMean", "Reshape", "Gemm")]
    assert {n.op_type for n in fp32_ops} == {"Slice", "ReduceMean", "Reshape", "Gemm"}
    assert not [n.name for n in fp32_ops if set(n.input) & dequantized]
    meta = read_metadata(out)
    assert meta.export["quantization"] == "int8"
    assert meta.export["calibration_images"] == 8
    verification = meta.export["verification"]
    assert verification["auc_drop"] == pytest.approx(check.drop)
    assert verification["n_patients"] == check.n_patients
    assert len(verification["auc_drop_ci"]) == 2
    int8 = Predictor.from_checkpoint(out).predict_paths(_images(run))[0]
    assert len(int8) == 12


def test_cli_int8_export_reports_the_check_on_unseen_patients(run, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "INT8_AUC_TOLERANCE", ACCEPT_ANY)
    out = tmp_path / "cli-int8.onnx"
    args = ["export", str(run), "--quantize", "int8", "--out", str(out), "--quiet"]
    r = CliRunner().invoke(main, [*args, "--calibration-images", "4", "--verify-images", "6"])
    assert r.exit_code == 0, r.output
    held = _held_out(run)
    assert f"Verified against fp32 on 6 of the {len(held)} images" in r.output
    assert "held-out (validation and test) patients" in r.output
    assert "95% CI over patients" in r.output and "calibrated on 4 training images" in r.output
    meta = read_metadata(out)
    assert meta.export["calibration_images"] == 4
    assert meta.export["verification"]["n_images"] == 6


def test_cli_int8_export_above_the_limit_is_refused_and_writes_nothing(run, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "INT8_AUC_TOLERANCE", REFUSE_ANY)
    out = tmp_path / "refused" / "m-int8.onnx"
    out.parent.mkdir()
    args = ["export", str(run), "--quantize", "int8", "--out", str(out), "--quiet"]
    r = CliRunner().invoke(main, [*args, "--calibration-images", "4"])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1
    assert r.output.startswith("error: The int8 export loses ")
    assert "of image AUC" in r.output and "95% CI of the drop over patients" in r.output
    assert "more than the -1.0 allowed, so nothing was written" in r.output
    assert list(out.parent.iterdir()) == []


def test_cli_int8_export_checks_on_verify_data(run, synth_small, tmp_path, monkeypatch):
    from histolens.data.synth import generate_synthetic

    monkeypatch.setattr(export_module, "INT8_AUC_TOLERANCE", ACCEPT_ANY)
    other = tmp_path / "other-patients"
    generate_synthetic(other, n=12, seed=11, size=(176, 120), n_patients=4)
    trained = {r.patient for r in load_split_csv(run / "split.csv").train}
    new = discover(other).records
    assert not trained & {r.patient for r in new}  # the premise: other patients
    out = tmp_path / "verified.onnx"
    args = ["export", str(run), "--quantize", "int8", "--out", str(out), "--quiet"]
    r = CliRunner().invoke(main, [*args, "--verify-data", str(other)])
    assert r.exit_code == 0, r.output
    assert f"Verified against fp32 on {len(new)} of the {len(new)} images" in r.output
    assert f"of the --verify-data {other}" in r.output
    assert read_metadata(out).export["verification"]["n_patients"] == 4
    # The training data themselves are refused: they share the patients that trained the model.
    refused = tmp_path / "refused.onnx"
    args = ["export", str(run), "--quantize", "int8", "--out", str(refused), "--quiet"]
    r = CliRunner().invoke(main, [*args, "--verify-data", str(synth_small)])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "shares" in r.output and "give images of other patients" in r.output
    assert not refused.exists()
    r = CliRunner().invoke(main, ["export", str(run), "--verify-data", str(other), "--quiet"])
    assert r.exit_code == 1 and "add --quantize int8" in r.output


def test_int8_of_a_cross_validated_probe_is_checked_on_per_fold_refits(run, tmp_path, monkeypatch):
    """Every patient trained the shipped probe: each image is scored by a probe refit without
    its fold's patients, through the fp32 and the int8 backbone alike."""
    monkeypatch.setattr(export_module, "INT8_AUC_TOLERANCE", ACCEPT_ANY)
    cv = tmp_path / "cv"
    shutil.copytree(run, cv, ignore=shutil.ignore_patterns("*.onnx"))
    every = load_split_csv(run / "split.csv").side("all")
    Split(every, [], []).write_csv(cv / "split.csv")
    result = export_onnx(cv, tmp_path / "cv-int8.onnx", "int8", calibration_images=8)
    check = result.int8_check
    assert "each scored by the probe refit without its fold" in check.images_from
    assert check.n_images == len(every)
    assert check.n_patients == len({r.patient for r in every})
    # No unseen patient at all: refused, naming the flag that gives some.
    (cv / "split.csv").unlink()
    with pytest.raises(ExportError, match=r"no split\.csv beside it.*--verify-data PATH"):
        export_onnx(cv, tmp_path / "none.onnx", "int8")


def test_an_export_that_strays_from_torch_is_refused_and_writes_nothing(run, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "FP32_TOLERANCE", -1.0)
    out = tmp_path / "refused" / "m.onnx"
    out.parent.mkdir()
    with pytest.raises(ExportError, match=r"differ from PyTorch's by up to \d\.\d{4} on .*nothing"):
        export_onnx(run, out)
    assert list(out.parent.iterdir()) == []
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(out), "--quiet"])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and r.output.startswith("error: The ONNX export's")
    assert list(out.parent.iterdir()) == []


def test_heatmaps_load_the_torch_checkpoint_when_it_is_there(run, predictors):
    from histolens.explain import Explainer

    image = make_tissue_image((2 * TILE, TILE), seed=4)
    torch_p, onnx_p = predictors
    with Explainer(torch_p) as explainer:
        expected = explainer.explain(image, "gradcam").heatmap
    with Explainer(onnx_p) as explainer:
        got = explainer.explain(image, "gradcam").heatmap
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_heatmaps_of_an_export_whose_checkpoint_is_gone_say_so_in_one_sentence(run, tmp_path):
    from histolens.explain import Explainer

    moved = tmp_path / "moved"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("*.onnx"))
    alone = tmp_path / "alone" / "model.onnx"
    export_onnx(moved, alone)
    (moved / "best.safetensors").unlink()
    predictor = Predictor.from_checkpoint(alone)
    assert predictor.predict_image(make_tissue_image((2 * TILE, TILE), seed=4)).label
    message = r"^Heatmaps need gradients, .*torch checkpoint .*moved/best\.safetensors, which is not there\.$"
    with pytest.raises(CheckpointError, match=message):
        Explainer(predictor)
    image = tmp_path / "tile.png"
    make_tissue_image((2 * TILE, TILE), seed=4).save(image)
    r = CliRunner().invoke(main, ["explain", str(alone), str(image), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and r.output.startswith("error: Heatmaps need gradients")
    with pytest.raises(CheckpointError, match="adapt the torch checkpoint .*export it again"):
        predictor.adapt_batchnorm([str(image)])


def test_onnx_files_that_are_not_histolens_exports_are_refused(tmp_path):
    plain = tmp_path / "plain.onnx"
    plain_onnx(plain)
    with pytest.raises(CheckpointError, match="ONNX model but not a histolens export"):
        Predictor.from_checkpoint(plain)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="is not a readable ONNX model"):
        read_metadata(garbage)


def test_export_options_are_checked(run, fp32, tmp_path):
    with pytest.raises(ConfigError, match="must end in .onnx"):
        export_onnx(run, tmp_path / "model.bin")
    with pytest.raises(ConfigError, match="already an ONNX export"):
        export_onnx(fp32.path)
    with pytest.raises(ConfigError, match="Did you mean 'int8'"):
        export_onnx(run, quantization="int9")
    with pytest.raises(ConfigError, match="choose cpu or cuda"):
        Predictor.from_checkpoint(fp32.path, device="tpu")


def test_int8_keeps_the_stages_a_multi_level_model_reads_early_in_fp32(tmp_path):
    """With pooled features from several levels, the stem and the stages up to the shallowest
    level stay fp32 (int8 there cost a real run 0.030 AUC); deeper stages are quantised."""
    spec = get_backbone_spec("test_efficientnet")
    torch.manual_seed(0)
    model = build_model(spec, 2, "none", (), (), "blocks.1,blocks.2").eval()
    assert export_module.fp32_stages(model) == ("conv_stem", "bn1", "blocks.0", "blocks.1")
    assert export_module.fp32_stages(build_model(spec, 2, "none", (), (), "blocks.2")) == ()
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m-int8.onnx"
    export_module.trace_onnx(model, (64, 64), fp32)
    x = torch.stack(
        [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    )
    # One image per batch: the ranges of every batch count, however many batches there are.
    batches = [x[i : i + 1].numpy() for i in range(4)]
    keep = export_module.fp32_stages(model)
    assert export_module.quantize_int8(fp32, int8, batches, keep) == 4
    graph = onnx.load(str(int8)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}

    def quantised(prefix: str) -> list[bool]:
        return [convs[k].input[1] in dequantized for k in convs if k.startswith(prefix)]

    assert quantised("/conv_stem/") and not any(quantised("/conv_stem/"))
    assert quantised("/blocks.1/") and not any(quantised("/blocks.1/"))
    assert quantised("/blocks.2/") and all(quantised("/blocks.2/"))
