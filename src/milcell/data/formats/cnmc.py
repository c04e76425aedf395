"""Loader for the C-NMC 2019 leukaemia layout (ALL blasts vs healthy cells).

Layout read by :func:`load_cnmc` (the folder Kaggle names ``C-NMC_Leukemia``)::

    root/
      training_data/                      # or C-NMC_training_data/
        fold_0/
          all/UID_11_10_1_all.bmp ...     # UID_<patient>_<image>_<cell>_all.bmp
          hem/UID_H10_43_1_hem.bmp ...    # UID_H<patient>_<image>_<cell>_hem.bmp
        fold_1/ ...
        fold_2/ ...
      validation_data/                    # the preliminary-phase test set (optional)
        C-NMC_test_prelim_phase_data/
          1.bmp 2.bmp ...
        C-NMC_test_prelim_phase_data_labels.csv   # Patient_ID,new_names,labels

Conventions:

* Labels: ``1`` = ALL (blast), ``0`` = HEM (healthy);
  ``class_names == ("hem", "all")``.
* Patient: parsed from the file name (or from the prelim ``Patient_ID``,
  ``UID_57`` / ``UID_H49``, or a full training-style file name), keeping the
  ``H`` of healthy subjects: ``"57"`` and ``"H49"``, so the ALL and healthy
  numberings never collide. Use :attr:`CellSet.groups` for patient-level splits.
* The prelim folder is found tolerantly: ``validation_data/`` (or
  ``C-NMC_test_prelim_phase_data/``) under the root; the labels CSV is the one
  CSV in it or one folder below it with the columns ``Patient_ID, new_names,
  labels``; the images are in the one folder there that holds image files.
* The fold (``fold_0`` ...) is not kept in the records; split by patient
  with :attr:`CellSet.groups` instead.

Examples
--------
>>> import tempfile
>>> from milcell.data.synthetic import make_cohort
>>> from milcell.data.formats.cnmc import load_cnmc
>>> root = make_cohort(tempfile.mkdtemp(), n_patients=6, layout="cnmc", image_size=32, bag_size=(2, 4))
>>> cells = load_cnmc(root)
>>> cells.class_names, sorted(set(cells.labels.tolist()))
(('hem', 'all'), [0, 1])
>>> sorted(set(cells.groups.tolist()))[:2]
['11', '12']
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from milcell.data.formats._csv import find_table, read_table
from milcell.data.formats._paths import (
    IMAGE_SUFFIXES,
    check_name,
    list_dir,
    resolve_root,
    safe_join,
    verify_image,
)
from milcell.data.records import CellRecord, CellSet
from milcell.exceptions import DataError

__all__ = ["CLASS_NAMES", "PRELIM_COLUMNS", "load_cnmc", "parse_cnmc_name"]

logger = logging.getLogger("milcell")

#: Class names by label: 0 = healthy (HEM), 1 = leukaemic blast (ALL).
CLASS_NAMES: tuple[str, ...] = ("hem", "all")
#: Columns of the prelim labels CSV.
PRELIM_COLUMNS: tuple[str, ...] = ("Patient_ID", "new_names", "labels")

_TAGS = {"hem": 0, "all": 1}
_TRAIN_DIRS = ("training_data", "C-NMC_training_data")
_PRELIM_DIRS = ("validation_data", "C-NMC_test_prelim_phase_data")
_FOLD = re.compile(r"^fold_\d+$")
_EXT = "|".join(s.lstrip(".") for s in sorted(IMAGE_SUFFIXES))
_NAME = re.compile(rf"^UID_(H?\d+)_(\d+)_(\d+)_(all|hem)\.(?:{_EXT})$", re.IGNORECASE)
_PATIENT_ID = re.compile(rf"^UID_(H?\d+)(?:_\d+_\d+_(all|hem))?(?:\.(?:{_EXT}))?$", re.IGNORECASE)


def parse_cnmc_name(name: str) -> tuple[str, int]:
    """Patient and label of a C-NMC training file name.

    Parameters
    ----------
    name : str
        ``UID_<patient>_<image>_<cell>_all.bmp`` or
        ``UID_H<patient>_<image>_<cell>_hem.bmp``.

    Returns
    -------
    (str, int)
        The patient (``"11"``, ``"H10"``: the ``H`` of healthy subjects kept)
        and the label (1 = ALL, 0 = HEM).

    Raises
    ------
    DataError
        If the name does not follow the pattern.

    Examples
    --------
    >>> parse_cnmc_name("UID_11_10_1_all.bmp"), parse_cnmc_name("UID_H10_43_1_hem.bmp")
    (('11', 1), ('H10', 0))
    >>> parse_cnmc_name("cell.bmp")
    Traceback (most recent call last):
    ...
    milcell.exceptions.DataError: unrecognised C-NMC file name 'cell.bmp'...
    """
    m = _NAME.match(name)
    if m is None:
        raise DataError(
            f"unrecognised C-NMC file name {name!r}: expected UID_<patient>_<image>_<cell>_all.bmp "
            "or UID_H<patient>_<image>_<cell>_hem.bmp"
        )
    patient = m.group(1)
    return patient[0].upper() + patient[1:], _TAGS[m.group(4).lower()]


def _training(train_dir: Path, root: Path, verify_images: bool) -> list[CellRecord]:
    folds = list_dir(train_dir, root)
    for entry in folds:
        if not (entry.is_dir() and _FOLD.match(entry.name)):
            raise DataError(f"unexpected entry '{entry}' in '{train_dir}': expected only fold_<n> folders")
    if not folds:
        raise DataError(f"no fold_<n> folders in '{train_dir}'")
    records: list[CellRecord] = []
    seen: dict[str, Path] = {}
    for fold in folds:
        class_dirs = list_dir(fold, root)
        if not class_dirs:
            raise DataError(f"fold folder '{fold}' is empty: expected all/ and hem/")
        for class_dir in class_dirs:
            tag = class_dir.name.lower()
            if not class_dir.is_dir() or tag not in _TAGS:
                raise DataError(f"unexpected entry '{class_dir}' in '{fold}': expected only all/ and hem/")
            files = list_dir(class_dir, root)
            if not files:
                raise DataError(f"class folder '{class_dir}' holds no images")
            for path in files:
                if path.is_dir():
                    raise DataError(f"unexpected folder '{path}' in '{class_dir}'")
                try:
                    patient, label = parse_cnmc_name(path.name)
                except DataError as err:
                    raise DataError(f"'{path}': {err}") from None
                if label != _TAGS[tag]:
                    raise DataError(
                        f"'{path}': an {'ALL' if label else 'HEM'} file name in the {tag}/ folder"
                    )
                if path.name in seen:
                    raise DataError(f"image {path.name!r} appears twice: '{seen[path.name]}' and '{path}'")
                seen[path.name] = path
                if verify_images:
                    verify_image(path, f"patient {patient!r}")
                records.append(CellRecord(path, label, patient))
    return records


def _parse_patient_id(text: str, csv_path: Path, line: int) -> tuple[str, int | None]:
    m = _PATIENT_ID.match(text)
    if m is None:
        raise DataError(
            f"'{csv_path}', line {line}: unrecognised Patient_ID {text!r} (expected UID_<n> or UID_H<n>)"
        )
    patient = m.group(1)
    tag = m.group(2)
    return patient[0].upper() + patient[1:], None if tag is None else _TAGS[tag.lower()]


def _prelim(prelim_dir: Path, root: Path, verify_images: bool) -> list[CellRecord]:
    subdirs = list_dir(prelim_dir, root, dirs=True)
    csvs = list_dir(prelim_dir, root, dirs=False, suffixes={".csv"})
    for sub in subdirs:
        csvs += list_dir(sub, root, dirs=False, suffixes={".csv"})
    csv_path = find_table(prelim_dir, PRELIM_COLUMNS, csvs)
    rows = read_table(csv_path, PRELIM_COLUMNS)
    if not rows:
        raise DataError(f"prelim labels CSV '{csv_path}' has no rows")
    holders = [d for d in [prelim_dir, *subdirs] if list_dir(d, root, dirs=False, suffixes=IMAGE_SUFFIXES)]
    if len(holders) > 1:
        first = rows[0]["new_names"]
        holders = [d for d in holders if (d / first).is_file()] or holders
    if not holders:
        raise DataError(f"no folder of prelim images in '{prelim_dir}' (for '{csv_path}')")
    if len(holders) > 1:
        raise DataError(f"several folders of prelim images in '{prelim_dir}': {[str(d) for d in holders]}")
    image_dir = holders[0]
    records: list[CellRecord] = []
    seen: dict[str, int] = {}
    for row in rows:
        name = row["new_names"]
        check_name(name, "new_names value", f"{csv_path}, line {row.line}")
        if name in seen:
            raise DataError(
                f"'{csv_path}', line {row.line}: image {name!r} already listed on line {seen[name]}"
            )
        seen[name] = row.line
        label_text = row["labels"]
        if label_text not in ("0", "1"):
            raise DataError(
                f"'{csv_path}', line {row.line}: unknown labels value {label_text!r} "
                "(expected 1 = ALL, 0 = HEM)"
            )
        label = int(label_text)
        patient, tag = _parse_patient_id(row["Patient_ID"], csv_path, row.line)
        if tag is not None and tag != label:
            raise DataError(
                f"'{csv_path}', line {row.line}: Patient_ID {row['Patient_ID']!r} "
                f"disagrees with labels={label}"
            )
        path = safe_join(image_dir, name, what="new_names value", source=csv_path)
        if not path.is_file():
            raise DataError(f"'{csv_path}', line {row.line}: image '{path}' is missing")
        if verify_images:
            verify_image(path, f"patient {patient!r}")
        records.append(CellRecord(path, label, patient))
    unlisted = [
        p.name for p in list_dir(image_dir, root, dirs=False, suffixes=IMAGE_SUFFIXES) if p.name not in seen
    ]
    if unlisted:
        raise DataError(f"images {unlisted[:5]} in '{image_dir}' have no row in '{csv_path}'")
    return records


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return safe_join(root, name, what="folder")
    return None


def load_cnmc(
    root: str | os.PathLike[str], include_prelim: bool = True, verify_images: bool = False
) -> CellSet:
    """Read the C-NMC 2019 layout into a :class:`CellSet` of single cells.

    Parameters
    ----------
    root : path-like
        The folder that holds ``training_data/`` (Kaggle's ``C-NMC_Leukemia``).
    include_prelim : bool, default True
        Also read the labelled preliminary-phase set under ``validation_data/``
        (the reports merge it with the training folds); it must then exist.
    verify_images : bool, default False
        Open every image with PIL (``Image.verify``) now, so a corrupt file
        fails at load time. Otherwise the dataset raises when it decodes it.

    Returns
    -------
    CellSet
        Training cells (by fold, class folder, file name), then prelim cells
        (in CSV order); ``class_names == ("hem", "all")``, label 1 = ALL;
        ``patient`` = ``"57"`` or ``"H49"``.

    Raises
    ------
    DataError
        Missing training or prelim folder; an unexpected folder or an
        unrecognised file name (or an ALL name in ``hem/``); an empty class
        folder; a file name present twice; no or several labels CSVs, a
        missing column, an unknown label, a bad ``Patient_ID``, a listed image
        that is missing, an image not listed; an unsafe name or a symlink
        leaving ``root``; an undecodable image (with ``verify_images=True``).

    Examples
    --------
    >>> import tempfile
    >>> from milcell.data.synthetic import make_cohort
    >>> root = make_cohort(tempfile.mkdtemp(), n_patients=5, layout="cnmc", image_size=32, bag_size=(2, 2))
    >>> len(load_cnmc(root)), len(load_cnmc(root, include_prelim=False))
    (10, 8)
    """
    base = resolve_root(root)
    train_dir = _first_dir(base, _TRAIN_DIRS)
    if train_dir is None:
        raise DataError(f"no training_data/ folder in '{base}' (expected the C-NMC_Leukemia folder)")
    records = _training(train_dir, base, verify_images)
    if include_prelim:
        prelim_dir = _first_dir(base, _PRELIM_DIRS)
        if prelim_dir is None:
            raise DataError(
                f"no validation_data/ folder in '{base}'; "
                "pass include_prelim=False to read only training_data/"
            )
        records += _prelim(prelim_dir, base, verify_images)
    logger.info(
        "load_cnmc: %d cells of %d patients from '%s'", len(records), len({r.patient for r in records}), base
    )
    return CellSet(records, class_names=CLASS_NAMES, root=base)
