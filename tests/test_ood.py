"""The out-of-distribution guard: cheap checks of the image, the feature distance to the training
images, and the "not like the training images" flag in predictions, the CSV and the metrics."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw
from safetensors import safe_open

from histolens.checkpoint.io import CheckpointMetadata, read_metadata
from histolens.data.records import ImageRecord
from histolens.errors import CheckpointError
from histolens.inference.ood import FeatureGuard, InputChecks, OODGuard
from histolens.inference.predictor import Predictor
from histolens.models.transforms import Preprocess
from histolens.testing import make_tissue_image, tiny_config
from histolens.training.runner import train

INPUT = (294, 448)  # (height, width), the default model input


def resized(*images: Image.Image, size=INPUT) -> torch.Tensor:
    pre = Preprocess(size, (0.5,) * 3, (0.5,) * 3)
    return torch.stack([pre.resize(img.convert("RGB")) for img in images])


def cat() -> Image.Image:
    from skimage.data import chelsea

    return Image.fromarray(chelsea())


def text_screenshot() -> Image.Image:
    img = Image.new("RGB", (700, 460), "white")
    draw = ImageDraw.Draw(img)
    for i in range(18):
        draw.text(
            (12, 10 + 24 * i), f"line {i}: the quick brown fox jumps over the lazy dog", "black"
        )
    return img


# ------------------------------------------------------------------------------ cheap checks


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1, 1), "1x1 pixels, far smaller than the model's 448x294 input"),
        ((4000, 3), "4000x3 pixels, far smaller"),
        ((2000, 200), "stretched over 4x"),
        ((700, 460), None),  # BreakHis
        ((224, 224), None),  # the 224-px BreakHis copies
    ],
)
def test_size_check(size, expected):
    reason = InputChecks().size_reason(*size, INPUT)
    assert reason is None if expected is None else expected in reason


def test_content_checks_flag_blank_grey_and_text_but_not_tissue():
    from skimage.data import camera

    rng = np.random.default_rng(0)
    images = [
        Image.new("RGB", (700, 460), "white"),
        Image.new("RGB", (700, 460), (12, 12, 12)),
        Image.fromarray(camera()),
        text_screenshot(),
        make_tissue_image((448, 294), seed=1),
        make_tissue_image((448, 294), seed=2, dark=True),
        Image.fromarray(rng.integers(0, 256, (460, 700, 3), dtype=np.uint8)),
    ]
    reasons = InputChecks().content_reasons(resized(*images))
    assert "nearly uniform" in reasons[0] and "nearly uniform" in reasons[1]
    assert "no H&E-like" in reasons[2] and "no H&E-like" in reasons[3]
    # Tissue passes; so does noise, whose colours are everywhere: the feature check's job.
    assert reasons[4:] == [None, None, None]


# ---------------------------------------------------------------------------- feature guard


def grouped_gaussian(n_groups=30, per_group=20, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    cov = np.diag(np.linspace(0.2, 5.0, dim))
    x = rng.multivariate_normal(np.arange(dim, dtype=float), cov, n_groups * per_group)
    groups = np.repeat(np.arange(n_groups), per_group)
    return x, groups


def test_distance_is_the_ledoit_wolf_mahalanobis_distance_of_standardised_features():
    from sklearn.covariance import LedoitWolf

    x, _ = grouped_gaussian()
    guard = FeatureGuard.fit(x)
    z = (x - x.mean(0)) / x.std(0)
    expected = np.sqrt(LedoitWolf(assume_centered=True).fit(z).mahalanobis(z))
    np.testing.assert_allclose(guard.distance(x), expected, rtol=1e-6)
    np.testing.assert_allclose(guard.distance(torch.as_tensor(x[:5])), expected[:5], rtol=1e-6)


def test_limit_comes_from_held_out_patients_and_flags_far_images():
    from histolens.training.probe import group_folds

    x, groups = grouped_gaussian()
    folds = group_folds(np.zeros(len(x), int) + groups % 2, groups, 5, 0)
    guard, held_out = FeatureGuard.calibrated(x, folds, quantile=0.95)
    assert not np.isnan(held_out).any()
    assert guard.threshold == pytest.approx(np.quantile(held_out, 0.95))
    assert guard.held_out_flag_rate == pytest.approx(0.05, abs=0.005)
    # Held-out distances run larger than those of the images the statistics were fitted on.
    assert np.median(held_out) > np.median(guard.distance(x))
    new, _ = grouped_gaussian(seed=1)
    assert (guard.distance(new) > guard.threshold).mean() < 0.1
    far = new + 6 * new.std(0)
    reasons = guard.reasons(far)
    assert all(r and "features are far from the training images'" in r for r in reasons)


def test_guard_round_trips_through_a_checkpoint_state():
    x, _ = grouped_gaussian(dim=5)
    guard = OODGuard(features=FeatureGuard.fit(x, threshold=7.5))
    state = {"head.out.weight": torch.zeros(1, 5), **guard.state_dict()}
    meta = CheckpointMetadata(
        "test_resnet", ("benign", "malignant"), Preprocess(INPUT, (0.5,) * 3, (0.5,) * 3)
    )
    with_guard = dataclasses.replace(meta, ood=guard.to_dict())
    back = OODGuard.from_checkpoint(state, with_guard)
    assert set(state) == {"head.out.weight"}  # the guard's tensors are taken out
    assert back.features.threshold == 7.5 and back.checks == guard.checks
    np.testing.assert_allclose(back.features.distance(x), guard.features.distance(x), rtol=1e-5)
    assert OODGuard.from_checkpoint({}, meta) is None
    with pytest.raises(CheckpointError, match="out-of-distribution guard is damaged"):
        OODGuard.from_checkpoint({}, with_guard)


# ------------------------------------------------------------------- trained on synthetic tiles

PROBE = {
    "model.head": "linear",
    "train.cv_folds": 3,
    "model.input_size": (120, 176),
    "train.probe_cs": (0.01,),
}


@pytest.fixture(scope="module")
def guarded(synth_small, tmp_path_factory):
    run = tmp_path_factory.mktemp("ood") / "run"
    train(tiny_config(synth_small, **PROBE), run, progress=False, evaluate=False)
    return run


@pytest.fixture(scope="module")
def new_patients(tmp_path_factory):
    """Synthetic tiles of patients the model never saw (another seed)."""
    from histolens.data.synth import generate_synthetic

    out = tmp_path_factory.mktemp("new") / "data"
    generate_synthetic(out, n=12, seed=11, size=(176, 120), n_patients=4)
    return sorted(out.glob("*X/*/*.png"))  # not the masks, nor the contact sheet


def test_training_stores_the_guard(guarded):
    meta = read_metadata(guarded)
    features = meta.ood["features"]
    assert features["n_images"] == 32 and features["threshold"] > 0
    assert features["quantile"] == 0.99
    with safe_open(str(guarded / "best.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    dim = features["feature_dim"]
    assert {"ood.mean", "ood.scale", "ood.precision"} <= keys
    with safe_open(str(guarded / "best.safetensors"), framework="pt") as fh:
        assert tuple(fh.get_tensor("ood.precision").shape) == (dim, dim)


def test_cat_photo_and_white_tile_are_flagged_and_new_tiles_are_not(guarded, new_patients):
    predictor = Predictor.from_checkpoint(guarded)
    flagged = predictor.predict_images(
        [cat(), Image.new("RGB", (176, 120), "white"), Image.new("RGB", (1, 1), (200, 80, 160))]
    )
    for pred in flagged:
        assert pred.ood and pred.refer and pred.uncertain
        assert pred.refer_reason.startswith("not like the training images: ")
    assert "nearly uniform" in flagged[1].ood_reason
    assert "1x1 pixels" in flagged[2].ood_reason
    tiles, skipped = predictor.predict_paths(new_patients)
    assert not skipped
    assert [p.ood_reason for p in tiles if p.ood] == []


def test_predict_csv_marks_unlike_images(guarded, new_patients, tmp_path):
    from histolens.cli.commands import main

    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.new("RGB", (176, 120), "white").save(folder / "a_white.png")
    cat().save(folder / "b_cat.jpg")
    Image.new("RGB", (4000, 3), (200, 80, 160)).save(folder / "c_sliver.png")
    Image.open(new_patients[0]).save(folder / "d_tile.png")
    out = tmp_path / "predictions.csv"
    res = CliRunner().invoke(main, ["predict", str(guarded), str(folder), "--out", str(out)])
    assert res.exit_code == 0, res.output
    with open(out, newline="", encoding="utf-8") as fh:
        rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(fh)}
    assert [rows[n]["ood"] for n in sorted(rows)] == ["1", "1", "1", "0"]
    assert "4000x3 pixels" in rows["c_sliver.png"]["ood_reason"]
    assert rows["d_tile.png"]["ood_reason"] == ""
    assert all(rows[n]["uncertain"] == "1" for n in ("a_white.png", "b_cat.jpg"))


def test_evaluation_counts_unlike_images_apart(guarded, new_patients, tmp_path):
    from histolens.evaluation.evaluate import evaluate_checkpoint

    white = tmp_path / "white.png"
    Image.new("RGB", (176, 120), "white").save(white)
    records = [
        ImageRecord(str(p), "malignant" if "/malignant/" in str(p) else "benign", group=f"g{i % 4}")
        for i, p in enumerate(new_patients)
    ]
    records.append(ImageRecord(str(white), "benign", group="g9"))
    result, _ = evaluate_checkpoint(guarded, records, n_boot=0, progress=False)
    refer = result.metrics.refer
    assert refer.n_ood == 1 and refer.ood_reasons == {"the image is nearly uniform": 1}
    assert result.metrics.n_images == len(records)  # headline metrics keep every image
    assert sum(r.ood for r in result.rows) == 1 and result.rows[-1].ood


# ------------------------------------------------------------------------- real histology


@pytest.mark.real_data
def test_real_tiles_of_new_patients_pass_and_a_cat_does_not(real_data, tmp_path):
    """Lite0 (ImageNet weights) at 224 px trained on the 100X images of most patient groups;
    the 100X images (37) of four held-out groups are not flagged, a cat photo and a white tile are."""
    from histolens.config import recipe_config
    from histolens.data.records import discover, filter_records
    from histolens.data.splits import Split

    records = filter_records(discover(real_data / "manifest.csv").records, "all", "binary")
    records = [r for r in records if r.magnification == 100]
    # Two benign and two malignant groups held out.
    held = {
        g
        for label in ("benign", "malignant")
        for g in sorted({r.group for r in records if r.label == label})[:2]
    }
    split = Split(
        [r for r in records if r.group not in held],
        [],
        [r for r in records if r.group in held],
        True,
    )
    cfg = recipe_config("default").override(
        {
            "data.path": str(real_data / "manifest.csv"),
            "model.input_size": None,
            "stain.method": "none",
        }
    )
    run = tmp_path / "run"
    train(cfg, run, split=split, progress=False, write_outputs=False)
    predictor = Predictor.from_checkpoint(run)
    preds, _ = predictor.predict_paths([r.path for r in split.test])
    flagged = [p.path for p in preds if p.ood]
    assert len(preds) >= 30 and len(flagged) <= 0.02 * len(preds), flagged
    cat_pred, white_pred = predictor.predict_images([cat(), Image.new("RGB", (700, 460), "white")])
    assert cat_pred.ood and white_pred.ood
    # The cat passes the cheap checks; the feature distance catches it.
    assert "features are far" in cat_pred.ood_reason


def test_the_flag_survives_the_web_round_trip(guarded, new_patients):
    """/v1/predict JSON carries the prediction set, the referral and the guard's flag."""
    import io

    pytest.importorskip("fastapi", reason="the web extra (fastapi) is not installed")
    from fastapi.testclient import TestClient

    from histolens.web.app import create_app

    def png(image: Image.Image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    white = png(Image.new("RGB", (176, 120), "white"))
    tile = new_patients[0].read_bytes()
    with TestClient(create_app(guarded)) as client:
        flagged = client.post("/v1/predict", files={"file": ("white.png", white, "image/png")})
        kept = client.post("/v1/predict", files={"file": ("tile.png", tile, "image/png")})
    assert flagged.status_code == 200 and kept.status_code == 200, flagged.text + kept.text
    body = flagged.json()
    assert body["ood"] is True and body["refer"] is True and body["uncertain"] is True
    assert "nearly uniform" in body["ood_reason"]
    assert body["refer_reason"].startswith("not like the training images")
    ok = kept.json()
    assert ok["ood"] is False and ok["ood_reason"] is None
    assert ok["class"] in ok["prediction_set"] and ok["alpha"] == pytest.approx(0.1)
    assert ok["refer"] == (len(ok["prediction_set"]) > 1)
