"""Slide tiles are decided at the operating point of the magnification whose field they cover."""

from __future__ import annotations

import dataclasses

import h5py

from histolens.slides.memory import release_free_heap
from histolens.slides.scale import training_scale
from histolens.stats.decisions import OperatingPoints
from histolens.stats.operating_points import OperatingPointRule

# Thresholds far apart, so which one a tile was decided at shows in every output.
OWN_200, POOLED = 0.2, 0.8


def test_tile_scale_knows_the_training_magnification_it_matches():
    assert training_scale((224, 224), "all").magnification == 200  # mixed: tiled at 200X
    assert training_scale((224, 224), "100").magnification == 100
    # --tile-mpp cutting 100X's 700 x 460 um field for a model trained on every magnification.
    assert training_scale((294, 448), "all", tile_mpp=700 / 448).magnification == 100
    # A scale between magnifications, or a square --tile-size field, matches none.
    assert training_scale((224, 224), "all", tile_mpp=0.8).magnification is None
    assert training_scale((294, 448), "200", tile_size=300).magnification is None
    # The scale recorded at training (--mpp 0.5) is 200X's in the BreakHis table.
    recorded = training_scale((294, 448), "all", image_mpp=0.5, image_size=(700, 460))
    assert recorded.magnification == 200
    assert training_scale((224, 224), "all", image_mpp=0.7).magnification is None


def _predictor(checkpoint):
    from histolens.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(checkpoint)
    predictor.threshold = POOLED
    predictor.operating_points = OperatingPoints(
        OperatingPointRule(), POOLED, {"200": OWN_200}, {"200": (3, 3), "100": (1, 2)}
    )
    return predictor


def _run(tmp_path, checkpoint, **options):
    from histolens.slides.predict import SlideOptions, SlideRun

    opts = SlideOptions(workers=0, batch_size=4, **options)
    return SlideRun(_predictor(checkpoint), tmp_path / "out", opts, progress=False)


def _outputs(run, slide):
    summary = run.predict_slide(slide)
    with h5py.File(run.out / "h5" / f"{slide.stem}.h5", "r") as f:
        return summary, dict(f.attrs), f["score"][:], f["refer"][:]


def test_tiles_at_a_training_field_use_that_magnifications_threshold(
    tmp_path, tiny_checkpoint, small_slides
):
    run = _run(tmp_path, tiny_checkpoint)  # 'all' checkpoint: tiles cover 200X's field
    assert run.operating_point.magnification == 200 and run.threshold == OWN_200
    summary, attrs, score, _ = _outputs(run, small_slides / "slide0.tiff")
    assert summary.magnification == "200X" and summary.threshold == OWN_200
    assert "200X's own threshold" in summary.operating_point
    assert attrs["magnification"] == "200X" and attrs["threshold"] == OWN_200
    assert attrs["operating_point"] == summary.operating_point
    assert summary.tiles_above_threshold == int((score >= OWN_200).sum())
    # 100X has too few patients of its own: its tiles borrow the pooled threshold.
    meta = dataclasses.replace(run.predictor.metadata, magnification="100")
    run.predictor.metadata = meta
    from histolens.slides.operating import tile_operating_point
    from histolens.slides.scale import training_scale as scale_of

    hundred = tile_operating_point(run.predictor, scale_of((160, 160), "100"))
    assert hundred.magnification == 100 and hundred.threshold == POOLED
    assert "borrow the pooled threshold" in hundred.description


def test_tiles_matching_no_magnification_use_the_pooled_point(
    tmp_path, tiny_checkpoint, small_slides
):
    run = _run(tmp_path, tiny_checkpoint, tile_mpp=1.0, tile_size=160)
    assert run.operating_point.magnification is None and run.threshold == POOLED
    summary, attrs, score, refer = _outputs(run, small_slides / "slide1.tiff")
    assert summary.magnification == "pooled" and attrs["magnification"] == "pooled"
    assert "match no training magnification" in summary.operating_point
    assert summary.tiles_above_threshold == int((score >= POOLED).sum())


def test_a_threshold_given_overrides_the_operating_point(tiny_checkpoint, tmp_path):
    run = _run(tmp_path, tiny_checkpoint, threshold=0.5)
    assert run.threshold == 0.5 and "--threshold" in run.operating_point.description
    assert run.operating_point.magnification == 200  # prediction sets keep 200X's calibration


def test_every_tile_is_decided_as_an_image_of_the_tiles_magnification(tiny_checkpoint):
    import torch

    from histolens.slides.tiles import score_batch

    predictor = _predictor(tiny_checkpoint)
    seen = []
    decide = predictor.decide_batch

    def recording(probs, paths=None, ood_reasons=None, magnifications=None):
        seen.append(list(magnifications))
        return decide(probs, paths, ood_reasons, magnifications)

    predictor.decide_batch = recording
    h, w = predictor.preprocess.input_size
    batch = torch.zeros((3, 3, h, w), dtype=torch.uint8)
    score_batch(predictor, batch, magnification=200)
    score_batch(predictor, batch)
    assert seen == [[200, 200, 200], [None, None, None]]


def test_free_heap_release_runs_on_this_platform():
    assert isinstance(release_free_heap(), bool)
