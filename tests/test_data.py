import csv
import shutil
from pathlib import Path

import pytest
from PIL import Image

from histolens.data.records import (
    SUBTYPE_CLASSES,
    class_names_for,
    discover,
    filter_records,
    parse_breakhis_name,
    patient_group,
)
from histolens.errors import ConfigError, DataError


@pytest.mark.parametrize(
    "subtype,cls",
    [
        ("A", "benign"),
        ("F", "benign"),
        ("PT", "benign"),
        ("TA", "benign"),
        ("DC", "malignant"),
        ("LC", "malignant"),
        ("MC", "malignant"),
        ("PC", "malignant"),
    ],
)
@pytest.mark.parametrize("mag", [40, 100, 200, 400])
def test_parse_every_subtype_and_magnification(subtype, cls, mag):
    code = "B" if cls == "benign" else "M"
    parsed = parse_breakhis_name(f"SOB_{code}_{subtype}-14-22549AB-{mag}-012.png")
    assert parsed.label == cls
    assert parsed.subtype == subtype
    assert parsed.patient == "14-22549AB"
    assert parsed.magnification == mag
    assert parsed.image_number == 12


def test_parse_examples_from_breakhis():
    p = parse_breakhis_name("SOB_B_TA-14-3411F-100-001.png")
    assert (p.label, p.subtype, p.patient, p.magnification, p.image_number) == (
        "benign",
        "TA",
        "14-3411F",
        100,
        1,
    )
    p = parse_breakhis_name("/x/y/SOB_M_PC-15-190EF-400-014.png")
    assert (p.patient, p.magnification) == ("15-190EF", 400)
    assert patient_group(p.patient) == "190"
    short = parse_breakhis_name("DC_10926_003.png")
    assert (short.label, short.subtype, short.patient, short.magnification) == (
        "malignant",
        "DC",
        "10926",
        None,
    )


def test_patient_groups_share_numeric_core():
    assert patient_group("14-22549AB") == patient_group("14-22549CD") == "22549"
    assert patient_group("14-22549G") == "22549"
    assert patient_group("15-190EF") == "190"


@pytest.mark.parametrize(
    "name",
    [
        "photo.png",
        "SOB_X_TA-14-3411F-100-001.png",
        "SOB_B_ZZ-14-3411F-100-001.png",
        "SOB_B_TA-14-3411F-50-001.png",
    ],
)
def test_non_breakhis_names(name):
    assert parse_breakhis_name(name) is None


def _png(path: Path, color=(200, 120, 160)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path)
    return path


def test_original_project_layout_and_its_parent(tmp_path):
    base = tmp_path / "dataset_cancer_v1" / "classificacao_binaria" / "400X"
    _png(base / "benign" / "SOB_B_F-14-9133-400-001.png")
    _png(base / "malignant" / "SOB_M_DC-14-2523-400-004.png")
    _png(base / "malignant" / "other.png")
    for root in (tmp_path / "dataset_cancer_v1", base.parent, base):
        ds = discover(root)
        assert ds.layout.startswith("original project")
        assert sorted(r.label for r in ds.records) == ["benign", "malignant", "malignant"]
        assert {r.magnification for r in ds.records} == {400}
        by_name = {Path(r.path).name: r for r in ds.records}
        assert by_name["SOB_M_DC-14-2523-400-004.png"].group == "2523"
        assert by_name["other.png"].patient is None


def test_official_breakhis_archive_tree(tmp_path):
    breast = tmp_path / "BreaKHis_v1" / "histology_slides" / "breast"
    _png(breast / "benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png")
    _png(breast / "benign/SOB/adenosis/SOB_B_A_14-22549AB/100X/SOB_B_A-14-22549AB-100-001.png")
    _png(breast / "malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2523/40X/SOB_M_DC-14-2523-40-001.png")
    ds = discover(tmp_path / "BreaKHis_v1")
    assert "official BreakHis" in ds.layout
    assert len(ds.records) == 3
    assert {r.subtype for r in ds.records} == {"A", "DC"}
    assert filter_records(ds.records, "40")[0].magnification == 40
    assert len(filter_records(ds.records, "40X")) == 2


def test_generic_class_folders(tmp_path):
    _png(tmp_path / "tumour" / "a" / "1.png")
    _png(tmp_path / "normal" / "2.jpg")
    _png(tmp_path / "normal" / "3.PNG")
    ds = discover(tmp_path)
    assert ds.layout.startswith("class folders")
    assert sorted(r.label for r in ds.records) == ["normal", "normal", "tumour"]
    assert not ds.has_patients
    assert class_names_for("binary", ds.records) == ("normal", "tumour")


def test_csv_manifest_relative_paths(tmp_path):
    img = _png(tmp_path / "imgs" / "x.png")
    _png(tmp_path / "imgs" / "y.png")
    man = tmp_path / "meta" / "m.csv"
    man.parent.mkdir()
    with open(man, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient", "subtype", "magnification"])
        w.writerow(["../imgs/x.png", "Benign", "14-100AB", "F", "100X"])
        w.writerow(["../imgs/y.png", "malignant", "14-200", "DC", "200"])
        w.writerow(["../imgs/missing.png", "malignant", "14-300", "DC", "200"])
    ds = discover(man)
    assert ds.layout == "CSV manifest"
    assert [Path(r.path).name for r in ds.records] == ["x.png", "y.png"]
    assert ds.records[0].label == "benign" and ds.records[0].group == "100"
    assert ds.records[0].magnification == 100
    assert Path(ds.records[0].path) == img.resolve()
    assert "missing" in ds.skipped[0].reason


def test_manifest_without_label_column(tmp_path):
    man = tmp_path / "m.csv"
    man.write_text("file,class\nx.png,benign\n")
    with pytest.raises(DataError, match="lacks the column"):
        discover(man)


def test_wrong_layout_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No labelled images found"):
        discover(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")


def test_folder_label_contradicting_file_name_is_skipped(tmp_path):
    _png(tmp_path / "400X" / "benign" / "SOB_M_DC-14-2523-400-004.png")
    _png(tmp_path / "400X" / "benign" / "SOB_B_F-14-9133-400-001.png")
    ds = discover(tmp_path)
    assert len(ds.records) == 1
    assert "folder says benign" in ds.skipped[0].reason


def test_task_and_magnification_options(tmp_path):
    _png(tmp_path / "100X" / "benign" / "SOB_B_F-14-9133-100-001.png")
    _png(tmp_path / "100X" / "malignant" / "SOB_M_DC-14-2523-100-001.png")
    _png(tmp_path / "200X" / "malignant" / "SOB_M_DC-14-2523-200-001.png")
    ds = discover(tmp_path)
    assert len(filter_records(ds.records, "all")) == 3
    assert len(filter_records(ds.records, 100)) == 2
    assert class_names_for("subtype") == SUBTYPE_CLASSES
    with pytest.raises(ConfigError, match="did you mean|Did you mean"):
        filter_records(ds.records, "1000")
    with pytest.raises(ConfigError, match="binary, subtype"):
        filter_records(ds.records, "all", task="subtypes")
    with pytest.raises(DataError, match="No images left"):
        filter_records(ds.records, "400")


def test_discovery_only_reads(tmp_path):
    src = tmp_path / "400X" / "benign"
    _png(src / "SOB_B_F-14-9133-400-001.png")
    _png(tmp_path / "400X" / "malignant" / "SOB_M_DC-14-2523-400-004.png")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    discover(tmp_path)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert before == after


@pytest.mark.real_data
def test_real_breakhis_through_manifest_and_folders(real_data):
    by_manifest = discover(real_data / "manifest.csv")
    by_folders = discover(real_data)
    assert len(by_manifest.records) == len(by_folders.records) == 735
    assert by_folders.layout.startswith("original project")
    groups_m = {Path(r.path).resolve(): r.group for r in by_manifest.records}
    groups_f = {Path(r.path).resolve(): r.group for r in by_folders.records}
    assert groups_m == groups_f  # our parsing agrees with the manifest's patient groups
    assert len({r.group for r in by_folders.records}) == 30
    hundred = filter_records(by_folders.records, "100")
    assert len(hundred) == 230


@pytest.mark.real_data
def test_real_breakhis_copy_is_not_modified(real_data, tmp_path):
    copy = tmp_path / "100X"
    shutil.copytree(real_data / "100X", copy)
    ds = discover(copy)
    assert len(ds.records) == 230
