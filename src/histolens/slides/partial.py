"""A slide's tile scores on disk while it is being scored: the partial HDF5 file.

``h5/.<slide>.h5.partial`` holds the whole layout from the start (``coords``, ``tissue``, and
``probabilities``/``score``/``ood``/``refer`` filled as batches arrive, ``features`` with
--save-features); its ``done`` attribute counts the tiles written, so an interrupted run resumes
at the next batch. Each batch goes to disk as it comes, so memory holds one batch of scores,
whatever the slide's size. A partial file of another checkpoint or tile grid is discarded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histolens.slides.tiles import BatchScores

__all__ = ["PartialScores", "create_partial", "resume_point"]


def resume_point(
    partial: Path, coords: np.ndarray, fingerprint: str, save_features: bool
) -> int | None:
    """Tiles already scored in ``partial`` for this checkpoint ``fingerprint`` and grid, else
    None (the partial file, if any, is then deleted)."""
    import h5py

    if not partial.exists():
        return None
    try:
        with h5py.File(partial, "r") as f:
            same = (
                f.attrs.get("checkpoint_fingerprint") == fingerprint
                and f["coords"].shape == coords.shape
                and np.array_equal(f["coords"][:], coords)
                and (not save_features or "features" in f or f.attrs["done"] == 0)
            )
            done = int(f.attrs["done"])
    except (OSError, KeyError, ValueError):
        same, done = False, 0
    if not same:
        partial.unlink()
        return None
    return done


def create_partial(
    partial: Path, coords: np.ndarray, tissue: np.ndarray, n_classes: int, attrs: dict
) -> None:
    """A fresh partial file: the grid, empty score datasets, ``attrs`` and ``done`` = 0."""
    import h5py

    n = len(coords)
    with h5py.File(partial, "w") as f:
        dataset = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        for key, value in attrs.items():
            f.attrs[key] = value
            dataset.attrs[key] = value
        f.create_dataset("tissue", data=np.asarray(tissue, np.float32))
        f.create_dataset("probabilities", (n, n_classes), np.float32, fillvalue=np.nan)
        f.create_dataset("score", (n,), np.float32, fillvalue=np.nan)
        f.create_dataset("ood", (n,), bool)
        f.create_dataset("refer", (n,), bool)
        f.attrs["done"] = 0


class PartialScores:
    """The open partial file, appended to batch by batch (a context manager)."""

    def __init__(self, partial: Path, score_index: int, save_features: bool) -> None:
        import h5py

        self._file = h5py.File(partial, "r+")
        self.done = int(self._file.attrs["done"])
        self.score_index = score_index
        self.save_features = save_features

    def write(self, scores: BatchScores) -> int:
        """Store one batch after the tiles already done, flush, and return its size."""
        f, i = self._file, self.done
        b = len(scores.probabilities)
        f["probabilities"][i : i + b] = scores.probabilities
        f["score"][i : i + b] = scores.probabilities[:, self.score_index]
        f["ood"][i : i + b] = scores.ood
        f["refer"][i : i + b] = scores.refer
        if self.save_features and scores.features is not None:
            if "features" not in f:
                n = f["coords"].shape[0]
                f.create_dataset("features", (n, scores.features.shape[1]), np.float32)
            f["features"][i : i + b] = scores.features
        self.done = i + b
        f.attrs["done"] = self.done
        f.flush()
        return b

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PartialScores:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
