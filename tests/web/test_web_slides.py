"""The slide viewer's API: listing by id, Deep Zoom, 404 for anything not listed, analyses."""

from __future__ import annotations

import io
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("openslide", reason="openslide-python is not installed")

# The tiny test model takes 160 x 160 inputs; at 1 um/px a tile is 320 level-0 px of a
# 0.5 um/px slide, so each slide holds a few dozen tiles at most.
TILE_MPP = 1.0
SIZES = {"a/slide0.tiff": (2048, 1536), "slide1.tiff": (1536, 1024)}


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory) -> Path:
    """Two synthetic pyramidal slides (one in a subfolder), plus files that are not slides."""
    from histolens.slides.synthetic import TextureBank, make_synthetic_slide, write_pyramid_tiff

    bank = TextureBank.paint(seed=0, k=2)
    root = tmp_path_factory.mktemp("served")
    for i, (relative, (w, h)) in enumerate(SIZES.items()):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        slide = make_synthetic_slide(w, h, 0.5, n_lesions=1, seed=20 + i, bank=bank)
        write_pyramid_tiff(slide, root / relative, levels=2)
    (root / "notes.txt").write_text("not a slide", encoding="utf-8")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.tiff").write_bytes(b"not listed")
    return root


@pytest.fixture
def slide_client(make_client, slide_dir, tmp_path):
    def make(cache: Path = tmp_path / "cache"):
        return make_client(slides=slide_dir, slide_cache=cache, slide_tile_mpp=TILE_MPP)

    return make


def _ids(client) -> dict[str, str]:
    r = client.get("/v1/slides")
    assert r.status_code == 200, r.text
    return {s["relative_path"]: s["id"] for s in r.json()["slides"]}


def _wait_done(client, sid: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/slides/{sid}/analysis").json()
        assert body["state"] in ("queued", "running", "done"), body
        if body["state"] == "done":
            return body
        time.sleep(0.2)
    raise AssertionError(f"the analysis did not finish: {body}")


def test_listing_names_slides_by_opaque_id_only(slide_client):
    client = slide_client()
    body = client.get("/v1/slides").json()["slides"]
    assert [s["relative_path"] for s in body] == ["a/slide0.tiff", "slide1.tiff"]
    for item in body:
        assert len(item["id"]) == 16 and all(c in "0123456789abcdef" for c in item["id"])
        assert item["analysis"] == "idle"
        assert "/" not in item["id"] and item["name"] in ("slide0", "slide1")


def test_dzi_and_tiles(slide_client):
    client = slide_client()
    sid = _ids(client)["a/slide0.tiff"]
    r = client.get(f"/v1/slides/{sid}.dzi")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    root = ET.fromstring(r.text)
    size = root.find("{*}Size")
    assert (int(size.get("Width")), int(size.get("Height"))) == (2048, 1536)
    assert root.get("TileSize") == "254" and root.get("Format") == "jpeg"
    # The top level of a 2048-px-wide image is level 11 (2 ** 11 = 2048): 9 x 7 tiles of 254.
    tile = client.get(f"/v1/slides/{sid}_files/11/3_2.jpeg")
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    assert tile.content[:2] == b"\xff\xd8"
    image = Image.open(io.BytesIO(tile.content))
    assert image.format == "JPEG" and image.size == (256, 256)  # 254 + an overlap on each side
    assert np.asarray(image).std() > 5  # synthetic tissue, not a blank tile
    assert client.get(f"/v1/slides/{sid}_files/0/0_0.jpeg").status_code == 200
    for bad in ("12/0_0", "11/9_0", "11/0_7", "99/0_0"):
        assert client.get(f"/v1/slides/{sid}_files/{bad}.jpeg").status_code == 404, bad


@pytest.mark.parametrize(
    "path",
    [
        "/v1/slides/..%2F..%2Fetc%2Fpasswd.dzi",
        "/v1/slides/..%2Fserved%2Fslide1.dzi",
        "/v1/slides/%2Fetc%2Fpasswd.dzi",
        "/v1/slides/slide1.dzi",
        "/v1/slides/slide1.tiff_files/0/0_0.jpeg",
        "/v1/slides/0123456789abcdef.dzi",
        "/v1/slides/0123456789abcdef/analysis",
        "/v1/slides/0123456789abcdef/heatmap.png",
        "/v1/slides/..%2F..%2Fetc%2Fpasswd_files/0/0_0.jpeg",
    ],
)
def test_anything_not_listed_is_404(slide_client, path):
    client = slide_client()
    assert client.get(path).status_code == 404
    if path.endswith("/analysis"):
        assert client.post(path).status_code == 404


def test_without_a_slide_folder_the_slide_routes_are_404(client):
    r = client.get("/v1/slides")
    assert r.status_code == 404 and "--slides" in r.json()["detail"]


def test_analysis_lifecycle_and_cache_survives_a_new_app(slide_client, tmp_path):
    cache = tmp_path / "cache"
    client = slide_client(cache)
    sid = _ids(client)["slide1.tiff"]
    assert client.get(f"/v1/slides/{sid}/heatmap.png").status_code == 404
    assert client.get(f"/v1/slides/{sid}/analysis").json()["state"] == "idle"
    first = client.post(f"/v1/slides/{sid}/analysis").json()
    assert first["joined"] is False and first["state"] in ("queued", "running", "done")
    done = _wait_done(client, sid)
    assert done["progress"] == 1.0 and done["tiles_total"] == done["summary"]["tiles_scored"] > 0
    assert "path" not in done["summary"]  # the server's paths stay on the server
    png = client.get(f"/v1/slides/{sid}/heatmap.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    overlay = np.asarray(Image.open(io.BytesIO(png.content)))
    assert overlay.shape[2] == 4
    # Same aspect as the 1536 x 1024 slide, to the pixel that rounding may add.
    assert abs(overlay.shape[1] / overlay.shape[0] - 1.5) < 1.5 / overlay.shape[0] + 1e-9
    assert 0 < (overlay[..., 3] > 0).mean() <= 1.0
    assert client.post(f"/v1/slides/{sid}/analysis").json()["joined"] is True

    # A new service on the same cache finds the result without analysing again.
    again = slide_client(cache)
    status = again.get(f"/v1/slides/{sid}/analysis").json()
    assert status["state"] == "done" and status["summary"] == done["summary"]
    assert again.get(f"/v1/slides/{sid}/heatmap.png").content == png.content
    listed = {s["id"]: s["analysis"] for s in again.get("/v1/slides").json()["slides"]}
    assert listed[sid] == "done"


def test_second_request_joins_the_running_job(slide_dir, tiny_checkpoint, tmp_path):
    from histolens.inference.predictor import Predictor
    from histolens.slides.predict import SlideOptions
    from histolens.web.slide_jobs import SlideAnalyses
    from histolens.web.slide_library import SlideLibrary

    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    gate = threading.Event()
    loads = []

    def load():
        loads.append(1)
        assert gate.wait(60)
        return predictor

    library = SlideLibrary(slide_dir)
    sid = {e.relative: e.id for e in library.entries()}["slide1.tiff"]
    analyses = SlideAnalyses(
        library, load, "f" * 64, tmp_path / "cache", SlideOptions(tile_mpp=TILE_MPP, workers=0)
    )
    try:
        job, joined = analyses.start(sid)
        assert not joined and job.state in ("queued", "running")
        again, joined_again = analyses.start(sid)
        assert joined_again and again is job
        gate.set()
        deadline = time.monotonic() + 300
        while analyses.status(sid).state != "done":
            assert analyses.status(sid).state != "failed", analyses.status(sid)
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert loads == [1]  # one job ran, one model load
        assert analyses.start(sid)[1] is True  # done: a new request gets the cached result
    finally:
        gate.set()
        analyses.close()
        library.close()


def test_serve_slides_option_reaches_the_app(checkpoint, slide_dir, tmp_path, monkeypatch):
    import uvicorn
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from histolens.cli.web import serve_command

    calls: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(app))
    args = ["--checkpoint", str(checkpoint), "--slides", str(slide_dir)]
    result = CliRunner().invoke(serve_command, [*args, "--slide-cache", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert f"slides of {slide_dir} at /slides" in result.output
    with TestClient(calls[0]) as client:
        assert len(_ids(client)) == 2
        assert client.get("/slides").status_code == 200
    missing = CliRunner().invoke(
        serve_command, ["--checkpoint", str(checkpoint), "--slides", "/no"]
    )
    assert missing.exit_code != 0 and "does not exist" in missing.output
