"""OpenVINO as the opt-in runtime of an ONNX export: the same logits, features and predictions as
ONNX Runtime, chosen by ``runtime=``, ``--onnx-runtime`` or $HISTOLENS_ONNX_RUNTIME, and one
sentence for each thing that cannot work."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from predictions_helpers import assert_predictions_close

from histolens.cli.commands import main
from histolens.cli.options import ONNX_RUNTIME_CHOICES
from histolens.data.records import discover
from histolens.data.splits import load_split_csv, split_by_patient
from histolens.errors import CheckpointError, ConfigError
from histolens.export.onnx import export_onnx
from histolens.gui.model_info import ModelSummary
from histolens.inference.predictor import UNCERTAINTY_MARGIN, Predictor
from histolens.inference.runtimes import (
    ONNX_RUNTIMES,
    RUNTIME_ENV,
    OnnxRunner,
    OpenVinoRunner,
)
from histolens.testing import make_checkpoint, plain_onnx

# The same fp32 graph on two runtimes' kernels: logits agree to this (the logits test below).
LOGIT_ATOL = 1e-4
# A probability is sigmoid(logit / T) with T = 1 here, whose slope is at most 1/4; the CSV's
# 6-decimal rounding adds up to 1e-6.
PROBABILITY_ATOL = LOGIT_ATOL / 4 + 1e-6


@pytest.fixture(scope="module")
def run(synth_small, tmp_path_factory) -> Path:
    """A run directory of a tiny random ResNet whose threshold splits the images about in half,
    with its split.csv (export verifies on the run's validation images)."""
    run_dir = tmp_path_factory.mktemp("openvino") / "run"
    run_dir.mkdir()
    split_by_patient(discover(synth_small).records, "binary", 0.25, 0.25, 0).write_csv(
        run_dir / "split.csv"
    )
    make_checkpoint(run_dir / "best.safetensors")
    probs = [
        p.positive_probability
        for p in Predictor.from_checkpoint(run_dir).predict_paths(_images(run_dir))[0]
    ]
    make_checkpoint(run_dir / "best.safetensors", threshold=float(np.median(probs)))
    return run_dir


@pytest.fixture(scope="module")
def onnx_path(run) -> Path:
    return export_onnx(run, verify_images=8).path


@pytest.fixture(autouse=True)
def _no_runtime_from_the_environment(monkeypatch):
    monkeypatch.delenv(RUNTIME_ENV, raising=False)


def _images(run: Path, n: int = 12) -> list[str]:
    records = load_split_csv(run / "split.csv").side("all")
    return [records[int(i)].path for i in np.linspace(0, len(records) - 1, n).round()]


def _inputs(predictor: Predictor, run: Path, n: int = 6) -> torch.Tensor:
    return predictor.to_input(torch.stack([predictor.load_input(p) for p in _images(run, n)]))


def test_openvino_gives_onnx_runtimes_logits_and_features(run, onnx_path):
    predictor = Predictor.from_checkpoint(onnx_path)
    x = _inputs(predictor, run)
    ort, ov = OnnxRunner(onnx_path), OpenVinoRunner(onnx_path, threads=1)
    logits, features = ov.forward_with_features(x)
    expected_logits, expected_features = ort.forward_with_features(x)
    assert logits.shape == (6, 1) and features.shape == expected_features.shape
    torch.testing.assert_close(logits, expected_logits, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(features, expected_features, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(ov(x), expected_logits, atol=LOGIT_ATOL, rtol=0)
    # Any batch size: one image at a time gives the same logits.
    torch.testing.assert_close(ov(x[:1]), expected_logits[:1], atol=1e-4, rtol=0)
    # Each image runs in a call of its own (openvino_core.infer_per_image): its outputs are
    # the same to the bit whatever batch it comes in, and an empty batch gives empty outputs.
    for i in range(len(x)):
        assert torch.equal(ov.forward_with_features(x[i : i + 1])[1], features[i : i + 1])
    assert torch.equal(ov(x[2:5]), logits[2:5])
    empty_logits, empty_features = ov.forward_with_features(x[:0])
    assert empty_logits.shape == (0, 1) and empty_features.shape == (0, features.shape[1])


def test_one_runner_serves_several_threads(run, onnx_path):
    predictor = Predictor.from_checkpoint(onnx_path, runtime="openvino")
    x = _inputs(predictor, run, 8)
    expected = [predictor.logits(x[i : i + 1]) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: predictor.logits(x[i : i + 1]), [*range(8), *range(8)]))
    for i, logits in enumerate(got):
        torch.testing.assert_close(logits, expected[i % 8], atol=0, rtol=0)


def test_the_predictor_on_openvino_predicts_as_on_onnx_runtime(run, onnx_path):
    ort = Predictor.from_checkpoint(onnx_path, runtime="onnxruntime")
    ov = Predictor.from_checkpoint(onnx_path, runtime="openvino")
    assert isinstance(ov.runner, OpenVinoRunner) and ov.runner.runtime == "openvino"
    assert isinstance(ort.runner, OnnxRunner) and ort.runner.runtime == "onnxruntime"
    paths = _images(run)
    expected, _ = ort.predict_paths(paths, batch_size=5)
    got, skipped = ov.predict_paths(paths, batch_size=5)
    assert not skipped and len(got) == len(expected) == len(paths)
    assert len({e.label for e in expected}) == 2  # a threshold that tells the images apart
    np.testing.assert_allclose(
        [[g.scores[c] for c in ort.class_names] for g in got],
        [[e.scores[c] for c in ort.class_names] for e in expected],
        atol=PROBABILITY_ATOL,
        rtol=0,
    )
    # The threshold is the median probability: the decisions agree wherever a probability is
    # further than PROBABILITY_ATOL from the threshold and from the review margin's edges.
    edges = [ort.threshold + d for d in (0.0, -UNCERTAINTY_MARGIN, UNCERTAINTY_MARGIN)]
    decided = [
        (g, e) for g, e in zip(got, expected, strict=True)
        if all(abs(e.positive_probability - edge) > PROBABILITY_ATOL for edge in edges)
    ]  # fmt: skip
    assert len(decided) > len(paths) // 2
    assert [(g.label, g.uncertain) for g, _ in decided] == [
        (e.label, e.uncertain) for _, e in decided
    ]
    assert ov.model._module is None  # predicting never needed the torch model


def test_the_environment_variable_chooses_the_runtime(run, onnx_path, monkeypatch):
    assert isinstance(Predictor.from_checkpoint(onnx_path).runner, OnnxRunner)  # the default
    monkeypatch.setenv(RUNTIME_ENV, "OpenVINO")
    assert isinstance(Predictor.from_checkpoint(onnx_path).runner, OpenVinoRunner)
    # An explicit choice wins over the variable, and a torch checkpoint ignores the variable.
    assert isinstance(
        Predictor.from_checkpoint(onnx_path, runtime="onnxruntime").runner, OnnxRunner
    )
    assert Predictor.from_checkpoint(run).runner is None
    monkeypatch.setenv(RUNTIME_ENV, "tensorrt")
    with pytest.raises(ConfigError, match=r"\$HISTOLENS_ONNX_RUNTIME\) 'tensorrt'; choose one of"):
        Predictor.from_checkpoint(onnx_path)


def test_what_cannot_run_is_refused_in_one_sentence(run, onnx_path, monkeypatch):
    with pytest.raises(
        ConfigError,
        match=r"^Unknown ONNX runtime 'openvno'; choose one of: onnxruntime, openvino\. "
        r"Did you mean 'openvino'\?$",
    ):
        Predictor.from_checkpoint(onnx_path, runtime="openvno")
    with pytest.raises(ConfigError, match=r"^OpenVINO runs an ONNX model on the CPU only, not on"):
        Predictor.from_checkpoint(onnx_path, device="cuda:0", runtime="openvino")
    with pytest.raises(ConfigError, match=r"applies to \.onnx exports only, and best\.safetensors"):
        Predictor.from_checkpoint(run / "best.safetensors", runtime="openvino")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    with pytest.raises(
        ConfigError,
        match=r"^OpenVINO is not installed: pip install openvino \(or pip install "
        r"'histolens\[openvino\]'\), or run the model on ONNX Runtime "
        r"\(--onnx-runtime onnxruntime\)\.$",
    ):
        Predictor.from_checkpoint(onnx_path, runtime="openvino")


def test_a_refusal_names_the_environment_variable_when_it_chose_openvino(onnx_path, monkeypatch):
    # explain and the desktop app have no --onnx-runtime: the way back is unsetting the variable.
    monkeypatch.setenv(RUNTIME_ENV, "openvino")
    with pytest.raises(
        ConfigError,
        match=r"^OpenVINO runs an ONNX model on the CPU only, not on 'cuda'; use --device cpu, "
        r"or ONNX Runtime for a GPU \(unset \$HISTOLENS_ONNX_RUNTIME, which chose OpenVINO\)\.$",
    ):
        Predictor.from_checkpoint(onnx_path, device="cuda")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(
        ConfigError,
        match=r"^OpenVINO is not installed: .*, or run the model on ONNX Runtime "
        r"\(unset \$HISTOLENS_ONNX_RUNTIME, which chose OpenVINO\)\.$",
    ):
        Predictor.from_checkpoint(onnx_path)
    # The flag, when given, chose it: the sentence names the flag again.
    with pytest.raises(ConfigError, match=r"\(--onnx-runtime onnxruntime\)\.$"):
        Predictor.from_checkpoint(onnx_path, runtime="openvino")


@pytest.mark.parametrize(
    ("args", "env", "hide_openvino"),
    [
        (["--onnx-runtime", "openvino"], {}, True),
        (["--onnx-runtime", "openvino", "--device", "cuda"], {}, False),
        ([], {RUNTIME_ENV: "openvino"}, True),
    ],
    ids=["not-installed", "gpu", "not-installed-by-env"],
)
def test_serve_refuses_an_unusable_runtime_before_starting(
    onnx_path, monkeypatch, args, env, hide_openvino
):
    uvicorn = pytest.importorskip("uvicorn", reason="the web extra (uvicorn) is not installed")

    def must_not_run(*_args, **_kwargs):
        pytest.fail("uvicorn.run was called for a runtime that cannot run")

    monkeypatch.setattr(uvicorn, "run", must_not_run)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if hide_openvino:
        monkeypatch.setitem(sys.modules, "openvino", None)
    device = args[args.index("--device") + 1] if "--device" in args else "cpu"
    with pytest.raises(ConfigError) as refused:  # what loading the model would say
        Predictor.from_checkpoint(onnx_path, device, runtime=None if env else "openvino")
    r = CliRunner().invoke(main, ["serve", "--checkpoint", str(onnx_path), *args])
    assert r.exit_code == 1, r.output
    assert r.output.strip() == f"error: {refused.value}"  # one line: no traceback, no "serving"


def test_files_openvino_cannot_run_are_refused(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match=r"^OpenVINO cannot load .*garbage\.onnx \("):
        OpenVinoRunner(garbage)
    plain = tmp_path / "plain.onnx"
    plain_onnx(plain)
    with pytest.raises(CheckpointError, match=r"is not a histolens export \(its graph has inputs"):
        OpenVinoRunner(plain)


def test_cli_predict_on_openvino_writes_the_default_csv(run, onnx_path, tmp_path):
    images = _images(run, 8)
    outputs = {}
    for runtime in (None, "openvino"):
        out = tmp_path / f"{runtime}.csv"
        flag = ["--onnx-runtime", runtime] if runtime else []
        r = CliRunner().invoke(
            main, ["predict", str(onnx_path), *images, "--out", str(out), "--quiet", *flag]
        )
        assert r.exit_code == 0, r.output
        outputs[runtime] = out.read_text(encoding="utf-8")
    threshold = Predictor.from_checkpoint(onnx_path).threshold
    # The same rows and decisions; probabilities a few float32 steps apart.
    undecided = assert_predictions_close(
        outputs["openvino"], outputs[None], atol=PROBABILITY_ATOL, threshold=threshold
    )
    assert len(undecided) < len(images)  # most rows' decisions were compared
    assert outputs[None].count("\n") == len(images) + 1
    r = CliRunner().invoke(main, ["predict", str(run), *images, "--onnx-runtime", "openvino"])
    assert r.exit_code == 1
    assert "applies to .onnx exports only" in r.output and "histolens export RUN" in r.output


def test_a_predict_run_is_resumed_on_the_runtime_it_was_started_on(run, onnx_path, tmp_path):
    from histolens.inference.batch import PredictionJob

    class Stop(Exception):
        pass

    def stop_after_one_batch(_n: int) -> None:
        raise Stop

    images, out = _images(run, 8), tmp_path / "out.csv"
    ort = Predictor.from_checkpoint(onnx_path, runtime="onnxruntime")
    ov = Predictor.from_checkpoint(onnx_path, runtime="openvino")
    job = PredictionJob.open(ort, images, out)
    with pytest.raises(Stop):
        job.run(4, progress=stop_after_one_batch)
    record = json.loads(job.sidecar.read_text())
    assert record["runtime"] == "onnxruntime"
    before = job.partial.read_bytes()
    sentence = (
        f"{job.partial} was started on onnxruntime, not openvino; give --onnx-runtime "
        "onnxruntime to resume it, or delete it to start over."
    )
    with pytest.raises(ConfigError) as refused:
        PredictionJob.open(ov, images, out)
    assert str(refused.value) == sentence
    args = ["predict", str(onnx_path), *images, "--out", str(out), "--quiet"]
    r = CliRunner().invoke(main, [*args, "--onnx-runtime", "openvino"])
    assert r.exit_code == 1 and r.output.strip() == f"error: {sentence}"
    assert job.partial.read_bytes() == before and not out.exists()
    # A sidecar written before the runtime was recorded says nothing against resuming.
    del record["runtime"]
    job.sidecar.write_text(json.dumps(record))
    resumed = PredictionJob.open(ov, images, out)
    assert resumed.already_done == 4
    r = CliRunner().invoke(main, [*args, "--onnx-runtime", "onnxruntime"])
    assert r.exit_code == 0, r.output
    assert out.read_text().count("\n") == len(images) + 1


def test_cli_evaluate_on_openvino_gives_the_default_metrics(onnx_path, tmp_path):
    metrics, predictions = {}, {}
    for runtime in ("onnxruntime", "openvino"):
        args = ["evaluate", str(onnx_path), "--split", "all", "--n-boot", "0", "--quiet"]
        out = tmp_path / runtime
        r = CliRunner().invoke(main, [*args, "--out", str(out), "--onnx-runtime", runtime])
        assert r.exit_code == 0, r.output
        metrics[runtime] = json.loads((out / "metrics.json").read_text())["image"]
        predictions[runtime] = (out / "predictions.csv").read_text(encoding="utf-8")
    threshold = Predictor.from_checkpoint(onnx_path).threshold
    undecided = assert_predictions_close(
        predictions["openvino"], predictions["onnxruntime"], atol=PROBABILITY_ATOL,
        threshold=threshold,
    )  # fmt: skip
    # The run's threshold is the median probability: the images pile up around it. Only an
    # image within PROBABILITY_ATOL of it can change its decision, and only a positive and a
    # negative image within 2 * PROBABILITY_ATOL of each other can swap their ROC order.
    rows = list(csv.DictReader(io.StringIO(predictions["onnxruntime"])))
    p = {r["path"]: float(r["p_malignant"]) for r in rows}
    positives = [p[r["path"]] for r in rows if r["label"] == "malignant"]
    negatives = [p[r["path"]] for r in rows if r["label"] != "malignant"]
    close = sum(abs(a - b) <= 2 * PROBABILITY_ATOL for a in positives for b in negatives)
    ov, ort = metrics["openvino"], metrics["onnxruntime"]
    assert abs(ov["accuracy"] - ort["accuracy"]) <= len(undecided) / len(rows) + 1e-12
    pairs = len(positives) * len(negatives)
    assert abs(ov["roc_auc"] - ort["roc_auc"]) <= close / pairs + 1e-12
    assert len(undecided) < len(rows) and close < pairs  # most of it was compared exactly


def test_every_front_end_offers_the_flag_and_says_which_runtime_runs(onnx_path):
    assert ONNX_RUNTIME_CHOICES == ONNX_RUNTIMES  # the CLI's copy (no torch import for --help)
    for command in ("predict", "evaluate", "serve"):
        r = CliRunner().invoke(main, [command, "--help"])
        assert "--onnx-runtime [onnxruntime|openvino]" in r.output, command
    predictor = Predictor.from_checkpoint(onnx_path, runtime="openvino")
    assert (
        dict(ModelSummary.from_predictor(predictor).rows())["Runtime"] == "OpenVINO (ONNX export)"
    )
    pytest.importorskip("fastapi", reason="the web extra (fastapi) is not installed")
    from fastapi.testclient import TestClient

    from histolens.web.app import create_app

    with TestClient(create_app(onnx_path, onnx_runtime="openvino")) as client:
        info = client.get("/v1/model").json()
    assert info["runtime"] == "openvino"


# Run in a child process: the failure it guards against kills the process that shows it.
TWO_RUNNERS_THEN_A_SIGNAL = """
import faulthandler, signal, subprocess, sys
faulthandler.enable()  # as pytest does: the main thread gets a signal stack of its own
signal.signal(signal.SIGCHLD, lambda *a: None)  # as PyTorch's DataLoader does
from histolens.inference.runtimes import OpenVinoRunner
first, second = OpenVinoRunner(sys.argv[1]), OpenVinoRunner(sys.argv[1])
del first  # dropped in the order they were made
del second
subprocess.run(["true"], check=True)  # its SIGCHLD is handled on this thread
print("survived")
"""


def test_runners_dropped_in_any_order_leave_signals_working(onnx_path):
    """Each runner once made its own Core, whose CPU plugin swapped the thread's signal stack and,
    dropped first-made-first, left it pointing at unmapped memory: the next handled signal was a
    SIGSEGV that no handler saw (the test suite died of it). One shared Core keeps it valid."""
    child = subprocess.run(
        [sys.executable, "-c", TWO_RUNNERS_THEN_A_SIGNAL, str(onnx_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-2000:]}"
    assert child.stdout.strip() == "survived"
