"""The slide window's presenter without Tk: open, analyse, progress, cancel, regions, errors."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from gui_helpers import poll_until
from PIL import Image

from histolens.gui.jobs import ImmediateExecutor
from histolens.gui.slide_analysis import SlideResults
from histolens.gui.slide_presenter import SlidePresenter
from histolens.slides.outputs import SlideOutputs
from histolens.slides.predict import SlideOptions
from histolens.testing import make_tissue_image

MPP = 1.0  # the plain test slide's microns per pixel
# The tiny test model takes 160 x 160 inputs: at 1 um/px a tile is 160 level-0 px, so the
# 1280 x 960 test slide (tissue in its middle 800 x 600) holds a few dozen tiles.
OPTIONS = SlideOptions(tile_mpp=1.0, batch_size=4, workers=0)


class FakeSlideView:
    """Records what the presenter shows."""

    def __init__(self) -> None:
        self.slide = None
        self.layers: dict[str, Image.Image | None] = {}
        self.visible: dict[str, bool] = {}
        self.analyses: list = []
        self.tiles: tuple = ([], None, "")
        self.tile: tuple = (None, None, None, "")
        self.status = ""
        self.errors: list[tuple[str, str]] = []

    def show_slide(self, slide, note):
        self.slide = slide

    def show_layer(self, name, image):
        self.layers[name] = image

    def set_layer_visible(self, name, visible):
        self.visible[name] = visible

    def show_analysis(self, analysis):
        self.analyses.append(analysis)

    def show_tiles(self, rows, box, note):
        self.tiles = (list(rows), box, note)

    def show_tile(self, row, tile, overlay, caption):
        self.tile = (row, tile, overlay, caption)

    def show_status(self, message):
        self.status = message

    def show_error(self, title, message):
        self.errors.append((title, message))

    def set_busy(self, busy):
        pass


class Gated:
    """A Predictor that counts its batches and can hold one back until released."""

    def __init__(self, predictor, block_at: int = 0) -> None:
        self._predictor = predictor
        self.block_at = block_at
        self.calls = 0
        self.reached, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._predictor, name)

    def decide_batch(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.block_at:
            self.reached.set()
            assert self.release.wait(60), "the test never released the batch"
        return self._predictor.decide_batch(*args, **kwargs)


@pytest.fixture(scope="module")
def plain_slide(tmp_path_factory) -> Path:
    """A 1280 x 960 PNG: white glass around an 800 x 600 piece of H&E-coloured tissue."""
    path = tmp_path_factory.mktemp("plain") / "plain_slide.png"
    canvas = Image.new("RGB", (1280, 960), (244, 244, 242))
    canvas.paste(make_tissue_image((800, 600), seed=4, dark=True), (240, 180))
    canvas.save(path)
    return path


@pytest.fixture(scope="module")
def predictor(checkpoint):
    from histolens.inference.predictor import Predictor

    return Predictor.from_checkpoint(checkpoint)


def _presenter(view, executor, checkpoint, predictor, tmp_path, **kwargs) -> SlidePresenter:
    return SlidePresenter(
        view,
        executor,
        checkpoint=lambda: str(checkpoint),
        load_predictor=lambda path: predictor,
        options=OPTIONS,
        cache=tmp_path / "cache",
        **kwargs,
    )


def _pump(presenter, done, what: str, timeout: float = 60) -> None:
    poll_until(presenter.poll, done, what, timeout, 0.005)


def test_open_analyse_layers_and_region_click(plain_slide, checkpoint, predictor, tmp_path):
    view = FakeSlideView()
    gated = Gated(predictor)
    p = _presenter(view, ImmediateExecutor(), checkpoint, gated, tmp_path)
    p.open_slide(plain_slide, MPP)
    p.poll()
    assert view.slide is not None and view.slide.dimensions == (1280, 960)
    assert max(view.slide.thumbnail.size) == 1280  # never enlarged beyond level 0
    mask = np.asarray(view.layers["mask"])
    assert mask.shape == (960, 1280, 4)
    assert mask[480, 640, 3] > 0 and mask[20, 20, 3] == 0  # tissue tinted, glass clear

    assert p.analysis.state == "done" and view.errors == []
    n = len(p.results)
    assert n == p.analysis.total == p.results.summary.tiles_scored
    assert 12 <= n <= 30  # the tissue's 800 x 600 px in 160 px tiles, with edge tiles
    assert gated.calls == math.ceil(n / OPTIONS.batch_size)
    heat = np.asarray(view.layers["heatmap"])
    assert heat.shape == (960, 1280, 4)
    x, y = p.results.coords[0]
    assert heat[y + 80, x + 80, 3] > 0 and heat[5, 5, 3] == 0  # a tile painted, glass clear
    assert view.status.startswith(f"Analysed {n} tiles: mean P(malignant) ")

    p.set_layer_visible("heatmap", False)
    assert view.visible == {"heatmap": False} and p.visible["heatmap"] is False

    # A click on a tile's centre lists the 3 x 3 tiles around it, highest score first.
    i = int(np.argmin(np.abs(p.results.coords - p.results.coords.mean(0)).sum(1)))
    cx, cy = p.results.coords[i] + 80
    p.click(cx, cy)
    rows, box, note = view.tiles
    assert box == (cx - 240, cy - 240, cx + 240, cy + 240)
    # The 3 x 3 tiles centred in the box, fewer where the tissue (and so the grid) ends.
    assert i in [r.index for r in rows] and 4 <= len(rows) <= 9
    assert [r.score for r in rows] == sorted((r.score for r in rows), reverse=True)
    assert all(abs(r.x + 80 - cx) <= 160 and abs(r.y + 80 - cy) <= 160 for r in rows)
    assert note == f"{len(rows)} tiles in the region"
    p.click(10, 10)  # glass: no tiles there
    assert view.tiles[0] == [] and view.tiles[2] == "0 tiles in the region"

    # The same slide again: the finished analysis is read back, nothing is scored.
    calls = gated.calls
    p.open_slide(plain_slide, MPP)
    p.poll()
    assert p.analysis.state == "done" and len(p.results) == n and gated.calls == calls


def test_tiles_in_a_box_are_those_centred_in_it_highest_first():
    coords = np.array([[0, 0], [100, 0], [200, 0], [0, 100], [100, 100]], np.int64)
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.9], np.float32)
    flags = np.zeros(5, bool)
    results = SlideResults(coords, scores, flags, flags, (100, 100), "malignant")
    # Centres at 50, 150, 250: x 140..260 holds two of them; y 0..60 only the first row's.
    assert results.tiles_in((140, 0, 260, 60)).tolist() == [1, 2]
    # Ties (0.9) by position: x, then y.
    assert results.tiles_in((0, 0, 300, 200)).tolist() == [1, 4, 3, 2, 0]
    # A box along tile edges takes no slivers of the neighbours it touches.
    assert results.tiles_in((96, 0, 204, 100)).tolist() == [1]
    # A box inside one tile holds no centre: the tile it lies in.
    assert results.tiles_in((110, 110, 120, 120)).tolist() == [4]
    assert results.tiles_in((300, 0, 400, 100)).tolist() == []  # touching an edge is no overlap


def test_progress_and_cancel_between_batches_then_resume(
    plain_slide, checkpoint, predictor, tmp_path
):
    view = FakeSlideView()
    gated = Gated(predictor, block_at=2)
    with ThreadPoolExecutor(1) as executor:
        p = _presenter(view, executor, checkpoint, gated, tmp_path)
        # A DataLoader worker process reads the tiles, as in the app: it must not keep the
        # partial file locked once the run stops.
        p.options = replace(OPTIONS, workers=1)
        p.open_slide(plain_slide, MPP)
        # The slide opens, the analysis starts (at a poll) and its second batch is held back.
        _pump(p, gated.reached.is_set, "the second batch")
        # The first batch is scored and shown while the second is held back.
        _pump(p, lambda: p.analysis.done == 4, "the first batch's progress")
        total = p.analysis.total
        assert p.analysis.state == "running" and total > 8
        assert p.analysis.message == f"Scoring tiles: 4 of {total}"
        p.cancel()
        assert view.analyses[-1].state == "cancelling"
        gated.release.set()
        _pump(p, lambda: p.analysis.state in ("cancelled", "failed"), "the cancel")
        assert p.analysis.state == "cancelled", view.errors
        # It stopped after the batch under way: two batches, 8 tiles, kept as partial results.
        assert gated.calls == 2 and p.analysis.done == 8
        assert p.analysis.message == "Cancelled at 8 tiles"
        assert view.status == (
            f"Analysis cancelled after 8 of {total} tiles; Analyse resumes from there."
        )
        assert len(p.results) == 8 and view.layers["heatmap"] is not None
        partial = SlideOutputs(p.last_folder, plain_slide.stem).partial_h5
        with h5py.File(partial, "r") as f:
            assert int(f.attrs["done"]) == 8
        steps = [a.done for a in view.analyses if a.state == "running"]
        assert steps == sorted(steps) and steps[-1] <= 8

        # Analyse again: it resumes at tile 8 and scores only the rest.
        gated.calls, gated.block_at = 0, 0
        p.analyse()
        _pump(p, lambda: p.analysis.state == "done", "the resumed analysis")
    assert len(p.results) == total
    assert gated.calls == math.ceil((total - 8) / OPTIONS.batch_size)
    assert not partial.exists()


def test_grad_cam_of_a_listed_tile_at_full_resolution(plain_slide, checkpoint, tmp_path):
    from histolens.inference.predictor import Predictor

    view = FakeSlideView()
    own = Predictor.from_checkpoint(checkpoint)  # the Explainer hooks this copy
    p = _presenter(view, ImmediateExecutor(), checkpoint, own, tmp_path)
    p.open_slide(plain_slide, MPP)
    p.poll()
    cx, cy = p.results.coords[len(p.results) // 2] + 80
    p.click(cx, cy)
    row = view.tiles[0][0]
    p.select_tile(row.index)
    p.poll()
    shown_row, tile, overlay, caption = view.tile
    assert shown_row == row and view.errors == []
    assert tile.size == overlay.size == (160, 160)  # the tile's level-0 pixels
    assert caption in ("Grad-CAM · benign", "Grad-CAM · malignant")
    expected = Image.open(plain_slide).convert("RGB").crop(row.box)
    assert np.array_equal(np.asarray(tile), np.asarray(expected))
    p.close()


def test_errors_are_one_sentence_in_the_window(plain_slide, checkpoint, predictor, tmp_path):
    view = FakeSlideView()
    p = _presenter(view, ImmediateExecutor(), checkpoint, predictor, tmp_path)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide at all")
    p.open_slide(broken)
    p.poll()
    [(title, message)] = view.errors
    assert title == "Cannot open slide" and message.endswith(
        "(SVS, NDPI, MRXS, tiled TIFF, DICOM, ...)."
    )
    assert "\n" not in message and p.slide is None

    view.errors.clear()
    p.open_slide(plain_slide)  # a plain image says nothing of its scale
    p.poll()
    assert (
        "is a plain image with no reliable scale; give its level-0 scale with --mpp"
        in (view.errors[0][1])
    )

    view.errors.clear()
    nothing = SlidePresenter(
        view, ImmediateExecutor(), checkpoint=lambda: None, options=OPTIONS, cache=tmp_path
    )
    nothing.open_slide(plain_slide, MPP)
    nothing.poll()
    assert nothing.analysis.state == "idle" and "Open a checkpoint" in view.status
    nothing.analyse()
    assert view.errors == [
        ("No model loaded", "Open a checkpoint first (File ▸ Open checkpoint, Ctrl+L).")
    ]

    view.errors.clear()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    bad = SlidePresenter(
        view, ImmediateExecutor(), checkpoint=lambda: str(junk), options=OPTIONS, cache=tmp_path
    )
    bad.open_slide(plain_slide, MPP)
    bad.poll()
    assert bad.analysis.state == "failed"
    [(title, message)] = view.errors
    assert title == "Analysis failed" and "not a readable histolens checkpoint" in message
    assert "\n" not in message
