"""Loader for the lymphocytosis challenge layout (DLMI, Kaggle).

Layout read by :func:`load_dlmi`::

    root/
      trainset/
        trainset_true.csv        # any single CSV with the columns below
        P26/                     # one folder per patient ID
          000001.jpg ...         # its 224x224 JPEG cell images
        P183/ ...
      testset/
        testset_data.csv         # same columns, LABEL = -1
        P71/ ...

CSV columns (case and surrounding spaces ignored; extra columns ignored):
``ID, LABEL, GENDER, DOB, LYMPH_COUNT``.

* ``LABEL``: ``0`` reactive, ``1`` malignant, ``-1`` unlabelled (test patients).
* ``GENDER``: ``M``/``F``/``male``/``female`` in any case; empty = missing.
* ``DOB``: ``m/d/YYYY`` (``11/3/1933``), ``dd-mm-YYYY`` (``25-04-1948``) or
  ISO ``YYYY-mm-dd``; empty = missing. The age is the number of years
  (days / 365.25) from the DOB to ``reference_date`` (default
  :data:`DEFAULT_REFERENCE_DATE`, 1 January 2020).
* ``LYMPH_COUNT``: lymphocyte count (10^9 cells/L), a non-negative number;
  empty = missing.

The returned :class:`~milcell.data.records.BagCohort` has
``clinical_names == ("age", "lymph_count", "sex")`` with raw values, sex
encoded ``1.0`` male, ``0.0`` female and ``nan`` for any missing value, and
``class_names == ("reactive", "malignant")``. Scale them with
:meth:`BagCohort.fit_scaler(train_indices) <milcell.data.records.BagCohort.fit_scaler>`
so only training-fold statistics are used (missing values are median-imputed).

Examples
--------
>>> import tempfile
>>> from milcell.data.synthetic import make_cohort
>>> from milcell.data.formats.dlmi import load_dlmi
>>> root = make_cohort(tempfile.mkdtemp(), n_patients=10, seed=0, layout="dlmi", image_size=32)
>>> train = load_dlmi(root, split="train")
>>> train.clinical_names, train.class_names
(('age', 'lymph_count', 'sex'), ('reactive', 'malignant'))
>>> test = load_dlmi(root, split="test")
>>> set(test.labels.tolist())
{-1}
>>> scaler = train.fit_scaler(range(len(train)))   # fit on training rows only
>>> scaler.transform(test.clinical_matrix()).shape
(2, 3)
"""

from __future__ import annotations

import logging
import math
import os
import re
from datetime import date
from pathlib import Path
from typing import Literal

from milcell.data.formats._csv import Row, read_table
from milcell.data.formats._paths import (
    IMAGE_SUFFIXES,
    check_inside,
    list_dir,
    resolve_root,
    safe_join,
    verify_image,
)
from milcell.data.records import BagCohort, BagRecord
from milcell.exceptions import ConfigError, DataError

__all__ = ["CLINICAL_NAMES", "CSV_COLUMNS", "DEFAULT_REFERENCE_DATE", "load_dlmi", "parse_dob"]

logger = logging.getLogger("milcell")

#: Date against which ages are computed unless ``reference_date`` is given.
DEFAULT_REFERENCE_DATE: date = date(2020, 1, 1)
#: Columns every split CSV must have.
CSV_COLUMNS: tuple[str, ...] = ("ID", "LABEL", "GENDER", "DOB", "LYMPH_COUNT")
#: Names of the clinical values stored in each record, in order.
CLINICAL_NAMES: tuple[str, ...] = ("age", "lymph_count", "sex")

_SPLIT_DIRS = {"train": "trainset", "test": "testset"}
_LABELS = {"0": 0, "1": 1, "-1": -1}
_SEX = {"m": 1.0, "male": 1.0, "f": 0.0, "female": 0.0}
_MDY = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4})$")
_DMY = re.compile(r"^(\d{1,2})-(\d{1,2})-(\d{4})$")
_ISO = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})$")


def parse_dob(text: str) -> date:
    """Parse a date of birth written ``m/d/YYYY``, ``dd-mm-YYYY`` or ``YYYY-mm-dd``.

    Parameters
    ----------
    text : str
        The date as written in the CSV (surrounding spaces ignored).

    Returns
    -------
    datetime.date

    Raises
    ------
    DataError
        If the text matches none of the formats or is not a real calendar date.

    Examples
    --------
    >>> parse_dob("11/3/1933"), parse_dob("25-04-1948"), parse_dob("1950-12-31")
    (datetime.date(1933, 11, 3), datetime.date(1948, 4, 25), datetime.date(1950, 12, 31))
    >>> parse_dob("31/31/1950")
    Traceback (most recent call last):
    ...
    milcell.exceptions.DataError: date '31/31/1950' is not a valid calendar date ...
    """
    s = text.strip()
    if m := _MDY.match(s):
        month, day, year = (int(g) for g in m.groups())
    elif m := _DMY.match(s):
        day, month, year = (int(g) for g in m.groups())
    elif m := _ISO.match(s):
        year, month, day = (int(g) for g in m.groups())
    else:
        raise DataError(f"date {text!r} matches none of the formats m/d/YYYY, dd-mm-YYYY, YYYY-mm-dd")
    try:
        return date(year, month, day)
    except ValueError as err:
        raise DataError(f"date {text!r} is not a valid calendar date ({err})") from None


def _where(csv_path: Path, row: Row, patient: str | None = None) -> str:
    who = f", patient {patient!r}" if patient is not None else ""
    return f"'{csv_path}', line {row.line}{who}"


_PLAIN_DECIMAL = re.compile(r"\s*\+?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*")


def _parse_row(csv_path: Path, row: Row, reference: date) -> tuple[str, int, tuple[float, float, float]]:
    pid = row["ID"]
    if pid == "":
        raise DataError(f"{_where(csv_path, row)}: empty ID")
    label_text = row["LABEL"]
    try:
        label_value = float(label_text)
    except ValueError:
        label_value = math.nan
    key = str(int(label_value)) if label_value in (-1.0, 0.0, 1.0) else label_text
    if key not in _LABELS:
        raise DataError(
            f"{_where(csv_path, row, pid)}: unknown LABEL {label_text!r} (expected 0, 1, or -1 = unlabelled)"
        )
    gender = row["GENDER"].lower()
    if gender == "":
        sex = math.nan
    elif gender in _SEX:
        sex = _SEX[gender]
    else:
        raise DataError(f"{_where(csv_path, row, pid)}: unknown GENDER {row['GENDER']!r} (expected M or F)")
    if row["DOB"] == "":
        age = math.nan
    else:
        try:
            dob = parse_dob(row["DOB"])
        except DataError as err:
            raise DataError(f"{_where(csv_path, row, pid)}: column DOB: {err}") from None
        if dob > reference:
            raise DataError(
                f"{_where(csv_path, row, pid)}: DOB {row['DOB']!r} is after the reference date {reference}"
            )
        age = (reference - dob).days / 365.25
    count_text = row["LYMPH_COUNT"]
    if count_text == "":
        count = math.nan
    else:
        # decimal numbers only ("12", "3.5", "1e-05"): Python's float() also reads "22_58" (as 2258),
        # "inf", "nan" and " 1_0.5", none of which a laboratory export means
        count = float(count_text) if _PLAIN_DECIMAL.fullmatch(count_text) else math.nan
        if not math.isfinite(count) or count < 0:
            raise DataError(
                f"{_where(csv_path, row, pid)}: LYMPH_COUNT {count_text!r} is not a non-negative number"
            )
    return pid, _LABELS[key], (age, count, sex)


def _split_csv(folder: Path, root: Path) -> Path:
    csvs = list_dir(folder, root, dirs=False, suffixes={".csv"})
    if not csvs:
        raise DataError(f"no CSV file in '{folder}' (expected one with columns {list(CSV_COLUMNS)})")
    if len(csvs) > 1:
        raise DataError(f"several CSV files in '{folder}': {[p.name for p in csvs]}; expected exactly one")
    return csvs[0]


def _load_split(folder: Path, root: Path, reference: date, verify_images: bool) -> list[BagRecord]:
    if not folder.is_dir():
        raise DataError(f"missing split folder '{folder}' (expected trainset/ and testset/ under the root)")
    check_inside(root, folder)
    csv_path = _split_csv(folder, root)
    records: list[BagRecord] = []
    seen: dict[str, int] = {}
    for row in read_table(csv_path, CSV_COLUMNS):
        pid, label, clinical = _parse_row(csv_path, row, reference)
        if pid in seen:
            raise DataError(f"{_where(csv_path, row, pid)}: duplicate patient ID (first on line {seen[pid]})")
        seen[pid] = row.line
        patient_dir = safe_join(folder, pid, what="patient ID", source=csv_path)
        check_inside(root, patient_dir)
        if not patient_dir.is_dir():
            raise DataError(f"patient {pid!r} (from '{csv_path}'): folder '{patient_dir}' is missing")
        entries = list_dir(patient_dir, root)
        images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        broken = [p.name for p in entries if p.is_symlink() and not p.exists()]
        if broken:
            raise DataError(
                f"patient {pid!r}: {broken} in '{patient_dir}' are broken links (their target does not exist)"
            )
        others = [p.name for p in entries if p not in images]
        if others:
            logger.warning(
                "patient %r: ignoring %d entries that are not cell images in a format milcell reads "
                "(%s; images: %s; subfolders are not read) in '%s'",
                pid,
                len(others),
                ", ".join(others),
                " ".join(sorted(IMAGE_SUFFIXES)),
                patient_dir,
            )
        if not images:
            raise DataError(f"patient {pid!r}: folder '{patient_dir}' holds no images")
        if verify_images:
            for p in images:
                verify_image(p, f"patient {pid!r}")
        records.append(BagRecord(pid, label, tuple(images), clinical))
    if not records:
        raise DataError(f"CSV file '{csv_path}' has no patient rows")
    extra = [p.name for p in list_dir(folder, root, dirs=True) if p.name not in seen]
    if extra:
        raise DataError(f"folders {extra} in '{folder}' have no row in '{csv_path}'")
    return records


def load_dlmi(
    root: str | os.PathLike[str],
    split: Literal["train", "test", "all"] = "train",
    reference_date: date = DEFAULT_REFERENCE_DATE,
    verify_images: bool = False,
) -> BagCohort:
    """Read the lymphocytosis layout (``trainset/``, ``testset/``) into a :class:`BagCohort`.

    Parameters
    ----------
    root : path-like
        The folder that holds ``trainset/`` and ``testset/``.
    split : {"train", "test", "all"}, default "train"
        Which split to read; ``"all"`` gives the training patients, then the
        test patients (whose label is ``-1``).
    reference_date : datetime.date, default :data:`DEFAULT_REFERENCE_DATE`
        Ages are ``(reference_date - DOB).days / 365.25``.
    verify_images : bool, default False
        Open every image with PIL (``Image.verify``) now, so a corrupt file
        fails at load time. Otherwise the dataset raises when it decodes it.

    Returns
    -------
    BagCohort
        One :class:`BagRecord` per CSV row, in CSV order; ``paths`` are the
        patient's images sorted by file name; ``clinical`` is
        ``(age, lymph_count, sex)`` raw (``sex``: 1.0 male, 0.0 female,
        ``nan`` missing). ``class_names == ("reactive", "malignant")``.

    Raises
    ------
    DataError
        Missing split folder or CSV, several CSVs in a split folder, missing
        column, unknown LABEL or GENDER, unparseable DOB or a DOB after
        ``reference_date``, bad LYMPH_COUNT, duplicate patient ID (also across
        splits), an ID that is not a plain name (``..``, ``/``, absolute), a
        missing patient folder or one without images, a patient folder with
        no CSV row, a symlink resolving outside ``root``, an undecodable image
        (with ``verify_images=True``). Each message names the file, line,
        patient or column.
    ConfigError
        If ``split`` is not one of the three values.

    Examples
    --------
    >>> import tempfile
    >>> from milcell.data.synthetic import make_cohort
    >>> root = make_cohort(tempfile.mkdtemp(), n_patients=8, seed=1, image_size=32)
    >>> cohort = load_dlmi(root, split="all")
    >>> len(cohort), cohort[0].paths[0].suffix
    (8, '.jpg')
    """
    if split not in ("train", "test", "all"):
        raise ConfigError(f"load_dlmi: split must be 'train', 'test' or 'all', got {split!r}")
    if not isinstance(reference_date, date):
        raise ConfigError(f"load_dlmi: reference_date must be a datetime.date, got {reference_date!r}")
    base = resolve_root(root)
    names = ["train", "test"] if split == "all" else [split]
    records: list[BagRecord] = []
    origin: dict[str, str] = {}
    for name in names:
        folder = base / _SPLIT_DIRS[name]
        for rec in _load_split(folder, base, reference_date, verify_images):
            if rec.id in origin:
                raise DataError(f"patient {rec.id!r} appears in both {origin[rec.id]}/ and {folder.name}/")
            origin[rec.id] = folder.name
            records.append(rec)
    logger.info("load_dlmi: %d patients from '%s' (split=%s)", len(records), base, split)
    return BagCohort(records, clinical_names=CLINICAL_NAMES, class_names=("reactive", "malignant"), root=base)
