"""``histolens serve``: options reach create_app and uvicorn; --help stays light."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from histolens.cli.web import serve_command
from histolens.errors import CheckpointError


@pytest.fixture
def captured_run(monkeypatch):
    import uvicorn

    calls: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    return calls


def test_serve_passes_options_to_the_app_and_uvicorn(checkpoint, captured_run):
    from fastapi.testclient import TestClient

    result = CliRunner().invoke(
        serve_command,
        [
            "--checkpoint",
            str(checkpoint),
            "--port",
            "8123",
            "--token",
            "abc",
            "--max-upload-mb",
            "1",
            "--max-batch",
            "1",
            "--max-queue",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "http://127.0.0.1:8123/" in result.output and "token required" in result.output
    [(app, kwargs)] = captured_run
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 8123
    with TestClient(app) as client:
        assert client.get("/v1/model").status_code == 401
        limits = client.get("/v1/model", headers={"Authorization": "Bearer abc"}).json()["limits"]
    assert limits["max_upload_bytes"] == 1024 * 1024
    assert (limits["max_batch"], limits["max_queue"]) == (1, 3)


def test_token_can_come_from_the_environment(checkpoint, captured_run):
    from fastapi.testclient import TestClient

    result = CliRunner().invoke(
        serve_command, ["--checkpoint", str(checkpoint)], env={"HISTOLENS_TOKEN": "from-env"}
    )
    assert result.exit_code == 0, result.output
    assert "token required" in result.output
    [(app, _)] = captured_run
    with TestClient(app) as client:
        assert client.get("/v1/model").status_code == 401
        wrong = client.get("/v1/model", headers={"Authorization": "Bearer other"})
        assert wrong.status_code == 401
        right = client.get("/v1/model", headers={"Authorization": "Bearer from-env"})
        assert right.status_code == 200


@pytest.mark.parametrize("token", ["", "secret"])
def test_public_host_without_token_warns(checkpoint, captured_run, token):
    result = CliRunner().invoke(
        serve_command,
        ["--checkpoint", str(checkpoint), "--host", "0.0.0.0"],
        env={"HISTOLENS_TOKEN": token},
    )
    assert result.exit_code == 0, result.output  # a warning, not a refusal
    assert ("warning: serving on 0.0.0.0 without --token" in result.output) == (not token)
    [(_, kwargs)] = captured_run
    assert kwargs["host"] == "0.0.0.0"
    assert "http://0.0.0.0:8000/" in result.output


def test_batching_and_logging_options_reach_the_service(checkpoint, captured_run):
    from fastapi.testclient import TestClient

    result = CliRunner().invoke(
        serve_command,
        [
            "--checkpoint", str(checkpoint), "--batch-wait-ms", "7.5",
            "--max-batch-files", "3", "--log-level", "warning",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [(app, kwargs)] = captured_run
    assert kwargs["log_level"] == "warning"
    with TestClient(app) as client:
        limits = client.get("/v1/model").json()["limits"]
        assert (limits["batch_wait_ms"], limits["max_batch_files"]) == (7.5, 3)
        assert client.app.state.service.worker.batch_wait_s == pytest.approx(0.0075)
    bad = CliRunner().invoke(serve_command, ["--checkpoint", str(checkpoint), "--log-level", "x"])
    assert bad.exit_code == 2 and "'x' is not one of" in bad.output


def test_unusable_checkpoint_fails_before_serving(tmp_path, captured_run):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(serve_command, ["--checkpoint", str(bad)])
    assert isinstance(result.exception, CheckpointError)
    assert "not a readable histolens checkpoint" in str(result.exception)
    assert captured_run == []


def test_help_imports_neither_torch_nor_fastapi(modules_after_help):
    loaded, output = modules_after_help(["serve", "--help"], ["torch", "fastapi", "uvicorn"])
    assert "--max-batch" in output and loaded == []
