"""Tests for milcell.data.splits: patient-level k-fold and hold-out."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from milcell.data import BagCohort, BagRecord, CellRecord, CellSet
from milcell.data.splits import (
    Fold,
    folds_from_assignment,
    folds_from_splitter,
    inner_split,
    make_folds,
    patient_holdout,
    patient_kfold,
    read_fold_assignment,
)
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


# --------------------------------------------------------------------------- custom splits (issue 15)


def _cells() -> tuple[np.ndarray, np.ndarray]:
    """12 cells of 6 patients (2 each), patient labels 0/1 alternating, one unlabelled patient."""
    patients = np.repeat([f"p{i}" for i in range(6)], 2)
    labels = np.repeat([0, 1, 0, 1, 0, -1], 2)
    return labels, patients


def test_folds_from_assignment_mapping_column_and_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    labels, patients = _cells()
    mapping = {"p0": "A", "p1": "A", "p2": "B", "p3": "B", "p4": "B"}  # p5 is unlabelled: no fold needed
    with caplog.at_level(logging.INFO, logger="milcell"):
        folds = folds_from_assignment(mapping, labels, patients)
    assert "validation patients per fold: 2 (4 samples), 3 (6 samples)" in caplog.text
    assert [(f.fold, f.val.tolist(), f.train.tolist()) for f in folds] == [
        (0, [0, 1, 2, 3], [4, 5, 6, 7, 8, 9]),
        (1, [4, 5, 6, 7, 8, 9], [0, 1, 2, 3]),
    ]
    column = [mapping.get(p) for p in patients]
    assert [f.val.tolist() for f in folds_from_assignment(column, labels, patients)] == [
        f.val.tolist() for f in folds
    ]
    file = tmp_path / "split.csv"
    file.write_text("patient_id,fold,site\n" + "".join(f"{p},{f},x\n" for p, f in mapping.items()))
    assert [f.val.tolist() for f in folds_from_assignment(file, labels, patients)] == [
        f.val.tolist() for f in folds
    ]
    # numeric folds sort numerically, whatever their type
    numeric = folds_from_assignment({"p0": 10, "p1": 2, "p2": 2.0, "p3": "10", "p4": 2}, labels, patients)
    assert [f.val.tolist() for f in numeric] == [[2, 3, 4, 5, 8, 9], [0, 1, 6, 7]]


def test_folds_from_assignment_of_a_cohort_uses_its_ids() -> None:
    cohort = BagCohort([BagRecord(f"p{i}", i % 2, (Path(f"p{i}/c.png"),)) for i in range(4)])
    folds = folds_from_assignment({"p0": 0, "p1": 0, "p2": 1, "p3": 1}, cohort)
    assert [f.val.tolist() for f in folds] == [[0, 1], [2, 3]]


def test_folds_from_assignment_errors(tmp_path: Path) -> None:
    labels, patients = _cells()
    full = {"p0": 0, "p1": 0, "p2": 1, "p3": 1, "p4": 1}
    with pytest.raises(DataError, match="2 labelled patient.*have no fold.*'p3', 'p4'"):
        folds_from_assignment({"p0": 0, "p1": 0, "p2": 1}, labels, patients)
    with pytest.raises(DataError, match="does not have: 'ghost', 'x'"):
        folds_from_assignment({**full, "x": 1, "ghost": 0}, labels, patients)
    with pytest.raises(DataError, match="patient 'p1' is in two folds"):
        folds_from_assignment([0, 0, 0, 1, 1, 1, 0, 0, 1, 1, None, None], labels, patients)
    with pytest.raises(DataError, match=r"shape \(12,\)"):
        folds_from_assignment([0, 1], labels, patients)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        folds_from_assignment(dict.fromkeys(full, 0), labels, patients)
    with pytest.raises(ConfigError, match="needs the patient of each sample"):
        folds_from_assignment(full, labels)
    with pytest.raises(DataError, match="a fold must be a whole number or a name"):
        folds_from_assignment({**full, "p0": 0.5}, labels, patients)
    bad = tmp_path / "bad.csv"
    bad.write_text("patient,fold\np0,0\n")
    with pytest.raises(DataError, match=r"bad.csv' lacks the column\(s\) \['patient_id'\]"):
        folds_from_assignment(bad, labels, patients)
    twice = tmp_path / "twice.csv"
    twice.write_text("patient_id,fold\np0,0\np1,1\np0,0\n")
    with pytest.raises(DataError, match="patient 'p0' is listed twice \\(rows 2 and 4\\)"):
        read_fold_assignment(twice)
    blank = tmp_path / "blank.csv"
    blank.write_text("patient_id,fold\np0,\n")
    with pytest.raises(DataError, match="row 2 \\(patient 'p0'\\): the 'fold' cell is blank"):
        read_fold_assignment(blank)
    with pytest.raises(FileNotFoundError, match="fold file"):
        read_fold_assignment(tmp_path / "absent.csv")
    other = tmp_path / "other.csv"
    other.write_text("id;split\np0;0\n".replace(";", ","))
    assert read_fold_assignment(other, patient_column="id", fold_column="split") == {"p0": 0}


def test_folds_from_splitter() -> None:
    from sklearn.model_selection import GroupKFold, KFold, RepeatedStratifiedKFold

    labels, patients = _cells()
    folds = folds_from_splitter(GroupKFold(n_splits=5), labels, patients)
    assert len(folds) == 5 and sorted(np.concatenate([f.val for f in folds]).tolist()) == list(range(10))
    for f in folds:
        assert not set(patients[f.train]) & set(patients[f.val])
    repeated = folds_from_splitter(
        RepeatedStratifiedKFold(n_splits=2, n_repeats=3, random_state=0), [0, 1] * 5
    )
    assert [(f.repeat, f.fold) for f in repeated] == [(r, k) for r in range(3) for k in range(2)]
    with pytest.raises(DataError, match="fold 1 puts 1 patient\\(s\\) on both sides: 'p3'"):
        folds_from_splitter(KFold(n_splits=3), labels, patients)  # splits the cells of a patient
    with pytest.raises(ConfigError, match="must have a split"):
        folds_from_splitter(object(), labels)
    with pytest.raises(ConfigError, match="KFold.split failed"):
        folds_from_splitter(KFold(n_splits=50), labels)


def test_make_folds_dispatches_and_checks_given_folds(tmp_path: Path) -> None:
    from sklearn.model_selection import StratifiedKFold

    labels = np.array([0, 1] * 4)
    assert [f.val.tolist() for f in make_folds(None, labels, n_splits=2, seed=3)] == [
        f.val.tolist() for f in patient_kfold(labels, n_splits=2, seed=3)
    ]
    assert len(make_folds(StratifiedKFold(n_splits=4), labels)) == 4
    given = [Fold(np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7]), 0, 0)]
    assert make_folds(given, labels)[0].val.tolist() == [4, 5, 6, 7]
    with pytest.raises(DataError, match="on both sides"):
        make_folds([Fold(np.array([0, 1]), np.array([1, 2]), 0, 0)], labels)
    with pytest.raises(DataError, match="out of range"):
        make_folds([Fold(np.array([0, 1]), np.array([9]), 0, 0)], labels)
    with pytest.raises(DataError, match="patient\\(s\\) 'a' on both sides"):
        make_folds([Fold(np.array([0]), np.array([1]), 0, 0)], labels[:2], ["a", "a"])
    file = tmp_path / "f.csv"
    file.write_text("patient_id,fold\n" + "".join(f"s{i},{i % 2}\n" for i in range(8)))
    assert len(make_folds(str(file), labels, [f"s{i}" for i in range(8)])) == 2


@settings(max_examples=20)
@given(
    n_patients=st.integers(6, 30),
    cells=st.integers(1, 3),
    fraction=st.floats(0.05, 0.5),
    seed=st.integers(0, 100),
)
def test_inner_split_is_patient_level_stratified_and_inside_the_training_fold(
    n_patients: int, cells: int, fraction: float, seed: int
) -> None:
    labels = np.repeat(np.arange(n_patients) % 2, cells)
    groups = np.repeat([f"p{i}" for i in range(n_patients)], cells)
    outer = patient_kfold(labels, groups, n_splits=2, seed=seed)[0]
    n_train = len(set(groups[outer.train]))
    per_class = [len(set(groups[outer.train][labels[outer.train] == c])) for c in (0, 1)]
    try:
        inner = inner_split(outer, labels, groups, fraction=fraction, seed=seed)
    except ConfigError as exc:
        assert max(per_class) < 2 and "too few" in str(exc)  # no class can be on both sides
        return
    assert sorted(np.concatenate([inner.train, inner.val]).tolist()) == outer.train.tolist()
    assert not set(groups[inner.train]) & set(groups[inner.val])
    assert set(labels[inner.train]) == {0, 1}
    if min(per_class) >= 2:  # stratified: every class on both sides
        assert set(labels[inner.val]) == {0, 1}
        assert len(set(groups[inner.val])) == max(2, int(np.ceil(fraction * n_train)))
    else:  # the class with a single training patient stays for training
        lonely = int(np.argmin(per_class))
        assert lonely not in set(labels[inner.val]) and len(inner.val) > 0
    assert (inner.repeat, inner.fold) == (outer.repeat, outer.fold)
    again = inner_split(outer, labels, groups, fraction=fraction, seed=seed)
    assert again.val.tolist() == inner.val.tolist()


def test_inner_split_keeps_a_lonely_class_for_training(caplog: pytest.LogCaptureFixture) -> None:
    labels = np.array([0, 1, 1, 1, 1, 1])
    outer = Fold(np.arange(6), np.array([], dtype=np.int64), 0, 3)
    with caplog.at_level(logging.WARNING, logger="milcell"):
        inner = inner_split(outer, labels, fraction=0.4, seed=1)
    assert "fold 3 of repeat 0: class(es) [0] have a single training patient" in caplog.text
    assert 0 in inner.train and set(labels[inner.val]) == {1} and len(inner.val) == 2
    assert sorted(np.concatenate([inner.train, inner.val]).tolist()) == list(range(6))
    with pytest.raises(ConfigError, match="too few"):
        inner_split(outer, np.array([0, 1, 2, 3, 4, 5]), fraction=0.2)
