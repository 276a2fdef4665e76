"""Predicting at scale: listing order, resuming a killed run, refusing to mix models, progress."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
from click.testing import CliRunner
from predictions_helpers import assert_predictions_close

from histolens.cli.commands import main
from histolens.data.imagefiles import images_under
from histolens.errors import ConfigError
from histolens.inference.batch import (
    PredictionJob,
    ProgressReporter,
    prediction_columns,
)
from histolens.inference.predictor import Predictor
from histolens.testing import make_checkpoint, make_tissue_image, stratified_calibration


class _Stop(Exception):
    """Raised by a progress callback to stop a run after some batches, as a kill would."""


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.from_checkpoint(make_checkpoint(tmp_path_factory.mktemp("ck") / "a.st"))


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """14 tiles in two class folders, one unreadable file, and a masks/ folder to ignore."""
    root = tmp_path_factory.mktemp("tiles")
    for i in range(14):
        folder = root / ("benign" if i % 2 else "malignant")
        folder.mkdir(exist_ok=True)
        make_tissue_image((40, 32), seed=i, dark=i % 3 == 0).save(folder / f"t{i:02d}.png")
    (root / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "masks").mkdir()
    make_tissue_image((40, 32)).save(root / "masks" / "m.png")
    return root


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _interrupted(predictor, inputs, out, after_batches: int, batch_size: int = 4):
    """Run a job and stop it after ``after_batches`` batches were written."""
    calls = []

    def stop(n: int) -> None:
        calls.append(n)
        if len(calls) == after_batches:
            raise _Stop

    job = PredictionJob.open(predictor, inputs, out)
    with pytest.raises(_Stop):
        job.run(batch_size, progress=stop)
    return job


def test_rows_follow_the_image_listing_and_a_path_given_twice_is_predicted_once(
    predictor, tiles, tmp_path
):
    listed = [str(p) for p in images_under(tiles)]
    out = tmp_path / "out.csv"
    job = PredictionJob.open(predictor, [tiles, tiles / "malignant" / "t00.png"], out)
    assert job.paths == listed and job.total == 15
    job.run(batch_size=4)
    assert [r["path"] for r in _rows(out)] == [p for p in listed if "broken" not in p]


def test_resume_after_a_torn_last_line_finishes_without_duplicates(predictor, tiles, tmp_path):
    full = tmp_path / "full.csv"
    summary = PredictionJob.open(predictor, [tiles], full).run(batch_size=4)
    assert summary.rows == 14 and [s.path for s in summary.skipped] == [
        str(tiles / "benign" / "broken.png")
    ]
    expected = _rows(full)
    assert list(expected[0]) == prediction_columns(predictor)

    out = tmp_path / "out.csv"
    job = _interrupted(predictor, [tiles], out, after_batches=2)
    assert not out.exists() and job.partial.is_file() and job.sidecar.is_file()
    kept = _rows(job.partial)
    assert len(kept) == 7  # two batches of four listed files, one of them unreadable
    # A kill in the middle of a write: keep five whole rows and half of the sixth.
    lines = job.partial.read_bytes().splitlines(keepends=True)
    job.partial.write_bytes(b"".join(lines[:6]) + lines[6][:20])

    resumed = PredictionJob.open(predictor, [tiles], out)
    assert (resumed.total, resumed.already_done) == (15, 5)
    summary = resumed.run(batch_size=4)
    assert (summary.rows, summary.resumed, summary.new_rows) == (14, 5, 9)
    assert not resumed.partial.exists() and not resumed.sidecar.exists()
    got = _rows(out)
    assert [r["path"] for r in got] == [r["path"] for r in expected]  # same order, none twice
    for a, b in zip(got, expected, strict=True):
        assert a["prediction"] == b["prediction"]
        # Row 6 was predicted in a smaller batch than in the uninterrupted run.
        assert float(a["probability"]) == pytest.approx(float(b["probability"]), abs=1e-5)
    assert summary.labels == Counter(r["prediction"] for r in got)


def test_resume_at_a_batch_boundary_writes_the_same_file(predictor, tiles, tmp_path):
    full = tmp_path / "full.csv"
    PredictionJob.open(predictor, [tiles], full).run(batch_size=4)
    out = tmp_path / "out.csv"
    _interrupted(predictor, [tiles], out, after_batches=3)
    PredictionJob.open(predictor, [tiles], out).run(batch_size=4)
    assert out.read_bytes() == full.read_bytes()


def test_a_partial_file_of_another_model_or_other_inputs_is_refused(predictor, tiles, tmp_path):
    out = tmp_path / "out.csv"
    job = _interrupted(predictor, [tiles], out, after_batches=1)
    before = job.partial.read_bytes()
    other = Predictor.from_checkpoint(make_checkpoint(tmp_path / "b.st", seed=1))
    # Same model id ("test-test_resnet"), different weights: the file's hash tells them apart.
    assert other.model_id == predictor.model_id
    with pytest.raises(ConfigError, match=r"was started with model test-test_resnet .*a\.st"):
        PredictionJob.open(other, [tiles], out)
    with pytest.raises(ConfigError, match="was started on other inputs"):
        PredictionJob.open(predictor, [tiles / "benign"], out)
    assert job.partial.read_bytes() == before  # a refusal changes nothing

    ckpt = tmp_path / "b.st"
    res = CliRunner().invoke(main, ["predict", str(ckpt), str(tiles), "--out", str(out)])
    assert res.exit_code == 1
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    assert "delete it, or write to another file" in res.output

    job.sidecar.unlink()
    with pytest.raises(ConfigError, match="has no out.csv.partial.json saying which model"):
        PredictionJob.open(predictor, [tiles], out)
    json_bad = tmp_path / "x.csv.partial.json"
    (tmp_path / "x.csv.partial").write_text("path\n")
    json_bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match="is not a histolens record"):
        PredictionJob.open(predictor, [tiles], tmp_path / "x.csv")


def test_a_partial_file_of_the_previous_schema_is_refused_in_one_sentence(
    predictor, tiles, tmp_path
):
    out = tmp_path / "out.csv"
    job = _interrupted(predictor, [tiles], out, after_batches=1)
    # As histolens wrote it before histolens.inference.predictions_csv: uncertain 4th, flags True/False.
    old_columns = ["path", "prediction", "probability", "uncertain", "p_benign", "p_malignant"]
    old_columns += ["prediction_set", "refer", "ood", "ood_reason"]
    old_rows = [
        [r["path"], r["prediction"], r["probability"], "False", r["p_benign"], r["p_malignant"]]
        + ["", "False", "False", ""]
        for r in _rows(job.partial)
    ]
    with open(job.partial, "w", newline="") as fh:
        csv.writer(fh).writerows([old_columns, *old_rows])
    record = json.loads(job.sidecar.read_text())
    job.sidecar.write_text(json.dumps({**record, "version": 1, "columns": old_columns}))
    before = job.partial.read_bytes()
    sentence = (
        f"{job.partial} was started by another version of histolens, which writes other "
        "columns; delete it to start over."
    )
    with pytest.raises(ConfigError) as refused:
        PredictionJob.open(predictor, [tiles], out)
    assert str(refused.value) == sentence
    res = CliRunner().invoke(main, ["predict", predictor.source, str(tiles), "--out", str(out)])
    assert res.exit_code == 1 and res.output.strip() == f"error: {sentence}"
    assert job.partial.read_bytes() == before and not out.exists()

    # The current sidecar over a row whose flag is not 1 or 0: a damaged row, not a resume.
    job.sidecar.write_text(json.dumps(record))
    rows = [prediction_columns(predictor)] + [
        [r[c] for c in prediction_columns(predictor)] for r in _rows(job.partial)
    ]
    with open(job.partial, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    with pytest.raises(ConfigError, match="has a damaged row at line 2; delete it"):
        PredictionJob.open(predictor, [tiles], out)


def test_a_partial_file_of_another_alpha_is_refused(tiles, tmp_path):
    from histolens.testing import flat_calibration

    # Scores of 0.5: at alpha 0.1 a tile's set is its label; at 0.02 (under what 20 patients
    # can promise) both classes. Rows of one alpha must not be finished with the other.
    ckpt = make_checkpoint(tmp_path / "c.st", conformal=flat_calibration(0.5))
    calibrated = Predictor.from_checkpoint(ckpt)
    out = tmp_path / "out.csv"
    job = _interrupted(calibrated, [tiles], out, after_batches=1)
    assert json.loads(job.sidecar.read_text())["alpha"] == 0.1
    assert json.loads(job.sidecar.read_text())["runtime"] == "torch"
    sets = {r["prediction_set"] for r in _rows(job.partial)}
    assert sets and all(";" not in s for s in sets)
    calibrated.alpha = 0.02
    with pytest.raises(ConfigError) as refused:
        PredictionJob.open(calibrated, [tiles], out)
    assert str(refused.value) == (
        f"{job.partial} was started with prediction sets at alpha 0.1, not 0.02; give --alpha "
        "0.1 to resume it, or delete it to start over."
    )
    res = CliRunner().invoke(main, ["predict", str(ckpt), str(tiles), "--out", str(out)])
    assert res.exit_code == 0, res.output  # no --alpha: the training one, as started
    res = CliRunner().invoke(
        main, ["predict", str(ckpt), str(tiles), "--out", str(out), "--alpha", "0.02"]
    )
    assert res.exit_code == 0, res.output  # the finished file is written again, not resumed
    assert {r["prediction_set"] for r in _rows(out)} == {"benign;malignant"}


def test_predict_magnification_picks_the_calibration_of_every_image(tiles, tmp_path):
    # The tiles' names and folders (t00.png under benign/) say no magnification.
    ckpt = make_checkpoint(tmp_path / "m.st", conformal=stratified_calibration("100", "200"))
    runs = {}
    for mag in ("100", "200", None):
        out = tmp_path / f"at{mag}.csv"
        args = ["predict", str(ckpt), str(tiles), "--out", str(out), "--quiet"]
        res = CliRunner().invoke(main, args + (["--magnification", mag] if mag else []))
        assert res.exit_code == 0, res.output
        runs[mag] = _rows(out)
    assert len(runs["100"]) == len(runs["200"]) == 14
    assert {(r["prediction_set"], r["refer"]) for r in runs["100"]} == {("benign;malignant", "1")}
    assert all(r["prediction_set"] == r["prediction"] for r in runs["200"])
    assert {r["refer"] for r in runs["200"]} == {"0"}
    # Unknown: the most cautious calibration, 100X's here.
    assert {r["refer"] for r in runs[None]} == {"1"}
    res = CliRunner().invoke(main, ["predict", str(ckpt), str(tiles), "-m", "all"])
    assert res.exit_code == 2 and "'all' is not one of '40', '100', '200', '400'" in res.output


def test_a_partial_file_of_another_magnification_is_refused(tiles, tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.st", conformal=stratified_calibration("100", "200"))
    calibrated = Predictor.from_checkpoint(ckpt)
    out = tmp_path / "out.csv"

    def stop(n: int) -> None:
        raise _Stop  # after the first batch

    job = PredictionJob.open(calibrated, [tiles], out, magnification=100)
    with pytest.raises(_Stop):
        job.run(4, progress=stop)
    assert json.loads(job.sidecar.read_text())["magnification"] == 100
    before = job.partial.read_bytes()
    with pytest.raises(ConfigError) as refused:
        PredictionJob.open(calibrated, [tiles], out, magnification=200)
    assert str(refused.value) == (
        f"{job.partial} was started with --magnification 100, not --magnification 200; give "
        "--magnification 100 to resume it, or delete it to start over."
    )
    args = ["predict", str(ckpt), str(tiles), "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and res.output.strip() == (
        f"error: {job.partial} was started with --magnification 100, not magnifications read "
        "from the file names; give --magnification 100 to resume it, or delete it to start over."
    )
    assert job.partial.read_bytes() == before and not out.exists()
    res = CliRunner().invoke(main, [*args, "--magnification", "100"])
    assert res.exit_code == 0, res.output
    assert {r["refer"] for r in _rows(out)} == {"1"} and len(_rows(out)) == 14

    # A sidecar written before the magnification was recorded: rows read it from their paths.
    job = PredictionJob.open(calibrated, [tiles], out)
    with pytest.raises(_Stop):
        job.run(4, progress=stop)
    record = json.loads(job.sidecar.read_text())
    assert record.pop("magnification") is None
    job.sidecar.write_text(json.dumps(record))
    with pytest.raises(ConfigError) as refused:
        PredictionJob.open(calibrated, [tiles], out, magnification=200)
    assert str(refused.value) == (
        f"{job.partial} was started with magnifications read from the file names, not "
        "--magnification 200; leave out --magnification to resume it, or delete it to start over."
    )
    resumed = PredictionJob.open(calibrated, [tiles], out)
    assert resumed.already_done == len(_rows(job.partial)) > 0


def test_cli_resumes_and_reports_progress(predictor, tiles, tmp_path):
    out = tmp_path / "p.csv"
    _interrupted(predictor, [tiles], out, after_batches=1, batch_size=8)
    res = CliRunner().invoke(
        main, ["predict", predictor.source, str(tiles), "--out", str(out), "--batch-size", "8"]
    )
    assert res.exit_code == 0, res.output
    assert "Resuming" in res.output and "7 of 15 images already predicted" in res.output
    assert "predicted 15/15 images" in res.output and "images/s" in res.output
    assert "14 image(s) predicted with test_resnet" in res.output
    assert "skipped " in res.output and "broken.png" in res.output
    assert len({r["path"] for r in _rows(out)}) == len(_rows(out)) == 14
    quiet = CliRunner().invoke(
        main, ["predict", predictor.source, str(tiles), "--out", str(out), "--quiet"]
    )
    assert quiet.exit_code == 0 and "images/s" not in quiet.output


def test_progress_prints_lines_when_not_a_terminal():
    stream = io.StringIO()
    with ProgressReporter(10, initial=2, stream=stream, interval=0.0) as progress:
        progress.update(4)
        progress.update(4)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("predicted 6/10 images, ") and "images/s" in lines[0]
    assert lines[-1].startswith("predicted 10/10 images, ")
    assert "\r" not in stream.getvalue()
    silent = io.StringIO()
    with ProgressReporter(10, stream=silent, interval=0.0, enabled=False) as progress:
        progress.update(10)
    assert silent.getvalue() == ""


def _partial_rows(path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_killed_predict_resumes_without_duplicate_or_missing_rows(tmp_path, sigkill_when):
    from histolens.data.synth import generate_synthetic

    data = tmp_path / "data"
    generate_synthetic(data, n=200, seed=2, size=(48, 32), n_patients=10)
    ckpt = make_checkpoint(tmp_path / "ck.safetensors")
    # One intra-op thread: the test must not depend on how busy the machine's cores are.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "histolens", "predict", str(ckpt), str(data), "--batch-size", "4"]
    full = tmp_path / "full.csv"
    done = subprocess.run([*cmd, "--out", str(full), "--quiet"], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    n_images = len(images_under(data))  # 200 tiles and the contact sheet
    assert len(_rows(full)) == n_images

    out = tmp_path / "out.csv"
    partial = tmp_path / "out.csv.partial"
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sigkill_when(proc, lambda: _partial_rows(partial) >= 40, 120, "no rows written in 120 s", 0.01)
    assert proc.returncode == -signal.SIGKILL, "predict ended before it could be killed"
    at_kill = _partial_rows(partial)
    assert 40 <= at_kill < n_images and not out.exists()

    rerun = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True)
    print(f"killed after {at_kill} of {n_images} rows; rerun stderr tail:\n{rerun.stderr[-300:]}")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already predicted" in rerun.stderr and "images/s" in rerun.stderr
    paths = [r["path"] for r in _rows(out)]
    assert len(paths) == len(set(paths)) == n_images
    # The kill may tear a row, so the rerun's batches are not the uninterrupted run's: the same
    # rows and decisions, probabilities to float32 rounding (as the resume test above allows).
    assert_predictions_close(out.read_text(), full.read_text(), atol=1e-5, threshold=0.5)
    assert not partial.exists() and not (tmp_path / "out.csv.partial.json").exists()
