"""The real Tk window under Xvfb: open a checkpoint, a folder and an image, take a screenshot."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gui_helpers import SCREEN, assert_screenshot, pump, screenshot
from PIL import Image

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def breakhis_like(tmp_path_factory, estimate) -> tuple[Path, Path]:
    """Twelve 700x460 synthetic BreakHis tiles and a checkpoint whose probabilities spread
    like a trained model's: random weights, the last bias centred on these tiles and a
    temperature that widens the logits, so both classes and some review flags appear."""
    import torch

    from histolens.checkpoint.io import save_checkpoint
    from histolens.data.synth import generate_synthetic
    from histolens.gui.presenter import find_images
    from histolens.inference.predictor import Predictor
    from histolens.testing import make_checkpoint

    root = tmp_path_factory.mktemp("gui")
    generate_synthetic(root, n=12, seed=0)
    data = root / "400X"  # beside it: masks/ and a contact sheet, not tiles
    probe = Predictor.from_checkpoint(make_checkpoint(root / "probe.safetensors", seed=2))
    _, logits, _ = probe.logits_for_paths(find_images(data))
    last = [m for m in probe.model.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias -= float(logits.mean())
    meta = probe.metadata.to_dict()
    meta.update(
        temperature=float(logits.std()) / 1.5,
        metrics={
            "split": "test",
            "roc_auc": 0.934,
            "balanced_accuracy": 0.871,
            "patient_recognition_rate": 0.889,
            "n_images": 1186,
            "n_patients": 17,
        },
        estimate=estimate,
    )
    return data, save_checkpoint(root / "viewer.safetensors", probe.model, meta)


def test_viewer_window_end_to_end(xvfb_display, breakhis_like, image_folder, tmp_path, estimate):
    import tkinter as tk

    from histolens.gui.app import ViewerApp

    data, ckpt = breakhis_like
    root = tk.Tk()
    root.geometry(f"{SCREEN[0]}x{SCREEN[1] - 28}+0+0")  # the menu bar sits above this
    app = ViewerApp(root, ckpt)
    presenter = app.presenter
    try:
        pump(root, lambda: presenter.predictor is not None and not presenter.busy, "the model")
        assert str(app.method_var.get()) == "Grad-CAM"
        # The estimate, with its CI, support and warnings, in the model panel.
        shown = app.performance_text.get("1.0", "end")
        auc, (lo, hi) = estimate["metrics"]["roc_auc"], estimate["ci95"]["roc_auc"]
        assert shown.startswith(f"ROC AUC: {auc:.3f} (95% CI {lo:.2f}-{hi:.2f})\n")
        assert "Support: 66 images of 11 patients (3 benign, 8 malignant)." in shown
        assert "\u26a0 Only 3 benign patients support this estimate at 100X" in shown
        assert "100X: ROC AUC" in shown

        # A wrong checkpoint: a message in the window, the loaded model kept.
        junk = tmp_path / "junk.safetensors"
        junk.write_bytes(b"not a checkpoint")
        app.open_checkpoint(junk)
        pump(root, lambda: not presenter.busy, "the wrong checkpoint")
        assert app.error_message.startswith("Cannot load checkpoint:")
        assert "not a readable histolens checkpoint" in app.error_message
        assert presenter.model_info.backbone == "test_resnet"
        screenshot(xvfb_display, tmp_path / "histolens-gui-error.png")
        app.clear_error()

        # An unreadable image, from a folder with a broken file: a row flagged, no traceback.
        app.open_folder(image_folder)
        pump(
            root,
            lambda: len(app.tree.get_children()) == 6 and not presenter.busy,
            "the small folder's results",
        )
        assert app.tree.set(str(image_folder / "broken.png"), "review") == "unreadable"
        app.open_image(image_folder / "broken.png")
        pump(root, lambda: bool(app.error_message), "the unreadable-image message")
        assert "broken.png: not an image file PIL can read" in app.error_message
        app.clear_error()

        # The realistic folder: 12 tiles, sorted by probability, one clicked.
        started = time.perf_counter()
        app.open_folder(data)
        pump(root, lambda: len(presenter.results) == 12 and not presenter.busy, "the batch")
        batch_seconds = time.perf_counter() - started
        assert float(app.progress.cget("value")) == 0  # reset when done
        assert str(app.status_text.cget("text")).startswith("Analysed 12 images:")
        app.presenter.sort_results("probability")
        rows = app.tree.get_children()
        probs = [float(app.tree.set(r, "probability")) for r in rows]
        assert probs == sorted(probs, reverse=True)
        assert app.tree.heading("probability", "text") == "Probability ▼"
        flagged = [r for r in rows if app.tree.set(r, "review") == "review needed"]
        assert flagged and len(flagged) < len(rows), "some, not all, close to the threshold"
        assert "review" in app.tree.item(flagged[0], "tags")

        app.select_row(flagged[0])
        pump(
            root,
            lambda: (
                presenter.current_path == flagged[0] and "heatmap_s" in presenter.current_timings
            ),
            "the clicked row's heatmap",
        )
        row = next(r for r in presenter.results if r.path == flagged[0])
        assert app.headline.cget("text") == row.label
        assert app.review_badge.winfo_ismapped()
        assert "Review needed" in str(app.review_badge.cget("text"))
        assert str(app.heatmap_panel.title.cget("text")).startswith("HEATMAP  ·  Grad-CAM")
        assert app.heatmap_panel._photo is not None and app.image_panel._photo is not None

        # Opacity is a re-blend: no job is queued.
        app.opacity_var.set(60)
        app._opacity_moved("60")
        assert not presenter.busy
        assert str(app.heatmap_panel.title.cget("text")).endswith("opacity 60%")
        shot = assert_screenshot(root, xvfb_display, tmp_path / "histolens-gui.png")
        with Image.open(shot) as png:
            # Not a blank screen: the dark image canvases and the red notice are drawn.
            colours = png.convert("RGB").resize((144, 90)).getcolors(144 * 90)
            assert len(colours) > 50
        print(
            f"batch of 12 tiles: {batch_seconds:.2f} s; open-to-heatmap (clicked row): "
            f"{presenter.current_timings}"
        )
    finally:
        app.close()


def test_window_shows_refer_and_unlike_badges_with_their_reasons(
    xvfb_display, image_folder, tmp_path
):
    """A calibrated, guarded checkpoint: the Flag column and the prediction panel's badge say
    'refer' (with the set and its alpha) and 'not like the training images' (with the reason)."""
    import tkinter as tk

    from histolens.gui.app import ViewerApp
    from histolens.inference.ood import OODGuard
    from histolens.testing import flat_calibration, make_checkpoint

    ckpt = make_checkpoint(
        tmp_path / "refer.safetensors", conformal=flat_calibration(0.99), guard=OODGuard()
    )
    Image.new("RGB", (96, 64), "white").save(image_folder / "blank.png")
    root = tk.Tk()
    root.geometry(f"{SCREEN[0]}x{SCREEN[1] - 28}+0+0")
    app = ViewerApp(root, ckpt)
    presenter = app.presenter
    try:
        pump(root, lambda: presenter.predictor is not None and not presenter.busy, "the model")
        app.open_folder(image_folder)
        pump(root, lambda: len(presenter.results) == 7 and not presenter.busy, "the results")
        blank, tile = str(image_folder / "blank.png"), str(image_folder / "tile_0.png")
        assert app.tree.set(blank, "review") == "not like the training images"
        assert "unlike" in app.tree.item(blank, "tags")
        assert app.tree.set(tile, "review") == "refer"
        assert "review" in app.tree.item(tile, "tags")

        app.select_row(tile)
        pump(root, lambda: presenter.current_path == tile and not presenter.busy, "the tile")
        badge = app.prediction_panel.review_badge
        assert badge.winfo_ismapped() and str(badge.cget("style")) == "Review.TLabel"
        assert str(badge.cget("text")).startswith("⚑  REFER: {benign, malignant} at α=0.10\n")
        assert app.prediction_panel.set_text.cget("text") == (
            "prediction set {benign, malignant} at α=0.10"
        )

        app.select_row(blank)
        pump(root, lambda: presenter.current_path == blank and not presenter.busy, "the blank")
        assert badge.winfo_ismapped() and str(badge.cget("style")) == "Unlike.TLabel"
        assert str(badge.cget("text")) == (
            "⚑  NOT LIKE THE TRAINING IMAGES\nThe image is nearly uniform (no visible structure)"
        )
        assert str(app.status_text.cget("text")).endswith("·  NOT LIKE THE TRAINING IMAGES")
        assert_screenshot(root, xvfb_display, tmp_path / "histolens-gui-unlike.png")
    finally:
        app.close()
