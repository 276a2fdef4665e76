"""``histolens explain`` (explain_command) and the faithfulness metrics."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from histolens.cli.explain import OPACITY_RENAMED, explain_command
from histolens.explain.faithfulness import (
    deletion_insertion_auc,
    mask_iou,
    pointing_game,
    random_heatmap,
    road_score,
)
from histolens.testing import make_tissue_image


def _invoke(*args: str):
    return CliRunner().invoke(explain_command, [str(a) for a in args], catch_exceptions=False)


def _faithfulness_rows(checkpoint, data, methods: str, out) -> dict[str, dict]:
    """`explain --evaluate` of ``methods`` on 16 images of ``data`` (no ROAD): its rows by method."""
    args = ["--evaluate", "-m", methods, "--max-images", "16", "--no-road", "--out", out]
    result = _invoke(checkpoint, data, *args, "--quiet")
    assert result.exit_code == 0, result.output
    return {r["method"]: r for r in json.loads((out / "faithfulness.json").read_text())["rows"]}


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    make_tissue_image((140, 92), seed=1).save(root / "a" / "x.png")
    make_tissue_image((120, 80), seed=2, dark=True).save(root / "b" / "x.png")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_corrupt_image_gives_one_line_error(tmp_path, tiny_checkpoint):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    result = CliRunner().invoke(
        explain_command, [str(tiny_checkpoint), str(bad), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "bad.png" in lines[0]
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_a_one_line_error(tmp_path, tiny_checkpoint):
    img = tmp_path / "x.png"
    make_tissue_image().save(img)
    result = CliRunner().invoke(explain_command, [str(tiny_checkpoint), str(img), "-m", "gradcm"])
    assert result.exit_code == 1
    assert "Did you mean 'gradcam'" in result.output and len(result.output.splitlines()) == 1


def test_a_folder_without_images_is_a_one_line_error(tmp_path, tiny_checkpoint):
    (tmp_path / "data" / "masks").mkdir(parents=True)
    make_tissue_image().save(tmp_path / "data" / "masks" / "x_mask.png")  # masks are not images
    result = CliRunner().invoke(explain_command, [str(tiny_checkpoint), str(tmp_path / "data")])
    assert result.exit_code == 1
    assert result.output.startswith("error: No images in") and len(result.output.splitlines()) == 1


def test_the_old_alpha_spelling_is_refused_naming_opacity(tmp_path, tiny_checkpoint, folder):
    # --alpha is the conformal error level everywhere else; explain's opacity is --opacity.
    result = _invoke(tiny_checkpoint, folder, "--out", tmp_path / "out", "--alpha", "0.3")
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"error: {OPACITY_RENAMED}"]
    assert "--opacity" in OPACITY_RENAMED and not (tmp_path / "out").exists()


def test_folder_writes_heatmaps_overlays_panels_and_index(tmp_path, tiny_checkpoint, folder):
    out = tmp_path / "out"
    options = ("-m", "gradcam,eigencam", "--opacity", "0.3", "--quiet")
    result = _invoke(tiny_checkpoint, folder, "--out", out, *options)
    assert result.exit_code == 0, result.output
    assert "4 heatmap(s) of 2 image(s)" in result.output
    assert "skipped" in result.output and "broken.png" in result.output
    heat = np.load(out / "a__x_gradcam_heatmap.npy")
    assert heat.shape == (92, 140) and heat.dtype == np.float32
    assert np.load(out / "b__x_eigencam_heatmap.npy").shape == (80, 120)
    assert Image.open(out / "a__x_gradcam_overlay.png").size == (140, 92)
    assert Image.open(out / "b__x_eigencam_panel.png").mode == "RGB"
    index = (out / "index.csv").read_text().splitlines()
    assert len(index) == 1 + 4 + 1  # header, 4 maps, 1 skipped row
    assert "skipped: " in (out / "index.csv").read_text()
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temp files


def test_default_output_is_next_to_the_checkpoint(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "run" / "best.safetensors"
    ckpt.parent.mkdir()
    shutil.copy(tiny_checkpoint, ckpt)
    img = tmp_path / "x.png"
    make_tissue_image().save(img)
    result = _invoke(ckpt.parent, img, "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "explanations" / "x_gradcam_panel.png").is_file()


def test_target_class_explains_that_class_whatever_the_prediction(tmp_path, tiny_checkpoint):
    img = tmp_path / "x.png"
    make_tissue_image((120, 80), seed=3).save(img)
    heatmaps, rows = {}, {}
    for target in ("benign", "malignant"):
        out = tmp_path / target
        result = _invoke(tiny_checkpoint, img, "--target-class", target, "--out", out, "--quiet")
        assert result.exit_code == 0, result.output
        [rows[target]] = list(csv.DictReader((out / "index.csv").open(encoding="utf-8")))
        heatmaps[target] = np.load(out / "x_gradcam_heatmap.npy")
    assert rows["benign"]["target_class"] == "benign"
    assert rows["malignant"]["target_class"] == "malignant"
    assert rows["benign"]["prediction"] == rows["malignant"]["prediction"]  # one prediction
    assert not np.allclose(heatmaps["benign"], heatmaps["malignant"])  # two explanations
    bad = CliRunner().invoke(
        explain_command, [str(tiny_checkpoint), str(img), "--target-class", "tumour"]
    )
    assert bad.exit_code == 1
    assert bad.output == "error: Unknown target class 'tumour'; choose one of: benign, malignant.\n"


def test_split_needs_a_run_with_split_csv(tmp_path, tiny_checkpoint):
    result = CliRunner().invoke(explain_command, [str(tiny_checkpoint), "--split", "test"])
    assert result.exit_code == 2
    assert "--split needs a run directory with split.csv" in result.output
    assert not (tiny_checkpoint.parent / "explanations").exists()


def test_split_of_a_cross_validated_run_says_to_use_all(tmp_path, tiny_checkpoint, synth_small):
    from histolens.data.records import discover
    from histolens.data.splits import Split

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_checkpoint, run / "best.safetensors")
    # A cross-validated run: every patient trained the final model, none is held out.
    Split(discover(synth_small).records, [], []).write_csv(run / "split.csv")
    for side in ("test", "val"):
        result = CliRunner().invoke(explain_command, [str(run), "--split", side])
        assert result.exit_code == 2
        assert f"has no {side} images: the run was cross-validated" in result.output
        assert "Use --split all" in result.output
    result = _invoke(run, "--split", "all", "--limit", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert "2 heatmap(s) of 2 image(s)" in result.output


def test_evaluate_writes_the_faithfulness_table(tmp_path, tiny_checkpoint, synth_small):
    out = tmp_path / "ev"
    rows = _faithfulness_rows(tiny_checkpoint, synth_small, "gradcam,eigencam", out)
    assert list(rows) == ["gradcam", "eigencam", "random"]
    for r in rows.values():
        assert set(r) >= {"deletion_auc", "insertion_auc", "road", "pointing_game", "iou", "n"}
        assert r["n"] == 16 and r["road"] is None
        assert r["n_masks"] == 8  # the 8 malignant images of 16 carry lesion masks
        assert 0 <= r["deletion_auc"] <= 1 and 0 <= r["insertion_auc"] <= 1
    # On the synthetic lesions a CAM beats the smooth random map: EigenCAM's peak falls in the
    # lesion on 7 of 8 images against the random map's 3 (here a margin of 2 images is asked).
    # Grad-CAM needs a model that has learnt the lesions: this untrained one scores 1 of 8.
    eigen, random = rows["eigencam"], rows["random"]
    assert eigen["pointing_game"] >= random["pointing_game"] + 2 / 8
    assert eigen["iou"] > random["iou"] + 0.2
    assert (out / "faithfulness.csv").read_text().startswith("method,deletion_auc")


# --- metric functions --------------------------------------------------------------------
class _LeftTexture(torch.nn.Module):
    """A 'model' whose logit is the fine texture of the image's left half, nothing else."""

    def forward(self, x):
        left = x[:, :, :, : x.shape[-1] // 2]
        return (left[..., 1:] - left[..., :-1]).abs().mean(dim=(1, 2, 3))[:, None] * 4 - 2


def _left_and_right_maps() -> tuple[np.ndarray, np.ndarray]:
    good = np.zeros((32, 32), np.float32)
    good[:, :16] = np.linspace(1.0, 0.5, 16)  # graded, so percentiles split it cleanly
    bad = np.zeros((32, 32), np.float32)
    bad[:, 16:] = np.linspace(0.5, 1.0, 16)
    return good, bad


def test_deletion_and_insertion_reward_the_right_map():
    torch.manual_seed(0)
    model, x = _LeftTexture(), torch.randn(1, 3, 32, 32)
    good, bad = _left_and_right_maps()

    def score(out):
        return torch.sigmoid(out[:, 0])

    d_good, i_good = deletion_insertion_auc(model, x, good, score, steps=10)
    d_bad, i_bad = deletion_insertion_auc(model, x, bad, score, steps=10)
    assert d_good < d_bad - 0.1
    assert i_good > i_bad + 0.1


def test_road_rewards_the_right_map():
    torch.manual_seed(0)
    model, x = _LeftTexture(), torch.randn(1, 3, 32, 32)
    good, bad = _left_and_right_maps()

    def target(out):
        return out[..., 0]

    assert road_score(model, x, good, target, (50,)) > road_score(model, x, bad, target, (50,))


def test_pointing_game_and_iou():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    heat = np.zeros((10, 10), np.float32)
    heat[3, 3] = 1
    assert pointing_game(heat, mask) == 1.0
    assert pointing_game(1 - heat, mask) == 0.0
    assert mask_iou(mask.astype(np.float32), mask) == 1.0
    assert mask_iou(1 - mask.astype(np.float32), mask) == 0.0
    # A lesion-free image (benign synthetic tile) has nothing to point at: not scored, not a miss.
    empty = np.zeros((10, 10), bool)
    assert np.isnan(pointing_game(heat, empty)) and np.isnan(mask_iou(heat, empty))
    r = random_heatmap((10, 20), seed=1)
    assert r.shape == (10, 20) and r.std() > 0


@pytest.mark.slow
def test_trained_gradcam_beats_random_on_the_pointing_game(tmp_path):
    """A Lite0 model trained on synthetic data points at the lesion more often than chance."""
    from histolens.cli.commands import main
    from histolens.data import synth
    from histolens.data.imagefiles import images_under
    from histolens.explain import Explainer
    from histolens.explain.faithfulness import evaluate_faithfulness
    from histolens.inference.predictor import Predictor

    data = tmp_path / "data"
    synth.generate_synthetic(data, n=96, seed=5)
    run = tmp_path / "run"
    train = CliRunner().invoke(
        main,
        [
            "train",
            "--data",
            str(data),
            "--backbone",
            "tf_efficientnet_lite0",
            # The backbone's own 224x224 input and last layer: the CAM sees the same layer at
            # the same scale as the classifier, and the test stays fast.
            "--input-size",
            "pretrained",
            "--feature-layer",
            "last",
            "--stain-norm",
            "none",
            "--cv-folds",
            "2",
            "--out",
            str(run),
            "--quiet",
        ],
    )
    if train.exit_code != 0 and "Lite0" in train.output and "not installed" in train.output:
        pytest.skip("Lite0 ImageNet weights package not installed")
    assert train.exit_code == 0, train.output
    # The images `explain --evaluate --max-images 16` would take (tests above run that command);
    # the localisation scores do not depend on the deletion/insertion curves' steps, so the
    # curves are kept short: at the default 20 steps they took 24 of this test's 45 s.
    images = images_under(data)
    images = [images[int(i)] for i in np.linspace(0, len(images) - 1, 16).round()]
    with Explainer(Predictor.from_checkpoint(run)) as explainer:
        table = evaluate_faithfulness(explainer, images, ["gradcam"], steps=2, road=False)
    rows = {r.method: r.as_dict() for r in table}
    assert rows["gradcam"]["n_masks"] >= 6
    assert rows["gradcam"]["pointing_game"] > rows["random"]["pointing_game"]
    assert rows["gradcam"]["iou"] > rows["random"]["iou"]


def test_split_option_explains_the_runs_test_images(trained_run, tmp_path):
    from click.testing import CliRunner

    from histolens.cli.explain import explain_command

    run, _ = trained_run
    out = tmp_path / "x"
    res = CliRunner().invoke(
        explain_command, [str(run), "--split", "test", "--limit", "2", "--out", str(out), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("*_panel.png"))) == 2
    res = CliRunner().invoke(explain_command, [str(run)])
    assert res.exit_code == 2 and "IMAGE_OR_FOLDER or --split" in res.output


def test_layers_option_chooses_the_cam_layer_and_names_a_missing_one(trained_run, tmp_path):
    run, _ = trained_run
    maps = {}
    for layers in (None, "layer1"):
        out = tmp_path / str(layers)
        extra = ["--layers", layers] if layers else []
        res = _invoke(run, "--split", "test", "--limit", "1", *extra, "--out", out, "--quiet")
        assert res.exit_code == 0, res.output
        maps[layers] = np.load(next(out.glob("*_gradcam_heatmap.npy")))
    assert maps[None].shape == maps["layer1"].shape
    assert not np.allclose(maps[None], maps["layer1"], atol=1e-3)  # another layer, another map
    res = _invoke(run, "--split", "test", "--limit", "1", "--layers", "nosuch", "--quiet")
    assert res.exit_code == 1 and "no layer 'nosuch'" in res.output
