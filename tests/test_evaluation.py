import csv
import json
import random
import statistics

import numpy as np
import pytest
from click.testing import CliRunner

from histolens.cli.commands import main
from histolens.data.imagefiles import images_under
from histolens.data.records import discover
from histolens.errors import DataError
from histolens.evaluation.evaluate import evaluate_checkpoint, rows_from_logits


def test_loader_order_changes_nothing(trained_run, synth_small):
    run, _ = trained_run
    records = discover(synth_small).records
    a, _ = evaluate_checkpoint(run, records, n_boot=50, progress=False)
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    b, _ = evaluate_checkpoint(run, shuffled, n_boot=50, progress=False)
    by_path_a = {r.path: r.probs for r in a.rows}
    by_path_b = {r.path: r.probs for r in b.rows}
    assert by_path_a.keys() == by_path_b.keys()
    # Other batches, other GEMM blockings: float32 rounding (as in test_batch_predict), 1e-5.
    for k in by_path_a:
        np.testing.assert_allclose(by_path_a[k], by_path_b[k], atol=1e-5)
    for key in ("roc_auc", "accuracy", "patient_recognition_rate", "patient_auc"):
        assert a.metrics.image.figure(key) == pytest.approx(
            b.metrics.image.figure(key), nan_ok=True
        )


def test_rows_pair_each_record_with_its_own_logits(synth_small):
    import torch

    records = discover(synth_small).records[:4]
    with pytest.raises(ValueError, match="4 records but 3 logits"):
        rows_from_logits(records, torch.zeros(3, 1), ("benign", "malignant"), "binary", 1.0)
    with pytest.raises(DataError, match="another task"):
        rows_from_logits(
            records, torch.zeros(4, 8), ("A", "F", "PT", "TA", "X", "Y", "Z", "W"), "binary", 1.0
        )


def test_evaluate_cli_writes_report_and_predictions(trained_run, tmp_path):
    run, _ = trained_run
    out = tmp_path / "ev"
    res = CliRunner().invoke(
        main,
        ["evaluate", str(run), "--split", "all", "--out", str(out), "--n-boot", "50", "--quiet"],
    )
    assert res.exit_code == 0, res.output
    assert res.output.startswith("Evaluated 32 images of 8 patients (")
    assert "all split of the run's split.csv, including the patients the model was trained on" in (
        res.output
    )
    assert "  patient recognition rate: " in res.output and "(95% CI " in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 32
    assert metrics["estimate"]["n_images"] == 32
    assert sum(metrics["estimate"]["patients_per_class"].values()) == 8
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {"path", "patient", "label", "probability", "prediction"} <= set(rows[0])
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "Not for diagnosis" in html
    assert "<h2>Performance on the evaluated images</h2>" in html


def test_predict_cli(trained_run, synth_small, tmp_path):
    run, _ = trained_run
    bad = tmp_path / "in" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "p.csv"
    res = CliRunner().invoke(
        main,
        [
            "predict",
            str(run),
            str(synth_small / "400X" / "benign"),
            str(bad),
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "broken.png" in res.output and "corrupt" in res.output
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    # One row per readable image of the folder, in order; the corrupt file has none.
    expected = [str(p) for p in images_under(synth_small / "400X" / "benign")]
    assert expected and [r["path"] for r in rows] == expected
    assert all(r["prediction"] in ("benign", "malignant") for r in rows)
    for r in rows:
        assert float(r["p_benign"]) + float(r["p_malignant"]) == pytest.approx(1, abs=2e-6)
        assert float(r["probability"]) == float(r[f"p_{r['prediction']}"])


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"nope")
    res = CliRunner().invoke(main, ["predict", str(tmp_path / "x.safetensors"), str(tmp_path)])
    assert res.exit_code == 1
    assert res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--epoch", "3"])
    assert res.exit_code == 2 and "Did you mean '--epochs'" in res.output
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main, ["train", "--data", str(tmp_path), "--backbone", "vgg61", "--out", str(out)]
    )
    assert res.exit_code == 1 and "Did you mean 'vgg16'" in res.output
    assert not out.exists()  # nothing is left behind by a failed start


def test_data_summary_cli(synth_small):
    res = CliRunner().invoke(main, ["data", "summary", str(synth_small)])
    assert res.exit_code == 0, res.output
    assert "Layout: original project" in res.output
    assert "Patient groups: 8" in res.output
    assert "patient-disjoint" in res.output and "Class weights" in res.output


def test_report_cli(trained_run):
    run, _ = trained_run
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 0, res.output
    html = (run / "report.html").read_text()
    for part in ("Model card", "ROC", "Resolved configuration", "Patient recognition rate"):
        assert part in html


def test_report_keeps_the_run_notes(trained_run, tmp_path):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    notes_file = run / "evaluation" / "notes.json"
    assert isinstance(json.loads(notes_file.read_text()), list)  # written by training
    notes_file.write_text(json.dumps(["Only 1 validation patient group & <few> images."]))
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 0, res.output
    html = (run / "report.html").read_text()
    assert "Only 1 validation patient group &amp; &lt;few&gt; images." in html


def test_report_shows_heatmaps_and_faithfulness(trained_run, tmp_path):
    import json
    import shutil

    from PIL import Image

    from histolens.report.build import write_report

    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    exp = run / "explanations"
    exp.mkdir()
    Image.new("RGB", (40, 20), "white").save(exp / "a_gradcam_panel.png")
    (exp / "index.csv").write_text(
        "path,status,method,prediction,probability,uncertain,panel\n"
        "/data/a.png,ok,gradcam,malignant,0.8765,True,a_gradcam_panel.png\n"
    )
    row = {"deletion_auc": 0.41, "insertion_auc": 0.8, "road": None, "pointing_game": None}
    rows = [{"method": "gradcam", **row, "iou": None, "n": 3, "n_masks": 0}]
    (exp / "faithfulness.json").write_text(json.dumps({"rows": rows}))
    html = write_report(run).read_text()
    assert "a.png: malignant (P = 0.88), review, gradcam" in html
    assert "Deletion AUC (lower is better)" in html and "<td class=num>0.410</td>" in html
    assert "ROAD</th>" not in html and "Pointing game" not in html  # not measured: no column


@pytest.mark.real_data
def test_data_summary_on_real_breakhis(real_data):
    res = CliRunner().invoke(main, ["data", "summary", str(real_data / "100X")])
    assert res.exit_code == 0, res.output
    assert "benign        111               5" in res.output
    assert "Patient groups: 18" in res.output


def test_cross_validation_cli(synth_small, monkeypatch):
    import histolens.training.crossval

    results = []
    original = histolens.training.crossval.cross_validate

    def recording(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(histolens.training.crossval, "cross_validate", recording)
    args = ["--folds", "2", "--backbone", "test_resnet", "--pretrained", "none", "--epochs", "1"]
    res = CliRunner().invoke(main, ["cv", "--data", str(synth_small), *args])
    assert res.exit_code == 0, res.output
    assert "fold 2/2" in res.output
    [result] = results
    # 32 images of 8 patients, each held out once; the printed figures are the folds' mean and
    # standard deviation.
    assert len(result.folds) == 2
    assert sum(f["n_test_patients"] for f in result.folds) == 8
    printed = {
        line.split(":")[0].strip(): line.split(":")[1].strip()
        for line in res.output.splitlines()
        if "+/-" in line
    }
    aucs = [f["roc_auc"] for f in result.folds]
    assert printed["roc_auc"] == f"{statistics.mean(aucs):.3f} +/- {statistics.stdev(aucs):.3f}"
    for key, (mean, std) in result.summary().items():
        if mean == mean:
            assert printed[key] == f"{mean:.3f} +/- {std:.3f}"


# --- one magnification of a new cohort -------------------------------------------------------
@pytest.fixture(scope="module")
def two_magnifications(tmp_path_factory):
    """A manifest of 32 synthetic images of 4 patients: 16 at 100X and the same 16 at 400X."""
    from histolens.data.synth import generate_synthetic

    root = tmp_path_factory.mktemp("cohort")
    lines = []
    for part, mag in (("a", 100), ("b", 400)):
        generate_synthetic(
            root / part, n=16, seed=5, magnification=mag, size=(96, 64), n_patients=4
        )
        rows = (root / part / "manifest.csv").read_text().splitlines()
        header = rows[0].split(",")
        for row in rows[1:]:
            cells = dict(zip(header, row.split(","), strict=True))
            cells["path"] = f"{part}/{cells['path']}"
            cells["mask"] = f"{part}/{cells['mask']}" if cells.get("mask") else ""
            lines.append(",".join(cells[h] for h in header))
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join([",".join(header), *lines]) + "\n")
    return manifest


def test_records_for_evaluation_keeps_one_magnification(tmp_path, two_magnifications):
    from histolens.evaluation.evaluate import records_for_evaluation
    from histolens.testing import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "m.safetensors")  # trained on every magnification
    _, records, where = records_for_evaluation(ckpt, two_magnifications, "all")
    assert len(records) == 32 and {r.magnification for r in records} == {100, 400}
    assert where == f"all images of {two_magnifications}"
    _, records, where = records_for_evaluation(ckpt, two_magnifications, "all", "100")
    assert len(records) == 16 and {r.magnification for r in records} == {100}
    assert where.endswith(", magnification 100X")
    with pytest.raises(DataError, match=r"No 40X image was found in .*; its images are at 100X, "):
        records_for_evaluation(ckpt, two_magnifications, "all", "40")


def test_evaluate_cli_takes_alpha_for_the_prediction_sets(tmp_path, two_magnifications):
    from histolens.testing import flat_calibration, make_checkpoint

    # Every calibration score 0.3: at the training alpha (0.1) no image is referred; at 0.02,
    # below what 20 calibration patients can promise, every set holds both classes.
    ckpt = make_checkpoint(tmp_path / "c.safetensors", conformal=flat_calibration(0.3))
    args = ["evaluate", str(ckpt), "--data", str(two_magnifications), "--split", "all"]
    args += ["-m", "400", "--n-boot", "0", "--quiet"]
    res = CliRunner().invoke(main, [*args, "--out", tmp_path / "a", "--alpha", "0.02"])
    assert res.exit_code == 0, res.output
    assert (
        "Prediction sets at alpha 0.02: coverage 1.000 over patients (target 0.98); "
        "100.0% of the images referred."
    ) in res.output.splitlines()
    refer = json.loads((tmp_path / "a" / "metrics.json").read_text())["refer"]
    assert refer["alpha"] == 0.02 and refer["refer_rate"] == 1.0
    with open(tmp_path / "a" / "predictions.csv") as fh:
        assert {r["prediction_set"] for r in csv.DictReader(fh)} == {"benign;malignant"}

    res = CliRunner().invoke(main, [*args, "--out", tmp_path / "b"])
    assert res.exit_code == 0, res.output
    assert "Prediction sets at alpha 0.1: " in res.output and "; 0.0% of the images" in res.output

    bad = CliRunner().invoke(main, [*args, "--out", tmp_path / "c", "--alpha", "1"])
    assert bad.exit_code == 2 and "--alpha" in bad.output
    plain = make_checkpoint(tmp_path / "p.safetensors")
    args[1] = str(plain)
    res = CliRunner().invoke(main, [*args, "--out", tmp_path / "d", "--alpha", "0.2"])
    assert res.exit_code == 0, res.output
    assert "warning: --alpha has no effect: the checkpoint has no conformal calibration." in (
        res.output
    )


def test_evaluate_cli_at_one_magnification_says_what_the_figures_rest_on(
    tmp_path, two_magnifications
):
    from histolens.testing import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "ev"
    args = ["evaluate", str(ckpt), "--data", str(two_magnifications), "--split", "all"]
    res = CliRunner().invoke(main, [*args, "-m", "400", "--n-boot", "20", "--quiet", "--out", out])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == (
        "Evaluated 16 images of 4 patients (2 benign, 2 malignant): all images of "
        f"{two_magnifications}, magnification 400X."
    )
    assert lines[1].startswith("  ROC AUC: ")
    assert "  100X: " not in res.output  # one magnification: no per-magnification lines
    assert (
        "warning: Only 2 benign patients support this estimate: its confidence interval rests on "
        "very few people and may not hold for new patients."
    ) in lines
    estimate = json.loads((out / "metrics.json").read_text())["estimate"]
    assert estimate["n_images"] == 16 and estimate["patients_per_class"] == {
        "benign": 2,
        "malignant": 2,
    }
    with open(out / "predictions.csv") as fh:
        assert {row["magnification"] for row in csv.DictReader(fh)} == {"400"}
    html = (out / "report.html").read_text()
    assert "Only 2 malignant patients support this estimate" in html

    res = CliRunner().invoke(main, [*args, "-m", "40", "--quiet", "--out", tmp_path / "ev40"])
    assert res.exit_code == 1
    assert res.output.strip() == (
        f"error: No 40X image was found in {two_magnifications}; its images are at 100X, 400X."
    )
    assert not (tmp_path / "ev40").exists()
