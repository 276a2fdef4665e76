"""Each evaluation plot writes a PNG that opens, at about its figure size, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histolens.evaluation import plots
from histolens.testing import make_tissue_image

DPI = 110  # plots._save


@pytest.fixture(scope="module")
def scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = np.clip(0.35 * y + 0.65 * rng.random(80), 0, 1)
    return y, p


def _check_png(path, figsize: tuple[float, float]) -> Image.Image:
    """The file is a PNG that decodes, about figsize x DPI (tight bounding boxes trim margins),
    drawn on (not one flat colour), and no temp file of the atomic write is left beside it."""
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    width, height = image.size
    assert 0.7 * figsize[0] * DPI <= width <= 1.1 * figsize[0] * DPI
    assert 0.7 * figsize[1] * DPI <= height <= 1.1 * figsize[1] * DPI
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 10
    assert not list(path.parent.glob(".*.tmp"))
    return image


def test_roc_pr(tmp_path, scores):
    y, p = scores
    out = plots.plot_roc_pr(y, p, 0.5, tmp_path / "roc.png", title="test split")
    assert out == tmp_path / "roc.png"
    _check_png(out, (10, 4.3))


def test_roc_pr_of_one_class_still_writes_a_figure(tmp_path, scores):
    _, p = scores
    _check_png(plots.plot_roc_pr(np.ones_like(p), p, 0.5, tmp_path / "roc.png"), (10, 4.3))


@pytest.mark.parametrize("k", [2, 8])
def test_confusion_matrix_grows_with_the_classes(tmp_path, k):
    rng = np.random.default_rng(k)
    y, pred = rng.integers(0, k, 50), rng.integers(0, k, 50)
    side = 3.2 + 0.6 * k
    out = plots.plot_confusion_matrix(y, pred, [f"class{i}" for i in range(k)], tmp_path / "cm.png")
    _check_png(out, (side, side * 0.85))


def test_probability_distribution(tmp_path, scores):
    y, p = scores
    out = plots.plot_probability_distribution(
        y, p, ["benign", "malignant"], 0.4, tmp_path / "dist.png"
    )
    _check_png(out, (6.5, 4))


def test_reliability(tmp_path, scores):
    y, p = scores
    _check_png(plots.plot_reliability(y, p, p**0.8, 1.3, tmp_path / "rel.png"), (10, 4.3))


def test_training_curves_read_every_resumed_log(tmp_path):
    logs = tmp_path / "logs"
    assert plots.plot_training_curves(logs, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    for version, epochs in ((0, range(0, 3)), (1, range(3, 5))):
        folder = logs / f"version_{version}"
        folder.mkdir(parents=True)
        lines = ["epoch,train_loss,val_loss,val_auc"]
        lines += [f"{e},{1 / (e + 1):.3f},{1.2 / (e + 1):.3f},{0.6 + 0.05 * e:.3f}" for e in epochs]
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    _check_png(plots.plot_training_curves(logs, tmp_path / "curves.png"), (10, 4))


def test_misclassified_grid_shows_unreadable_files_as_such(tmp_path):
    assert plots.plot_misclassified([], tmp_path / "none.png") is None
    good = tmp_path / "x.png"
    make_tissue_image((120, 80), seed=1).save(good)
    items = [
        (str(good), "benign", "malignant", 0.91),
        (str(tmp_path / "missing.png"), "malignant", "benign", 0.64),
    ]
    out = plots.plot_misclassified(items, tmp_path / "mis.png")
    _check_png(out, (3.3 * 2, 2.8))
