"""Fixtures for the web service tests: one tiny real checkpoint, test images as bytes, clients."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from histolens.testing import make_checkpoint, make_tissue_image

pytest.importorskip("fastapi", reason="the web extra (fastapi) is not installed")

TEST_METRICS = {"test": {"accuracy": 0.875, "auc": 0.931}}
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("web") / "model.safetensors"
    return make_checkpoint(path, metrics=TEST_METRICS)


@pytest.fixture(scope="session")
def tissue_png() -> bytes:
    """A 96x64 H&E-coloured PNG."""
    return _png(make_tissue_image((96, 64), seed=1))


@pytest.fixture(scope="session")
def bomb_png() -> bytes:
    """A 1x1 PNG whose header claims 30000 x 30000 pixels: a decompression bomb in 70 bytes."""
    data = bytearray(_png(Image.new("L", (1, 1))))
    # Signature (8), then IHDR: length (4), b"IHDR" (4), width (4), height (4), 5 bytes, CRC (4).
    data[16:24] = struct.pack(">II", 30_000, 30_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture
def make_client(checkpoint) -> Iterator[Callable]:
    """make_client(**create_app_kwargs) -> a started TestClient (closed after the test)."""
    from fastapi.testclient import TestClient

    from histolens.web.app import create_app

    clients = []

    def make(**kwargs):
        client = TestClient(create_app(checkpoint, **kwargs))
        client.__enter__()  # runs the lifespan: the model loads here
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium through playwright (closed after the test); skips when either is absent."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (install Debian's chromium package)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@contextlib.contextmanager
def _serve(app: Any) -> Iterator[str]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held from now on: no race with other tests
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    try:
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
def serve() -> Callable[[Any], contextlib.AbstractContextManager[str]]:
    """serve(app): a context manager running ``app`` under uvicorn on loopback, yielding its URL."""
    pytest.importorskip("uvicorn")
    return _serve


def _keep_screenshot(screenshot: Path) -> None:
    if os.environ.get("HISTOLENS_SCREENSHOT_DIR"):
        target = Path(os.environ["HISTOLENS_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, target / screenshot.name)


@pytest.fixture
def keep_screenshot() -> Callable[[Path], None]:
    """keep_screenshot(path): copy it into $HISTOLENS_SCREENSHOT_DIR when that is set."""
    return _keep_screenshot
