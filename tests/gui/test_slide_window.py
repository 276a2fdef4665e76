"""The real slide window under Xvfb: the CMU slide analysed, its layers toggled, a tile explained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gui_helpers import SCREEN, assert_screenshot, pump, screenshot
from PIL import Image

from histolens.slides.predict import SlideOptions

pytestmark = pytest.mark.gui

CMU = Path(__file__).resolve().parents[1] / "data" / "slides" / "CMU-1-Small-Region.svs"
# 0.5 um/px model inputs of 160 px: 160-pixel tiles of the 0.499 um/px slide, about 90 of them.
OPTIONS = SlideOptions(tile_mpp=0.5, batch_size=16, workers=1)


@pytest.fixture(scope="module")
def cmu_checkpoint(tmp_path_factory) -> Path:
    """A random-weight checkpoint whose tile scores spread over 0..1 on the CMU slide, as a
    trained model's would: the output bias centred on the slide's tiles and a temperature that
    widens the logits (random weights alone give every tile about the same score)."""
    import h5py
    import torch

    from histolens.checkpoint.io import save_checkpoint
    from histolens.inference.predictor import Predictor
    from histolens.slides.outputs import SlideOutputs
    from histolens.slides.predict import SlideRun
    from histolens.testing import make_checkpoint

    root = tmp_path_factory.mktemp("cmu")
    probe = Predictor.from_checkpoint(make_checkpoint(root / "probe.safetensors", seed=2))
    SlideRun(probe, root / "probe-run", OPTIONS, progress=False).predict_slide(CMU)
    with h5py.File(SlideOutputs(root / "probe-run", CMU.stem).h5, "r") as f:
        p = np.clip(f["score"][:].astype(np.float64), 1e-6, 1 - 1e-6)
    logits = np.log(p / (1 - p))  # the single binary logit at temperature 1
    last = [m for m in probe.model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias -= float(logits.mean())
    meta = probe.metadata.to_dict()
    meta["temperature"] = float(logits.std()) / 2.0
    return save_checkpoint(root / "cmu.safetensors", probe.model, meta)


def _wait_analysed(root, window) -> None:
    p = window.presenter
    pump(root, lambda: p.analysis.state in ("done", "failed", "cancelled"), "the analysis", 180)
    assert p.analysis.state == "done", window.error_message


def _region(shot: Path, box: tuple[int, int, int, int]) -> np.ndarray:
    with Image.open(shot) as png:
        return np.asarray(png.convert("RGB").crop(box), np.int16)


def test_slide_window_analyses_the_cmu_slide(xvfb_display, cmu_checkpoint, tmp_path):
    import tkinter as tk

    from histolens.gui.app import ViewerApp

    root = tk.Tk()
    root.geometry(f"{SCREEN[0]}x{SCREEN[1] - 28}+0+0")
    app = ViewerApp(root, cmu_checkpoint)
    try:
        app.slides.options, app.slides.cache = OPTIONS, tmp_path / "cache"
        window = app.slides.open(CMU)
        window.top.geometry(f"{SCREEN[0] - 40}x{SCREEN[1] - 60}+20+20")
        p, canvas = window.presenter, window.canvas
        _wait_analysed(root, window)
        n = len(p.results)
        assert n == p.results.summary.tiles_scored and 60 <= n <= 120
        assert str(window.progress_text.cget("text")) == f"Done: {n} tiles scored"
        assert window.cancel_button.instate(["disabled"])
        assert str(window.analyse_button.cget("state")) != "disabled"
        scores = p.results.scores
        assert scores.max() - scores.min() > 0.3, "the fixture's scores should spread"

        # The heatmap is a canvas layer over the thumbnail; its checkbutton hides it.
        [heat] = canvas.find_withtag("heatmap")
        [mask] = canvas.find_withtag("mask")
        assert canvas.itemcget(heat, "state") == "normal"
        x0, y0, x1, y1 = (int(v) for v in canvas.bbox("slide"))
        for _ in range(10):
            root.update()
        on = screenshot(xvfb_display, tmp_path / "histolens-slide-heatmap-on.png")
        window.layer_buttons["heatmap"].invoke()
        assert p.visible["heatmap"] is False and window.layer_vars["heatmap"].get() is False
        assert canvas.itemcget(heat, "state") == "hidden"
        assert canvas.itemcget(mask, "state") == "normal"
        for _ in range(10):
            root.update()
        off = screenshot(xvfb_display, tmp_path / "histolens-slide-heatmap-off.png")
        # What the screen shows changes inside the slide (canvas offset: the window at +20+20
        # plus the widgets above the canvas; compare the whole window area instead).
        box = (20, 20, SCREEN[0] - 20, SCREEN[1] - 40)
        changed = np.abs(_region(on, box) - _region(off, box)).max(axis=2) > 30
        assert changed.mean() > 0.02, "hiding the heatmap left the screen unchanged"
        window.layer_buttons["heatmap"].invoke()
        assert canvas.itemcget(heat, "state") == "normal"

        # A click on the slide lists the tiles there; the chosen one gets its Grad-CAM.
        best = int(np.argmax(scores))
        tx, ty = p.results.coords[best] + 80
        cx, cy = window.slide_canvas.to_canvas(tx, ty)
        assert x0 <= cx <= x1 and y0 <= cy <= y1
        canvas.event_generate("<ButtonPress-1>", x=int(cx), y=int(cy))
        canvas.event_generate("<ButtonRelease-1>", x=int(cx), y=int(cy))
        pump(root, lambda: bool(window.tiles.get_children()), "the region's tiles")
        rows = window.tiles.get_children()
        assert rows[0] == str(best), "the best tile of the slide heads its region's list"
        assert window.tiles.set(rows[0], "score") == f"{scores[best]:.3f}"
        assert canvas.find_withtag("region") and len(canvas.find_withtag("tile")) == len(rows)
        window.tiles.selection_set(rows[0])
        panel = window.tile_images.heatmap_panel
        pump(root, lambda: panel._photo is not None, "the tile's Grad-CAM", 120)
        assert str(panel.title.cget("text")).startswith("HEATMAP  ·  Grad-CAM · ")
        assert canvas.find_withtag("selected")
        assert window.error_message == ""
        assert_screenshot(root, xvfb_display, tmp_path / "histolens-slide.png")
    finally:
        app.close()


def test_gui_command_opens_a_slide_and_analyses_it(
    xvfb_display, cmu_checkpoint, tmp_path, monkeypatch
):
    """`histolens gui -c CKPT --slide CMU.svs --tile-mpp 0.5`: a slide window, analysed."""
    import tkinter

    import histolens.gui.app as gui_app
    from histolens.cli.gui import gui_command

    opened: list = []

    class RecordedApp(gui_app.ViewerApp):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    def mainloop(root, n=0) -> None:  # runs until the analysis is done instead of until closed
        [window] = opened[-1].slides.windows
        _wait_analysed(root, window)

    monkeypatch.setenv("HISTOLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gui_app, "ViewerApp", RecordedApp)
    monkeypatch.setattr(tkinter.Tk, "mainloop", mainloop)
    args = ["-c", str(cmu_checkpoint), "--slide", str(CMU), "--tile-mpp", "0.5"]
    result = CliRunner().invoke(gui_command, args)
    assert result.exit_code == 0, result.output
    [app] = opened
    try:
        [window] = app.slides.windows
        assert window.presenter.slide.path == CMU
        assert window.presenter.results.summary.tile_mpp == pytest.approx(0.5)
        assert list((tmp_path / "cache" / "desktop-slides").glob("*/summaries/*.json"))
    finally:
        app.close()
