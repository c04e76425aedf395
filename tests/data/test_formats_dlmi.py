"""The lymphocytosis (dlmi) loader: real layout, quirks, every bad input, CSV fuzzing."""

from __future__ import annotations

import csv
import io
import math
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from milcell.data.formats.dlmi import CLINICAL_NAMES, load_dlmi, parse_dob
from milcell.data.synthetic import make_cohort
from milcell.exceptions import ConfigError, DataError

HEADER = ["ID", "LABEL", "GENDER", "DOB", "LYMPH_COUNT"]


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 150)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def write_split(
    root: Path,
    rows: list[list[str]],
    split: str = "trainset",
    header: list[str] | None = None,
    images: int = 2,
    make_dirs: bool = True,
) -> Path:
    """Write ``root/split/<split>.csv`` and one folder of tiny JPEGs per row ID."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header or HEADER)
        w.writerows(rows)
    if make_dirs:
        for row in rows:
            pid = row[0]
            if not pid or "/" in pid or pid in (".", ".."):
                continue
            (folder / pid).mkdir(exist_ok=True)
            for k in range(images):
                (folder / pid / f"{k}.jpg").write_bytes(JPEG)
    return folder


GOOD = [
    ["P1", "1", "M", "11/3/1933", "12.5"],
    ["P2", "0", "f", "25-04-1948", "4.1"],
    ["P3", "1", "F", "1950-12-31", "30"],
]


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("dlmi"), n_patients=20, seed=3, image_size=16, bag_size=(2, 4))


def _truth(root: Path) -> dict[str, dict[str, str]]:
    with open(root / "synthetic_truth.csv", newline="") as fh:
        return {r["ID"]: r for r in csv.DictReader(fh)}


def test_synthetic_cohort_roundtrip(cohort_root: Path) -> None:
    truth = _truth(cohort_root)
    train = load_dlmi(cohort_root, split="train")
    test = load_dlmi(cohort_root, split="test")
    both = load_dlmi(cohort_root, split="all")
    assert len(train) + len(test) == len(both) == 20
    assert both.ids == train.ids + test.ids
    assert train.clinical_names == CLINICAL_NAMES == ("age", "lymph_count", "sex")
    assert train.class_names == ("reactive", "malignant")
    assert set(test.labels.tolist()) == {-1}
    for rec in train:
        assert rec.label == int(truth[rec.id]["LABEL"])
        assert rec.num_instances == int(truth[rec.id]["N_CELLS"])
        assert list(rec.paths) == sorted(rec.paths)
        assert all(p.is_file() and p.parent.name == rec.id for p in rec.paths)
    x = both.clinical_matrix()
    assert x.shape == (20, 3)
    assert set(np.unique(x[:, 2]).tolist()) <= {0.0, 1.0}
    assert np.all((x[:, 0] > 15) & (x[:, 0] < 100))
    assert np.all(x[:, 1] > 0)
    assert both.root == cohort_root.absolute()


def test_quirks_are_parsed(tmp_path: Path) -> None:
    write_split(tmp_path, GOOD)
    c = load_dlmi(tmp_path, reference_date=date(2020, 1, 1))
    ages = c.clinical_matrix()[:, 0]
    assert ages[0] == pytest.approx((date(2020, 1, 1) - date(1933, 11, 3)).days / 365.25)
    assert ages[1] == pytest.approx((date(2020, 1, 1) - date(1948, 4, 25)).days / 365.25)
    assert c.clinical_matrix()[:, 2].tolist() == [1.0, 0.0, 0.0]
    assert c.labels.tolist() == [1, 0, 1]


def test_reference_date_shifts_ages(tmp_path: Path) -> None:
    write_split(tmp_path, GOOD)
    a = load_dlmi(tmp_path, reference_date=date(2020, 1, 1)).clinical_matrix()[:, 0]
    b = load_dlmi(tmp_path, reference_date=date(2030, 1, 1)).clinical_matrix()[:, 0]
    np.testing.assert_allclose(b - a, (date(2030, 1, 1) - date(2020, 1, 1)).days / 365.25)


def test_missing_values_become_nan_and_scaler_uses_train_rows(tmp_path: Path) -> None:
    rows = [*GOOD, ["P4", "0", "", "", ""], ["P5", "1", "m", "1/1/1940", "500"]]
    write_split(tmp_path, rows)
    c = load_dlmi(tmp_path)
    x = c.clinical_matrix()
    assert all(math.isnan(v) for v in x[3])
    scaler = c.fit_scaler([0, 1, 2, 3])
    z = scaler.transform(x)
    assert np.all((z[:4] >= 0) & (z[:4] <= 1))
    assert z[4, 1] > 1.0  # the held-out lymph count 500 is outside the training range


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("11/3/1933", date(1933, 11, 3)),
        ("1/1/2000", date(2000, 1, 1)),
        ("25-04-1948", date(1948, 4, 25)),
        ("5-6-1950", date(1950, 6, 5)),
        (" 1950-12-31 ", date(1950, 12, 31)),
    ],
)
def test_parse_dob_formats(text: str, expected: date) -> None:
    assert parse_dob(text) == expected


@pytest.mark.parametrize("text", ["13/13/1950", "30/2/1950", "31-02-1950", "1950", "yesterday", "1/2/50", ""])
def test_parse_dob_rejects(text: str) -> None:
    with pytest.raises(DataError, match="date"):
        parse_dob(text)


# --- every bad input ---------------------------------------------------------------------


def test_missing_column(tmp_path: Path) -> None:
    write_split(tmp_path, [r[:3] + r[4:] for r in GOOD], header=["ID", "LABEL", "GENDER", "LYMPH_COUNT"])
    with pytest.raises(DataError, match=r"trainset\.csv' has no column 'DOB'"):
        load_dlmi(tmp_path)


def test_extra_columns_and_case_are_tolerated(tmp_path: Path) -> None:
    rows = [[*r, "x"] for r in GOOD]
    write_split(tmp_path, rows, header=[" id", "Label", "gender ", "DOB", "lymph_count", "NOTE"])
    assert load_dlmi(tmp_path).ids == ["P1", "P2", "P3"]


@pytest.mark.parametrize("label", ["2", "yes", "", "0.5", "nan"])
def test_unknown_label(tmp_path: Path, label: str) -> None:
    write_split(tmp_path, [*GOOD, ["P9", label, "M", "1/1/1950", "3"]])
    with pytest.raises(DataError, match=r"line 5, patient 'P9': unknown LABEL"):
        load_dlmi(tmp_path)


def test_label_minus_one_and_float_labels_accepted(tmp_path: Path) -> None:
    write_split(tmp_path, [["P1", "-1", "M", "1/1/1950", "3"], ["P2", "1.0", "F", "1/1/1950", "3"]])
    assert load_dlmi(tmp_path).labels.tolist() == [-1, 1]


def test_unknown_gender(tmp_path: Path) -> None:
    write_split(tmp_path, [*GOOD, ["P9", "1", "X", "1/1/1950", "3"]])
    with pytest.raises(DataError, match=r"patient 'P9': unknown GENDER 'X'"):
        load_dlmi(tmp_path)


def test_unparseable_date(tmp_path: Path) -> None:
    write_split(tmp_path, [*GOOD, ["P9", "1", "M", "31/31/1950", "3"]])
    with pytest.raises(DataError, match=r"patient 'P9': column DOB: date '31/31/1950'"):
        load_dlmi(tmp_path)


def test_dob_after_reference_date(tmp_path: Path) -> None:
    write_split(tmp_path, [["P1", "1", "M", "1/1/2021", "3"]])
    with pytest.raises(DataError, match=r"patient 'P1': DOB '1/1/2021' is after the reference date"):
        load_dlmi(tmp_path)


@pytest.mark.parametrize("count", ["abc", "-1", "inf", "nan", "22_58", "0x1A", "1,5"])
def test_bad_lymph_count(tmp_path: Path, count: str) -> None:
    write_split(tmp_path, [["P1", "1", "M", "1/1/1950", count]])
    with pytest.raises(DataError, match=r"patient 'P1': LYMPH_COUNT"):
        load_dlmi(tmp_path)


@pytest.mark.parametrize(("count", "value"), [("12", 12.0), (" 3.5 ", 3.5), ("1e-05", 1e-05), (".5", 0.5)])
def test_decimal_lymph_counts_parse(tmp_path: Path, count: str, value: float) -> None:
    write_split(tmp_path, [["P1", "1", "M", "1/1/1950", count]])
    assert load_dlmi(tmp_path)[0].clinical[1] == pytest.approx(value)


def test_duplicate_patient_id(tmp_path: Path) -> None:
    write_split(tmp_path, [*GOOD, ["P2", "0", "M", "1/1/1950", "3"]])
    with pytest.raises(DataError, match=r"line 5, patient 'P2': duplicate patient ID \(first on line 3\)"):
        load_dlmi(tmp_path)


def test_duplicate_across_splits(tmp_path: Path) -> None:
    write_split(tmp_path, GOOD)
    write_split(tmp_path, [["P1", "-1", "M", "1/1/1950", "3"]], split="testset")
    assert len(load_dlmi(tmp_path, split="test")) == 1
    with pytest.raises(DataError, match="patient 'P1' appears in both trainset/ and testset/"):
        load_dlmi(tmp_path, split="all")


def test_empty_id(tmp_path: Path) -> None:
    write_split(tmp_path, [*GOOD, ["", "1", "M", "1/1/1950", "3"]])
    with pytest.raises(DataError, match="line 5: empty ID"):
        load_dlmi(tmp_path)


def test_patient_folder_missing(tmp_path: Path) -> None:
    folder = write_split(tmp_path, GOOD)
    for f in (folder / "P2").iterdir():
        f.unlink()
    (folder / "P2").rmdir()
    with pytest.raises(DataError, match=r"patient 'P2'.*folder '.*P2' is missing"):
        load_dlmi(tmp_path)


def test_patient_folder_without_images(tmp_path: Path) -> None:
    folder = write_split(tmp_path, GOOD)
    for f in (folder / "P3").iterdir():
        f.unlink()
    (folder / "P3" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"patient 'P3': folder '.*P3' holds no images"):
        load_dlmi(tmp_path)


def test_non_image_files_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_split(tmp_path, GOOD)
    (folder / "P1" / "Thumbs.db").write_bytes(b"x")
    with caplog.at_level("WARNING", logger="milcell"):
        c = load_dlmi(tmp_path)
    assert c[0].num_instances == 2
    assert "Thumbs.db" in caplog.text


def test_folder_without_csv_row(tmp_path: Path) -> None:
    folder = write_split(tmp_path, GOOD)
    (folder / "P77").mkdir()
    with pytest.raises(DataError, match=r"folders \['P77'\].*have no row"):
        load_dlmi(tmp_path)


def test_undecodable_image(tmp_path: Path) -> None:
    folder = write_split(tmp_path, GOOD)
    (folder / "P2" / "1.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    assert len(load_dlmi(tmp_path)) == 3  # not checked by default: the dataset raises on decode
    with pytest.raises(DataError, match=r"patient 'P2': image '.*P2/1\.jpg' cannot be decoded"):
        load_dlmi(tmp_path, verify_images=True)


@pytest.mark.parametrize("pid", ["..", "../P1", "a/b", "/etc", "a\\b", "."])
def test_unsafe_patient_id(tmp_path: Path, pid: str) -> None:
    write_split(tmp_path, [*GOOD, [pid, "1", "M", "1/1/1950", "3"]])
    with pytest.raises(DataError, match="is not a plain name"):
        load_dlmi(tmp_path)


def test_patient_symlink_outside_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    folder = write_split(root, GOOD[:2])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(JPEG)
    (folder / "P3").symlink_to(outside, target_is_directory=True)
    write_split(root, GOOD, make_dirs=False)
    with pytest.raises(DataError, match="P3' resolves to .*outside the dataset root"):
        load_dlmi(root)


def test_image_symlink_outside_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    folder = write_split(root, GOOD)
    (tmp_path / "secret.jpg").write_bytes(JPEG)
    (folder / "P1" / "9.jpg").symlink_to(tmp_path / "secret.jpg")
    with pytest.raises(DataError, match=r"9\.jpg' resolves to .*outside the dataset root"):
        load_dlmi(root)


def test_symlink_inside_root_is_followed(tmp_path: Path) -> None:
    folder = write_split(tmp_path, GOOD)
    (folder / "P1" / "9.jpg").symlink_to(folder / "P2" / "0.jpg")
    assert load_dlmi(tmp_path)[0].num_instances == 3


def test_missing_split_folder_and_csv(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing split folder .*trainset"):
        load_dlmi(tmp_path)
    (tmp_path / "trainset").mkdir()
    with pytest.raises(DataError, match="no CSV file in .*trainset"):
        load_dlmi(tmp_path)
    write_split(tmp_path, GOOD)
    (tmp_path / "trainset" / "other.csv").write_text("a\n")
    with pytest.raises(DataError, match="several CSV files"):
        load_dlmi(tmp_path)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dlmi(tmp_path / "nowhere")


def test_empty_csv_and_header_only(tmp_path: Path) -> None:
    folder = tmp_path / "trainset"
    folder.mkdir()
    (folder / "t.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"t\.csv' is empty"):
        load_dlmi(tmp_path)
    (folder / "t.csv").write_text("ID,LABEL,GENDER,DOB,LYMPH_COUNT\n")
    with pytest.raises(DataError, match="has no patient rows"):
        load_dlmi(tmp_path)


def test_bad_encoding_and_ragged_rows(tmp_path: Path) -> None:
    folder = write_split(tmp_path, GOOD)
    (folder / "trainset.csv").write_bytes(
        "ID,LABEL,GENDER,DOB,LYMPH_COUNT\nP1,1,M,1/1/1950,3 é\n".encode("latin-1")
    )
    with pytest.raises(DataError, match="is not valid UTF-8"):
        load_dlmi(tmp_path)
    (folder / "trainset.csv").write_text("ID,LABEL,GENDER,DOB,LYMPH_COUNT\nP1,1,M\n")
    with pytest.raises(DataError, match="line 2: 3 fields, the header has 5"):
        load_dlmi(tmp_path)
    (folder / "trainset.csv").write_bytes(b"ID,LABEL,GENDER,DOB,LYMPH_COUNT\nP1,1,M,1/1/1950,3\x00\n")
    with pytest.raises(DataError, match="line"):
        load_dlmi(tmp_path)


def test_bad_arguments(tmp_path: Path) -> None:
    write_split(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="split must be"):
        load_dlmi(tmp_path, split="val")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="reference_date"):
        load_dlmi(tmp_path, reference_date="2020-01-01")  # type: ignore[arg-type]


# --- fuzzing: the only exception escaping is DataError --------------------------------------

_past = st.dates(min_value=date(1900, 1, 1), max_value=date(2019, 12, 31))
_dates = st.one_of(
    _past.map(lambda d: f"{d.month}/{d.day}/{d.year}"),
    _past.map(lambda d: d.strftime("%d-%m-%Y")),
    st.dates().map(lambda d: f"{d.month}/{d.day}/{d.year:04d}"),
    st.text(max_size=12),
    st.sampled_from(["", "0/0/0", "99/99/9999", "1/1/1", "29-02-1900", "29-02-2000"]),
)
_cells = {
    "LABEL": st.one_of(st.sampled_from(["0", "1", "-1", "1.0"]), st.text(max_size=4)),
    "GENDER": st.one_of(st.sampled_from(["M", "F", "f", "m", "", "male"]), st.text(max_size=4)),
    "DOB": _dates,
    "LYMPH_COUNT": st.one_of(st.floats(allow_nan=True).map(repr), st.text(max_size=6)),
}
_valid = {
    "LABEL": st.sampled_from(["0", "1", "-1", "1.0", " 0 "]),
    "GENDER": st.sampled_from(["M", "F", "f", "m", "", "male", "FEMALE"]),
    "DOB": st.one_of(
        _past.map(lambda d: f"{d.month}/{d.day}/{d.year}"), _past.map(lambda d: d.strftime("%d-%m-%Y"))
    ),
    "LYMPH_COUNT": st.one_of(st.floats(min_value=0, max_value=1e4).map(repr), st.just("")),
}
_odd_ids = st.one_of(st.sampled_from(["", "..", "P1/x", "/abs", "P4"]), st.text(max_size=6))


@st.composite
def _tables(draw: st.DrawFn) -> tuple[list[str], list[list[str]]]:
    """Headers with shuffled, sometimes missing, extra columns; rows for P1-P3 with messy values."""
    header = [c for c in draw(st.permutations(HEADER)) if c == "ID" or draw(st.integers(0, 19)) != 7]
    header += draw(st.lists(st.text(max_size=5), max_size=2))
    ids = list(draw(st.permutations(["P1", "P2", "P3"])))
    if draw(st.integers(0, 4)) == 0:
        ids[draw(st.integers(0, 2))] = draw(_odd_ids)
    rows = []
    for pid in ids:
        row = [
            pid if c == "ID" else draw(_cells[c]) if c in _cells else draw(st.text(max_size=4))
            for c in header
        ]
        if draw(st.integers(0, 19)) == 7:
            row = row[:-1]
        rows.append(row)
    return header, rows


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dlmi_fuzz")
    for pid in ("P1", "P2", "P3"):
        (root / "trainset" / pid).mkdir(parents=True)
        (root / "trainset" / pid / "0.jpg").write_bytes(JPEG)
    return root


# Hypothesis runs the examples one after another, so rewriting the one CSV is safe.


@given(_tables())
def test_fuzz_structured_csv(fuzz_root: Path, table: tuple[list[str], list[list[str]]]) -> None:
    header, rows = table
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    (fuzz_root / "trainset" / "t.csv").write_bytes(buf.getvalue().encode("utf-8", errors="surrogatepass"))
    try:
        cohort = load_dlmi(fuzz_root)
    except DataError:
        event("DataError")
        return
    event("loaded")
    assert sorted(cohort.ids) == ["P1", "P2", "P3"]
    assert set(cohort.labels.tolist()) <= {-1, 0, 1}
    assert cohort.clinical_matrix().shape == (3, 3)


@given(st.binary(max_size=200))
def test_fuzz_raw_bytes(fuzz_root: Path, data: bytes) -> None:
    (fuzz_root / "trainset" / "t.csv").write_bytes(data)
    try:
        load_dlmi(fuzz_root)
    except DataError:
        return


@given(st.text(max_size=200))
def test_fuzz_text_after_valid_header(fuzz_root: Path, body: str) -> None:
    (fuzz_root / "trainset" / "t.csv").write_bytes(
        ("ID,LABEL,GENDER,DOB,LYMPH_COUNT\n" + body).encode("utf-8", errors="surrogatepass")
    )
    try:
        load_dlmi(fuzz_root)
    except DataError:
        return


def test_fuzz_can_succeed(fuzz_root: Path) -> None:
    """The fuzzed setup is loadable with a well-formed CSV (so the fuzz tests exercise success too)."""
    rows = "P1,1,M,1/1/1950,3\nP2,0,f,02-03-1960,\nP3,-1,,,4.5\n"
    (fuzz_root / "trainset" / "t.csv").write_text(
        "ID,LABEL,GENDER,DOB,LYMPH_COUNT,X\n" + rows.replace("\n", ",x\n")
    )
    assert load_dlmi(fuzz_root).labels.tolist() == [1, 0, -1]


def test_byte_order_marks_inside_a_csv_are_not_data(tmp_path: Path) -> None:
    """Regression (found by the fuzz test): files concatenated after saving with a BOM."""
    from milcell.data.formats._csv import read_table

    path = tmp_path / "t.csv"
    path.write_bytes(b"\xef\xbb\xbfID,LABEL\r\nP1,0\r\n\xef\xbb\xbfP2,1\r\n\xef\xbb\xbf\n\n")
    rows = read_table(path, ("ID", "LABEL"))
    assert [(r["ID"], r["LABEL"]) for r in rows] == [("P1", "0"), ("P2", "1")]
