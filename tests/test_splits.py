import warnings

import pytest

from histolens.data.records import ImageRecord
from histolens.data.splits import (
    assert_patient_disjoint,
    balanced_class_weights,
    group_kfold,
    load_split_csv,
    split_by_patient,
)
from histolens.errors import ConfigError, DataError, LeakageError


def _records(n_benign_groups=6, n_malignant_groups=10, per_group=(3, 12)):
    recs = []
    for cls, n_groups in (("benign", n_benign_groups), ("malignant", n_malignant_groups)):
        for g in range(n_groups):
            size = per_group[0] + (g * 7) % (per_group[1] - per_group[0])
            for i in range(size):
                gid = f"{cls[0]}{g}"
                recs.append(
                    ImageRecord(
                        f"/d/{gid}_{i}.png",
                        cls,
                        "F" if cls == "benign" else "DC",
                        f"14-{gid}",
                        gid,
                        400,
                    )
                )
    return recs


def test_patient_disjoint_and_stratified():
    recs = _records()
    split = split_by_patient(recs, val_fraction=0.15, test_fraction=0.2, seed=1)
    parts = split.parts()
    groups = {name: {r.group for r in rs} for name, rs in parts.items()}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert sum(len(p) for p in parts.values()) == len(recs)
    for name in ("train", "val", "test"):
        assert {r.label for r in parts[name]} == {"benign", "malignant"}, name
    test_share = len(split.test) / len(recs)
    assert 0.1 < test_share < 0.32


def test_seeded_and_reproducible():
    recs = _records()
    a = split_by_patient(recs, seed=7)
    b = split_by_patient(list(reversed(recs)), seed=7)
    assert {r.path for r in a.test} == {r.path for r in b.test}
    c = split_by_patient(recs, seed=8)
    assert {r.group for r in a.test} != {r.group for r in c.test} or {r.group for r in a.val} != {
        r.group for r in c.val
    }


def test_leakage_check_refuses_shared_patient():
    r1 = ImageRecord("/a.png", "benign", group="5")
    r2 = ImageRecord("/b.png", "benign", group="5")
    with pytest.raises(LeakageError, match="Patient group 5 appears in both"):
        assert_patient_disjoint({"train": [r1], "test": [r2]})


def test_image_level_fallback_warns():
    recs = [ImageRecord(f"/x{i}.png", "a" if i % 2 else "b") for i in range(40)]
    with pytest.warns(UserWarning, match="splitting by image"):
        split = split_by_patient(recs)
    assert not split.patient_level
    assert any("optimistic" in w for w in split.warnings)


def test_exact_patient_option_splits_finer():
    recs = []
    for g in range(8):
        for suffix in ("AB", "CD"):
            for i in range(3):
                recs.append(
                    ImageRecord(
                        f"/{g}{suffix}{i}.png",
                        "benign" if g < 4 else "malignant",
                        patient=f"14-{g}{suffix}",
                        group=str(g),
                    )
                )
    by_group = split_by_patient(recs, group_by="group")
    by_patient = split_by_patient(recs, group_by="patient")
    assert len({r.group for r in by_patient.train}) > len({r.group for r in by_group.train})


def test_bad_fractions():
    with pytest.raises(ConfigError, match="leave no training data"):
        split_by_patient(_records(), val_fraction=0.5, test_fraction=0.5)


def test_kfold_disjoint_covers_all():
    recs = _records()
    folds = group_kfold(recs, n_splits=5, seed=0)
    assert len(folds) == 5
    seen = sorted(i for _, te in folds for i in te)
    assert seen == list(range(len(recs)))
    for tr, te in folds:
        assert not {recs[i].group for i in tr} & {recs[i].group for i in te}
    with pytest.raises(DataError, match="at least 40 patient groups"):
        group_kfold(recs, n_splits=40)


def test_balanced_class_weights():
    recs = [ImageRecord(f"/{i}", "benign") for i in range(10)] + [
        ImageRecord(f"/m{i}", "malignant") for i in range(30)
    ]
    w = balanced_class_weights(recs, ("benign", "malignant"), "binary")
    assert w == pytest.approx([2.0, 2 / 3])


def test_split_csv_round_trip(tmp_path):
    recs = _records()
    with warnings.catch_warnings():
        split = split_by_patient(recs)
    split.write_csv(tmp_path / "split.csv")
    back = load_split_csv(tmp_path / "split.csv")
    for name in ("train", "val", "test"):
        assert [r.path for r in back.parts()[name]] == [r.path for r in split.parts()[name]]
