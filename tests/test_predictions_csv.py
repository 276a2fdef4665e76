"""One schema for the predictions CSV: predict, evaluation and the desktop export agree."""

import csv
import re

import pytest
from PIL import Image

from histolens.data.imagefiles import images_under
from histolens.evaluation.evaluate import write_predictions_csv
from histolens.evaluation.metrics import EvalResult, PredictionRow
from histolens.gui.display import ResultRow
from histolens.gui.export import export_results
from histolens.inference.batch import PredictionJob
from histolens.inference.ood import OODGuard
from histolens.inference.predictions_csv import (
    core_columns,
    format_flag,
    format_probability,
    parse_flag,
    prediction_columns,
)
from histolens.inference.predictor import Predictor
from histolens.testing import flat_calibration, make_checkpoint, make_tissue_image

CLASSES = ("benign", "malignant")
CORE = core_columns(CLASSES)


class _Overlay:
    def overlay(self, opacity: float) -> Image.Image:
        return Image.new("RGB", (8, 8), "red")


class _Explainer:
    """Stands in for histolens.explain.Explainer: the export only saves its overlay."""

    def explain(self, image, method: str) -> _Overlay:
        return _Overlay()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The same predictions written by all three writers: {writer: (header, rows by path)}."""
    tmp = tmp_path_factory.mktemp("schema")
    # Sets of both classes at alpha 0.02 (refer = 1), and a blank tile unlike tissue (ood = 1).
    ckpt = make_checkpoint(tmp / "m.st", conformal=flat_calibration(0.5), guard=OODGuard())
    predictor = Predictor.from_checkpoint(ckpt)
    predictor.alpha = 0.02
    folder = tmp / "tiles"
    folder.mkdir()
    for i in range(3):
        make_tissue_image((96, 64), seed=i, dark=i == 1).save(folder / f"t{i}.png")
    Image.new("RGB", (96, 64), "white").save(folder / "blank.png")
    paths = [str(p) for p in images_under(folder)]

    PredictionJob.open(predictor, [folder], tmp / "predict.csv").run(batch_size=8)
    preds, skipped = predictor.predict_paths(paths, batch_size=8)
    assert not skipped and [p.path for p in preds] == paths

    results = [ResultRow(p.path, p.path.rsplit("/", 1)[-1], p) for p in preds]
    export_results(results, tmp / "gui", _Explainer(), "gradcam", 0.5, CLASSES, "m")
    # The first image's true label is the other class: one incorrect prediction.
    labels = [CLASSES[(CLASSES.index(p.label) + (i == 0)) % 2] for i, p in enumerate(preds)]
    rows = [
        PredictionRow(
            path=p.path,
            patient=f"patient-{i}",
            magnification=400,
            label=labels[i],
            target=CLASSES.index(labels[i]),
            probs=tuple(p.scores[c] for c in CLASSES),
            probs_uncalibrated=tuple(p.scores[c] for c in CLASSES),
            prediction_set=p.prediction_set,
            refer=p.refer,
            ood=p.ood,
            ood_reason=p.ood_reason or "",
        )
        for i, p in enumerate(preds)
    ]
    result = EvalResult(rows, CLASSES, "binary", predictor.threshold, 1.0)
    write_predictions_csv(result, tmp / "evaluation.csv")

    out = {}
    for name, path, skip in [
        ("predict", tmp / "predict.csv", 0),
        ("evaluation", tmp / "evaluation.csv", 0),
        ("gui", tmp / "gui" / "predictions.csv", 1),  # its first line is a '# ...' comment
    ]:
        lines = path.read_text(encoding="utf-8").splitlines()[skip:]
        reader = csv.DictReader(lines)
        by_path = {r["path"]: r for r in reader}
        out[name] = (reader.fieldnames, by_path)
    return out


def test_every_writer_starts_with_the_core_columns_in_order(written):
    assert CORE == [
        "path",
        "prediction",
        "probability",
        "p_benign",
        "p_malignant",
        "prediction_set",
        "refer",
        "ood",
        "ood_reason",
    ]
    headers = {name: header for name, (header, _) in written.items()}
    assert headers == {
        "predict": [*CORE, "uncertain"],
        "evaluation": [*CORE, "patient", "magnification", "label", "correct"],
        "gui": [*CORE, "uncertain", "file", "overlay", "error"],
    }


def test_every_writer_encodes_the_core_cells_identically(written):
    _, predict = written["predict"]
    assert len(predict) == 4
    for name in ("evaluation", "gui"):
        _, rows = written[name]
        assert {p: [r[c] for c in CORE] for p, r in rows.items()} == {
            p: [r[c] for c in CORE] for p, r in predict.items()
        }, name
    # Both values of each flag occur, so the encoding below is tested, not assumed.
    cells = list(predict.values())
    assert {r["refer"] for r in cells} == {"1"} and {r["ood"] for r in cells} == {"0", "1"}
    blank = next(r for p, r in predict.items() if p.endswith("blank.png"))
    assert blank["ood"] == "1" and blank["ood_reason"]
    for _, rows in written.values():
        for r in rows.values():
            for c in ("probability", "p_benign", "p_malignant"):
                assert re.fullmatch(r"[01]\.\d{6}", r[c]), (c, r[c])
            assert r["prediction_set"] == "benign;malignant"
            flags = [r[c] for c in ("refer", "ood", "uncertain", "correct") if c in r]
            assert set(flags) <= {"0", "1"}
    evaluated = written["evaluation"][1]
    assert sorted(r["correct"] for r in evaluated.values()) == ["0", "1", "1", "1"]
    assert all((r["label"] == r["prediction"]) == (r["correct"] == "1") for r in evaluated.values())
    assert {r["uncertain"] for r in written["gui"][1].values()} == {"1"}


def test_flags_and_probabilities_round_trip():
    assert [format_flag(True), format_flag(False)] == ["1", "0"]
    assert parse_flag("1") is True and parse_flag("0") is False
    with pytest.raises(ValueError, match="'True' is not a flag of the predictions CSV"):
        parse_flag("True")
    assert format_probability(0.5) == "0.500000" and format_probability(1e-7) == "0.000000"
    assert prediction_columns(["a"]) == [*core_columns(["a"]), "uncertain"]
