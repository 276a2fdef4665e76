"""Fixtures for the desktop viewer: a tiny real checkpoint, tissue images, a fake explainer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histolens.testing import make_checkpoint, make_tissue_image

FAKE_METHODS = ("gradcam", "gradcam++", "eigencam")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A random-weight test_resnet checkpoint with test metrics in its metadata."""
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    return make_checkpoint(
        path,
        metrics={
            "split": "test",
            "roc_auc": 0.912,
            "patient_recognition_rate": 0.875,
            "n_images": 40,
        },
    )


@pytest.fixture
def image_path(tmp_path) -> Path:
    path = tmp_path / "SOB_M_DC-14-2523-400-001.png"
    make_tissue_image((140, 96), seed=3).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Five readable tissue images (one in a sub-folder), one broken PNG and a text file."""
    root = tmp_path / "slides"
    (root / "patient_b").mkdir(parents=True)
    for i in range(4):
        make_tissue_image((96, 64), seed=i, dark=i % 2 == 1).save(root / f"tile_{i}.png")
    make_tissue_image((96, 64), seed=9, dark=True).save(root / "patient_b" / "tile_9.png")
    (root / "broken.png").write_bytes(b"this is not a png")
    (root / "notes.txt").write_text("not an image")
    return root


class FakeExplanation:
    """Stands in for histolens.explain's Explanation: a heatmap and an opacity blend."""

    def __init__(self, image: Image.Image, method: str, prediction) -> None:
        self.image = image
        self.method = method
        self.prediction = prediction
        w, h = image.size
        self.heatmap = np.linspace(0, 1, w * h, dtype=np.float32).reshape(h, w)

    def overlay(self, alpha: float) -> Image.Image:
        red = Image.new("RGB", self.image.size, (255, 0, 0))
        return Image.blend(self.image, red, alpha)


class FakeExplainer:
    """Counts calls, so tests can show what does and does not re-run the model."""

    instances: list[FakeExplainer] = []

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.calls: list[str] = []
        self.closed = False
        FakeExplainer.instances.append(self)

    def explain(self, image: Image.Image, method: str = "gradcam") -> FakeExplanation:
        assert not self.closed, "explain() after close()"
        self.calls.append(method)
        return FakeExplanation(image, method, self.predictor.predict_image(image))

    def close(self) -> None:
        self.closed = True
