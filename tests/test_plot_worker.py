"""PlotWorker: the evaluation's plots drawn in a second process are the files this one draws."""

from __future__ import annotations

import numpy as np
import pytest

from histolens.evaluation.plot_worker import PlotWorker, draw_plots
from histolens.testing import make_tissue_image


def _calls(out, image_path) -> list:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.35 * y + 0.65 * rng.random(60), 0, 1)
    wrong = [(str(image_path), "benign", "malignant", 0.9)]
    return [
        ("plot_confusion_matrix", (y, (p >= 0.5).astype(int), ("b", "m"), out / "cm.png"), {}),
        ("plot_roc_pr", (y, p, 0.5, out / "roc.png"), {"predicted": (p >= 0.5).astype(int)}),
        ("plot_misclassified", (wrong, out / "wrong.png"), {}),
    ]


@pytest.fixture()
def image_path(tmp_path):
    path = tmp_path / "tissue.png"
    make_tissue_image((120, 90), seed=1).save(path)
    return path


def test_the_worker_writes_the_same_files_as_this_process(tmp_path, image_path):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    draw_plots(_calls(here, image_path))
    with PlotWorker() as worker:
        worker.submit(_calls(there, image_path))
        worker.wait()
        assert worker.running  # drawn by the worker, not by the fallback
    for name in ("cm.png", "roc.png", "wrong.png"):
        # The same functions, arguments and matplotlib: byte-identical files.
        assert (there / name).read_bytes() == (here / name).read_bytes(), name


def test_a_failed_plot_is_drawn_again_here_and_raises_here(tmp_path):
    bad = [("plot_roc_pr", (np.array([0, 1]), np.array([0.2]), 0.5, tmp_path / "x.png"), {})]
    with PlotWorker() as worker:
        worker.submit(bad)
        with pytest.raises(ValueError):  # y and p of different lengths, raised in this process
            worker.wait()
        assert not worker.running  # the worker was ended


def test_without_a_worker_the_plots_are_drawn_at_wait(tmp_path, image_path, monkeypatch):
    def no_process(*args, **kwargs):
        raise OSError("no processes here")

    monkeypatch.setattr("histolens.evaluation.plot_worker.subprocess.Popen", no_process)
    worker = PlotWorker()
    worker.submit(_calls(tmp_path, image_path))
    assert not (tmp_path / "cm.png").exists()
    worker.wait()
    assert {p.name for p in tmp_path.glob("*.png")} >= {"cm.png", "roc.png", "wrong.png"}


def test_a_bundled_app_draws_in_this_process(monkeypatch):
    # In a frozen app sys.executable is the app, not Python: no worker is started.
    monkeypatch.setattr("sys.frozen", True, raising=False)
    with PlotWorker() as worker:
        assert not worker.running


def test_a_worker_that_never_answers_is_killed_and_the_plots_drawn_here(
    tmp_path, image_path, monkeypatch
):
    # A worker stuck before answering (here: one that only sleeps) must not block the run.
    monkeypatch.setattr("histolens.evaluation.plot_worker._SERVE", "import time; time.sleep(120)")
    monkeypatch.setattr("histolens.evaluation.plot_worker._ANSWER_TIMEOUT_S", 1.0)
    worker = PlotWorker()
    assert worker.running
    proc = worker._proc
    worker.submit(_calls(tmp_path, image_path))
    worker.wait()
    assert not worker.running and proc.poll() is not None  # killed, not left behind
    assert {p.name for p in tmp_path.glob("*.png")} >= {"cm.png", "roc.png", "wrong.png"}
