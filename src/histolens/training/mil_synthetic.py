"""Synthetic feature bags with planted lesions, for MIL tests and the MIL benchmark.

A feature-level simulation, not images: each slide's tiles sit on a square grid; benign tiles'
features come from a mixture of ``tissue_types`` Gaussian clusters whose proportions differ from
slide to slide (as the share of stroma, fat and epithelium does), plus a per-patient offset (as
staining and scanner differences do); a positive slide has one contiguous lesion (the tiles
nearest a random point) covering a fraction of its tiles drawn log-uniformly from
``lesion_range``, whose features come from a separate cluster. Mean pooling sees the lesion as a
shift of ``fraction x distance`` under the benign mixture's slide-to-slide variation; attention
can find the lesion tiles one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histolens.errors import ConfigError

__all__ = ["SyntheticBag", "synthetic_bags"]


@dataclass(frozen=True)
class SyntheticBag:
    """One synthetic slide: features (N x D), grid corners (N x 2), planted lesion tiles (N)."""

    name: str
    patient: str
    target: int
    lesion_fraction: float
    features: np.ndarray
    coords: np.ndarray
    lesion: np.ndarray


def synthetic_bags(
    n_slides: int = 60,
    slides_per_patient: int = 2,
    tiles: int = 2000,
    dim: int = 64,
    lesion_range: tuple[float, float] = (0.01, 0.20),
    tissue_types: int = 4,
    lesion_distance: float = 4.0,
    seed: int = 0,
) -> list[SyntheticBag]:
    """Bags of ``n_slides`` slides, ``slides_per_patient`` per patient; half the patients (and so
    half the slides) have lesions in every slide. All draws come from one seeded generator."""
    if n_slides < 2 or slides_per_patient < 1 or tiles < 10 or dim < 2:
        raise ConfigError("synthetic_bags needs >= 2 slides, >= 10 tiles and >= 2 features.")
    lo, hi = lesion_range
    if not 0 < lo <= hi < 1:
        raise ConfigError(f"lesion_range must satisfy 0 < low <= high < 1, not {lesion_range}.")
    rng = np.random.default_rng(seed)
    # Benign cluster centres at unit scale; the lesion cluster lesion_distance away from their mean.
    centres = rng.normal(0.0, 1.0, (tissue_types, dim))
    direction = rng.normal(0.0, 1.0, dim)
    lesion_centre = centres.mean(0) + lesion_distance * direction / np.linalg.norm(direction)
    side = int(np.ceil(np.sqrt(tiles)))
    grid = np.stack(np.divmod(np.arange(tiles), side), axis=1)[:, ::-1] * 256
    n_patients = int(np.ceil(n_slides / slides_per_patient))
    positive_patients = set(rng.permutation(n_patients)[: n_patients // 2].tolist())
    bags = []
    for i in range(n_slides):
        patient = i // slides_per_patient
        if i % slides_per_patient == 0:
            offset = rng.normal(0.0, 0.3, dim)
        target = int(patient in positive_patients)
        mix = rng.dirichlet(np.full(tissue_types, 0.7))
        kinds = rng.choice(tissue_types, size=tiles, p=mix)
        features = centres[kinds] + offset + rng.normal(0.0, 1.0, (tiles, dim))
        lesion = np.zeros(tiles, bool)
        fraction = 0.0
        if target:
            fraction = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            count = max(1, round(fraction * tiles))
            seed_tile = grid[rng.integers(tiles)]
            nearest = np.argsort(((grid - seed_tile) ** 2).sum(1), kind="stable")[:count]
            lesion[nearest] = True
            features[nearest] = lesion_centre + offset + rng.normal(0.0, 1.0, (count, dim))
            fraction = count / tiles
        bags.append(
            SyntheticBag(
                f"synthetic-{i:03d}",
                f"patient-{patient:03d}",
                target,
                fraction,
                features.astype(np.float32),
                grid.astype(np.int64),
                lesion,
            )
        )
    return bags
