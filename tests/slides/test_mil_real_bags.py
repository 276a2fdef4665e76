"""MIL on bags of real (synthetic) slide images: ``data synth --slides N --patients P`` ->
``slide features`` -> ``train --slides`` -> ``predict``, at small scale, and the pointing game
on the masks."""

from __future__ import annotations

import csv

import h5py
import numpy as np
from click.testing import CliRunner
from PIL import Image

from histolens.cli.commands import main

FAST = ["--tile-mpp", "1.0", "--tile-size", "96", "--batch-size", "32", "--quiet", "--workers", "0"]


def test_synthetic_cohort_to_mil_run(tmp_path, tiny_checkpoint):
    from histolens.slides.synthetic_cohort import pointing_game
    from histolens.training.mil_run import load_mil

    out = tmp_path / "cohort"
    args = ["data", "synth", str(out), "--slides", "8", "--patients", "4"]
    result = CliRunner().invoke(main, [*args, "--slide-size", "2048x2048", "--seed", "3"])
    assert result.exit_code == 0, result.output
    with open(out / "slides" / "slides.csv", newline="") as fh:
        manifest = list(csv.DictReader(fh))
    assert len(manifest) == 8 and len({r["patient"] for r in manifest}) == 4
    for r in manifest:  # a patient's slides share its label; lesions 1%-20% of the tissue
        frac = float(r["lesion_fraction"])
        assert (0.005 < frac <= 0.2) if r["label"] == "tumour" else frac == 0.0, r
    assert {r["label"] for r in manifest} == {"tumour", "normal"}

    bags = out / "bags"
    args = ["slide", "features", str(tiny_checkpoint), str(out / "slides"), "--out", str(bags)]
    result = CliRunner().invoke(main, [*args, *FAST])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    args = ["train", "--slides", str(out / "slides" / "labels.csv"), "--out", str(run)]
    result = CliRunner().invoke(main, [*args, "--cv-folds", "2", "--epochs", "3"])
    assert result.exit_code == 0, result.output
    _, meta = load_mil(run)
    assert meta["estimate"]["n_images"] == 8 and meta["estimate"]["n_patients"] == 4
    assert meta["features"]["checkpoint"] == str(tiny_checkpoint.resolve())
    # "tumour" sorts after "normal": the positive class, as sensitivity and referral need.
    assert meta["class_names"] == ["normal", "tumour"] and meta["positive_class"] == "tumour"
    # 4 patients: too few for an inner validation split, so fixed epochs, said in one line.
    training = meta["metrics"]["training"]
    assert [f["epochs"] for f in training["folds"]] == [3, 3]
    assert training["final"]["early_stopping"] is False
    assert result.output.count("No early stopping for fold 1, fold 2, the final model") == 1

    # The MIL checkpoint predicts a slide: class, calibrated probability, set, attention map.
    slide = out / "slides" / f"{manifest[0]['slide']}"
    preds = tmp_path / "preds.csv"
    args = ["predict", str(run), str(slide), "--out", str(preds), "--workers", "1", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with open(preds, newline="") as fh:
        (pred,) = list(csv.DictReader(fh))
    assert pred["prediction"] in ("tumour", "normal") and 0 <= float(pred["p_tumour"]) <= 1
    assert pred["prediction"] in pred["prediction_set"].split(";")
    assert (tmp_path / "preds" / "heatmaps" / f"{slide.stem}.attention.png").is_file()

    # The pointing game's geometry: a weight put on a tile whose centre is on the lesion mask
    # scores a hit, on a tile far from it a miss.
    row = max(manifest, key=lambda r: float(r["lesion_fraction"]))
    name = row["slide"].removesuffix(".tiff")
    lesion = np.asarray(Image.open(out / "slides" / "masks" / f"{name}.planted.png")) > 0
    with h5py.File(bags / "h5" / f"{name}.h5", "r") as f:
        coords = f["coords"][:]
        size = tuple(int(v) for v in f.attrs["patch_size_level0"])
    step = int(row["truth_step"])
    centres = (coords + np.array(size) // 2) // step
    on = lesion[centres[:, 1], centres[:, 0]]
    assert on.any() and not on.all(), (row, len(coords))
    for expected in (True, False):
        weights = np.where(on == expected, 1.0, 0.0)
        weights[np.flatnonzero(on == expected)[0]] = 2.0
        assert pointing_game(coords, size, weights, lesion, step) is expected
