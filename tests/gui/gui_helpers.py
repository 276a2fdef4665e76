"""Helpers for the viewer's tests: a fake explainer and a Tk event pump.

A module of its own, not conftest: tests/web has a conftest too, so ``from conftest import ...``
would find the wrong one when both folders run together.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

FAKE_METHODS = ("gradcam", "gradcam++", "eigencam")
SCREEN = (1440, 900)  # the Xvfb screen the window tests run on


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

    def explain(
        self, image: Image.Image, method: str = "gradcam", magnification: int | None = None
    ) -> FakeExplanation:
        assert not self.closed, "explain() after close()"
        self.calls.append(method)
        return FakeExplanation(image, method, self.predictor.predict_image(image))

    def close(self) -> None:
        self.closed = True


def poll_until(
    step: Callable[[], object],
    done: Callable[[], bool],
    what: str,
    timeout: float,
    interval: float = 0.01,
) -> None:
    """Call ``step()`` until ``done()``, every ``interval`` s; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step()
        if done():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def pump(root, done: Callable[[], bool], what: str, timeout: float = 90) -> None:
    """Run the Tk event loop until ``done()`` or fail after ``timeout`` seconds."""
    poll_until(root.update, done, what, timeout)


def assert_screenshot(root, display: str, target: Path) -> Path:
    """Let the window settle, shoot the whole screen to ``target``, check its size; the PNG."""
    for _ in range(20):
        root.update()
    shot = screenshot(display, target)
    with Image.open(shot) as png:
        assert png.size == SCREEN
    return shot


def screenshot(display: str, target: Path) -> Path:
    """The whole X screen as PNG (ImageMagick's import, or Pillow's ImageGrab as a fallback)."""
    if shutil.which("import"):
        subprocess.run(
            ["import", "-display", display, "-window", "root", str(target)], check=True, timeout=30
        )
    else:
        from PIL import ImageGrab

        ImageGrab.grab(xdisplay=display).save(target)
    if os.environ.get("HISTOLENS_SCREENSHOT_DIR"):
        out = Path(os.environ["HISTOLENS_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(target, out / target.name)
    return target
