"""Patient-level cross-validation and hold-out splits.

No patient ever appears on both sides of a split, and class ratios are kept.
Both functions take labels (and optionally groups) or, as a convenience, a
:class:`~milcell.data.BagCohort` (each patient is one sample) or a
:class:`~milcell.data.CellSet` (cells grouped by ``CellRecord.patient``).
They are thin layers over scikit-learn: ``StratifiedKFold`` when each sample
is its own group, ``StratifiedGroupKFold`` otherwise, and
``train_test_split`` over patients for the hold-out.

A published split is reproduced with :func:`folds_from_assignment` (a
``patient -> fold`` mapping, one fold number per sample, or a CSV file with
the columns ``patient_id`` and ``fold``) or :func:`folds_from_splitter` (any
scikit-learn splitter, or an object with ``split(X, y, groups)``);
:func:`make_folds` picks the right one. :func:`inner_split` holds out a
stratified, patient-level selection set from a training fold (the honest
protocol of :func:`~milcell.train.crossval.cross_validate`).

Unlabelled samples (label ``-1``, e.g. a challenge's test patients) are
dropped from every split and their count is logged at INFO level on the
``"milcell"`` logger. Returned indices always refer to positions in the
original input.

Examples
--------
>>> import numpy as np
>>> labels = np.array([0, 0, 0, 1, 1, 1, -1])
>>> folds = patient_kfold(labels, n_splits=3, seed=0)
>>> len(folds), sorted(np.concatenate([f.val for f in folds]).tolist())
(3, [0, 1, 2, 3, 4, 5])
"""

from __future__ import annotations

import csv
import logging
import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from milcell._validation import check_int, check_real, constraint_error
from milcell.data.records import BagCohort, CellSet
from milcell.exceptions import ConfigError, DataError

__all__ = [
    "Fold",
    "folds_from_assignment",
    "folds_from_splitter",
    "inner_split",
    "make_folds",
    "patient_holdout",
    "patient_kfold",
    "read_fold_assignment",
]

logger = logging.getLogger("milcell")


@dataclass(frozen=True)
class Fold:
    """One split: training and validation positions.

    Attributes
    ----------
    train : ndarray
        ``(n_train,)`` int64 sorted positions of the training samples.
    val : ndarray
        ``(n_val,)`` int64 sorted positions of the validation (or test) samples.
    repeat : int
        Repetition index, ``0 .. n_repeats - 1``.
    fold : int
        Fold index within the repetition, ``0 .. n_splits - 1``.

    Examples
    --------
    >>> import numpy as np
    >>> f = Fold(np.array([0, 2]), np.array([1]), repeat=0, fold=0)
    >>> f.apply(["a", "b", "c"])
    (['a', 'c'], ['b'])
    """

    train: np.ndarray
    val: np.ndarray
    repeat: int
    fold: int

    def apply(self, data: Any) -> tuple[Any, Any]:
        """Split ``data`` into ``(train_part, val_part)``.

        Uses ``data.subset(indices)`` when it exists (a cohort or a cell set),
        numpy indexing for arrays and tensors, and a list otherwise.
        """
        if hasattr(data, "subset"):
            return data.subset(self.train), data.subset(self.val)
        if hasattr(data, "shape"):
            return data[self.train], data[self.val]
        return [data[int(i)] for i in self.train], [data[int(i)] for i in self.val]


def _inputs(
    labels: Sequence[int] | np.ndarray | BagCohort | CellSet, groups: Sequence[Any] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(labels, BagCohort):
        if groups is not None:
            raise ConfigError("groups must be None when splitting a BagCohort (each patient is one sample)")
        return labels.labels, None
    if isinstance(labels, CellSet):
        if groups is not None:
            raise ConfigError("groups must be None when splitting a CellSet (its patients are the groups)")
        return labels.labels, labels.groups
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise DataError(f"labels must be a non-empty 1-D sequence, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"labels must be integers (class indices, -1 = unlabelled), got dtype {y.dtype}")
    if (y < -1).any():
        raise DataError(f"labels must be >= -1, got {int(y.min())} at position {int(np.argmin(y))}")
    g = None
    if groups is not None:
        g = np.asarray(groups, dtype=object)
        if g.shape != y.shape:
            raise DataError(f"groups has shape {g.shape} but labels has shape {y.shape}")
    return y.astype(np.int64), g


def _labelled(y: np.ndarray, what: str) -> np.ndarray:
    keep = np.flatnonzero(y >= 0)
    dropped = y.size - keep.size
    if dropped:
        logger.info("%s: dropped %d unlabelled sample(s) (label -1) from the split", what, dropped)
    if keep.size == 0:
        raise DataError(f"{what}: no labelled sample to split")
    return keep


def _group_labels(y: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique groups and the most frequent label of each (ties: smallest label)."""
    uniq, inverse = np.unique(g.astype(str), return_inverse=True)
    n_classes = int(y.max()) + 1
    counts = np.zeros((uniq.size, n_classes), dtype=np.int64)
    np.add.at(counts, (inverse, y), 1)
    return inverse, counts.argmax(axis=1)


def patient_kfold(
    labels: Sequence[int] | np.ndarray | BagCohort | CellSet,
    groups: Sequence[Any] | np.ndarray | None = None,
    n_splits: int = 5,
    n_repeats: int = 1,
    seed: int = 0,
) -> list[Fold]:
    """Stratified, patient-level k-fold cross-validation, optionally repeated.

    Parameters
    ----------
    labels : sequence of int, BagCohort or CellSet
        ``(n,)`` class index of each sample, ``-1`` for unlabelled samples
        (dropped, count logged). A cohort splits its patients; a cell set
        splits its cells grouped by patient.
    groups : sequence or None, default None
        ``(n,)`` patient of each sample. ``None``: every sample is its own
        patient (``StratifiedKFold``); otherwise ``StratifiedGroupKFold``.
    n_splits : int, default 5
        Folds per repetition, at least 2 and at most the number of patients
        of the smallest class. Integer arguments may be numpy integers.
    n_repeats : int, default 1
        Repetitions, each shuffled with a different seed derived from ``seed``.
    seed : int, default 0
        Seed of the shuffles; the same seed gives the same folds.

    Returns
    -------
    list of Fold
        ``n_repeats * n_splits`` folds, ordered by repeat then fold. Within a
        repetition every labelled sample is in exactly one ``val``.

    Raises
    ------
    ConfigError
        If ``n_splits``/``n_repeats``/``seed`` is invalid or a class has fewer
        patients than ``n_splits``; the message names the class and count.
    DataError
        If labels or groups are malformed or nothing is labelled.

    Examples
    --------
    >>> labels = [0, 0, 0, 0, 1, 1, 1, 1]
    >>> groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
    >>> folds = patient_kfold(labels, groups, n_splits=2, n_repeats=2, seed=1)
    >>> [(f.repeat, f.fold, len(f.train), len(f.val)) for f in folds]
    [(0, 0, 4, 4), (0, 1, 4, 4), (1, 0, 4, 4), (1, 1, 4, 4)]
    """
    y, g = _inputs(labels, groups)
    n_splits = check_int(n_splits, "n_splits", low=2)
    n_repeats = check_int(n_repeats, "n_repeats", low=1)
    seed = check_int(seed, "seed", low=0)
    keep = _labelled(y, "patient_kfold")
    y_l = y[keep]
    g_l = None if g is None else g[keep]
    # Patients per class: a class with fewer patients than folds would leave a fold without it.
    if g_l is None:
        classes, per_class = np.unique(y_l, return_counts=True)
    else:
        pairs = {(str(gr), int(lab)) for gr, lab in zip(g_l, y_l, strict=True)}
        classes = np.unique(y_l)
        per_class = np.array([sum(1 for _, lab in pairs if lab == c) for c in classes])
    if classes.size < 2:
        raise ConfigError(
            f"patient_kfold: stratification needs at least 2 classes, found only {classes.tolist()}"
        )
    smallest = int(np.argmin(per_class))
    if per_class[smallest] < n_splits:
        raise ConfigError(
            f"patient_kfold: n_splits={n_splits} is greater than the {int(per_class[smallest])} patient(s) "
            f"of class {int(classes[smallest])}"
        )
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    seeds = np.random.SeedSequence(seed).generate_state(n_repeats)
    folds: list[Fold] = []
    for repeat, rep_seed in enumerate(seeds):
        state = int(rep_seed)
        if g_l is None:
            splitter: Any = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=state)
            parts = splitter.split(np.zeros(y_l.size), y_l)
        else:
            splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=state)
            parts = splitter.split(np.zeros(y_l.size), y_l, g_l.astype(str))
        for fold, (tr, va) in enumerate(parts):
            if va.size == 0 or tr.size == 0:  # pragma: no cover - guarded by the class-count check
                raise DataError(f"patient_kfold: fold {fold} of repeat {repeat} is empty")
            folds.append(Fold(np.sort(keep[tr]), np.sort(keep[va]), repeat=repeat, fold=fold))
    return folds


def patient_holdout(
    labels: Sequence[int] | np.ndarray | BagCohort | CellSet,
    groups: Sequence[Any] | np.ndarray | None = None,
    test_size: float | int = 0.2,
    seed: int = 0,
) -> Fold:
    """Stratified patient-level hold-out split.

    Patients (not samples) are split with scikit-learn's ``train_test_split``
    stratified by each patient's label (its most frequent sample label), then
    every sample follows its patient.

    Parameters
    ----------
    labels : sequence of int, BagCohort or CellSet
        As in :func:`patient_kfold`; unlabelled samples are dropped.
    groups : sequence or None, default None
        ``(n,)`` patient of each sample; ``None``: each sample is a patient.
    test_size : float or int, default 0.2
        Fraction in (0, 1) or number of *patients* held out.
    seed : int, default 0
        Seed of the shuffle.

    Returns
    -------
    Fold
        ``train`` and ``val`` (the held-out part) positions, ``repeat=0``, ``fold=0``.

    Raises
    ------
    ConfigError
        If ``test_size`` is invalid or too small/large to hold every class on
        both sides, or a class has a single patient.
    DataError
        If labels or groups are malformed or nothing is labelled.

    Examples
    --------
    >>> f = patient_holdout([0] * 6 + [1] * 4, test_size=0.5, seed=0)
    >>> len(f.train), len(f.val)
    (5, 5)
    """
    y, g = _inputs(labels, groups)
    seed = check_int(seed, "seed", low=0)
    if isinstance(test_size, bool) or not isinstance(test_size, numbers.Real):
        raise constraint_error("test_size", "a fraction in (0, 1) or a number of patients >= 1", test_size)
    if isinstance(test_size, numbers.Integral):
        test_size = check_int(test_size, "test_size", low=1)
    else:
        test_size = check_real(test_size, "test_size", low=0.0, high=1.0, low_open=True, high_open=True)
    keep = _labelled(y, "patient_holdout")
    y_l = y[keep]
    if g is None:
        inverse = np.arange(y_l.size)
        patient_labels = y_l
    else:
        inverse, patient_labels = _group_labels(y_l, g[keep])
    classes, counts = np.unique(patient_labels, return_counts=True)
    if classes.size < 2:
        raise ConfigError(
            f"patient_holdout: stratification needs at least 2 classes, found {classes.tolist()}"
        )
    if counts.min() < 2:
        raise ConfigError(
            f"patient_holdout: class {int(classes[np.argmin(counts)])} has only {int(counts.min())} patient, "
            "need at least 2 to put one on each side"
        )
    from sklearn.model_selection import train_test_split

    patients = np.arange(patient_labels.size)
    try:
        _, test_p = train_test_split(
            patients, test_size=test_size, random_state=seed, shuffle=True, stratify=patient_labels
        )
    except ValueError as exc:
        raise ConfigError(
            f"patient_holdout: cannot hold out test_size={test_size} of {patients.size} patients "
            f"with {classes.size} classes: {exc}"
        ) from exc
    is_test = np.isin(inverse, test_p)
    return Fold(np.sort(keep[~is_test]), np.sort(keep[is_test]), repeat=0, fold=0)


# --------------------------------------------------------------------------- custom splits


def _samples(
    labels: Sequence[int] | np.ndarray | BagCohort | CellSet, groups: Sequence[Any] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels and the patient of each sample (a cohort's patient IDs; ``None``: each sample alone)."""
    y, g = _inputs(labels, groups)
    if g is None and isinstance(labels, BagCohort):
        g = labels.groups
    return y, g


def _shown(values: Sequence[Any], limit: int = 5) -> str:
    """``'a', 'b', 'c' and 4 more``: a few values for a message."""
    head = ", ".join(repr(v.item() if isinstance(v, np.generic) else v) for v in list(values)[:limit])
    return head if len(values) <= limit else f"{head} and {len(values) - limit} more"


def _fold_key(value: Any, where: str) -> int | str | None:
    """A fold number or name as given in a mapping, a column or a file; ``None`` when blank."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        raise DataError(f"{where}: a fold must be a number or a name, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        if math.isnan(float(value)):
            return None
        if float(value).is_integer():
            return int(float(value))
        raise DataError(f"{where}: a fold must be a whole number or a name, got {value!r}")
    text = str(value).strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _log_sizes(what: str, folds: Sequence[Fold], patients: np.ndarray | None) -> None:
    def count(idx: np.ndarray) -> int:
        return int(idx.size) if patients is None else len(set(patients[idx].tolist()))

    sizes = ", ".join(f"{count(f.val)} ({f.val.size} samples)" for f in folds if f.repeat == 0)
    repeats = 1 + max(f.repeat for f in folds)
    logger.info(
        "%s: %d fold(s)%s; validation patients per fold: %s",
        what,
        len(folds),
        f" in {repeats} repetitions" if repeats > 1 else "",
        sizes,
    )


def read_fold_assignment(
    path: str | os.PathLike[str], *, patient_column: str = "patient_id", fold_column: str = "fold"
) -> dict[str, int | str]:
    """Read a ``patient -> fold`` table from a CSV file (e.g. a published split).

    Parameters
    ----------
    path : path-like
        A CSV file with a header row holding ``patient_column`` and
        ``fold_column`` (other columns are ignored).
    patient_column, fold_column : str
        The column names, by default ``patient_id`` and ``fold``.

    Returns
    -------
    dict of str to int or str
        Patient ID to fold (an integer when the cell is one, else the text).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    DataError
        A missing column, a blank fold, or a patient listed twice (the message
        names the file, the patient and the rows).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "folds.csv"
    >>> _ = path.write_text("patient_id,fold\\nP1,0\\nP2,1\\nP3,0\\n")
    >>> read_fold_assignment(path)
    {'P1': 0, 'P2': 1, 'P3': 0}
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"fold file '{file}' does not exist or is not a file")
    try:
        with file.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            absent = [c for c in (patient_column, fold_column) if c not in columns]
            if absent:
                raise DataError(
                    f"fold file '{file}' lacks the column(s) {absent} (it has {columns}); "
                    f"expected the columns {patient_column!r} and {fold_column!r}"
                )
            table: dict[str, int | str] = {}
            rows: dict[str, int] = {}
            for row_number, raw in enumerate(reader, start=2):
                row = {str(k).strip(): v for k, v in raw.items() if k is not None}
                patient = str(row.get(patient_column) or "").strip()
                if not patient:
                    raise DataError(
                        f"fold file '{file}', row {row_number}: the {patient_column!r} cell is blank"
                    )
                where = f"fold file '{file}', row {row_number} (patient {patient!r})"
                fold = _fold_key(row.get(fold_column), where)
                if fold is None:
                    raise DataError(f"{where}: the {fold_column!r} cell is blank")
                if patient in table:
                    raise DataError(
                        f"fold file '{file}': patient {patient!r} is listed twice (rows {rows[patient]} and "
                        f"{row_number}); each patient must be assigned exactly once"
                    )
                table[patient] = fold
                rows[patient] = row_number
    except UnicodeDecodeError as exc:
        raise DataError(f"fold file '{file}' is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise DataError(f"fold file '{file}' is not a readable CSV file: {exc}") from exc
    if not table:
        raise DataError(f"fold file '{file}' assigns no patient")
    return table


def folds_from_assignment(
    assignment: Mapping[Any, Any] | Sequence[Any] | np.ndarray | str | os.PathLike[str],
    labels: Sequence[int] | np.ndarray | BagCohort | CellSet,
    groups: Sequence[Any] | np.ndarray | None = None,
    *,
    patient_column: str = "patient_id",
    fold_column: str = "fold",
) -> list[Fold]:
    """Folds from an explicit fold assignment: a published split, reproduced exactly.

    Fold ``k`` validates on the patients assigned to the ``k``-th fold value
    (fold values sorted: numbers numerically, then names) and trains on every
    other labelled patient. The sizes of the folds are logged (INFO).

    Parameters
    ----------
    assignment : mapping, sequence or path-like
        A ``patient -> fold`` mapping (patients as ``groups`` names them); a
        sequence ``(n,)`` of one fold per sample (e.g. a column of the
        samples' CSV; blank (``None``, ``""``, NaN) for unlabelled samples);
        or a CSV file with the columns ``patient_column`` and
        ``fold_column`` (see :func:`read_fold_assignment`).
    labels : sequence of int, BagCohort or CellSet
        ``(n,)`` class of each sample, ``-1`` for unlabelled samples (left
        out of every fold, they need no fold). A cohort's patients are its
        IDs; a cell set's are its cells' patients.
    groups : sequence, optional
        ``(n,)`` patient of each sample; required for a mapping or a file
        unless ``labels`` is a cohort or a cell set.
    patient_column, fold_column : str
        Column names of a CSV file.

    Returns
    -------
    list of Fold
        One fold per fold value, ``repeat=0``, ordered by fold value.

    Raises
    ------
    ConfigError
        A mapping or file without patient IDs (``groups``), or fewer than 2 folds.
    DataError
        A labelled patient without a fold, patients of the assignment that
        the data does not have, a patient in two folds, or a sequence of the
        wrong length; the message names the patients.

    Examples
    --------
    >>> labels = [0, 1, 0, 1, 0, 1]
    >>> ids = ["a", "b", "c", "d", "e", "f"]
    >>> folds = folds_from_assignment({"a": 1, "b": 1, "c": 2, "d": 2, "e": 3, "f": 3}, labels, ids)
    >>> [(f.fold, f.val.tolist()) for f in folds]
    [(0, [0, 1]), (1, [2, 3]), (2, [4, 5])]
    >>> folds_from_assignment({"a": 1, "b": 2, "x": 1}, labels, ids)
    Traceback (most recent call last):
    ...
    milcell.exceptions.DataError: folds_from_assignment: the assignment names 1 patient(s) ... 'x'
    """
    what = "folds_from_assignment"
    y, g = _samples(labels, groups)
    keep = _labelled(y, what)
    patients = None if g is None else np.array([str(p) for p in g], dtype=object)
    source = "the assignment"
    if isinstance(assignment, (str, os.PathLike)):
        source = f"fold file '{assignment}'"
        assignment = read_fold_assignment(assignment, patient_column=patient_column, fold_column=fold_column)
    per_sample: list[int | str | None]
    if isinstance(assignment, Mapping):
        if patients is None:
            raise ConfigError(
                f"{what}: a patient -> fold mapping needs the patient of each sample: pass groups "
                "(patient IDs), or a BagCohort / CellSet as labels"
            )
        table: dict[str, int | str | None] = {}
        for key, value in assignment.items():
            name = str(key).strip()
            if name in table:
                raise DataError(f"{what}: patient {name!r} appears twice in {source}")
            table[name] = _fold_key(value, f"{what}: patient {name!r} of {source}")
        known = set(patients.tolist())
        unknown = sorted(set(table) - known)
        if unknown:
            raise DataError(
                f"{what}: {source} names {len(unknown)} patient(s) the data does not have: {_shown(unknown)}"
            )
        per_sample = [table.get(p) for p in patients.tolist()]
    else:
        column = np.asarray(assignment, dtype=object)
        if column.ndim != 1 or column.shape != y.shape:
            raise DataError(
                f"{what}: a per-sample fold assignment must have shape {y.shape} (one fold per sample), "
                f"got {column.shape}"
            )
        per_sample = [_fold_key(v, f"{what}: sample {i}") for i, v in enumerate(column.tolist())]
    labelled = [per_sample[i] for i in keep]
    missing = [int(keep[i]) for i, v in enumerate(labelled) if v is None]
    if missing:
        names = sorted({str(patients[i]) for i in missing}) if patients is not None else missing
        raise DataError(
            f"{what}: {len(names)} labelled patient(s) have no fold in {source}: {_shown(names)}; every "
            "labelled patient must be assigned exactly once"
        )
    if patients is not None:
        seen: dict[str, int | str] = {}
        for i in keep:
            patient, fold = patients[i], per_sample[i]
            assert fold is not None
            if seen.setdefault(patient, fold) != fold:
                raise DataError(
                    f"{what}: patient {patient!r} is in two folds of {source} "
                    f"({seen[patient]!r} and {fold!r})"
                )
    values = sorted({v for v in labelled if v is not None}, key=lambda v: (isinstance(v, str), v))
    if len(values) < 2:
        raise ConfigError(f"{what}: cross-validation needs at least 2 folds, {source} has {values}")
    keys = np.array([str(v) for v in labelled], dtype=object)
    folds = []
    for k, value in enumerate(values):
        in_fold = keys == str(value)
        folds.append(Fold(np.sort(keep[~in_fold]), np.sort(keep[in_fold]), repeat=0, fold=k))
    _log_sizes(what, folds, patients)
    return folds


def folds_from_splitter(
    splitter: Any,
    labels: Sequence[int] | np.ndarray | BagCohort | CellSet,
    groups: Sequence[Any] | np.ndarray | None = None,
) -> list[Fold]:
    """Folds from a scikit-learn splitter (or any object with ``split(X, y, groups)``).

    The splitter sees the labelled samples only: ``X`` a ``(m, 1)`` array of
    zeros, ``y`` their labels and ``groups`` their patients (each sample is
    its own patient without ``groups``), so ``GroupKFold``,
    ``StratifiedGroupKFold``, ``StratifiedKFold``, ``RepeatedStratifiedKFold``
    ... all work. Every fold is checked: no patient on both sides. A
    splitter with an integer ``n_repeats`` attribute gives folds numbered by
    repetition. The sizes of the folds are logged (INFO).

    Parameters
    ----------
    splitter : object
        Has ``split(X, y, groups)`` yielding ``(train, test)`` positions.
    labels : sequence of int, BagCohort or CellSet
        ``(n,)`` class of each sample, ``-1`` unlabelled (left out).
    groups : sequence, optional
        ``(n,)`` patient of each sample.

    Returns
    -------
    list of Fold
        Positions refer to the original ``labels``.

    Raises
    ------
    ConfigError
        An object without ``split``, or a splitter that fails on these data.
    DataError
        An empty fold, positions out of range, or a patient on both sides of a
        fold (the message names it).

    Examples
    --------
    >>> from sklearn.model_selection import GroupKFold
    >>> labels = [0, 0, 1, 1, 0, 1]
    >>> groups = ["a", "a", "b", "b", "c", "c"]
    >>> folds = folds_from_splitter(GroupKFold(n_splits=3), labels, groups)
    >>> sorted(f.val.tolist() for f in folds)
    [[0, 1], [2, 3], [4, 5]]
    """
    what = "folds_from_splitter"
    if not callable(getattr(splitter, "split", None)) or isinstance(splitter, (str, bytes)):
        raise ConfigError(
            f"{what}: splitter must have a split(X, y, groups) method (a scikit-learn splitter), "
            f"got {type(splitter).__name__}"
        )
    y, g = _samples(labels, groups)
    keep = _labelled(y, what)
    patients = np.arange(keep.size).astype(str) if g is None else g[keep].astype(str)
    try:
        with warnings.catch_warnings():  # splitters without groups say they ignore them
            warnings.filterwarnings("ignore", message="The groups parameter is ignored")
            parts = [
                (np.asarray(tr, dtype=np.int64), np.asarray(va, dtype=np.int64))
                for tr, va in splitter.split(np.zeros((keep.size, 1)), y[keep], patients)
            ]
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: {type(splitter).__name__}.split failed on these data: {exc}") from exc
    if not parts:
        raise ConfigError(f"{what}: {type(splitter).__name__}.split gave no fold")
    n_repeats = getattr(splitter, "n_repeats", 1)
    if not isinstance(n_repeats, numbers.Integral) or n_repeats < 1 or len(parts) % int(n_repeats):
        n_repeats = 1
    per_repeat = len(parts) // int(n_repeats)
    folds = []
    for i, (tr, va) in enumerate(parts):
        for idx in (tr, va):
            if idx.size and (idx.min() < 0 or idx.max() >= keep.size):
                raise DataError(
                    f"{what}: fold {i} has positions out of range for {keep.size} labelled samples"
                )
        if tr.size == 0 or va.size == 0:
            raise DataError(
                f"{what}: fold {i} has an empty {'training' if tr.size == 0 else 'validation'} side"
            )
        shared = sorted(set(patients[tr].tolist()) & set(patients[va].tolist()))
        if shared:
            raise DataError(
                f"{what}: fold {i} puts {len(shared)} patient(s) on both sides: {_shown(shared)} "
                "(use a group-aware splitter, e.g. StratifiedGroupKFold, and pass groups)"
            )
        folds.append(Fold(np.sort(keep[tr]), np.sort(keep[va]), repeat=i // per_repeat, fold=i % per_repeat))
    _log_sizes(what, folds, None if g is None else g.astype(str))
    return folds


def make_folds(
    split: Any,
    labels: Sequence[int] | np.ndarray | BagCohort | CellSet,
    groups: Sequence[Any] | np.ndarray | None = None,
    *,
    n_splits: int = 5,
    n_repeats: int = 1,
    seed: int = 0,
) -> list[Fold]:
    """The folds of a cross-validation, whatever way they are given.

    Parameters
    ----------
    split : None, splitter, sequence of Fold, mapping, sequence or path-like
        ``None``: :func:`patient_kfold` with ``n_splits``, ``n_repeats`` and
        ``seed``; an object with ``split``: :func:`folds_from_splitter`; a
        sequence of :class:`Fold`: checked and used as given; anything else:
        :func:`folds_from_assignment` (a mapping, one fold per sample, or a
        CSV file).
    labels, groups
        As for :func:`patient_kfold`.
    n_splits, n_repeats, seed : int
        Used when ``split`` is ``None``.

    Returns
    -------
    list of Fold

    Raises
    ------
    ConfigError, DataError
        As the function called; for a sequence of folds, positions out of
        range, an unlabelled sample in a fold, or a patient on both sides.

    Examples
    --------
    >>> len(make_folds(None, [0, 1] * 4, n_splits=4))
    4
    >>> [f.val.tolist() for f in make_folds([0, 0, 1, 1], [0, 1, 0, 1])]
    [[0, 1], [2, 3]]
    """
    if split is None:
        return patient_kfold(labels, groups, n_splits=n_splits, n_repeats=n_repeats, seed=seed)
    if callable(getattr(split, "split", None)) and not isinstance(split, (str, bytes, os.PathLike)):
        return folds_from_splitter(split, labels, groups)
    if isinstance(split, Sequence) and split and all(isinstance(f, Fold) for f in split):
        return _checked_folds(list(split), labels, groups)
    return folds_from_assignment(split, labels, groups)


def _checked_folds(
    folds: list[Fold],
    labels: Sequence[int] | np.ndarray | BagCohort | CellSet,
    groups: Sequence[Any] | np.ndarray | None,
) -> list[Fold]:
    y, g = _samples(labels, groups)
    patients = None if g is None else g.astype(str)
    out = []
    for f in folds:
        name = f"fold {f.fold} of repeat {f.repeat}"
        train = np.sort(np.asarray(f.train, dtype=np.int64).reshape(-1))
        val = np.sort(np.asarray(f.val, dtype=np.int64).reshape(-1))
        if train.size == 0 or val.size == 0:
            raise DataError(f"make_folds: {name} has an empty side")
        both = np.concatenate([train, val])
        if both.min() < 0 or both.max() >= y.size:
            raise DataError(f"make_folds: {name} has positions out of range for {y.size} samples")
        if (y[both] < 0).any():
            raise DataError(f"make_folds: {name} holds unlabelled samples (label -1)")
        if np.intersect1d(train, val).size:
            raise DataError(f"make_folds: {name} has samples on both sides")
        if patients is not None:
            shared = sorted(set(patients[train].tolist()) & set(patients[val].tolist()))
            if shared:
                raise DataError(f"make_folds: {name} puts patient(s) {_shown(shared)} on both sides")
        out.append(Fold(train, val, repeat=int(f.repeat), fold=int(f.fold)))
    keys = [(f.repeat, f.fold) for f in out]
    if len(set(keys)) != len(keys):
        raise DataError("make_folds: two folds have the same (repeat, fold) numbers")
    return out


def inner_split(
    fold: Fold,
    labels: Sequence[int] | np.ndarray | BagCohort | CellSet,
    groups: Sequence[Any] | np.ndarray | None = None,
    *,
    fraction: float = 0.2,
    seed: int = 0,
) -> Fold:
    """Hold out a selection set from a fold's training part (patient level, stratified, seeded).

    The honest protocol of :func:`~milcell.train.crossval.cross_validate`:
    a model trains on ``inner.train``, early stopping and the best epoch are
    chosen on ``inner.val``, and ``fold.val`` is only used for reporting.
    At least one patient of each class is held out, and at least one of each
    class stays for training; a class with a single training patient can
    only stay for training (a warning says so), and the selection set is
    then drawn from the other classes, class by class.

    Parameters
    ----------
    fold : Fold
        An outer fold; only its ``train`` positions are split.
    labels, groups
        As for :func:`patient_kfold` (the same ones the fold was made from).
    fraction : float, default 0.2
        Share of the fold's training patients held out, in (0, 1); rounded
        up, and at least the number of classes.
    seed : int, default 0
        Seed of the shuffle.

    Returns
    -------
    Fold
        ``train`` and ``val`` (the selection set), both subsets of
        ``fold.train``, with the outer fold's ``repeat`` and ``fold``.

    Raises
    ------
    ConfigError
        An invalid ``fraction``, or a training fold too small to hold out one
        patient of every class (the message names the fold).

    Examples
    --------
    >>> import numpy as np
    >>> labels = np.array([0, 1] * 10)
    >>> outer = patient_kfold(labels, n_splits=2, seed=0)[0]
    >>> inner = inner_split(outer, labels, fraction=0.2, seed=0)
    >>> len(inner.train), len(inner.val), set(inner.val) <= set(outer.train)
    (8, 2, True)
    """
    y, g = _samples(labels, groups)
    fraction = check_real(fraction, "inner_fraction", low=0.0, high=1.0, low_open=True, high_open=True)
    seed = check_int(seed, "seed", low=0)
    train = np.asarray(fold.train, dtype=np.int64)
    y_t = y[train]
    g_t = None if g is None else g[train]
    inverse, patient_labels = (
        (np.arange(train.size), y_t) if g_t is None else _group_labels(y_t, g_t.astype(str))
    )
    n_patients = patient_labels.size
    classes, per_class = np.unique(patient_labels, return_counts=True)
    n_select = max(classes.size, math.ceil(fraction * n_patients))
    name = f"inner_split: fold {fold.fold} of repeat {fold.repeat}"
    splittable = classes[per_class >= 2]
    if splittable.size == 0 or (splittable.size == classes.size and n_patients - n_select < classes.size):
        raise ConfigError(
            f"{name} has {n_patients} training patient(s) of {classes.size} classes: too few to hold out "
            f"{n_select} for model selection and keep every class for training (use fewer folds, a "
            "smaller inner_fraction, or selection='outer')"
        )
    if splittable.size == classes.size:
        try:
            part = patient_holdout(y_t, g_t, test_size=n_select, seed=seed)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
        return Fold(train[part.train], train[part.val], repeat=fold.repeat, fold=fold.fold)
    # A class with a single training patient cannot be on both sides: it stays for training, and
    # the selection set is drawn, class by class, from the others.
    lonely = sorted(int(c) for c in set(classes.tolist()) - set(splittable.tolist()))
    logger.warning(
        "%s: class(es) %s have a single training patient, kept for training; the selection set holds "
        "the other classes only",
        name,
        lonely,
    )
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in splittable:
        members = np.flatnonzero(patient_labels == c)
        k = min(members.size - 1, max(1, round(fraction * members.size)))
        held += rng.choice(members, size=k, replace=False).tolist()
    is_val = np.isin(inverse, held)
    return Fold(np.sort(train[~is_val]), np.sort(train[is_val]), repeat=fold.repeat, fold=fold.fold)
