"""The HTML report leads with the estimate: figures with CIs, what they rest on, warnings."""

from __future__ import annotations

import json

from click.testing import CliRunner

from histolens.checkpoint.io import update_metadata
from histolens.cli.commands import main
from histolens.report.build import write_report
from histolens.testing import make_checkpoint


def test_report_leads_with_the_estimate_its_cis_support_and_warnings(tmp_path, estimate):
    run = tmp_path / "run"
    run.mkdir()
    make_checkpoint(run / "best.safetensors", metrics={"split": "out-of-fold"})
    update_metadata(run / "best.safetensors", estimate=estimate)
    (run / "evaluation").mkdir()
    notes = [estimate["warnings"][0], "The shortcut audit flagged image size."]
    (run / "evaluation" / "notes.json").write_text(json.dumps(notes))

    html = write_report(run).read_text()
    section = html[html.index("<section id=estimate>") :]
    section = section[: section.index("</section>")]
    assert "<h2>Estimated performance on unseen patients</h2>" in section
    auc, (lo, hi) = estimate["metrics"]["roc_auc"], estimate["ci95"]["roc_auc"]
    assert f"<b>{auc:.3f}</b><small>95% CI {lo:.2f}&ndash;{hi:.2f}</small>" in section  # card
    assert f"<td>ROC AUC</td><td class=num>{auc:.3f}</td><td class=num>{lo:.2f}&ndash;" in section
    assert "<b>Method:</b> 5-fold patient-level cross-validation (out-of-fold predictions)." in (
        section
    )
    assert "66 images of 11 patient groups in manifest.csv (magnification all)" in section
    assert "66 images of 11 patients (3 benign, 8 malignant)" in section
    assert "<td>100X</td><td class=num>33</td><td class=num>11</td><td>3 benign, 8 malignant" in (
        section
    )
    for warning in estimate["warnings"]:
        assert f"<li>{warning}</li>" in section
        assert html.count(warning) == 1  # shown with the estimate, not again among the notes
    assert "The shortcut audit flagged image size." in html
    assert "<b>Performance.</b> ROC AUC on unseen patients " in html  # the model card


def test_report_of_an_older_run_labels_its_test_split_and_warns(tmp_path):
    run = tmp_path / "run"
    ev = run / "evaluation"
    ev.mkdir(parents=True)
    old = {"split": "test", "roc_auc": 0.9, "n_images": 6, "n_patients": 3}
    make_checkpoint(run / "best.safetensors", metrics=old)
    metrics = {
        "split": "test",
        "n_images": 6,
        "n_patients": 3,
        "threshold": 0.5,
        "image": {"roc_auc": 0.9, "patient_auc": 1.0, "ci95": {"roc_auc": [0.7, 1.0]}},
    }
    (ev / "metrics.json").write_text(json.dumps(metrics))
    rows = ["path,patient,magnification,label,probability,prediction,correct"]
    for i, (patient, label) in enumerate([("a", "benign")] * 2 + [("b", "malignant")] * 2):
        rows.append(f"/d/{i}.png,{patient},400,{label},0.5,{label},1")
    rows += ["/d/8.png,c,400,malignant,0.9,malignant,1", "/d/9.png,c,400,benign,0.9,malignant,0"]
    (ev / "predictions.csv").write_text("\n".join(rows) + "\n")

    html = write_report(run).read_text()
    assert "<h2>Estimated performance on unseen patients</h2>" in html
    assert "Measured on a held-out test split of 3 patients (6 images)." in html
    assert "6 images of 3 patients (1 benign, 2 malignant)" in html  # c: mostly malignant
    assert "<td class=num>0.70&ndash;1.00</td>" in html
    assert "Only 1 benign patient supports this estimate" in html
    assert "Only 2 malignant patients support this estimate" in html
    assert "<b>Performance.</b> ROC AUC 0.900 (95% CI 0.70-1.00) on a held-out test split" in html
    assert "All metrics of these predictions (test)" in html


def test_report_of_an_older_checkpoint_alone_says_how_few_patients(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = {"split": "test", "patient_auc": 1.0, "n_images": 52, "n_patients": 7}
    make_checkpoint(run / "best.safetensors", metrics=old)
    html = write_report(run).read_text()
    assert (
        "Measured on a held-out test split of 7 patients (52 images); no confidence interval "
        "was stored."
    ) in html
    assert "<td>patient AUC</td><td class=num>1.000</td><td class=num>not stored</td>" in html
    assert "Measured on only 7 test patients: the figures may not hold for new patients." in html


def test_report_of_a_folder_without_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "evaluation").mkdir()
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert f"{tmp_path} is not a run directory (no best.safetensors)." in result.output
    assert not (tmp_path / "report.html").exists()


def test_ctrl_c_during_report_exits_130_without_a_training_hint(tmp_path, monkeypatch):
    import histolens.report.build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    make_checkpoint(tmp_path / "best.safetensors")
    monkeypatch.setattr(histolens.report.build, "write_report", interrupted)
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 130
    assert result.output.strip() == "interrupted; report stopped before it finished."
