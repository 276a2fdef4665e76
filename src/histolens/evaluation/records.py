"""Which records an evaluation runs on, and a phrase saying where they came from.

A run's own ``split.csv`` when the data are the run's; other data split the same way as the run
(its seed and fractions), or used whole; either narrowed to one magnification.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from histolens.data.records import ImageRecord
from histolens.errors import DataError
from histolens.rundir import RunDir

if TYPE_CHECKING:
    from histolens.config import RunConfig

__all__ = ["records_for_evaluation"]


def records_for_evaluation(
    checkpoint: str | os.PathLike,
    data_path: str | os.PathLike | None,
    split_name: str,
    magnification: str | int | None = None,
) -> tuple[Path, list[ImageRecord], str]:
    """The records to evaluate a checkpoint on, and a phrase saying where they came from.

    A run's own ``split.csv`` is used when the data are the run's; other data are split the same
    way (the checkpoint's seed and fractions) or used whole with ``split_name='all'``.

    Args:
        magnification: keep only the images of this magnification (40, 100, 200, 400 or 'all').
            None: the run's own split as it is, or of other data the magnification the model was
            trained on ('all' for a model trained on every magnification).
    """
    from histolens.checkpoint.io import read_metadata, resolve_checkpoint_path

    ckpt = resolve_checkpoint_path(checkpoint)
    meta = read_metadata(ckpt)
    cfg = meta.run_config
    trained_on = meta.data.path
    split_csv = RunDir(ckpt.parent).split
    same_data = data_path is None or (
        trained_on is not None and Path(data_path).resolve() == Path(trained_on).resolve()
    )
    if same_data and split_csv.is_file():
        records, where = _records_of_run_split(split_csv, split_name, magnification)
        return ckpt, records, where
    path = data_path or trained_on
    if path is None:
        raise DataError("Give --data: the checkpoint does not say what it was trained on.")
    mag = meta.magnification if magnification is None else magnification
    records, where = _records_of_data(path, meta.task, cfg, split_name, mag)
    return ckpt, records, where


def _records_of_run_split(
    split_csv: Path, split_name: str, magnification: str | int | None
) -> tuple[list[ImageRecord], str]:
    """The ``split_name`` side of a run's own split.csv (of one magnification if given), and
    where they came from; one sentence when that side is empty (cross-validated runs)."""
    from histolens.data.splits import load_split_csv

    records = load_split_csv(split_csv).side(split_name)
    where = f"{split_name} split of the run's split.csv"
    if split_name == "all":
        where += ", including the patients the model was trained on"
    if not records:
        raise DataError(
            f"The run's split.csv has no {split_name} images (under cross-validation every "
            "patient trains the model; its estimate is in the run's report); evaluate other "
            "data with --data PATH --split all."
        )
    part = "the run's split.csv" if split_name == "all" else f"the {where}"
    records = _of_magnification(records, magnification, part)
    return records, where + _magnification_phrase(magnification)


def _records_of_data(
    path: str | os.PathLike,
    task: str,
    cfg: RunConfig,
    split_name: str,
    magnification: str | int | None,
) -> tuple[list[ImageRecord], str]:
    """The images under ``path`` of ``task`` and one magnification, whole (``split_name``
    'all') or one side of the patient split ``cfg`` (the run's config) makes of them, and
    where they came from."""
    from histolens.data.records import discover, filter_records
    from histolens.data.splits import split_by_patient

    records = _of_magnification(discover(path).records, magnification, str(path))
    records = filter_records(records, "all", task)
    if split_name == "all":
        return records, f"all images of {path}{_magnification_phrase(magnification)}"
    split = split_by_patient(
        records,
        task,
        cfg.data.val_fraction,
        cfg.data.test_fraction,
        cfg.data.seed,
        cfg.data.group_by,
    )
    where = f"{split_name} split of {path} (seed {cfg.data.seed})"
    return split.parts()[split_name], where + _magnification_phrase(magnification)


def _magnification_phrase(magnification: str | int | None) -> str:
    """The phrase ', magnification 400X' of one magnification; nothing for None or 'all'."""
    if magnification is None or str(magnification).lower() == "all":
        return ""
    return f", magnification {str(magnification).upper().rstrip('X')}X"


def _of_magnification(
    records: Sequence[ImageRecord], magnification: str | int | None, where: str
) -> list[ImageRecord]:
    """The records of one magnification (None or 'all': every record); one sentence if none."""
    from histolens.data.records import MAGNIFICATIONS
    from histolens.errors import check_choice

    if magnification is None or str(magnification).lower() == "all":
        return list(records)
    mag = str(magnification).upper().rstrip("X")
    check_choice("magnification", mag, [str(m) for m in MAGNIFICATIONS] + ["all"])
    kept = [r for r in records if r.magnification == int(mag)]
    if not kept:
        found = sorted({r.magnification for r in records if r.magnification})
        has = (
            "its images are at " + ", ".join(f"{m}X" for m in found)
            if found
            else "no image there names its magnification (file name or manifest column)"
        )
        raise DataError(f"No {mag}X image was found in {where}; {has}.")
    return kept
