"""The unfinished output of ``histolens predict``: ``OUT.partial`` and its ``.json`` record.

A run appends rows to ``OUT.partial`` and records in ``OUT.partial.json`` (the sidecar) the model,
runtime, inputs, alpha and magnification the rows came from. Resuming reads both back: the sidecar
must match this run (same format version, model, runtime, inputs, alpha and magnification) or the
run is refused rather than mixed in; the rows are read up to the last whole line (a torn last line
is what a kill leaves behind), and any other damaged row is refused.
:class:`histolens.inference.batch.PredictionJob` drives the run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from histolens.atomic import atomic_write_text
from histolens.errors import ConfigError
from histolens.inference import predictions_csv
from histolens.inference.predictor import Predictor

__all__ = [
    "PARTIAL_SUFFIX",
    "RowBrief",
    "Tally",
    "check_sidecar",
    "model_fingerprint",
    "partial_writer",
    "read_partial",
    "runtime_of",
    "sidecar_path",
    "sidecar_record",
    "sync",
]

PARTIAL_SUFFIX = ".partial"
_SIDECAR_FORMAT = "histolens-predict-partial"
# 2: the columns and encoding of histolens.inference.predictions_csv (1: flags True/False, uncertain 4th).
_SIDECAR_VERSION = 2
# The summary lists each image when there are at most this many.
_BRIEF_ROWS = 20
# File names that are not valid UTF-8 (possible on Linux) round-trip through the CSV unchanged.
_ENCODING_ERRORS = "surrogateescape"


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


def runtime_of(predictor: Predictor) -> str:
    """What computes the predictor's logits: 'torch', or the runtime of an ONNX export
    ('onnxruntime' or 'openvino'), whose numbers differ in the last digits."""
    return getattr(predictor.runner, "runtime", "torch")


@dataclass(frozen=True)
class RowBrief:
    """One written row, as the summary shows it."""

    path: str
    label: str
    probability: float
    uncertain: bool


@dataclass
class Tally:
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


def sidecar_path(partial: Path) -> Path:
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


def _inputs_record(inputs: Sequence[Path]) -> list[list[str]]:
    return [[str(p), os.path.abspath(p)] for p in inputs]


def sidecar_record(
    predictor: Predictor,
    fingerprint: str,
    inputs: Sequence[Path],
    columns: list[str],
    magnification: int | None = None,
) -> dict[str, Any]:
    """What the sidecar of a new partial file records: the model, runtime, inputs, alpha and
    magnification (given for every image; None: read from each path) of its rows."""
    return {
        "format": _SIDECAR_FORMAT,
        "version": _SIDECAR_VERSION,
        "model_id": predictor.model_id,
        "checkpoint": predictor.source,
        "model_sha256": fingerprint,
        "runtime": runtime_of(predictor),
        "inputs": _inputs_record(inputs),
        "alpha": predictor.refer_alpha,
        "magnification": magnification,
        "columns": columns,
    }


def check_sidecar(
    partial: Path,
    predictor: Predictor,
    fingerprint: str,
    inputs: Sequence[Path],
    magnification: int | None = None,
) -> None:
    """Refuse, in one sentence, to resume ``partial`` unless its sidecar says the rows came from
    this version of the format, this model on this runtime, these inputs, this alpha and this
    magnification."""
    sidecar = sidecar_path(partial)
    if not sidecar.is_file():
        raise ConfigError(
            f"{partial} has no {sidecar.name} saying which model wrote it; delete it to start over."
        )
    record = _read_sidecar(sidecar)
    if record.get("version") != _SIDECAR_VERSION:
        raise ConfigError(
            f"{partial} was started by another version of histolens, which writes other "
            "columns; delete it to start over."
        )
    if record.get("model_sha256") != fingerprint:
        raise ConfigError(
            f"{partial} was started with model {record.get('model_id', '?')} "
            f"({record.get('checkpoint', '?')}), not {predictor.model_id} "
            f"({predictor.source}); delete it, or write to another file, to predict "
            "with this model."
        )
    # One export gives the same fingerprint on ONNX Runtime and OpenVINO, whose probabilities
    # differ in the last digits. A sidecar written before the runtime was recorded (same
    # version: the columns did not change) has none, and is resumed on whatever runs now.
    started, runtime = record.get("runtime"), runtime_of(predictor)
    if started is not None and started != runtime:
        raise ConfigError(
            f"{partial} was started on {started}, not {runtime}; give --onnx-runtime {started} "
            "to resume it, or delete it to start over."
        )
    if record.get("inputs") != _inputs_record(inputs):
        given = ", ".join(p for p, _ in record.get("inputs", [])) or "none"
        raise ConfigError(
            f"{partial} was started on other inputs ({given}); give the same inputs "
            "to resume it, or delete it to start over."
        )
    # The prediction sets (and so refer) of the rows written depend on alpha, which the
    # model's fingerprint does not include; None: the model has no calibration.
    started, alpha = record.get("alpha"), predictor.refer_alpha
    if started != alpha:
        if started is None:
            raise ConfigError(
                f"{partial} does not record the alpha of its prediction sets; delete "
                "it to start over."
            )
        raise ConfigError(
            f"{partial} was started with prediction sets at alpha {started}, not "
            f"{alpha}; give --alpha {started} to resume it, or delete it to start over."
        )
    _check_magnification(partial, record.get("magnification"), magnification)


def _check_magnification(partial: Path, started: int | None, given: int | None) -> None:
    # The magnification picks each row's calibration, so its prediction set and refer. A sidecar
    # written before it was recorded has none: those rows read it from their paths.
    if started == given:
        return

    def said(m: int | None) -> str:
        return (
            f"--magnification {m}" if m is not None else "magnifications read from the file names"
        )

    hint = f"give --magnification {started}" if started is not None else "leave out --magnification"
    raise ConfigError(
        f"{partial} was started with {said(started)}, not {said(given)}; {hint} to resume it, "
        "or delete it to start over."
    )


def read_partial(partial: Path, columns: list[str], done: set[str], tally: Tally) -> int:
    """Add the rows of ``partial`` to ``done`` (their paths) and ``tally``; returns how many bytes
    of it hold whole lines (0 when not even the header is whole)."""
    keep_bytes = _complete_length(partial)
    reader = csv.reader(_lines(partial, keep_bytes))
    header = next(reader, None)
    if header is None:
        return 0
    if header != columns:
        raise ConfigError(
            f"{partial} does not have the columns {', '.join(columns)}; delete it to start over."
        )
    i_path, i_label, i_prob, i_unc = (
        columns.index(c) for c in ("path", "prediction", "probability", "uncertain")
    )
    for row in reader:
        try:
            if len(row) != len(columns):
                raise ValueError
            brief = RowBrief(
                row[i_path],
                row[i_label],
                float(row[i_prob]),
                predictions_csv.parse_flag(row[i_unc]),
            )
        except ValueError:
            raise ConfigError(
                f"{partial} has a damaged row at line {reader.line_num}; delete it to start over."
            ) from None
        if brief.path not in done:
            done.add(brief.path)
            tally.add(brief)
    return keep_bytes


@contextlib.contextmanager
def partial_writer(
    partial: Path, keep_bytes: int, record: dict[str, Any], columns: list[str]
) -> Iterator[IO[str]]:
    """The partial file opened for appending: the torn tail cut off, or header and sidecar
    ``record`` written first when it is new."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    if keep_bytes:
        os.truncate(partial, keep_bytes)
    else:
        atomic_write_text(sidecar_path(partial), json.dumps(record, indent=2))
    mode = "a" if keep_bytes else "w"
    with open(partial, mode, newline="", encoding="utf-8", errors=_ENCODING_ERRORS) as fh:
        if mode == "w":
            csv.writer(fh).writerow(columns)
            sync(fh)
        yield fh


def sync(fh: IO) -> None:
    fh.flush()
    os.fsync(fh.fileno())
