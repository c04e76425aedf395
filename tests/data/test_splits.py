"""Tests for milcell.data.splits: patient-level k-fold and hold-out."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milcell.data import BagCohort, BagRecord, CellRecord, CellSet
from milcell.data.splits import Fold, patient_holdout, patient_kfold
from milcell.exceptions import ConfigError, DataError


@st.composite
def bag_labels(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    n_splits = draw(st.integers(2, 5))
    n_classes = draw(st.integers(2, 3))
    counts = [draw(st.integers(n_splits, 25)) for _ in range(n_classes)]
    labels = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    unlabelled = draw(st.integers(0, 3))
    labels = np.concatenate([labels, np.full(unlabelled, -1)])
    perm = draw(st.permutations(range(labels.size)))
    return labels[np.array(perm)], n_splits


@given(data=bag_labels(), n_repeats=st.integers(1, 3), seed=st.integers(0, 1000))
def test_kfold_bags_partition_and_stratify(data: tuple[np.ndarray, int], n_repeats: int, seed: int) -> None:
    labels, n_splits = data
    folds = patient_kfold(labels, n_splits=n_splits, n_repeats=n_repeats, seed=seed)
    assert len(folds) == n_splits * n_repeats
    labelled = np.flatnonzero(labels >= 0)
    for r in range(n_repeats):
        rep = [f for f in folds if f.repeat == r]
        assert [f.fold for f in rep] == list(range(n_splits))
        vals = np.concatenate([f.val for f in rep])
        # every labelled sample in exactly one validation fold per repeat; unlabelled nowhere
        np.testing.assert_array_equal(np.sort(vals), labelled)
        for f in rep:
            assert np.intersect1d(f.train, f.val).size == 0
            np.testing.assert_array_equal(np.union1d(f.train, f.val), labelled)
            for c in np.unique(labels[labelled]):
                expected = (labels == c).sum() / n_splits
                assert abs((labels[f.val] == c).sum() - expected) <= 1


@st.composite
def cell_groups(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    n_splits = draw(st.integers(2, 4))
    patients_per_class = [draw(st.integers(n_splits, 8)) for _ in range(2)]
    labels, groups = [], []
    for c, n_pat in enumerate(patients_per_class):
        for p in range(n_pat):
            size = draw(st.integers(1, 6))
            labels += [c] * size
            groups += [f"c{c}p{p}"] * size
    labels_a, groups_a = np.array(labels), np.array(groups, dtype=object)
    perm = np.array(draw(st.permutations(range(labels_a.size))))
    return labels_a[perm], groups_a[perm], n_splits


@given(data=cell_groups(), seed=st.integers(0, 1000))
def test_kfold_groups_never_cross(data: tuple[np.ndarray, np.ndarray, int], seed: int) -> None:
    labels, groups, n_splits = data
    folds = patient_kfold(labels, groups, n_splits=n_splits, n_repeats=2, seed=seed)
    for r in range(2):
        rep = [f for f in folds if f.repeat == r]
        np.testing.assert_array_equal(np.sort(np.concatenate([f.val for f in rep])), np.arange(labels.size))
        for f in rep:
            assert set(groups[f.train]).isdisjoint(set(groups[f.val]))
            assert f.val.size > 0


@settings(max_examples=40)
@given(data=cell_groups(), seed=st.integers(0, 1000), draw=st.data())
def test_holdout_groups_never_cross(
    data: tuple[np.ndarray, np.ndarray, int], seed: int, draw: st.DataObject
) -> None:
    labels, groups, _ = data
    n_patients = len(set(groups))
    test_size = draw.draw(st.integers(2, n_patients - 2))  # each side can hold both classes
    fold = patient_holdout(labels, groups, test_size=test_size, seed=seed)
    assert len(set(groups[fold.val])) == test_size
    assert set(groups[fold.train]).isdisjoint(set(groups[fold.val]))
    np.testing.assert_array_equal(np.union1d(fold.train, fold.val), np.arange(labels.size))
    patient_label = {g: labels[groups == g][0] for g in set(groups)}
    for c in (0, 1):
        in_class = sum(1 for lab in patient_label.values() if lab == c)
        held = sum(1 for g in set(groups[fold.val]) if patient_label[g] == c)
        assert abs(held - in_class * test_size / n_patients) < 1  # stratified by patient


def test_kfold_seeds_repeats_and_reproducibility() -> None:
    labels = np.array([0] * 10 + [1] * 10)
    a = patient_kfold(labels, n_splits=5, n_repeats=2, seed=0)
    b = patient_kfold(labels, n_splits=5, n_repeats=2, seed=0)
    c = patient_kfold(labels, n_splits=5, n_repeats=1, seed=1)
    assert all(np.array_equal(x.val, y.val) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x.val, y.val) for x, y in zip(a[:5], a[5:], strict=True))
    assert any(not np.array_equal(x.val, y.val) for x, y in zip(a[:5], c, strict=True))
    assert a[0].train.dtype == np.int64 and (np.diff(a[0].val) > 0).all()


def test_kfold_drops_unlabelled_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    labels = [0, 0, -1, 1, 1, -1]
    with caplog.at_level(logging.INFO, logger="milcell"):
        folds = patient_kfold(labels, n_splits=2)
    assert "dropped 2 unlabelled sample(s)" in caplog.text
    assert all(2 not in f.train and 5 not in f.val for f in folds)


def test_split_cohort_and_cellset_directly() -> None:
    records = [BagRecord(f"P{i}", i % 2 if i < 8 else -1, (Path(f"P{i}/0.jpg"),)) for i in range(10)]
    cohort = BagCohort(records)
    folds = patient_kfold(cohort, n_splits=4)
    assert len(folds) == 4
    train, val = folds[0].apply(cohort)
    assert isinstance(train, BagCohort) and set(train.ids).isdisjoint(val.ids)
    assert len(train) + len(val) == 8
    cells = CellSet(
        [CellRecord(Path(f"c{i}.bmp"), int(i >= 12), f"p{i // 3}") for i in range(24)],
        class_names=("hem", "all"),
    )
    for f in patient_kfold(cells, n_splits=2, n_repeats=2):
        tr, va = f.apply(cells)
        assert set(tr.groups).isdisjoint(set(va.groups))
    hold = patient_holdout(cells, test_size=2)
    assert len(set(cells.groups[hold.val])) == 2
    hold_bags = patient_holdout(cohort, test_size=0.25, seed=3)
    assert hold_bags.val.size == 2 and set(cohort.labels[hold_bags.val]) == {0, 1}


def test_fold_apply_arrays_and_lists() -> None:
    fold = Fold(np.array([1, 2]), np.array([0]), repeat=0, fold=0)
    tr, va = fold.apply(np.array([10, 11, 12]))
    assert tr.tolist() == [11, 12] and va.tolist() == [10]
    assert fold.apply("abc") == (["b", "c"], ["a"])


def test_holdout_stratifies_patients_by_majority_label() -> None:
    labels = np.array([0, 0, 1] * 4 + [1, 1, 1] * 4)
    groups = np.repeat([f"p{i}" for i in range(8)], 3)
    fold = patient_holdout(labels, groups, test_size=0.5, seed=0)
    assert len(set(groups[fold.val])) == 4
    majority_val = [np.bincount(labels[groups == g]).argmax() for g in set(groups[fold.val])]
    assert sorted(majority_val) == [0, 0, 1, 1]


def test_split_errors() -> None:
    labels = [0, 0, 0, 1, 1]
    with pytest.raises(ConfigError, match=r"n_splits=3 is greater than the 2 patient\(s\) of class 1"):
        patient_kfold(labels, n_splits=3)
    with pytest.raises(ConfigError, match=r"n_splits=2 is greater than the 1 patient\(s\) of class 1"):
        patient_kfold([0, 0, 1, 1], ["a", "b", "c", "c"], n_splits=2)
    with pytest.raises(ConfigError, match="n_splits must be an integer >= 2"):
        patient_kfold(labels, n_splits=1)
    with pytest.raises(ConfigError, match="n_repeats must be an integer >= 1"):
        patient_kfold(labels, n_splits=2, n_repeats=0)
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        patient_kfold(labels, n_splits=2, seed=-5)
    with pytest.raises(ConfigError, match=r"at least 2 classes, found only \[0\]"):
        patient_kfold([0, 0, 0, -1], n_splits=2)
    with pytest.raises(DataError, match="no labelled sample"):
        patient_kfold([-1, -1], n_splits=2)
    with pytest.raises(DataError, match="labels must be integers"):
        patient_kfold([0.0, 1.0], n_splits=2)
    with pytest.raises(DataError, match=r"labels must be >= -1, got -2 at position 1"):
        patient_kfold([0, -2], n_splits=2)
    with pytest.raises(DataError, match="non-empty 1-D"):
        patient_kfold([], n_splits=2)
    with pytest.raises(DataError, match=r"groups has shape \(2,\) but labels has shape \(5,\)"):
        patient_kfold(labels, ["a", "b"], n_splits=2)
    cohort = BagCohort([BagRecord("A", 0, ())])
    with pytest.raises(ConfigError, match="groups must be None when splitting a BagCohort"):
        patient_kfold(cohort, ["A"])
    with pytest.raises(ConfigError, match="groups must be None when splitting a CellSet"):
        patient_holdout(CellSet([CellRecord(Path("x.bmp"), 0, "p")]), ["p"])
    with pytest.raises(ConfigError, match="test_size must be a finite number > 0.0 and < 1.0, got 1.5"):
        patient_holdout(labels, test_size=1.5)
    with pytest.raises(ConfigError, match="test_size must be an integer >= 1, got 0"):
        patient_holdout(labels, test_size=0)
    with pytest.raises(
        ConfigError, match=r"test_size must be a fraction in \(0, 1\) or a number of patients"
    ):
        patient_holdout(labels, test_size="half")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="class 1 has only 1 patient"):
        patient_holdout([0, 0, 0, 1])
    with pytest.raises(ConfigError, match=r"cannot hold out test_size=1 of 5 patients with 2 classes"):
        patient_holdout(labels, test_size=1)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        patient_holdout([1, 1, 1])
