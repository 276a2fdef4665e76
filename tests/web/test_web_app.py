"""The service's endpoints, answers and errors, through FastAPI's TestClient."""

from __future__ import annotations

import base64
import io
import re
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from histolens.inference.predictor import Predictor
from histolens.testing import make_checkpoint, make_tissue_image


def _file(data: bytes, name: str = "tile.png", mime: str = "image/png") -> dict:
    return {"file": (name, data, mime)}


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


# --- predictions ------------------------------------------------------------------------------
def test_predict_matches_the_predictor(client, checkpoint, tissue_png):
    r = client.post("/v1/predict", files=_file(tissue_png))
    assert r.status_code == 200, r.text
    body = r.json()
    expected = Predictor.from_checkpoint(checkpoint).predict_images(
        [Image.open(io.BytesIO(tissue_png)).convert("RGB")]
    )[0]
    assert body["class"] == expected.label
    assert body["probability"] == pytest.approx(expected.probability, abs=1e-5)
    assert body["scores"] == pytest.approx(expected.scores, abs=1e-5)
    assert body["probability"] == pytest.approx(body["scores"][body["class"]])
    assert body["threshold"] == 0.5
    assert body["uncertain"] == expected.uncertain
    assert body["model_id"] == "test-test_resnet"
    assert body["filename"] == "tile.png"


def test_batch_gives_each_file_its_result_or_error(client, tissue_png):
    files = [
        ("files", ("a.png", tissue_png, "image/png")),
        ("files", ("notes.txt", b"not an image", "text/plain")),
        ("files", ("b.png", tissue_png[:300], "image/png")),
    ]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["n_ok"], body["n_failed"]) == (1, 2)
    ok, not_image, truncated = body["results"]
    assert ok["status"] == 200 and ok["prediction"]["class"] in ("benign", "malignant")
    assert not_image["status"] == 415 and "notes.txt" in not_image["error"]
    assert truncated["status"] == 422 and "truncated" in truncated["error"]
    assert not_image["prediction"] is None


def test_batch_refuses_too_many_files(make_client, tissue_png):
    client = make_client(max_batch_files=2)
    files = [("files", (f"{i}.png", tissue_png, "image/png")) for i in range(3)]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 413
    assert r.json() == {"detail": "Send at most 2 files per batch request (got 3)."}


def test_model_info_and_page_show_the_backbones_licence(tmp_path, make_client):
    from histolens.testing import make_checkpoint

    assert make_client().get("/v1/model").json()["licence"] is None  # a test net has none
    from fastapi.testclient import TestClient

    from histolens.web.app import create_app

    path = make_checkpoint(tmp_path / "uni.safetensors", licence="CC-BY-NC-ND-4.0")
    with TestClient(create_app(path)) as client:
        assert client.get("/v1/model").json()["licence"] == "CC-BY-NC-ND-4.0"
        assert '"Licence"' in client.get("/static/app.js").text


def test_model_info_shows_checkpoint_metadata_and_test_metrics(client):
    r = client.get("/v1/model")
    assert r.status_code == 200
    info = r.json()
    assert info["backbone"] == "test_resnet"
    assert info["class_names"] == ["benign", "malignant"]
    assert info["metrics"] == {"test": {"accuracy": 0.875, "auc": 0.931}}
    # An older checkpoint: no estimate, its metrics labelled with what they were measured on.
    assert info["estimate"] is None
    assert info["metrics_description"] == ("a held-out test split (number of patients not stored)")
    assert info["metrics_warnings"] == [
        "The number of test patients is not stored: the figures may not hold for new patients."
    ]
    assert info["data"] == {
        "name": "synthetic",
        "layout": "test fixture",
        "patient_level_split": None,
        "split": {},
    }
    assert info["task"] == "binary" and info["threshold"] == 0.5
    assert "gradcam" in info["explain_methods"]
    assert "not for diagnosis" in info["notice"]
    assert info["auth_required"] is False


def test_model_info_returns_the_estimate_and_no_server_path(tmp_path, estimate):
    from fastapi.testclient import TestClient

    from histolens.checkpoint.io import update_metadata
    from histolens.web.app import create_app

    data_dir = tmp_path / "private" / "breakhis-dev"
    path = make_checkpoint(
        tmp_path / "m.safetensors",
        metrics={"split": "out-of-fold", "roc_auc": 0.98, "n_images": 66, "n_patients": 11},
    )
    split = {"train": {"images": 66, "groups": 11, "classes": {"benign": 18, "malignant": 48}}}
    update_metadata(
        path,
        estimate=estimate,
        data={
            "path": str(data_dir),
            "layout": "manifest",
            "patient_level_split": True,
            "split": split,
        },
        stain_reference=str(tmp_path / "private" / "reference.png"),
    )
    with TestClient(create_app(path)) as client:
        r = client.get("/v1/model")
    assert r.status_code == 200
    assert str(tmp_path) not in r.text and "private" not in r.text
    info = r.json()
    assert info["data"] == {
        "name": "breakhis-dev",
        "layout": "manifest",
        "patient_level_split": True,
        "split": split,
    }
    est = info["estimate"]
    assert est["method"] == "5-fold patient-level cross-validation (out-of-fold predictions)"
    assert est["description"].startswith("66 images of 11 patient groups")
    assert (est["n_images"], est["n_patients"]) == (66, 11)
    assert est["patients_per_class"] == {"benign": 3, "malignant": 8}
    assert est["metrics"]["roc_auc"] == pytest.approx(estimate["metrics"]["roc_auc"])
    lo, hi = est["ci95"]["roc_auc"]
    assert lo <= est["metrics"]["roc_auc"] <= hi
    assert set(est["per_magnification"]) == {"100X", "400X"}
    assert est["per_magnification"]["100X"]["patients_per_class"] == {"benign": 3, "malignant": 8}
    assert est["warnings"] == estimate["warnings"] == info["metrics_warnings"]
    assert est["warnings"][0].startswith("Only 3 benign patients support this estimate")
    assert info["metrics"]["split"] == "out-of-fold"  # kept for older clients
    assert info["metrics_description"] == "the out-of-fold predictions of 11 patients (66 images)"


def test_health_page_and_docs_are_served(client):
    health = client.get("/healthz").json()
    assert health == {
        "status": "ok",
        "model_id": "test-test_resnet",
        "queue_depth": 0,
        "queue_capacity": 64,
    }
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "not for diagnosis" in page.text.lower()
    assert not re.search(r'(src|href)="(https?:)?//', page.text)  # no CDN: works offline
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/predict/batch", "/v1/explain", "/v1/model", "/healthz"} <= set(
        paths
    )


# --- explanations -----------------------------------------------------------------------------
def test_explain_png_is_an_overlay_at_the_image_size(client, tissue_png):
    r = client.post("/v1/explain", files=_file(tissue_png), data={"alpha": "0.4"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(r.content))
    assert overlay.size == (96, 64)
    assert r.headers["x-histolens-class"] in ("benign", "malignant")


def test_explain_json_base64_heatmap_decodes_to_the_image_shape(client, tissue_png):
    r = client.post(
        "/v1/explain", files=_file(tissue_png), data={"format": "json", "method": "gradcam"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    heat = body["heatmap"]
    assert heat["encoding"] == "base64-float32-le" and (heat["height"], heat["width"]) == (64, 96)
    values = np.frombuffer(base64.b64decode(heat["data"]), dtype="<f4").reshape(64, 96)
    assert values.min() >= 0.0 and values.max() <= 1.0
    assert body["method"] == "gradcam"
    assert body["prediction"]["class"] == body["target_class"]


def test_explain_json_list_encoding(client, tissue_png):
    r = client.post(
        "/v1/explain", files=_file(tissue_png), data={"format": "json", "encoding": "list"}
    )
    heat = r.json()["heatmap"]
    assert heat["encoding"] == "list"
    assert np.asarray(heat["data"]).shape == (64, 96)


def test_unknown_explain_method_names_the_valid_ones(client, tissue_png):
    r = client.post("/v1/explain", files=_file(tissue_png), data={"method": "gradcm"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "Unknown explanation method 'gradcm'" in detail
    assert "gradcam, gradcam++" in detail and "Did you mean 'gradcam'?" in detail


def test_invalid_form_values_get_one_sentence(client, tissue_png):
    r = client.post("/v1/explain", files=_file(tissue_png), data={"alpha": "3"})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("Invalid value for 'alpha':")
    r = client.post("/v1/predict", data={"x": "1"})
    assert r.status_code == 422 and r.json() == {"detail": "Missing form field 'file'."}
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "/v1/nothing" in r.json()["detail"]


# --- magnification -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def by_magnification(tmp_path_factory):
    """A service whose calibration found 100X patients hard (every score 0.99: both classes stay
    in a set) and 200X patients easy (0.01: a set is its label); unknown gets 100X's."""
    from fastapi.testclient import TestClient

    from histolens.testing import stratified_calibration
    from histolens.web.app import create_app

    cal = stratified_calibration("100", "200")
    path = make_checkpoint(tmp_path_factory.mktemp("mag") / "m.safetensors", conformal=cal)
    with TestClient(create_app(path)) as client:
        yield client


def _judged(body: dict) -> tuple[list[str], bool]:
    return sorted(body["prediction_set"]), body["refer"]


def test_the_magnification_field_picks_the_calibration(by_magnification, tissue_png):
    client, both = by_magnification, ["benign", "malignant"]
    # tile.png says no magnification: the most cautious calibration, unless the form says 200.
    unknown = client.post("/v1/predict", files=_file(tissue_png)).json()
    told = client.post("/v1/predict", files=_file(tissue_png), data={"magnification": "200"})
    assert told.status_code == 200, told.text
    assert _judged(unknown) == (both, True)
    assert _judged(told.json()) == ([told.json()["class"]], False)
    # The field overrides what a BreakHis file name says.
    named = _file(tissue_png, "SOB_M_DC-14-2523-200-001.png")
    assert _judged(client.post("/v1/predict", files=named).json())[1] is False
    overridden = client.post("/v1/predict", files=named, data={"magnification": "100"}).json()
    assert _judged(overridden) == (both, True)
    # An empty field (a form's "from the file name" choice) gives no magnification.
    empty = client.post("/v1/predict", files=_file(tissue_png), data={"magnification": ""})
    assert empty.status_code == 200 and _judged(empty.json()) == (both, True)

    files = [("files", (name, tissue_png, "image/png")) for name in ("a.png", "b.png")]
    batch = client.post("/v1/predict/batch", files=files, data={"magnification": "200"}).json()
    assert [r["prediction"]["refer"] for r in batch["results"]] == [False, False]
    batch = client.post("/v1/predict/batch", files=files).json()
    assert [r["prediction"]["refer"] for r in batch["results"]] == [True, True]

    for mag, refer in (("200", False), (None, True)):
        data = {"format": "json", **({"magnification": mag} if mag else {})}
        r = client.post("/v1/explain", files=_file(tissue_png), data=data)
        assert r.status_code == 200 and r.json()["prediction"]["refer"] is refer
    r = client.post("/v1/explain", files=_file(tissue_png), data={"magnification": "200"})
    assert r.headers["content-type"] == "image/png"
    assert r.headers["X-Histolens-Uncertain"] == "false"


@pytest.mark.parametrize("endpoint", ["/v1/predict", "/v1/predict/batch", "/v1/explain"])
@pytest.mark.parametrize("value", ["250", "100X", "forty"])
def test_a_bad_magnification_is_422_in_one_sentence(client, tissue_png, endpoint, value):
    field = "files" if endpoint.endswith("batch") else "file"
    files = {field: ("tile.png", tissue_png, "image/png")}
    r = client.post(endpoint, files=files, data={"magnification": value})
    assert r.status_code == 422
    assert r.json() == {
        "detail": "Invalid value for 'magnification': Input should be '40', '100', '200' or '400'."
    }


def test_the_magnification_field_is_documented(client):
    api = client.get("/openapi.json").json()
    for path in ("/v1/predict", "/v1/predict/batch", "/v1/explain"):
        ref = api["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
        body = api["components"]["schemas"][ref["schema"]["$ref"].rsplit("/", 1)[-1]]
        field = body["properties"]["magnification"]
        assert "magnification" not in body.get("required", [])
        assert {"type": "string", "enum": ["40", "100", "200", "400"]} in field["anyOf"]
        assert "for prediction sets calibrated per magnification" in field["description"]
        assert "Default: read from the file name" in field["description"]


# --- bad uploads --------------------------------------------------------------------------------
def test_non_image_is_415(client):
    r = client.post("/v1/predict", files=_file(b"%PDF-1.4 not a tile", "scan.pdf", "image/png"))
    assert r.status_code == 415
    assert r.json() == {
        "detail": "'scan.pdf' is not an image this service can read (PNG, JPEG, TIFF, BMP, WebP)."
    }


@pytest.mark.parametrize("cut", [100, 400])
def test_truncated_image_is_422(client, tissue_png, cut):
    r = client.post("/v1/predict", files=_file(tissue_png[:cut]))
    assert r.status_code == 422
    assert r.json()["detail"].startswith("Cannot use 'tile.png':")


def test_empty_upload_is_422(client):
    r = client.post("/v1/predict", files=_file(b""))
    assert r.status_code == 422
    assert r.json()["detail"] == "Cannot use 'tile.png': file is empty (0 bytes)."


def test_decompression_bomb_is_refused(client, bomb_png):
    assert len(bomb_png) < 100
    r = client.post("/v1/predict", files=_file(bomb_png, "bomb.png"))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("Cannot use 'bomb.png':") and "decompression bomb" in detail


def test_upload_over_the_limit_is_413_from_content_length(make_client, tissue_png):
    client = make_client(max_upload_bytes=100_000)
    r = client.post("/v1/predict", files=_file(b"\x89PNG" + b"\0" * 300_000))
    assert r.status_code == 413
    assert r.json() == {"detail": "Upload is larger than the 97.7 KB limit."}
    assert client.post("/v1/predict", files=_file(tissue_png)).status_code == 200


def test_upload_over_the_limit_is_413_while_streaming(make_client):
    """No Content-Length (chunked): the bytes are counted as they arrive."""
    client = make_client(max_upload_bytes=100_000)
    request = httpx.Request(
        "POST", "http://x/v1/predict", files=_file(b"\x89PNG" + b"\0" * 300_000)
    )
    body = request.read()
    chunks = (body[i : i + 16_384] for i in range(0, len(body), 16_384))
    r = client.post(
        "/v1/predict", content=chunks, headers={"content-type": request.headers["content-type"]}
    )
    assert r.status_code == 413
    assert r.json()["detail"] == "Upload is larger than the 97.7 KB limit."


def test_one_file_over_the_limit_in_a_batch_is_that_files_error(make_client, tissue_png):
    client = make_client(max_upload_bytes=len(tissue_png) + 10)
    files = [
        ("files", ("ok.png", tissue_png, "image/png")),
        ("files", ("big.png", tissue_png + b"\0" * 200, "image/png")),
    ]
    results = client.post("/v1/predict/batch", files=files).json()["results"]
    assert [r["status"] for r in results] == [200, 413]
    assert "'big.png' is larger than" in results[1]["error"]


# --- token --------------------------------------------------------------------------------------
def test_token_protects_the_api_but_not_the_page_or_health(make_client, tissue_png):
    client = make_client(token="s3cret")
    r = client.post("/v1/predict", files=_file(tissue_png))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["detail"] == (
        "This service needs an API token: send 'Authorization: Bearer <token>'."
    )
    r = client.get("/v1/model", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["detail"] == "The API token is not valid."
    ok = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/predict", files=_file(tissue_png), headers=ok).status_code == 200
    assert client.get("/v1/model", headers=ok).json()["auth_required"] is True
    assert client.get("/healthz").status_code == 200
    assert client.get("/").status_code == 200


def test_token_is_checked_before_the_body_is_read(make_client):
    client = make_client(token="s3cret", max_upload_bytes=1000)
    r = client.post("/v1/predict", files=_file(b"\0" * 50_000))
    assert r.status_code == 401


# --- queue and micro-batching -------------------------------------------------------------------
class _GatedPredict:
    """Wraps predict_images: records batch sizes; the first call waits until the gate opens."""

    def __init__(self, predict_images):
        self.predict_images = predict_images
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, images, batch_size=32, magnifications=None):
        self.sizes.append(len(images))
        self.entered.set()
        assert self.gate.wait(30)
        return self.predict_images(images, batch_size, magnifications)


def _post_in_threads(client, n, payload):
    results: list = []

    def post():
        results.append(client.post("/v1/predict", files=_file(payload)))

    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results


def _gate(client, monkeypatch) -> _GatedPredict:
    predictor = client.app.state.service.predictor
    gated = _GatedPredict(predictor.predict_images)
    monkeypatch.setattr(predictor, "predict_images", gated)
    return gated


def test_full_queue_answers_503_with_retry_after(make_client, tissue_png, monkeypatch):
    client = make_client(max_queue=1, max_batch=1)
    service = client.app.state.service
    gated = _gate(client, monkeypatch)
    first, results = _post_in_threads(client, 1, tissue_png)
    assert gated.entered.wait(10)  # the worker holds request 1
    second, more = _post_in_threads(client, 1, tissue_png)
    _wait_until(lambda: service.queue_depth == 1)  # request 2 waits: the queue is full
    r = client.post("/v1/predict", files=_file(tissue_png))
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert "queue is full" in r.json()["detail"]
    gated.gate.set()
    for t in first + second:
        t.join(30)
    assert [x.status_code for x in results + more] == [200, 200]


@pytest.mark.parametrize(("max_batch", "expected_sizes"), [(8, [1, 5]), (1, [1] * 6)])
def test_concurrent_predicts_are_micro_batched(
    make_client, tissue_png, monkeypatch, max_batch, expected_sizes
):
    client = make_client(max_batch=max_batch, batch_wait_ms=0)
    service = client.app.state.service
    gated = _gate(client, monkeypatch)
    first, results = _post_in_threads(client, 1, tissue_png)
    assert gated.entered.wait(10)
    rest, more = _post_in_threads(client, 5, tissue_png)
    _wait_until(lambda: service.queue_depth == 5)
    gated.gate.set()
    for t in first + rest:
        t.join(30)
    assert [r.status_code for r in results + more] == [200] * 6
    assert gated.sizes == expected_sizes
    # Batched or not, every request gets the same answer for the same image: to float32
    # rounding, as a batch of 1 and one of 5 sum each convolution in another blocked order
    # (eps 1.2e-7 x sqrt of the ~10^3 terms of a test_resnet output: ~4e-6), so 1e-5.
    probabilities = [r.json()["probability"] for r in results + more]
    assert max(probabilities) - min(probabilities) <= 1e-5


def test_batch_wait_collects_requests_arriving_shortly_after(make_client, tissue_png, monkeypatch):
    client = make_client(max_batch=8, batch_wait_ms=500)
    sizes: list[int] = []
    predictor = client.app.state.service.predictor
    original = predictor.predict_images

    def recording(images, batch_size=32, magnifications=None):
        sizes.append(len(images))
        return original(images, batch_size, magnifications)

    monkeypatch.setattr(predictor, "predict_images", recording)
    threads, results = _post_in_threads(client, 4, tissue_png)
    for t in threads:
        t.join(30)
    assert [r.status_code for r in results] == [200] * 4
    assert len(sizes) < 4 and sum(sizes) == 4


def test_requests_while_shutting_down_get_503_with_retry_after(make_client, tissue_png):
    client = make_client()
    client.app.state.service.close()  # what the lifespan does when the server stops
    r = client.post("/v1/predict", files=_file(tissue_png))
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json() == {"detail": "The service is shutting down; retry shortly."}


def test_rgba_and_grayscale_uploads_work(client):
    for mode in ("RGBA", "L"):
        img = make_tissue_image((80, 60)).convert(mode)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        assert client.post("/v1/predict", files=_file(buf.getvalue())).status_code == 200


def test_model_failure_is_a_json_500(checkpoint, tissue_png, monkeypatch):
    from fastapi.testclient import TestClient

    from histolens.web.app import create_app

    with TestClient(create_app(checkpoint), raise_server_exceptions=False) as client:

        def broken(images, batch_size=32, magnifications=None):
            raise RuntimeError("out of memory")

        monkeypatch.setattr(client.app.state.service.predictor, "predict_images", broken)
        r = client.post("/v1/predict", files=_file(tissue_png))
        assert r.status_code == 500
        assert r.json() == {"detail": "Internal error (RuntimeError); see the server log."}
        monkeypatch.undo()
        assert client.post("/v1/predict", files=_file(tissue_png)).status_code == 200


def test_invalid_limits_are_refused_when_the_app_is_made(checkpoint):
    from histolens.errors import ConfigError
    from histolens.web.app import create_app

    with pytest.raises(ConfigError, match="max_queue and max_batch must be at least 1"):
        create_app(checkpoint, max_batch=0)


def test_the_app_takes_its_settings_whole(checkpoint):
    from fastapi.testclient import TestClient

    from histolens.errors import ConfigError
    from histolens.web.app import ServiceSettings, create_app

    settings = ServiceSettings(max_batch=2, max_batch_files=3)
    with TestClient(create_app(checkpoint, settings)) as client:
        assert client.app.state.service.settings is settings
    with pytest.raises(ConfigError, match="settings or their fields"):
        create_app(checkpoint, settings, max_batch=4)


def test_both_pages_carry_the_shared_header_filled_in_for_them():
    from histolens.web.pages import render_page

    for name, heading, subject in (
        ("index.html", "<h1>histolens</h1>", "Predictions come from"),
        ("slides.html", "<h1>histolens slides</h1>", "Heatmaps come from"),
    ):
        page = render_page(name)
        assert heading in page and subject in page
        assert "<strong>Research use only: not for diagnosis.</strong>" in page
        assert "header.html" not in page and "$" not in page  # no marker or slot left over
    assert 'id="model-chip-text"' in render_page("index.html")
    assert "model-chip" not in render_page("slides.html")
