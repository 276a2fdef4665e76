"""``histolens slide predict``: mask, tile and score slides; write each slide's outputs once.

A slide's tile scores go batch by batch into a partial HDF5 file (``h5/.<slide>.h5.partial``)
whose ``done`` attribute counts the tiles written, so an interrupted run resumes at the next
batch; the finished file is renamed into place, the PNGs and GeoJSON follow, and the summary is
written last. A slide whose summary matches the checkpoint's fingerprint is skipped. Memory holds
one batch of tiles (plus the tile scores, a few floats a tile), whatever the slide's size.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histolens.errors import ConfigError, DataError
from histolens.slides.cohort import SLIDE_SUFFIXES, find_slides, parse_shard, shard_slides
from histolens.slides.memory import TRIM_EVERY, release_free_heap, runs_on_cpu
from histolens.slides.operating import tile_operating_point
from histolens.slides.outputs import (
    SlideOutputs,
    SlideSummary,
    heatmap_background,
    outputs_exist,
    read_summary,
    write_geojson,
    write_heatmap,
    write_mask,
)
from histolens.slides.partial import PartialScores, create_partial, resume_point
from histolens.slides.reader import open_slide
from histolens.slides.scale import TileScale, training_scale
from histolens.slides.tiles import StageTimes
from histolens.slides.tissue import MASK_MPP, mask_area_mm2, tile_grid, tissue_mask

__all__ = [
    "SLIDE_SUFFIXES",
    "SlideOptions",
    "SlideRun",
    "find_slides",
    "parse_shard",
    "shard_slides",
]


@dataclass(frozen=True)
class SlideOptions:
    """How slides are tiled and scored (the CLI's options; defaults here)."""

    slide_mpp: float | None = None
    tile_mpp: float | None = None
    tile_size: int | None = None
    min_tissue: float = 0.5
    overlap: float = 0.0
    batch_size: int = 32
    workers: int = 2
    save_features: bool = False
    threshold: float | None = None
    score_class: str | None = None
    top_k: int = 10

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue must be between 0 and 1, not {self.min_tissue}.")
        if not 0.0 <= self.overlap < 0.95:
            raise ConfigError(f"--overlap must be at least 0 and under 0.95, not {self.overlap}.")
        if self.batch_size < 1 or self.workers < 0 or self.top_k < 1:
            raise ConfigError("--batch-size and --top-k must be at least 1, --workers at least 0.")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be between 0 and 1, not {self.threshold}.")


@dataclass
class SlideRun:
    """Scores slides with one Predictor into one output folder."""

    predictor: object
    out: Path
    options: SlideOptions = field(default_factory=SlideOptions)
    progress: bool = True
    fingerprint: str = ""
    times: StageTimes = field(default_factory=StageTimes)
    masking_seconds: float = 0.0
    # Called with (tiles scored, tiles in the grid) before the first batch and after each one;
    # an exception it raises stops the slide there (its partial file resumes next time).
    on_progress: Callable[[int, int], None] | None = None
    # How tile-reading workers start (multiprocessing's "fork", "forkserver", "spawn"; None: the
    # platform's default). A process with a GUI toolkit must not fork: the desktop app asks for
    # "forkserver", whose workers come from a clean process.
    worker_start: str | None = None

    def __post_init__(self) -> None:
        from histolens.inference.resume import model_fingerprint

        self.out = Path(self.out)
        self.fingerprint = self.fingerprint or model_fingerprint(self.predictor)
        p = self.predictor
        names = tuple(p.class_names)
        if self.options.score_class is not None:
            if self.options.score_class not in names:
                from histolens.errors import check_choice

                check_choice("--score-class", self.options.score_class, names)
            self.score_class = self.options.score_class
        elif p.is_binary:
            self.score_class = p.positive_class
        else:
            raise ConfigError(
                f"This checkpoint has {len(names)} classes; say which one the slide heatmap "
                f"scores with --score-class ({', '.join(names)})."
            )
        self.score_index = names.index(self.score_class)
        meta = p.metadata
        self.scale: TileScale = training_scale(
            p.preprocess.input_size,
            meta.magnification if meta is not None else "all",
            self.options.tile_mpp,
            self.options.tile_size,
            meta.training_mpp if meta is not None else None,
            meta.training_image_size if meta is not None else None,
        )
        self.operating_point = tile_operating_point(p, self.scale, self.options.threshold)
        self.threshold = self.operating_point.threshold

    # --- the cohort --------------------------------------------------------------------------
    def is_done(self, slide: Path) -> bool:
        outputs = SlideOutputs(self.out, slide.stem)
        summary = read_summary(outputs.summary)
        return (
            summary is not None
            and summary.fingerprint == self.fingerprint
            and outputs_exist(outputs)
        )

    def run(
        self,
        slides: Sequence[Path],
        on_slide: Callable[[SlideSummary | None, Path, str | None], None] | None = None,
    ) -> list[SlideSummary]:
        """Score every slide not already done; ``on_slide(summary, path, note)`` after each
        (summary None and a note when the slide was skipped or could not be read)."""
        done = []
        for slide in slides:
            if self.is_done(slide):
                if on_slide:
                    on_slide(None, slide, "already done with this checkpoint")
                continue
            try:
                summary = self.predict_slide(slide)
            except DataError as exc:
                if on_slide:
                    on_slide(None, slide, str(exc))
                continue
            done.append(summary)
            if on_slide:
                on_slide(summary, slide, None)
        return done

    # --- one slide ---------------------------------------------------------------------------
    def predict_slide(self, path: Path) -> SlideSummary:
        """Mask, tile and score one slide; write its outputs; return its summary."""
        start = time.perf_counter()
        outputs = SlideOutputs(self.out, Path(path).stem)
        with open_slide(path, self.options.slide_mpp) as reader:
            t0 = time.perf_counter()
            thumbnail = reader.thumbnail(MASK_MPP)
            thumb_mpp = reader.mpp * reader.dimensions[0] / thumbnail.size[0]
            mask = tissue_mask(thumbnail, thumb_mpp)
            # Only the heatmap's small copy is kept while the tiles are scored (and inherited
            # by forked workers).
            thumbnail = heatmap_background(thumbnail)
            self.masking_seconds += time.perf_counter() - t0
            size0 = self.scale.level0_size(reader.mpp)
            grid = tile_grid(
                reader.dimensions, size0, mask, self.options.min_tissue, self.options.overlap
            )
            downsample = size0[0] / self.scale.input_size[0]
            level = reader.best_level(downsample)
            level_size = tuple(max(1, round(s / reader.level_downsamples[level])) for s in size0)
            mpp, mpp_source, dims = reader.mpp, reader.mpp_source, reader.dimensions
            read_downsample = float(reader.level_downsamples[level])
        attrs = {
            "checkpoint_fingerprint": self.fingerprint,
            "checkpoint": _source_of(self.predictor),
            "patch_size": int(level_size[0]),
            "patch_size_level0": np.asarray(size0, np.int64),
            "patch_level": int(level),
            "downsample": read_downsample,
            "level_dim": np.asarray(dims, np.int64),
            "slide_mpp": float(mpp),
            "tile_mpp": float(self.scale.mpp),
            "tile_field_um": np.asarray(self.scale.field_um, np.float64),
            "scale_source": self.scale.source,
            "min_tissue": float(self.options.min_tissue),
            "overlap": float(self.options.overlap),
            "class_names": ",".join(self.predictor.class_names),
            "score_class": self.score_class,
            **self.operating_point.as_attrs(),
            "name": outputs.name,
        }
        self._score_tiles(path, mpp, grid, size0, outputs, attrs)
        scores, ood, coords = _read_scores(outputs.h5)
        write_mask(mask, outputs.mask)
        label = f"P({self.score_class})"
        write_heatmap(thumbnail, coords, size0, scores, dims, outputs.heatmap, label)
        above = scores >= self.threshold
        write_geojson(coords[above], size0, scores[above], self.score_class, outputs.geojson)
        # The slide score leaves out tiles unlike the training images, unless all are.
        counted = scores[~ood] if (~ood).any() else scores
        k = min(self.options.top_k, len(counted))
        summary = SlideSummary(
            slide=outputs.name,
            score_mean=_stat(counted, np.mean),
            score_max=_stat(counted, np.max),
            score_topk_mean=_stat(np.sort(counted)[::-1][:k], np.mean),
            top_k=int(k),
            score_class=self.score_class,
            **self.operating_point.as_attrs(),
            tiles_above_threshold=int(above.sum()),
            tissue_mm2=round(mask_area_mm2(mask, dims, mpp), 4),
            tiles_scored=int(len(scores)),
            tiles_ood=int(ood.sum()),
            seconds=round(time.perf_counter() - start, 3),
            slide_mpp=float(mpp),
            mpp_source=mpp_source,
            tile_mpp=round(float(self.scale.mpp), 6),
            tile_size_level0=f"{size0[0]}x{size0[1]}",
            read_level=int(level),
            fingerprint=self.fingerprint,
            path=str(path),
        )
        from histolens.atomic import atomic_write_text

        atomic_write_text(outputs.summary, summary.to_json())
        return summary

    def _score_tiles(self, path, mpp, grid, size0, outputs: SlideOutputs, attrs: dict) -> None:
        """Score the grid's tiles into the partial HDF5 file batch by batch, then rename it."""
        import torch
        from torch.utils.data import DataLoader

        from histolens.slides.tiles import TileDataset, score_batch

        n = len(grid)
        outputs.h5.parent.mkdir(parents=True, exist_ok=True)
        partial, save_features = outputs.partial_h5, self.options.save_features
        start = resume_point(partial, grid.coords, self.fingerprint, save_features)
        if start is None:
            n_classes = len(self.predictor.class_names)
            create_partial(partial, grid.coords, grid.tissue, n_classes, attrs)
            start = 0
        if self.on_progress is not None:
            self.on_progress(start, n)
        if start < n:
            dataset = TileDataset(path, mpp, grid.coords[start:], size0, self.predictor.preprocess)
            release_free_heap()  # the masking's freed heap is not inherited by forked workers
            workers = min(self.options.workers, max(0, (n - start) // self.options.batch_size))
            loader = DataLoader(
                dataset,
                batch_size=self.options.batch_size,
                num_workers=workers,
                prefetch_factor=4 if workers else None,
                multiprocessing_context=self.worker_start if workers else None,
            )
            # The workers start here, before the partial file is opened: they must not inherit
            # its handle (a child holding it keeps HDF5's lock on the file after a stop).
            batches = iter(loader)
            bar = self._bar(n, start, outputs.name)
            mag = self.operating_point.magnification
            # Reading workers share the CPU with a CPU model: its input step on one thread.
            one_thread = bool(workers) and runs_on_cpu(self.predictor)
            try:
                with PartialScores(partial, self.score_index, save_features) as stored:
                    batches_done = 0
                    while True:
                        t0 = time.perf_counter()
                        batch = next(batches, None)
                        self.times.reading += time.perf_counter() - t0
                        if batch is None:
                            break
                        with torch.inference_mode():
                            scores = score_batch(self.predictor, batch, self.times, mag, one_thread)
                            b = stored.write(scores)
                        if bar is not None:
                            bar.update(b)
                        if self.on_progress is not None:
                            self.on_progress(stored.done, n)
                        batches_done += 1
                        if batches_done % TRIM_EVERY == 0:
                            release_free_heap()
            finally:
                del batches  # its workers stop now, not when a stop's traceback is freed
                dataset.close()
                if bar is not None:
                    bar.close()
        os.replace(partial, outputs.h5)

    def _bar(self, total: int, initial: int, name: str):
        if not (self.progress and _is_terminal(sys.stderr)):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=total, initial=initial, desc=name, unit=" tiles", file=sys.stderr, leave=False
        )


def _source_of(predictor) -> str:
    """The absolute path of the predictor's checkpoint ('' when it was put together by hand):
    a MIL model trained on the bags records where their features came from."""
    source = getattr(predictor, "source", "") or ""
    return str(Path(source).resolve()) if source else ""


def _read_scores(h5: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The finished slide file's per-tile scores, out-of-distribution flags and coordinates."""
    import h5py

    with h5py.File(h5, "r") as f:
        return f["score"][:], f["ood"][:], f["coords"][:]


def _stat(values: np.ndarray, fn) -> float:
    return round(float(fn(values)), 6) if len(values) else math.nan


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
