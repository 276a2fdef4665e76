"""``histolens serve`` runs a checkpoint's backbone on the feature engine, chosen as ``predict``
chooses it (``--engine``, else $HISTOLENS_ENGINE, else auto); heatmaps stay on PyTorch."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from histolens.cli.web import serve_command
from histolens.errors import ConfigError
from histolens.models.engine import EngineClassifier
from histolens.web.settings import ServiceSettings

# ONNX Runtime is a dependency, so it is there on every machine the suite runs on.
RUNTIME = "onnxruntime"


def test_the_service_predicts_on_the_engine_named_and_explains_on_pytorch(make_client, tissue_png):
    client = make_client(engine=RUNTIME)
    predictor = client.app.state.service.predictor
    assert isinstance(predictor.runner, EngineClassifier) and predictor.runner.runtime == RUNTIME
    assert client.get("/v1/model").json()["runtime"] == RUNTIME
    files = {"file": ("a.png", tissue_png, "image/png")}
    assert client.post("/v1/predict", files=files).status_code == 200
    explained = client.post("/v1/explain", files=files, data={"method": "gradcam"})
    assert explained.status_code == 200, explained.text


def test_the_environment_variable_decides_unless_the_setting_is_given(make_client, monkeypatch):
    monkeypatch.setenv("HISTOLENS_ENGINE", RUNTIME)
    assert make_client().app.state.service.predictor.runner.runtime == RUNTIME
    assert make_client(engine="torch").app.state.service.predictor.runner is None


def test_the_setting_is_checked_when_made():
    assert ServiceSettings(engine="ONNXRuntime").engine == "onnxruntime"
    with pytest.raises(ConfigError, match="auto"):
        ServiceSettings(engine="fast")


def test_serve_passes_engine_to_the_service(checkpoint, monkeypatch):
    import uvicorn

    import histolens.web.app as web_app

    made: list = []
    real = web_app.create_app
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    monkeypatch.setattr(web_app, "create_app", lambda c, s: made.append(s) or real(c, s))
    result = CliRunner().invoke(
        serve_command, ["--checkpoint", str(checkpoint), "--engine", "torch"]
    )
    assert result.exit_code == 0, result.output
    assert made[0].engine == "torch"
    bad = CliRunner().invoke(serve_command, ["--checkpoint", str(checkpoint), "--engine", "gpu"])
    assert bad.exit_code == 2 and "'gpu' is not one of" in bad.output
