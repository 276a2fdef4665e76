"""Fixtures for the web service tests: one tiny real checkpoint, test images as bytes, clients."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from histolens.testing import make_checkpoint, make_tissue_image

pytest.importorskip("fastapi", reason="the web extra (fastapi) is not installed")

TEST_METRICS = {"test": {"accuracy": 0.875, "auc": 0.931}}


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
