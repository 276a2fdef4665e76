"""The viewer's presenter, without a display: a fake view, jobs run synchronously or by hand."""

from __future__ import annotations

import csv
from collections import deque
from concurrent.futures import Executor, Future
from pathlib import Path

import pytest
from gui_helpers import FAKE_METHODS, FakeExplainer
from PIL import Image

from histolens.gui.presenter import (
    RESEARCH_NOTICE,
    ImmediateExecutor,
    Presenter,
    find_images,
    method_label,
)
from histolens.inference.predictor import Predictor
from histolens.testing import make_checkpoint

# The image files of the ``image_folder`` fixture in images_under's order (the text file is no
# image), the order `histolens predict` writes its CSV in.
IMAGE_FOLDER_FILES = [
    "broken.png",
    "patient_b/tile_9.png",
    "tile_0.png",
    "tile_1.png",
    "tile_2.png",
    "tile_3.png",
]


class FakeView:
    """Records every call the presenter makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        if name.startswith(("show_", "append_", "set_")):
            return lambda *args: self.calls.append((name, args))
        raise AttributeError(name)

    def all(self, name: str) -> list[tuple]:
        return [args for n, args in self.calls if n == name]

    def last(self, name: str) -> tuple:
        found = self.all(name)
        assert found, f"view.{name} was never called; calls: {[n for n, _ in self.calls]}"
        return found[-1]


class ManualExecutor(Executor):
    """Queues jobs until the test runs them, to interleave user actions with running jobs."""

    def __init__(self) -> None:
        self.jobs: deque = deque()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self.jobs.append((future, fn, args, kwargs))
        return future

    def run_next(self) -> None:
        future, fn, args, kwargs = self.jobs.popleft()
        future.set_result(fn(*args, **kwargs))

    def run_all(self, presenter: Presenter) -> None:
        while self.jobs or presenter.poll():
            if self.jobs:
                self.run_next()
            presenter.poll()


class CountingPredictor:
    """Wraps a real Predictor and counts model runs."""

    def __init__(self, predictor: Predictor) -> None:
        self._p = predictor
        self.runs = 0

    def __getattr__(self, name):
        return getattr(self._p, name)

    def predict_image(self, image):
        self.runs += 1
        return self._p.predict_image(image)

    def predict_paths(self, paths, batch_size=32, progress=None):
        self.runs += 1
        return self._p.predict_paths(paths, batch_size, progress)


def make_presenter(
    executor=None, explainer=FakeExplainer, loader=Predictor.from_checkpoint, batch_chunk=2
):
    view = FakeView()
    presenter = Presenter(
        view,
        executor or ImmediateExecutor(),
        load_predictor=loader,
        make_explainer=explainer,
        methods=FAKE_METHODS,
        batch_chunk=batch_chunk,
    )
    return presenter, view


@pytest.fixture
def loaded(checkpoint):
    """A presenter with the test checkpoint loaded, counting model runs."""
    presenter, view = make_presenter(
        loader=lambda p: CountingPredictor(Predictor.from_checkpoint(p))
    )
    presenter.open_checkpoint(checkpoint)
    presenter.poll()
    assert presenter.predictor is not None
    return presenter, view


def test_checkpoint_shows_backbone_task_data_and_metrics(loaded, checkpoint):
    presenter, view = loaded
    (info,) = view.last("show_model")
    rows = dict(info.rows())
    assert rows["Backbone"] == "test_resnet"
    assert rows["Licence"] == "see the backbone's model card"  # a test net records none
    assert rows["Task"] == "binary: benign, malignant"
    assert rows["Threshold"] == "0.500"
    assert rows["Training data"].startswith("synthetic (test fixture)")
    # An older checkpoint: test-split figures, labelled as such, with a warning in words.
    assert info.performance_title == "MEASURED PERFORMANCE"
    assert info.performance_text == (
        "Measured on a held-out test split of 40 images (number of patients not stored); "
        "no confidence interval was stored.",
        "  ROC AUC: 0.912",
        "  patient recognition rate: 0.875",
    )
    assert info.performance_warnings == (
        "The number of test patients is not stored: the figures may not hold for new patients.",
    )
    assert view.last("show_methods") == (FAKE_METHODS, "gradcam")
    assert not presenter.busy
    assert view.all("set_busy") == [(True,), (False,)]


def test_checkpoint_with_an_estimate_shows_its_cis_support_and_warnings(tmp_path, estimate):
    from histolens.checkpoint.io import update_metadata

    path = make_checkpoint(tmp_path / "m.safetensors", metrics={"split": "out-of-fold"})
    update_metadata(path, estimate=estimate)
    presenter, view = make_presenter()
    presenter.open_checkpoint(path)
    presenter.poll()
    (info,) = view.last("show_model")
    assert info.performance_title == "PERFORMANCE ON UNSEEN PATIENTS"
    text = info.performance_text
    assert text[0] == (
        "Estimated on unseen patients by 5-fold patient-level cross-validation (out-of-fold "
        "predictions): 66 images of 11 patient groups in manifest.csv (magnification all)."
    )
    assert text[1] == "Support: 66 images of 11 patients (3 benign, 8 malignant)."
    auc, (lo, hi) = estimate["metrics"]["roc_auc"], estimate["ci95"]["roc_auc"]
    assert f"  ROC AUC: {auc:.3f} (95% CI {lo:.2f}-{hi:.2f})" in text
    assert any(line.startswith("  100X: ROC AUC ") for line in text)
    assert info.performance_warnings == tuple(estimate["warnings"])
    assert info.performance_warnings[0].startswith("Only 3 benign patients support this")


def test_checkpoint_with_few_test_patients_says_so(tmp_path):
    metrics = {"split": "test", "patient_auc": 1.0, "n_images": 52, "n_patients": 7}
    presenter, view = make_presenter()
    presenter.open_checkpoint(make_checkpoint(tmp_path / "m.safetensors", metrics=metrics))
    presenter.poll()
    (info,) = view.last("show_model")
    assert info.performance_text[0].startswith("Measured on a held-out test split of 7 patients")
    assert "  patient AUC: 1.000" in info.performance_text
    assert info.performance_warnings == (
        "Measured on only 7 test patients: the figures may not hold for new patients.",
    )


def test_open_image_shows_image_prediction_and_heatmap(loaded, image_path):
    presenter, view = loaded
    presenter.open_image(image_path)
    assert presenter.poll() > 0
    path, image = view.last("show_image")
    assert path == str(image_path) and image.size == (140, 96)
    (summary,) = view.last("show_prediction")
    expected = presenter.predictor._p.predict_image(Image.open(image_path).convert("RGB"))
    assert summary.label == expected.label in ("benign", "malignant")
    assert summary.positive_probability == pytest.approx(expected.positive_probability)
    assert summary.probability_text == f"P(malignant) = {expected.positive_probability:.3f}"
    assert summary.threshold_text == "decision threshold 0.50"
    overlay, caption = view.last("show_heatmap")
    assert overlay.size == (140, 96)
    assert caption == "Grad-CAM · opacity 45%"
    assert set(presenter.current_timings) == {"prediction_s", "heatmap_s"}
    status = view.last("show_status")[0]
    assert status.startswith(f"{image_path.name}: {summary.label} ({summary.probability_text})")
    assert ("REVIEW NEEDED" in status) is summary.uncertain


def test_prediction_near_threshold_is_flagged_for_review(tmp_path, image_path):
    probe = Predictor.from_checkpoint(make_checkpoint(tmp_path / "a.safetensors", seed=5))
    p = probe.predict_image(Image.open(image_path).convert("RGB")).positive_probability
    for threshold, uncertain in (
        (min(0.99, p + 0.03), True),
        (p + 0.3 if p < 0.5 else p - 0.3, False),
    ):
        ckpt = make_checkpoint(
            tmp_path / f"t{threshold:.3f}.safetensors", seed=5, threshold=threshold
        )
        presenter, view = make_presenter()
        presenter.open_checkpoint(ckpt)
        presenter.open_image(image_path)
        presenter.poll()
        (summary,) = view.last("show_prediction")
        assert summary.uncertain is uncertain
        assert summary.threshold == pytest.approx(threshold)
        assert ("Review needed" in summary.review_text) is uncertain
        assert ("REVIEW NEEDED" in view.last("show_status")[0]) is uncertain


def test_opacity_change_reblends_without_running_the_model(loaded, image_path):
    presenter, view = loaded
    presenter.open_image(image_path)
    presenter.poll()
    explainer = FakeExplainer.instances[-1]
    runs, explains = presenter.predictor.runs, list(explainer.calls)
    before, _ = view.last("show_heatmap")
    presenter.set_opacity(0.9)
    assert presenter.poll() == 0  # nothing was queued
    after, caption = view.last("show_heatmap")
    assert presenter.predictor.runs == runs and explainer.calls == explains == ["gradcam"]
    assert caption == "Grad-CAM · opacity 90%"
    # More red at higher opacity: the blend changed, from the same explanation.
    assert after.getpixel((5, 5))[0] > before.getpixel((5, 5))[0]
    presenter.set_opacity(7)
    assert presenter.opacity == 1.0


def test_method_switch_explains_once_per_method_and_hide_toggle(loaded, image_path):
    presenter, view = loaded
    presenter.open_image(image_path)
    presenter.poll()
    explainer = FakeExplainer.instances[-1]
    presenter.set_method("eigencam")
    presenter.poll()
    assert view.last("show_heatmap")[1].startswith("Eigen-CAM")
    presenter.set_method("gradcam")
    presenter.poll()
    assert explainer.calls == ["gradcam", "eigencam"]  # the second Grad-CAM came from cache
    presenter.set_heatmap_visible(False)
    assert view.last("show_heatmap") == (None, "Heatmap hidden (Ctrl+H shows it)")
    presenter.set_heatmap_visible(True)
    assert view.last("show_heatmap")[0] is not None
    presenter.set_method("gradcamm")
    title, message = view.last("show_error")
    assert title == "Unknown heatmap method" and "Did you mean 'gradcam'?" in message
    assert presenter.method == "gradcam"


def test_unreadable_image_gives_a_message_not_a_traceback(loaded, tmp_path):
    presenter, view = loaded
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"\x89PNG truncated")
    presenter.open_image(bad)
    presenter.poll()
    assert view.last("show_error") == (
        "Cannot open image",
        "scan.png: not an image file PIL can read",
    )
    assert view.last("show_image") == (str(bad), None)
    assert view.last("show_prediction") == (None,)
    presenter.open_image(tmp_path / "missing.png")
    presenter.poll()
    assert view.last("show_error")[1] == "missing.png: file does not exist"


def test_wrong_checkpoint_gives_a_message_and_keeps_the_model(loaded, tmp_path, image_path):
    presenter, view = loaded
    before = presenter.predictor
    for bad, expected in (
        (tmp_path / "junk.safetensors", "not a readable histolens checkpoint"),
        (image_path, "not a readable histolens checkpoint"),
        (tmp_path, "without best.safetensors"),
    ):
        if bad.suffix == ".safetensors":
            bad.write_bytes(b"junk" * 10)
        presenter.open_checkpoint(bad)
        presenter.poll()
        title, message = view.last("show_error")
        assert title == "Cannot load checkpoint"
        assert expected in message
        assert presenter.predictor is before


def test_no_model_loaded_explains_what_to_do(image_path, image_folder):
    presenter, view = make_presenter()
    presenter.open_image(image_path)
    presenter.poll()
    assert view.last("show_image")[1] is not None
    assert "open a checkpoint" in view.last("show_status")[0]
    presenter.open_folder(image_folder)
    assert view.last("show_error")[0] == "No model loaded"


def test_folder_batch_fills_sorts_and_flags_results(loaded, image_folder):
    presenter, view = loaded
    presenter.open_folder(image_folder)
    presenter.poll()
    names = [r.name for r in presenter.results]
    assert names == IMAGE_FOLDER_FILES
    broken = presenter.results[0]
    assert broken.review == "unreadable" and broken.error == "not an image file PIL can read"
    assert presenter.predictor.runs == 3  # batch_chunk=2: three chunks, each one model run
    assert sum(len(args[0]) for args in view.all("append_results")) == 6
    assert view.last("show_progress") == (0, 0)
    assert (6, 6) in view.all("show_progress")
    status = view.last("show_status")[0]
    assert status.startswith("Analysed 6 images:") and "1 unreadable" in status

    presenter.sort_results("probability")
    rows, column, descending = view.last("show_results")
    probs = [r.probability for r in rows if r.probability is not None]
    assert column == "probability" and descending and probs == sorted(probs, reverse=True)
    assert rows[-1].name == "broken.png"
    presenter.sort_results("probability")
    rows, _, descending = view.last("show_results")
    assert not descending and rows[0].name == "broken.png"
    presenter.sort_results("file")
    assert [r.name for r in view.last("show_results")[0]] == sorted(names, key=str.lower)
    presenter.sort_results("review")
    assert view.last("show_results")[0][0].review == "unreadable"
    with pytest.raises(ValueError, match="choose one of file, class"):
        presenter.sort_results("colour")


def test_open_paths_shows_one_image_or_runs_folders_and_files_as_one_batch(
    loaded, image_folder, image_path, tmp_path
):
    presenter, view = loaded
    presenter.open_paths([image_path])
    presenter.poll()
    assert view.last("show_image")[0] == str(image_path) and not presenter.results
    assert view.last("show_prediction")[0] is not None

    presenter.open_paths([image_folder])
    presenter.poll()
    assert [r.name for r in presenter.results][1] == "patient_b/tile_9.png"
    assert len(presenter.results) == 6

    (tmp_path / "empty").mkdir()
    presenter.open_paths([image_path, image_folder / "patient_b", tmp_path / "empty"])
    presenter.poll()
    # Named from the folder above them all; an empty folder adds nothing.
    assert [r.name for r in presenter.results] == [
        image_path.name,
        "slides/patient_b/tile_9.png",
    ]
    assert view.last("show_status")[0].startswith("Analysed 2 images:")

    presenter.open_paths([tmp_path / "empty", tmp_path / "empty"])
    presenter.poll()
    title, message = view.last("show_error")
    assert title == "Batch stopped" and message.startswith(f"No images in {tmp_path / 'empty'}")


def test_paths_given_at_start_wait_for_the_checkpoint(checkpoint, image_folder, image_path):
    """What `histolens gui -c CKPT FOLDER` does: the folder is opened before the model loaded."""
    executor = ManualExecutor()
    presenter, view = make_presenter(executor)
    presenter.open_checkpoint(checkpoint)
    presenter.open_paths([image_folder])
    assert view.last("show_status") == ("Waiting for the checkpoint to load …",)
    executor.run_all(presenter)
    assert len(presenter.results) == 6 and presenter.predictor is not None
    assert view.last("show_status")[0].startswith("Analysed 6 images:")

    presenter, view = make_presenter(executor)
    presenter.open_checkpoint(checkpoint)
    presenter.open_paths([image_path])
    executor.run_all(presenter)
    assert presenter.current_path == str(image_path)
    assert presenter.current_prediction is not None
    assert view.last("show_heatmap")[0] is not None


def test_clicking_a_result_shows_its_prediction_at_once(loaded, image_folder):
    presenter, view = loaded
    presenter.open_folder(image_folder)
    presenter.poll()
    runs, explainer = presenter.predictor.runs, FakeExplainer.instances[-1]
    row = presenter.results[2]
    start = len(view.calls)
    presenter.select_result(row.path)
    # Shown before any job ran: the batch's prediction is reused.
    assert view.calls[start] == ("show_prediction", view.calls[start][1])
    assert view.calls[start][1][0].label == row.label
    presenter.poll()
    assert view.last("show_image")[0] == row.path
    assert view.last("show_prediction")[0].probability == pytest.approx(row.prediction.probability)
    assert view.last("show_heatmap")[0] is not None
    assert presenter.predictor.runs == runs + 1 and explainer.calls == ["gradcam"]  # heatmap only


def test_export_writes_csv_and_overlay_pngs(loaded, image_folder, tmp_path):
    presenter, view = loaded
    presenter.open_folder(image_folder)
    presenter.poll()
    presenter.set_opacity(0.6)
    out = tmp_path / "export"
    presenter.export(out)
    presenter.poll()
    lines = (out / "predictions.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith(
        "# histolens predictions; model test-test_resnet; heatmap gradcam; threshold 0.500000; "
    )
    assert RESEARCH_NOTICE in lines[0]
    rows = list(csv.DictReader(lines[1:]))
    assert len(rows) == 6
    # The columns of ``histolens predict`` (histolens.inference.predictions_csv), then the export's own.
    assert list(rows[0]) == [
        "path",
        "prediction",
        "probability",
        "p_benign",
        "p_malignant",
        "prediction_set",
        "refer",
        "ood",
        "ood_reason",
        "uncertain",
        "file",
        "overlay",
        "error",
    ]
    by_file = {r["file"]: r for r in rows}
    # A checkpoint without a calibration or guard: no set, nothing referred or flagged.
    assert {(r["prediction_set"], r["refer"], r["ood"]) for r in rows if not r["error"]} == {
        ("", "0", "0")
    }
    broken = by_file["broken.png"]
    assert broken["overlay"] == "" and broken["error"] and broken["path"].endswith("broken.png")
    assert broken["prediction"] == broken["probability"] == broken["refer"] == ""
    nested = by_file["patient_b/tile_9.png"]
    assert nested["overlay"] == "overlays/patient_b__tile_9_gradcam.png"
    assert float(nested["p_benign"]) + float(nested["p_malignant"]) == pytest.approx(1, abs=1e-5)
    with Image.open(out / nested["overlay"]) as png:
        assert png.format == "PNG" and png.size == (96, 64)
    assert len(list((out / "overlays").iterdir())) == 5  # no temp files left behind
    assert "Exported 6 results and 5 overlays" in view.last("show_status")[0]
    assert presenter.last_export.n_overlays == 5


def test_export_without_results_says_what_to_do(tmp_path):
    presenter, view = make_presenter()
    presenter.export(tmp_path / "x")
    assert view.last("show_error") == (
        "Nothing to export",
        "Open a folder or several images first; their results are what gets exported.",
    )
    assert not (tmp_path / "x").exists()


def test_stale_results_never_replace_the_newer_image(checkpoint, image_folder):
    executor = ManualExecutor()
    presenter, view = make_presenter(executor)
    presenter.open_checkpoint(checkpoint)
    executor.run_all(presenter)
    presenter.open_image(image_folder / "tile_0.png")
    presenter.open_image(image_folder / "tile_1.png")  # before the first one loaded
    executor.run_all(presenter)
    shown = [args[0] for args in view.all("show_image")]
    assert shown == [str(image_folder / "tile_1.png")]
    assert presenter.current_prediction.path == str(image_folder / "tile_1.png")


def test_a_click_is_answered_between_batch_chunks_and_cancel_stops(
    checkpoint, image_folder, image_path
):
    executor = ManualExecutor()
    presenter, view = make_presenter(executor, batch_chunk=1)
    presenter.open_checkpoint(checkpoint)
    executor.run_all(presenter)
    presenter.open_folder(image_folder)
    executor.run_next()  # list the folder
    presenter.poll()
    executor.run_next()  # first chunk
    presenter.open_image(image_path)  # the user clicks while the batch runs
    presenter.poll()  # queues chunk 2 behind the image load
    executor.run_next()
    presenter.poll()
    assert view.last("show_image")[0] == str(image_path)
    assert presenter.busy
    presenter.cancel_batch()
    executor.run_all(presenter)
    assert len(presenter.results) < 6
    assert view.last("show_progress") == (0, 0)
    assert any("Stopped after" in args[0] for args in view.all("show_status"))
    assert not presenter.busy and view.last("set_busy") == (False,)


def test_switching_checkpoint_closes_the_old_explainer_and_reruns(
    checkpoint, tmp_path, image_folder
):
    presenter, view = make_presenter()
    presenter.open_checkpoint(checkpoint)
    presenter.open_folder(image_folder)
    presenter.open_image(image_folder / "tile_2.png")
    presenter.poll()
    first = FakeExplainer.instances[-1]
    other = make_checkpoint(tmp_path / "other.safetensors", seed=1)
    presenter.open_checkpoint(other)
    presenter.poll()
    assert first.closed and not FakeExplainer.instances[-1].closed
    assert presenter.predictor.source == str(other)
    assert len(presenter.results) == 6  # the folder was analysed again with the new model
    assert view.last("show_image")[0] == str(image_folder / "tile_2.png")
    presenter.close()
    presenter.poll()
    assert FakeExplainer.instances[-1].closed


def test_find_images_and_method_labels(image_folder, tmp_path):
    found = [Path(p).relative_to(image_folder).as_posix() for p in find_images(image_folder)]
    assert found == IMAGE_FOLDER_FILES
    from histolens.data.imagefiles import images_under

    assert find_images(image_folder) == [str(p) for p in images_under(image_folder)]
    (tmp_path / "empty").mkdir()
    from histolens.errors import DataError

    with pytest.raises(DataError, match="No images in .*empty"):
        find_images(tmp_path / "empty")
    with pytest.raises(DataError, match="tile_0.png is not a folder"):
        find_images(image_folder / "tile_0.png")
    assert method_label("gradcam++") == "Grad-CAM++" and method_label("new_cam") == "new_cam"


def test_real_explainer(checkpoint, image_path):
    from histolens.explain import CAM_METHODS

    view = FakeView()
    presenter = Presenter(view, ImmediateExecutor())
    presenter.open_checkpoint(checkpoint)
    presenter.poll()
    assert set(presenter.methods) == set(CAM_METHODS)
    presenter.open_image(image_path)
    presenter.poll()
    overlay, caption = view.last("show_heatmap")
    assert overlay is not None and overlay.size == (140, 96), caption
    presenter.close()
    presenter.poll()


def test_model_info_names_the_backbones_licence(tmp_path):
    from histolens.gui.model_info import ModelSummary
    from histolens.testing import make_checkpoint

    path = make_checkpoint(tmp_path / "uni.safetensors", licence="CC-BY-NC-ND-4.0")
    info = ModelSummary.from_predictor(Predictor.from_checkpoint(path))
    assert dict(info.rows())["Licence"] == "CC-BY-NC-ND-4.0"


# --- prediction sets and the out-of-distribution flag (issue #15) -------------------------------
def _guarded_checkpoint(path: Path, score: float) -> Path:
    """A checkpoint with the image checks of the guard and a calibration that refers every
    image (``score`` 0.99) or none (0.01); see histolens.testing.flat_calibration."""
    from histolens.inference.ood import OODGuard
    from histolens.testing import flat_calibration

    return make_checkpoint(path, conformal=flat_calibration(score), guard=OODGuard())


@pytest.fixture
def white_path(tmp_path) -> Path:
    path = tmp_path / "blank.png"
    Image.new("RGB", (140, 96), "white").save(path)
    return path


def _open(checkpoint: Path, image: Path):
    presenter, view = make_presenter()
    presenter.open_checkpoint(checkpoint)
    presenter.open_image(image)
    presenter.poll()
    (summary,) = view.last("show_prediction")
    return summary, view.last("show_status")[0]


def test_a_referred_image_shows_its_set_alpha_and_reason(tmp_path, image_path):
    summary, status = _open(_guarded_checkpoint(tmp_path / "r.st", 0.99), image_path)
    assert summary.refer and summary.uncertain and not summary.ood
    assert summary.prediction_set == ("benign", "malignant") and summary.alpha == 0.1
    assert summary.review_text == (
        "REFER: {benign, malignant} at α=0.10\nBenign and malignant are all plausible at alpha 0.1"
    )
    assert summary.set_text == "prediction set {benign, malignant} at α=0.10"
    assert status.endswith("  ·  REFER")

    summary, status = _open(_guarded_checkpoint(tmp_path / "k.st", 0.01), image_path)
    assert not summary.flagged and summary.review_text == "" and summary.flag == ""
    assert summary.set_text == f"prediction set {{{summary.label}}} at α=0.10"
    assert "·" not in status


def test_an_image_unlike_the_training_images_says_so_with_the_reason(
    tmp_path, white_path, image_path
):
    summary, status = _open(_guarded_checkpoint(tmp_path / "k.st", 0.01), white_path)
    assert summary.ood and summary.refer and summary.flagged
    assert summary.ood_reason == "the image is nearly uniform (no visible structure)"
    assert summary.review_text == (
        "NOT LIKE THE TRAINING IMAGES\nThe image is nearly uniform (no visible structure)"
    )
    assert status.endswith("  ·  NOT LIKE THE TRAINING IMAGES")
    # A guard without a calibration (an older training) still flags it; no set is shown.
    from histolens.inference.ood import OODGuard

    summary, _ = _open(make_checkpoint(tmp_path / "g.st", guard=OODGuard()), white_path)
    assert summary.ood and summary.review_text.startswith("NOT LIKE THE TRAINING IMAGES\n")
    assert summary.set_text == ""


def test_batch_flags_referred_and_unlike_rows_sorts_them_and_exports_them(
    tmp_path, image_folder, white_path
):
    presenter, view = make_presenter()
    presenter.open_checkpoint(_guarded_checkpoint(tmp_path / "r.st", 0.99))
    presenter.open_paths([image_folder, white_path])
    presenter.poll()
    flags = {r.name: r.review for r in presenter.results}
    assert flags["blank.png"] == "not like the training images"
    assert flags["slides/broken.png"] == "unreadable"
    assert {flags[f"slides/tile_{i}.png"] for i in range(4)} == {"refer"}
    status = view.last("show_status")[0]
    assert "; 6 review needed (1 not like the training images); 1 unreadable" in status

    presenter.sort_results("review")
    rows = view.last("show_results")[0]
    assert [r.review for r in rows[:2]] == ["unreadable", "not like the training images"]
    assert {r.review for r in rows[2:]} == {"refer"}

    presenter.export(tmp_path / "export")
    presenter.poll()
    lines = (tmp_path / "export" / "predictions.csv").read_text(encoding="utf-8").splitlines()
    by_file = {r["file"]: r for r in csv.DictReader(lines[1:])}
    blank = by_file["blank.png"]
    assert (blank["ood"], blank["refer"], blank["uncertain"]) == ("1", "1", "1")
    assert blank["ood_reason"] == "the image is nearly uniform (no visible structure)"
    tile = by_file["slides/tile_0.png"]
    assert tile["prediction_set"] == "benign;malignant" and tile["refer"] == "1"
    assert (tile["ood"], tile["ood_reason"]) == ("0", "")
