"""Predicting folders of any size into a CSV: streamed, written as it goes, and resumable.

Images are decoded a few batches ahead by a thread pool, and each batch's rows are appended to
``OUT.partial`` and flushed to disk (fsync) before the next batch is predicted, so a killed run
loses at most the batch in flight, and memory holds a few batches of images and the list of paths,
not the predictions. Running again with the same output reads the paths already in
``OUT.partial`` (a torn last line is dropped), skips them and finishes the rest; the finished file
is then renamed onto ``OUT``, so ``OUT`` itself is only ever complete. ``OUT.partial.json`` records
the model and inputs the rows came from, and a rerun with another checkpoint or other inputs is
refused rather than mixed in.

Rows are in the order of ``images_under`` (the one rule for which files are images) and batches
are cut from that list at fixed positions, so a resumed run predicts the same batches as an
uninterrupted one and writes the same file.
"""

# Over 400 lines: one resumable job: reading back the partial file's rows (their columns are
# histolens.predictions_csv's), its bookkeeping and the progress line share its format.

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from histolens import predictions_csv
from histolens.atomic import atomic_write_text
from histolens.data import Skipped
from histolens.errors import ConfigError
from histolens.imagefiles import images_under
from histolens.predictor import Predictor

__all__ = [
    "PARTIAL_SUFFIX",
    "PredictionJob",
    "PredictSummary",
    "ProgressReporter",
    "RowBrief",
    "prediction_columns",
]

PARTIAL_SUFFIX = ".partial"
_SIDECAR_FORMAT = "histolens-predict-partial"
# 2: the columns and encoding of histolens.predictions_csv (1: flags True/False, uncertain 4th).
_SIDECAR_VERSION = 2
# The summary lists each image when there are at most this many.
_BRIEF_ROWS = 20
# File names that are not valid UTF-8 (possible on Linux) round-trip through the CSV unchanged.
_ENCODING_ERRORS = "surrogateescape"


def prediction_columns(predictor: Predictor) -> list[str]:
    """The columns of the predictions CSV of ``predictor``, as ``Prediction.as_row`` writes them."""
    return predictions_csv.prediction_columns(predictor.class_names)


def model_fingerprint(predictor: Predictor) -> str:
    """SHA-256 of the checkpoint file and the predictor's metadata: what makes its predictions."""
    digest = hashlib.sha256()
    source = Path(predictor.source) if predictor.source else None
    if source is not None and source.is_file():
        with open(source, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    meta = predictor.metadata.to_dict() if predictor.metadata is not None else {}
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class RowBrief:
    """One written row, as the summary shows it."""

    path: str
    label: str
    probability: float
    uncertain: bool


@dataclass
class _Tally:
    """Counts over the rows of the output, kept as they are written (not the rows themselves)."""

    rows: int = 0
    labels: Counter = field(default_factory=Counter)
    uncertain: int = 0
    first: list[RowBrief] = field(default_factory=list)

    def add(self, brief: RowBrief) -> None:
        self.rows += 1
        self.labels[brief.label] += 1
        self.uncertain += brief.uncertain
        if len(self.first) <= _BRIEF_ROWS:
            self.first.append(brief)


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


def _sidecar_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _read_sidecar(sidecar: Path) -> dict[str, Any]:
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("format") != _SIDECAR_FORMAT:
        raise ConfigError(f"{sidecar} is not a histolens record of an unfinished prediction run.")
    return data


def _lines(path: Path, limit: int) -> Iterator[str]:
    """The lines of the first ``limit`` bytes of a file, read one at a time."""
    with open(path, "rb") as raw:
        read = 0
        for line in raw:
            read += len(line)
            if read > limit:
                return
            yield line.decode("utf-8", errors=_ENCODING_ERRORS)


def _complete_length(path: Path) -> int:
    """Bytes up to and including the last newline: what survives of a file killed mid-write."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        end = size
        while end > 0:
            start = max(0, end - 65536)
            fh.seek(start)
            block = fh.read(end - start)
            i = block.rfind(b"\n")
            if i >= 0:
                return start + i + 1
            end = start
    return 0


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
    tally: _Tally
    keep_bytes: int  # of the partial file; anything after is a torn line

    @property
    def partial(self) -> Path:
        return self.out.with_name(self.out.name + PARTIAL_SUFFIX)

    @property
    def sidecar(self) -> Path:
        return _sidecar_path(self.partial)

    @classmethod
    def open(
        cls, predictor: Predictor, inputs: Sequence[str | os.PathLike], out: str | os.PathLike
    ) -> PredictionJob:
        """Check an unfinished run of the same output (same model, same inputs), read its rows
        and count the images still to do."""
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
            _Tally(),
            0,
        )
        if job.partial.exists():
            job._check_sidecar()
            job._read_partial()
            job.already_done = sum(p in job.done for p in paths)
        return job

    def _inputs_record(self) -> list[list[str]]:
        return [[str(p), os.path.abspath(p)] for p in self.inputs]

    def _check_sidecar(self) -> None:
        if not self.sidecar.is_file():
            raise ConfigError(
                f"{self.partial} has no {self.sidecar.name} saying which model wrote it; "
                "delete it to start over."
            )
        record = _read_sidecar(self.sidecar)
        if record.get("version") != _SIDECAR_VERSION:
            raise ConfigError(
                f"{self.partial} was started by another version of histolens, which writes other "
                "columns; delete it to start over."
            )
        if record.get("model_sha256") != self.fingerprint:
            raise ConfigError(
                f"{self.partial} was started with model {record.get('model_id', '?')} "
                f"({record.get('checkpoint', '?')}), not {self.predictor.model_id} "
                f"({self.predictor.source}); delete it, or write to another file, to predict "
                "with this model."
            )
        if record.get("inputs") != self._inputs_record():
            given = ", ".join(p for p, _ in record.get("inputs", [])) or "none"
            raise ConfigError(
                f"{self.partial} was started on other inputs ({given}); give the same inputs "
                "to resume it, or delete it to start over."
            )
        # The prediction sets (and so refer) of the rows written depend on alpha, which the
        # model's fingerprint does not include; None: the model has no calibration.
        started, alpha = record.get("alpha"), self.predictor.refer_alpha
        if started != alpha:
            if started is None:
                raise ConfigError(
                    f"{self.partial} does not record the alpha of its prediction sets; delete "
                    "it to start over."
                )
            raise ConfigError(
                f"{self.partial} was started with prediction sets at alpha {started}, not "
                f"{alpha}; give --alpha {started} to resume it, or delete it to start over."
            )

    def _read_partial(self) -> None:
        self.keep_bytes = _complete_length(self.partial)
        reader = csv.reader(_lines(self.partial, self.keep_bytes))
        header = next(reader, None)
        if header is None:
            self.keep_bytes = 0
            return
        if header != self.columns:
            raise ConfigError(
                f"{self.partial} does not have the columns {', '.join(self.columns)}; "
                "delete it to start over."
            )
        i_path, i_label, i_prob, i_unc = (
            self.columns.index(c) for c in ("path", "prediction", "probability", "uncertain")
        )
        for row in reader:
            try:
                if len(row) != len(self.columns):
                    raise ValueError
                brief = RowBrief(
                    row[i_path],
                    row[i_label],
                    float(row[i_prob]),
                    predictions_csv.parse_flag(row[i_unc]),
                )
            except ValueError:
                raise ConfigError(
                    f"{self.partial} has a damaged row at line {reader.line_num}; "
                    "delete it to start over."
                ) from None
            if brief.path not in self.done:
                self.done.add(brief.path)
                self.tally.add(brief)

    def _chunks(self, batch_size: int) -> Iterator[list[str]]:
        # Cut at fixed positions of the full listing, so a resumed run forms the same batches.
        for i in range(0, len(self.paths), batch_size):
            yield [p for p in self.paths[i : i + batch_size] if p not in self.done]

    @contextlib.contextmanager
    def _partial_writer(self) -> Iterator[IO[str]]:
        """The partial file opened for appending: the torn tail cut off, or header and sidecar
        written first when it is new."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.keep_bytes:
            os.truncate(self.partial, self.keep_bytes)
        else:
            atomic_write_text(
                self.sidecar,
                json.dumps(
                    {
                        "format": _SIDECAR_FORMAT,
                        "version": _SIDECAR_VERSION,
                        "model_id": self.predictor.model_id,
                        "checkpoint": self.predictor.source,
                        "model_sha256": self.fingerprint,
                        "inputs": self._inputs_record(),
                        "alpha": self.predictor.refer_alpha,
                        "columns": self.columns,
                    },
                    indent=2,
                ),
            )
        mode = "a" if self.keep_bytes else "w"
        with open(self.partial, mode, newline="", encoding="utf-8", errors=_ENCODING_ERRORS) as fh:
            if mode == "w":
                csv.writer(fh).writerow(self.columns)
                _sync(fh)
            yield fh

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
        with self._partial_writer() as fh:
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
                    preds = predictor.predict_batch(batch, [path for path, _ in ok])
                    for (path, _), pred in zip(ok, preds, strict=True):
                        writer.writerow(pred.as_row(predictor.class_names))
                        self.tally.add(RowBrief(path, pred.label, pred.probability, pred.uncertain))
                    _sync(fh)
                if progress is not None:
                    progress(len(chunk))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _sync(fh: IO) -> None:
    fh.flush()
    os.fsync(fh.fileno())


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


class ProgressReporter:
    """Images done of the total and images/s: a live bar on a terminal, and a plain line every
    ``interval`` seconds otherwise (log files get readable lines, not carriage returns)."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        stream: IO[str] | None = None,
        interval: float = 10.0,
        enabled: bool = True,
    ) -> None:
        self.total = total
        self.done = initial
        self.initial = initial
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.enabled = enabled
        self._start = time.perf_counter()
        self._last_line = self._start
        self._bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc="Predicting",
                unit=" images",
                file=self.stream,
                dynamic_ncols=True,
            )

    @property
    def images_per_second(self) -> float:
        elapsed = time.perf_counter() - self._start
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.images_per_second
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = f", about {left:.0f} s left" if left == left and self.done < self.total else ""
        return f"predicted {self.done:,}/{self.total:,} images, {rate:.1f} images/s{eta}"

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.perf_counter() - self._last_line >= self.interval:
            self._last_line = time.perf_counter()
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.done > self.initial:
            print(self.line(), file=self.stream, flush=True)
        self.enabled = False

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
