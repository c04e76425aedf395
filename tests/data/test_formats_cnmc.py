"""The C-NMC 2019 loader: real layout, tolerant prelim discovery, every bad input."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from milcell.data.formats.cnmc import CLASS_NAMES, load_cnmc, parse_cnmc_name
from milcell.data.synthetic import make_cohort
from milcell.exceptions import DataError


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 160)).save(buf, format="BMP")
    return buf.getvalue()


BMP = _bmp()
PRELIM = "validation_data/C-NMC_test_prelim_phase_data"
LABELS = "validation_data/C-NMC_test_prelim_phase_data_labels.csv"


def build(root: Path, prelim_rows: list[list[str]] | None = None) -> Path:
    """A small hand-made C-NMC tree: two folds, three patients, plus a prelim set."""
    files = {
        "training_data/fold_0/all/UID_11_1_1_all.bmp": BMP,
        "training_data/fold_0/all/UID_11_1_2_all.bmp": BMP,
        "training_data/fold_0/hem/UID_H10_3_1_hem.bmp": BMP,
        "training_data/fold_1/all/UID_12_2_1_all.bmp": BMP,
        "training_data/fold_1/hem/UID_H10_4_1_hem.bmp": BMP,
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    rows = prelim_rows if prelim_rows is not None else [["UID_57", "1.bmp", "1"], ["UID_H49", "2.bmp", "0"]]
    (root / PRELIM).mkdir(parents=True, exist_ok=True)
    for row in rows:
        if row[1] and "/" not in row[1] and row[1] not in (".", ".."):
            (root / PRELIM / row[1]).write_bytes(BMP)
    write_labels(root / LABELS, rows)
    return root


def write_labels(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header or ["Patient_ID", "new_names", "labels"])
        w.writerows(rows)


def test_hand_made_layout(tmp_path: Path) -> None:
    cells = load_cnmc(build(tmp_path))
    assert cells.class_names == CLASS_NAMES == ("hem", "all")
    assert [r.path.name for r in cells] == [
        "UID_11_1_1_all.bmp",
        "UID_11_1_2_all.bmp",
        "UID_H10_3_1_hem.bmp",
        "UID_12_2_1_all.bmp",
        "UID_H10_4_1_hem.bmp",
        "1.bmp",
        "2.bmp",
    ]
    assert cells.labels.tolist() == [1, 1, 0, 1, 0, 1, 0]
    assert cells.groups.tolist() == ["11", "11", "H10", "12", "H10", "57", "H49"]
    assert len(load_cnmc(tmp_path, include_prelim=False)) == 5


def test_synthetic_roundtrip(tmp_path: Path) -> None:
    root = make_cohort(tmp_path / "c", n_patients=8, seed=2, layout="cnmc", image_size=16, bag_size=(2, 3))
    cells = load_cnmc(root)
    assert len(cells) == sum(1 for _ in root.rglob("*.bmp"))
    for r in cells:
        assert r.label == (0 if r.patient.startswith("H") else 1)
    train_patients = {r.patient for r in load_cnmc(root, include_prelim=False)}
    prelim_patients = {r.patient for r in cells} - train_patients
    assert prelim_patients  # the prelim folder holds patients of its own
    assert {r.label for r in cells} == {0, 1}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("UID_11_10_1_all.bmp", ("11", 1)),
        ("UID_H10_43_1_hem.bmp", ("H10", 0)),
        ("UID_h7_1_1_hem.BMP", ("H7", 0)),
        ("UID_3_1_1_all.png", ("3", 1)),
    ],
)
def test_parse_names(name: str, expected: tuple[str, int]) -> None:
    assert parse_cnmc_name(name) == expected


@pytest.mark.parametrize(
    "name", ["1.bmp", "UID_11_10_all.bmp", "UID_11_10_1_xyz.bmp", "UID_11_10_1_all.txt", "uid_x_1_1_all.bmp"]
)
def test_parse_names_rejects(name: str) -> None:
    with pytest.raises(DataError, match="unrecognised C-NMC file name"):
        parse_cnmc_name(name)


@given(st.text(max_size=30))
def test_parse_names_only_dataerror(name: str) -> None:
    try:
        patient, label = parse_cnmc_name(name)
    except DataError:
        return
    assert label in (0, 1) and patient


def test_prelim_tolerant_layouts(tmp_path: Path) -> None:
    # Patient_ID given as a full training-style file name; CSV under a subfolder with another name
    build(tmp_path, [["UID_57_1_2_all.bmp", "1.bmp", "1"], ["UID_H49_3_4_hem.bmp", "2.bmp", "0"]])
    (tmp_path / LABELS).rename(tmp_path / PRELIM / "labels.csv")
    cells = load_cnmc(tmp_path)
    assert cells.groups.tolist()[-2:] == ["57", "H49"]
    assert cells.labels.tolist()[-2:] == [1, 0]


def test_other_folder_names(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / "training_data").rename(tmp_path / "C-NMC_training_data")
    assert len(load_cnmc(tmp_path)) == 7


# --- every bad input ---------------------------------------------------------------------


def test_unrecognised_training_name(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / "training_data/fold_1/all/cell_7.bmp").write_bytes(BMP)
    with pytest.raises(DataError, match=r"fold_1/all/cell_7\.bmp'.*unrecognised C-NMC file name"):
        load_cnmc(tmp_path)


def test_name_in_wrong_class_folder(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / "training_data/fold_1/hem/UID_5_1_1_all.bmp").write_bytes(BMP)
    with pytest.raises(DataError, match=r"UID_5_1_1_all\.bmp': an ALL file name in the hem/ folder"):
        load_cnmc(tmp_path)


def test_unexpected_entries(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / "training_data/extra").mkdir()
    with pytest.raises(DataError, match="unexpected entry '.*extra'"):
        load_cnmc(tmp_path)
    (tmp_path / "training_data/extra").rmdir()
    (tmp_path / "training_data/fold_0/other").mkdir()
    with pytest.raises(DataError, match="unexpected entry '.*other'.*expected only all/ and hem/"):
        load_cnmc(tmp_path)
    (tmp_path / "training_data/fold_0/other").rmdir()
    (tmp_path / "training_data/fold_0/all/sub").mkdir()
    with pytest.raises(DataError, match="unexpected folder '.*sub'"):
        load_cnmc(tmp_path)


def test_empty_folders(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / "training_data/fold_2/all").mkdir(parents=True)
    with pytest.raises(DataError, match="class folder '.*fold_2/all' holds no images"):
        load_cnmc(tmp_path)
    (tmp_path / "training_data/fold_2/all").rmdir()
    with pytest.raises(DataError, match="fold folder '.*fold_2' is empty"):
        load_cnmc(tmp_path)


def test_duplicate_file_across_folds(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / "training_data/fold_1/all/UID_11_1_1_all.bmp").write_bytes(BMP)
    with pytest.raises(DataError, match=r"image 'UID_11_1_1_all\.bmp' appears twice"):
        load_cnmc(tmp_path)


def test_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no training_data/ folder"):
        load_cnmc(tmp_path)
    build(tmp_path)
    shutil.rmtree(tmp_path / "validation_data")
    with pytest.raises(DataError, match="no validation_data/ folder.*include_prelim=False"):
        load_cnmc(tmp_path)
    assert len(load_cnmc(tmp_path, include_prelim=False)) == 5
    shutil.rmtree(tmp_path / "training_data/fold_0")
    shutil.rmtree(tmp_path / "training_data/fold_1")
    with pytest.raises(DataError, match="no fold_<n> folders"):
        load_cnmc(tmp_path, include_prelim=False)


def test_labels_csv_missing_column(tmp_path: Path) -> None:
    build(tmp_path)
    write_labels(tmp_path / LABELS, [["UID_57", "1.bmp"]], header=["Patient_ID", "new_names"])
    with pytest.raises(DataError, match=r"no CSV file with columns \['Patient_ID', 'new_names', 'labels'\]"):
        load_cnmc(tmp_path)


def test_several_labels_csvs(tmp_path: Path) -> None:
    build(tmp_path)
    shutil.copy(tmp_path / LABELS, tmp_path / PRELIM / "copy.csv")
    with pytest.raises(DataError, match="several CSV files with columns"):
        load_cnmc(tmp_path)


@pytest.mark.parametrize("label", ["2", "ALL", "", "-1"])
def test_prelim_unknown_label(tmp_path: Path, label: str) -> None:
    build(tmp_path, [["UID_57", "1.bmp", label]])
    with pytest.raises(DataError, match=r"line 2: unknown labels value"):
        load_cnmc(tmp_path)


@pytest.mark.parametrize("pid", ["57", "UID_", "UID_X9", "patient 57", ""])
def test_prelim_bad_patient_id(tmp_path: Path, pid: str) -> None:
    build(tmp_path, [[pid, "1.bmp", "1"]])
    with pytest.raises(DataError, match=r"line 2: unrecognised Patient_ID"):
        load_cnmc(tmp_path)


def test_prelim_patient_disagrees_with_label(tmp_path: Path) -> None:
    build(tmp_path, [["UID_57_1_1_all.bmp", "1.bmp", "0"]])
    with pytest.raises(DataError, match="disagrees with labels=0"):
        load_cnmc(tmp_path)


def test_prelim_image_missing_unlisted_duplicate(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / PRELIM / "2.bmp").unlink()
    with pytest.raises(DataError, match=r"line 3: image '.*2\.bmp' is missing"):
        load_cnmc(tmp_path)
    (tmp_path / PRELIM / "2.bmp").write_bytes(BMP)
    (tmp_path / PRELIM / "3.bmp").write_bytes(BMP)
    with pytest.raises(DataError, match=r"images \['3\.bmp'\] .* have no row"):
        load_cnmc(tmp_path)
    (tmp_path / PRELIM / "3.bmp").unlink()
    write_labels(tmp_path / LABELS, [["UID_57", "1.bmp", "1"], ["UID_57", "1.bmp", "1"]])
    with pytest.raises(DataError, match="line 3: image '1.bmp' already listed on line 2"):
        load_cnmc(tmp_path)


@pytest.mark.parametrize("name", ["../x.bmp", "..", "/etc/passwd", "a/1.bmp"])
def test_prelim_unsafe_name(tmp_path: Path, name: str) -> None:
    build(tmp_path, [["UID_57", "1.bmp", "1"], ["UID_57", name, "1"]])
    with pytest.raises(DataError, match="new_names value .* is not a plain name"):
        load_cnmc(tmp_path)


def test_prelim_empty_csv(tmp_path: Path) -> None:
    build(tmp_path, [])
    (tmp_path / PRELIM / "1.bmp").write_bytes(BMP)
    with pytest.raises(DataError, match="has no rows"):
        load_cnmc(tmp_path)


def test_symlink_outside_root(tmp_path: Path) -> None:
    root = build(tmp_path / "root")
    (tmp_path / "x.bmp").write_bytes(BMP)
    (root / "training_data/fold_0/all/UID_99_1_1_all.bmp").symlink_to(tmp_path / "x.bmp")
    with pytest.raises(DataError, match="UID_99_1_1_all.bmp' resolves to .*outside the dataset root"):
        load_cnmc(root)


def test_undecodable_image(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / "training_data/fold_1/all/UID_12_2_1_all.bmp").write_bytes(b"BM garbage")
    assert len(load_cnmc(tmp_path)) == 7
    with pytest.raises(DataError, match=r"patient '12': image '.*UID_12_2_1_all\.bmp' cannot be decoded"):
        load_cnmc(tmp_path, verify_images=True)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("cnmc_fuzz"))


@given(st.binary(max_size=120))
def test_fuzz_labels_csv_bytes(fuzz_root: Path, data: bytes) -> None:
    (fuzz_root / LABELS).write_bytes(data)  # examples run one after another: rewriting is safe
    try:
        load_cnmc(fuzz_root)
    except DataError:
        return
