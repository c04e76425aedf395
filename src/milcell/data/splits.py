"""Patient-level cross-validation and hold-out splits.

No patient ever appears on both sides of a split, and class ratios are kept.
Both functions take labels (and optionally groups) or, as a convenience, a
:class:`~milcell.data.BagCohort` (each patient is one sample) or a
:class:`~milcell.data.CellSet` (cells grouped by ``CellRecord.patient``).
They are thin layers over scikit-learn: ``StratifiedKFold`` when each sample
is its own group, ``StratifiedGroupKFold`` otherwise, and
``train_test_split`` over patients for the hold-out.

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

import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from milcell._validation import check_int, check_real, constraint_error
from milcell.data.records import BagCohort, CellSet
from milcell.exceptions import ConfigError, DataError

__all__ = ["Fold", "patient_holdout", "patient_kfold"]

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
