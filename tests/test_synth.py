"""The synthetic H&E generator: BreakHis layout and names, determinism, masks, stain statistics."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2hed

from histolens.data.records import (
    BENIGN_SUBTYPES,
    MALIGNANT_SUBTYPES,
    discover,
    parse_breakhis_name,
    patient_group,
)
from histolens.data.synth import (
    SynthSummary,
    generate_synthetic,
    mask_path_for,
    write_contact_sheet,
)
from histolens.errors import ConfigError

N = 24
SIZE = (176, 120)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "data"
    calls: list[tuple[int, int]] = []
    summary = generate_synthetic(
        out, n=N, seed=3, size=SIZE, workers=1, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (N, N) and len(calls) == N
    return out, summary


def _images(out: Path) -> list[Path]:
    return sorted((out / "400X").rglob("*.png"))


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_layout_and_breakhis_names(dataset):
    out, summary = dataset
    images = _images(out)
    assert len(images) == N == summary.n_images
    by_patient: dict[str, set[str]] = defaultdict(set)
    for path in images:
        parsed = parse_breakhis_name(path.name)
        assert parsed is not None, path.name
        assert parsed.label == path.parent.name
        assert parsed.magnification == 400
        assert parsed.subtype in (
            BENIGN_SUBTYPES if parsed.label == "benign" else MALIGNANT_SUBTYPES
        )
        by_patient[parsed.patient].add(parsed.subtype)
    assert all(len(subtypes) == 1 for subtypes in by_patient.values())
    groups = [patient_group(p) for p in by_patient]
    assert len(set(groups)) == len(groups) == summary.n_patients == 8  # max(8, n // 15)
    labels = {path.parent.name for path in images}
    assert labels == {"benign", "malignant"}
    assert summary.counts["benign"] + summary.counts["malignant"] == N
    assert 0.35 <= summary.counts["benign"] / N <= 0.5
    with Image.open(images[0]) as img:
        assert img.size == SIZE and img.mode == "RGB"


def test_discover_finds_the_images_and_not_the_masks(dataset):
    out, _ = dataset
    found = discover(out)
    assert len(found.records) == N
    assert {r.label for r in found.records} == {"benign", "malignant"}
    assert not any("masks" in Path(r.path).parts for r in found.records)
    groups_per_class = defaultdict(set)
    for record in found.records:
        groups_per_class[record.label].add(record.group)
        assert record.magnification == 400 and record.patient and record.subtype
    assert all(len(groups) >= 4 for groups in groups_per_class.values())


def test_manifest_lists_every_image_with_patient_group_and_mask(dataset):
    out, _ = dataset
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == [
        "path", "label", "subtype", "patient", "group", "magnification", "mask",
    ]  # fmt: skip
    assert len(rows) == N
    for row in rows:
        assert (out / row["path"]).is_file() and (out / row["mask"]).is_file()
        assert row["group"] == patient_group(row["patient"])
        assert row["magnification"] == "400"
    assert len(discover(out / "manifest.csv").records) == N


def test_masks_mark_lesions_only_in_malignant_images(dataset):
    out, _ = dataset
    for path in _images(out):
        mask_file = mask_path_for(path)
        assert mask_file is not None and mask_file.is_relative_to(out / "masks")
        with Image.open(mask_file) as img:
            assert img.mode == "L" and img.size == SIZE
            mask = np.asarray(img)
        assert set(np.unique(mask)) <= {0, 255}
        if path.parent.name == "benign":
            assert mask.max() == 0
        else:
            assert 0.1 <= (mask > 0).mean() <= 0.6


def test_mask_path_for_is_none_outside_a_synthetic_dataset(dataset, tmp_path):
    out, _ = dataset
    stray = tmp_path / "benign" / "x.png"
    stray.parent.mkdir()
    Image.new("RGB", (8, 8)).save(stray)
    assert mask_path_for(stray) is None
    assert mask_path_for(mask_path_for(_images(out)[-1])) is None


def test_malignant_tissue_carries_more_haematoxylin(dataset):
    out, _ = dataset
    per_class = defaultdict(list)
    inside, outside = [], []
    for path in _images(out):
        haem = rgb2hed(_rgb(path))[..., 0]
        per_class[path.parent.name].append(haem.mean())
        if path.parent.name == "malignant":
            with Image.open(mask_path_for(path)) as img:
                lesion = np.asarray(img) > 0
            inside.append(haem[lesion].mean())
            outside.append(haem[~lesion].mean())
    assert np.mean(per_class["malignant"]) > np.mean(per_class["benign"]) + 0.005
    # The lesion is where the nuclei are: a heatmap should find it there.
    assert np.mean(inside) > np.mean(outside) + 0.01


def test_images_of_one_patient_resemble_each_other(dataset):
    out, _ = dataset
    colour = {p: _rgb(p).reshape(-1, 3).mean(axis=0) for p in _images(out)}
    patient = {p: parse_breakhis_name(p.name).patient for p in colour}
    within, between = [], []
    paths = list(colour)
    for i, a in enumerate(paths):
        for b in paths[i + 1 :]:
            distance = float(np.linalg.norm(colour[a] - colour[b]))
            (within if patient[a] == patient[b] else between).append(distance)
    assert np.mean(within) < 0.7 * np.mean(between)


def test_same_seed_same_bytes_other_seed_other_images(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    generate_synthetic(again, n=N, seed=3, size=SIZE, workers=2)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    generate_synthetic(other, n=N, seed=4, size=SIZE)
    assert {p.name for p in _images(other)} != {p.name for p in _images(out)}
    first_other, first = _images(other)[0], _images(out)[0]
    assert not np.array_equal(_rgb(first_other), _rgb(first))


def test_contact_sheet_is_a_grid_of_captioned_thumbnails(dataset, tmp_path):
    out, summary = dataset
    assert summary.contact_sheet == out / "contact_sheet.png"
    with Image.open(summary.contact_sheet) as img:
        img.verify()
    images = _images(out)[:5]
    sheet = write_contact_sheet(images, tmp_path / "sheet.png", columns=2, thumb=(40, 30))
    with Image.open(sheet) as img:
        # 2 columns x 3 rows of 40x30 thumbnails with 4 px gaps and 28 px captions.
        assert img.size == (2 * 44 + 4, 3 * (30 + 28 + 4) + 4)
        assert np.asarray(img.convert("RGB")).std() > 10
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"magnification": 300}, "40, 100, 200, 400"),
        ({"n": 1}, "at least 2"),
        ({"n_patients": 1}, "n_patients"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_options_name_the_valid_ones(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        generate_synthetic(tmp_path / "x", size=(64, 48), **{"n": 4, **kwargs})


def test_refuses_to_mix_with_an_earlier_different_dataset(dataset, tmp_path):
    out = tmp_path / "mixed"
    generate_synthetic(out, n=4, seed=0, size=(64, 48))
    generate_synthetic(out, n=4, seed=0, size=(64, 48))  # the same run again is fine
    with pytest.raises(ConfigError, match="already holds"):
        generate_synthetic(out, n=4, seed=1, size=(64, 48))
