"""The desktop viewer predicts on the feature engine (``--engine``, else $HISTOLENS_ENGINE, else
auto), as ``predict`` does; its heatmaps keep PyTorch's gradients."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from histolens.gui.model_info import ModelSummary
from histolens.gui.presenter import open_predictor
from histolens.models.engine import EngineClassifier
from histolens.testing import make_tissue_image

# ONNX Runtime is a dependency, so it is there on every machine the suite runs on.
RUNTIME = "onnxruntime"


def test_a_checkpoint_opens_on_the_engine_named_and_says_so(checkpoint):
    predictor = open_predictor(str(checkpoint), RUNTIME)
    assert isinstance(predictor.runner, EngineClassifier) and predictor.runner.runtime == RUNTIME
    rows = dict(ModelSummary.from_predictor(predictor).rows())
    assert rows["Runtime"] == "ONNX Runtime (backbone features; heatmaps on PyTorch)"
    [prediction] = predictor.predict_images([make_tissue_image(seed=2)])
    assert prediction.label in predictor.class_names


def test_the_environment_variable_decides_unless_the_flag_is_given(checkpoint, monkeypatch):
    monkeypatch.setenv("HISTOLENS_ENGINE", RUNTIME)
    assert open_predictor(str(checkpoint)).runner.runtime == RUNTIME
    torch_predictor = open_predictor(str(checkpoint), "torch")
    assert torch_predictor.runner is None
    assert "Runtime" not in dict(ModelSummary.from_predictor(torch_predictor).rows())


def test_gui_passes_engine_to_the_window(checkpoint, monkeypatch):
    tkinter = pytest.importorskip("tkinter")
    import histolens.gui.app as gui_app
    from histolens.cli.gui import gui_command

    opened: list = []
    monkeypatch.setattr(tkinter, "Tk", lambda className: "root")
    monkeypatch.setattr(gui_app, "run_app", lambda *a, **kw: opened.append((a, kw)))
    args = ["--checkpoint", str(checkpoint), "--engine", "torch"]
    result = CliRunner().invoke(gui_command, args)
    assert result.exit_code == 0, result.output
    assert opened[0][1]["engine"] == "torch"
