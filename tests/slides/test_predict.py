"""``histolens slide predict``, ``merge`` and ``explain`` on small synthetic slides."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from histolens.cli.commands import main

# The tiny test model takes 160 x 160 inputs; at 1 um/px a tile is 320 level-0 px of a
# 0.5 um/px slide, so the small slides hold a few dozen tiles.
FAST = ["--tile-mpp", "1.0", "--batch-size", "4", "--quiet"]


def _predict(args, workers="0"):
    return CliRunner().invoke(main, ["slide", "predict", *args, *FAST, "--workers", workers])


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, tiny_checkpoint, small_slides):
    out = tmp_path_factory.mktemp("slide-out") / "out"
    result = _predict(
        [str(tiny_checkpoint), str(small_slides), "--out", str(out), "--save-features"], workers="2"
    )
    assert result.exit_code == 0, result.output
    return out, result


def test_outputs_of_one_run(predicted, small_slides):
    out, result = predicted
    assert "2 slide(s) in" in result.output
    rows = list(csv.DictReader((out / "slides.csv").read_text(encoding="utf-8").splitlines()))
    assert [r["slide"] for r in rows] == ["slide0", "slide1"]
    for row in rows:
        name = row["slide"]
        with h5py.File(out / "h5" / f"{name}.h5", "r") as f:
            coords, probs, score = f["coords"][:], f["probabilities"][:], f["score"][:]
            n = int(row["tiles_scored"])
            assert coords.shape == (n, 2) and coords.dtype == np.int64 and n > 5
            assert probs.shape == (n, 2) and np.isfinite(probs).all()
            np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)  # float32 softmax rounding
            np.testing.assert_array_equal(score, probs[:, 1])
            assert f["features"].shape[0] == n and f["features"].shape[1] > 0
            assert f["ood"].shape == (n,)
            attrs = f["coords"].attrs
            assert tuple(attrs["patch_size_level0"]) == (320, 320)  # 160 px at 1 um over 0.5 um/px
            assert attrs["patch_level"] == 0 and attrs["patch_size"] == 320
            assert attrs["slide_mpp"] == pytest.approx(0.5, rel=1e-4)
            assert attrs["tile_mpp"] == pytest.approx(1.0)
            assert len(attrs["checkpoint_fingerprint"]) == 64
            assert attrs["checkpoint_fingerprint"] == row["fingerprint"]
            assert (coords % 320 == 0).all()  # a non-overlapping grid from the origin
        threshold = float(row["threshold"])
        above = score >= threshold
        assert float(row["score_mean"]) == pytest.approx(float(score.mean()), abs=1e-5)
        assert float(row["score_max"]) == pytest.approx(float(score.max()), abs=1e-5)
        top = np.sort(score)[::-1][: int(row["top_k"])].mean()
        assert float(row["score_topk_mean"]) == pytest.approx(float(top), abs=1e-5)
        assert int(row["tiles_above_threshold"]) == int(above.sum())
        assert float(row["tissue_mm2"]) > 0.2
        geo = json.loads((out / "geojson" / f"{name}.geojson").read_text())
        assert geo["type"] == "FeatureCollection" and len(geo["features"]) == int(above.sum())
        if geo["features"]:
            ring = geo["features"][0]["geometry"]["coordinates"][0]
            x, y = ring[0]
            assert ring == [[x, y], [x + 320, y], [x + 320, y + 320], [x, y + 320], [x, y]]
            assert geo["features"][0]["properties"]["classification"]["name"] == "malignant"
        heat = Image.open(out / "heatmaps" / f"{name}.png")
        assert heat.format == "PNG" and heat.width > 300
        mask = np.asarray(Image.open(out / "masks" / f"{name}.png"))
        assert set(np.unique(mask)) <= {0, 255} and mask.any()


def test_second_run_skips_finished_slides(predicted, tiny_checkpoint, small_slides):
    out, _ = predicted
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")}
    result = _predict([str(tiny_checkpoint), str(small_slides), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("already done with this checkpoint") == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")} == before


def test_interrupted_slide_resumes_at_its_next_batch(
    tmp_path, tiny_checkpoint, small_slides, monkeypatch, predicted
):
    from histolens.inference.predictor import Predictor
    from histolens.slides import tiles
    from histolens.slides.predict import SlideOptions, SlideRun

    slide = small_slides / "slide1.tiff"
    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    options = SlideOptions(tile_mpp=1.0, batch_size=4, workers=0)
    real = tiles.score_batch
    calls = []

    def stop_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tiles, "score_batch", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        SlideRun(predictor, tmp_path, options, progress=False).predict_slide(slide)
    partial = tmp_path / "h5" / ".slide1.h5.partial"
    with h5py.File(partial, "r") as f:
        assert f.attrs["done"] == 8
    monkeypatch.setattr(tiles, "score_batch", real)
    resumed = SlideRun(predictor, tmp_path, options, progress=False)
    seen = []
    monkeypatch.setattr(
        tiles, "score_batch", lambda p, b, *rest: (seen.append(len(b)), real(p, b, *rest))[1]
    )
    summary = resumed.predict_slide(slide)
    assert not partial.exists()
    assert sum(seen) == summary.tiles_scored - 8  # only the tiles not yet scored
    with (
        h5py.File(tmp_path / "h5" / "slide1.h5", "r") as f1,
        h5py.File(predicted[0] / "h5" / "slide1.h5", "r") as f2,
    ):
        # Same model, same tiles, same batch size: the same numbers.
        np.testing.assert_allclose(f1["score"][:], f2["score"][:], atol=1e-6)


def test_two_shards_in_two_processes_then_merge(tmp_path, tiny_checkpoint, small_slides):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    cmd = [
        sys.executable,
        "-m",
        "histolens.cli.commands",
        "slide",
        "predict",
        str(tiny_checkpoint),
        str(small_slides),
        "--out",
        str(out),
        *FAST,
        "--workers",
        "0",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, "--shard", f"{i}/2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert "slide0:" in outputs[0] and "slide1:" in outputs[1]
    assert not (out / "slides.csv").exists()
    result = CliRunner().invoke(main, ["slide", "merge", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "slides.csv").read_text(encoding="utf-8").splitlines()))
    assert [r["slide"] for r in rows] == ["slide0", "slide1"]


def test_bad_inputs_get_one_line(tmp_path, tiny_checkpoint, small_slides):
    missing = _predict([str(tiny_checkpoint), str(tmp_path / "nope.svs"), "--out", str(tmp_path)])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    assert "Traceback" not in missing.output
    (tmp_path / "bad.svs").write_bytes(b"not a slide at all" * 10)
    bad = _predict([str(tiny_checkpoint), str(tmp_path / "bad.svs"), "--out", str(tmp_path / "o")])
    assert bad.exit_code == 1 and "bad.svs: skipped:" in bad.output
    assert "not a slide format OpenSlide reads" in bad.output
    shard = _predict(
        [str(tiny_checkpoint), str(small_slides), "--out", str(tmp_path), "--shard", "2/2"]
    )
    assert shard.exit_code == 1 and "I must be from 0 to N-1" in shard.output
    empty = CliRunner().invoke(main, ["slide", "merge", str(tmp_path)])
    assert empty.exit_code == 1 and "nothing to merge" in empty.output


def test_explain_top_tiles(predicted, tiny_checkpoint, small_slides, tmp_path):
    out, _ = predicted
    result = CliRunner().invoke(
        main,
        [
            "slide",
            "explain",
            str(tiny_checkpoint),
            str(small_slides / "slide0.tiff"),
            "--top",
            "2",
            "--results",
            str(out),
            "--out",
            str(tmp_path),
            "--tile-mpp",
            "1.0",
        ],
    )
    assert result.exit_code == 0, result.output
    pngs = sorted(tmp_path.glob("slide0_x*_y*_gradcam.png"))
    assert len(pngs) == 2
    assert Image.open(pngs[0]).size == (320, 320)  # the tile at full (level-0) resolution
    with h5py.File(out / "h5" / "slide0.h5", "r") as f:
        best = f["coords"][int(np.argmax(f["score"][:]))]
    assert (tmp_path / f"slide0_x{best[0]}_y{best[1]}_gradcam.png").exists()
    at = CliRunner().invoke(
        main,
        [
            "slide",
            "explain",
            str(tiny_checkpoint),
            str(small_slides / "slide0.tiff"),
            "--at",
            "99999,0",
            "--out",
            str(tmp_path),
        ],
    )
    assert at.exit_code == 1 and "lies outside" in at.output


def test_slide_help_loads_no_heavy_library(modules_after_help):
    """`histolens slide predict --help` stays instant: no torch, OpenSlide or HDF5 loaded."""
    loaded, _ = modules_after_help(["slide", "predict", "--help"], ["torch", "openslide", "h5py"])
    assert loaded == []


def test_single_threaded_input_scores_the_same_and_restores_the_threads(tiny_checkpoint):
    """The slide loop computes the model input on one thread while reading workers run; the
    scores are those of the multi-threaded step (the same operations; reductions in the stain
    step may sum in another order: float32 rounding, far under 1e-6 of a probability) and
    PyTorch's thread count is restored afterwards."""
    import torch

    from histolens.inference.predictor import Predictor
    from histolens.slides.tiles import _torch_threads, score_batch

    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    h, w = predictor.preprocess.input_size
    batch = torch.randint(0, 256, (6, 3, h, w), generator=torch.Generator().manual_seed(0))
    batch = batch.to(torch.uint8)
    before = torch.get_num_threads()
    with torch.inference_mode():
        many = score_batch(predictor, batch)
        one = score_batch(predictor, batch, single_threaded_input=True)
    assert torch.get_num_threads() == before
    np.testing.assert_allclose(one.probabilities, many.probabilities, atol=1e-6, rtol=0)
    assert (one.ood == many.ood).all() and (one.refer == many.refer).all()
    with _torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
