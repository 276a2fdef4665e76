"""Predicting folders of any size into a CSV: streamed, written as it goes, and resumable.

Images are decoded a few batches ahead by a thread pool, and each batch's rows are appended to
``OUT.partial`` and flushed to disk (fsync) before the next batch is predicted, so a killed run
loses at most the batch in flight, and memory holds a few batches of images and the list of paths,
not the predictions. Running again with the same output reads the paths already in
``OUT.partial`` (a torn last line is dropped), skips them and finishes the rest; the finished file
is then renamed onto ``OUT``, so ``OUT`` itself is only ever complete. ``OUT.partial.json`` records
the model, inputs and magnification the rows came from, and a rerun with another checkpoint,
other inputs or another ``--magnification`` is refused rather than mixed in.

Rows are in the order of ``images_under`` (the one rule for which files are images) and batches
are cut from that list at fixed positions, so a resumed run predicts the same batches as an
uninterrupted one and writes the same file.

This module is the streaming loop and what ``histolens predict`` calls; the partial file and its
record (reading back, checking, opening for append) are :mod:`histolens.inference.resume`'s, and
the progress line is :mod:`histolens.inference.progress`'s.
"""

from __future__ import annotations

import csv
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from histolens.data.imagefiles import images_under
from histolens.data.records import Skipped
from histolens.inference import predictions_csv
from histolens.inference.predictor import Predictor
from histolens.inference.progress import ProgressReporter
from histolens.inference.resume import (
    PARTIAL_SUFFIX,
    RowBrief,
    Tally,
    check_sidecar,
    model_fingerprint,
    partial_writer,
    read_partial,
    sidecar_path,
    sidecar_record,
    sync,
)

__all__ = [
    "PARTIAL_SUFFIX",
    "PredictionJob",
    "PredictSummary",
    "ProgressReporter",
    "RowBrief",
    "prediction_columns",
]


def prediction_columns(predictor: Predictor) -> list[str]:
    """The columns of the predictions CSV of ``predictor``, as ``Prediction.as_row`` writes them."""
    return predictions_csv.prediction_columns(predictor.class_names)


@dataclass
class PredictSummary:
    """What a finished run wrote: counts over every row of ``out``, and this run's own work."""

    out: Path
    rows: int
    resumed: int
    labels: Counter
    uncertain: int
    first: list[RowBrief]
    skipped: list[Skipped]
    seconds: float

    @property
    def new_rows(self) -> int:
        return self.rows - self.resumed

    @property
    def images_per_second(self) -> float:
        handled = self.new_rows + len(self.skipped)
        return handled / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class PredictionJob:
    """Predictions of ``inputs`` into the CSV ``out``, resuming ``out.partial`` when one is there.

    Make one with :meth:`open` (it checks and reads an unfinished run, counts the images and writes
    nothing), then call :meth:`run`.
    """

    predictor: Predictor
    inputs: list[Path]
    paths: list[str]  # every image of the inputs, in order, each once
    out: Path
    columns: list[str]
    fingerprint: str
    total: int
    already_done: int
    done: set[str]
    tally: Tally
    keep_bytes: int  # of the partial file; anything after is a torn line
    magnification: int | None = None  # of every image; None: each path's own, if it says

    @property
    def partial(self) -> Path:
        return self.out.with_name(self.out.name + PARTIAL_SUFFIX)

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.partial)

    @classmethod
    def open(
        cls,
        predictor: Predictor,
        inputs: Sequence[str | os.PathLike],
        out: str | os.PathLike,
        magnification: int | None = None,
    ) -> PredictionJob:
        """Check an unfinished run of the same output (same model, inputs and magnification),
        read its rows and count the images still to do.

        ``magnification`` is every image's, for prediction sets calibrated per magnification;
        None reads each image's from its path (else the most cautious calibration).
        """
        inputs = [Path(p) for p in inputs]
        paths = list(dict.fromkeys(str(p) for p in images_under(*inputs)))
        out = Path(out)
        job = cls(
            predictor,
            inputs,
            paths,
            out,
            prediction_columns(predictor),
            model_fingerprint(predictor),
            len(paths),
            0,
            set(),
            Tally(),
            0,
            magnification,
        )
        if job.partial.exists():
            check_sidecar(job.partial, predictor, job.fingerprint, inputs, magnification)
            job.keep_bytes = read_partial(job.partial, job.columns, job.done, job.tally)
            job.already_done = sum(p in job.done for p in paths)
        return job

    def _chunks(self, batch_size: int) -> Iterator[list[str]]:
        # Cut at fixed positions of the full listing, so a resumed run forms the same batches.
        for i in range(0, len(self.paths), batch_size):
            yield [p for p in self.paths[i : i + batch_size] if p not in self.done]

    def run(
        self,
        batch_size: int = 32,
        workers: int = 2,
        prefetch: int = 2,
        progress: Callable[[int], None] | None = None,
    ) -> PredictSummary:
        """Predict the images not yet in the output, appending each batch's rows to the partial
        file, then rename it onto ``out``. ``progress`` gets the number of images of each batch.

        Memory holds at most ``prefetch + 1`` batches of decoded images, whatever the total.
        """
        start = time.perf_counter()
        resumed = self.tally.rows
        skipped: list[Skipped] = []
        record = sidecar_record(
            self.predictor, self.fingerprint, self.inputs, self.columns, self.magnification
        )
        with partial_writer(self.partial, self.keep_bytes, record, self.columns) as fh:
            self._predict_into(fh, batch_size, workers, prefetch, progress, skipped)
        os.replace(self.partial, self.out)
        _sync_folder(self.out.parent)
        self.sidecar.unlink(missing_ok=True)
        return PredictSummary(
            self.out,
            self.tally.rows,
            resumed,
            self.tally.labels,
            self.tally.uncertain,
            self.tally.first,
            skipped,
            time.perf_counter() - start,
        )

    def _predict_into(
        self,
        fh: IO[str],
        batch_size: int,
        workers: int,
        prefetch: int,
        progress: Callable[[int], None] | None,
        skipped: list[Skipped],
    ) -> None:
        predictor = self.predictor
        pool = ThreadPoolExecutor(max_workers=max(1, workers))
        try:
            writer = csv.DictWriter(fh, fieldnames=self.columns)
            chunks = self._chunks(batch_size)
            queued: deque[tuple[list[str], list[Future]]] = deque()

            def queue_next() -> None:
                for chunk in chunks:
                    if chunk:
                        queued.append(
                            (chunk, [pool.submit(predictor.load_input, p) for p in chunk])
                        )
                        return

            for _ in range(max(0, prefetch) + 1):
                queue_next()
            while queued:
                chunk, futures = queued.popleft()
                queue_next()
                loaded = [(p, f.result()) for p, f in zip(chunk, futures, strict=True)]
                ok = [(p, r) for p, r in loaded if isinstance(r, torch.Tensor)]
                skipped += [r for _, r in loaded if isinstance(r, Skipped)]
                if ok:
                    batch = torch.stack([r for _, r in ok])
                    # predict_batch: prediction sets and the out-of-distribution guard too.
                    mags = None if self.magnification is None else [self.magnification] * len(ok)
                    preds = predictor.predict_batch(
                        batch, [path for path, _ in ok], magnifications=mags
                    )
                    for (path, _), pred in zip(ok, preds, strict=True):
                        writer.writerow(pred.as_row(predictor.class_names))
                        self.tally.add(RowBrief(path, pred.label, pred.probability, pred.uncertain))
                    sync(fh)
                if progress is not None:
                    progress(len(chunk))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _sync_folder(folder: Path) -> None:
    # Makes the rename itself durable; folders cannot be opened this way on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
