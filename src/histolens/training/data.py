"""What a training run starts from: its records and classes, which of its images can be read,
and the stain reference fitted to its training images. Shared by the probe and Lightning paths.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from histolens.atomic import atomic_open
from histolens.config import RunConfig
from histolens.data.records import Dataset as Records
from histolens.data.records import (
    ImageRecord,
    Skipped,
    class_names_for,
    discover,
    filter_records,
    target_of,
)
from histolens.data.splits import Split
from histolens.errors import ConfigError, DataError
from histolens.models.pipeline import ImageSource, ImageStream
from histolens.rundir import RunDir

__all__ = ["fit_stain", "prepare_records", "readable_split"]

SKIPPED_FILE = RunDir.SKIPPED


def prepare_records(cfg: RunConfig) -> tuple[Records, list[ImageRecord], tuple[str, ...]]:
    """Discover the data, keep the configured magnification and task, and name the classes."""
    dataset = discover(cfg.data.path)
    records = filter_records(dataset.records, cfg.data.magnification, cfg.data.task)
    classes = class_names_for(cfg.data.task, records)
    present = {target_of(r, cfg.data.task) for r in records}
    if len(present) < 2:
        raise DataError(
            f"Training needs at least two classes; {cfg.data.path} has only {', '.join(present)}."
        )
    return dataset, records, classes


def check_readable(images: ImageSource, paths: Sequence[str], fabric, progress: bool) -> None:
    """Decode each of ``paths`` once, shared out between ranks, so that ``images.skipped`` lists
    every unreadable one (a bank knows them already)."""
    if not isinstance(images, ImageStream):
        return
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    images.check(list(paths)[rank::world], progress)
    if world > 1:
        import torch.distributed as dist

        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, images.skipped)
        for skipped in shares:
            images.add_skipped(skipped)


def readable_split(split: Split, images: ImageSource, notes: list[str]) -> Split:
    """``split`` without the images that could not be decoded (noted in ``notes``)."""
    unreadable = {s.path for s in images.skipped}
    parts = [[r for r in part if r.path in images] for part in (split.train, split.val, split.test)]
    if unreadable:
        notes.append(f"{len(unreadable)} unreadable image(s) skipped; see {SKIPPED_FILE}.")
    return Split(*parts, split.patient_level, split.warnings)


def write_skipped(run_dir: Path, images: ImageSource, dataset: Records) -> None:
    """``skipped.csv``: the files found but not used, with the reason (only when there are any)."""
    skipped: list[Skipped] = list(images.skipped) + list(dataset.skipped)
    if not images.skipped:
        return
    with atomic_open(run_dir / SKIPPED_FILE, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "reason"])
        for s in skipped:
            w.writerow([s.path, s.reason])


def fit_stain(
    cfg: RunConfig,
    images: ImageSource,
    train_paths: Sequence[str],
    preprocess,
    hold: bool = False,
) -> tuple[Any, str | None]:
    """A StainNormalizer fitted to the given reference image, or to the median of up to 200
    training images (label-free, and robust to one unusual slide). With ``hold``, a stream
    keeps those images for the feature pass that follows (ImageStream.hold)."""
    if cfg.stain.method == "none":
        return None, None
    from histolens.data.imageio import load_rgb
    from histolens.stain.normalize import StainNormalizer

    normalizer = StainNormalizer(cfg.stain.method)
    if cfg.stain.reference and str(cfg.stain.reference).lower().endswith(".json"):
        return _stain_state(cfg), str(cfg.stain.reference)
    if cfg.stain.reference:
        ref = preprocess.resize(load_rgb(cfg.stain.reference))
        normalizer.fit(ref)
        return normalizer, str(cfg.stain.reference)
    paths = [p for p in train_paths if p in images]
    step = max(1, -(-len(paths) // 200))  # a median over up to 200 images is plenty
    candidates = paths[::step]
    decoded: dict[str, Any] = {}
    for kept, batch in images.batches(candidates, 32):
        decoded.update(zip(kept, batch.unbind(0), strict=True))
    normalizer.fit_median(list(decoded.values()))
    if hold and isinstance(images, ImageStream):  # the feature pass takes them, not the files
        images.hold(decoded)
    return normalizer, f"median of {len(decoded)} training images"


def _stain_state(cfg: RunConfig):
    from histolens.stain.normalize import StainNormalizer

    try:
        state = json.loads(Path(cfg.stain.reference).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot read the stain reference {cfg.stain.reference}: {exc}") from None
    fitted = StainNormalizer.from_dict(state)
    if fitted.method != cfg.stain.method or not fitted.fitted:
        raise ConfigError(
            f"The stain reference {cfg.stain.reference} holds no fitted {cfg.stain.method} "
            "state; give an image, or a JSON state saved from the same method."
        )
    return fitted
