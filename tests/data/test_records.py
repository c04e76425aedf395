"""Tests of the record collections and the clinical scaler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from milcell.data import BagCohort, BagRecord, CellRecord, CellSet, ClinicalScaler
from milcell.exceptions import ConfigError, DataError


def _cohort() -> BagCohort:
    return BagCohort(
        [
            BagRecord("A", 0, (Path("A/1.jpg"),), (30.0, 5.0, 1.0)),
            BagRecord("B", 1, (Path("B/1.jpg"),), (70.0, 40.0, float("nan"))),
            BagRecord("C", 1, (Path("C/1.jpg"),), (60.0, 25.0, 0.0)),
            BagRecord("D", -1, (Path("D/1.jpg"),), (90.0, 100.0, 1.0)),
        ],
        clinical_names=("age", "lymph_count", "sex"),
    )


@pytest.mark.parametrize(("method", "reference"), [("minmax", MinMaxScaler), ("standard", StandardScaler)])
def test_scaler_matches_scikit_learn_pipeline(method, reference) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(50, 10, size=(20, 3))
    x[rng.random((20, 3)) < 0.2] = np.nan
    ours = ClinicalScaler(["a", "b", "c"], method).fit(x[:12])
    ref = make_pipeline(SimpleImputer(strategy="median"), reference()).fit(x[:12])
    np.testing.assert_allclose(ours.transform(x[12:]), ref.transform(x[12:]), rtol=1e-5, atol=1e-6)


def test_scaler_uses_training_rows_only() -> None:
    cohort = _cohort()
    scaler = cohort.fit_scaler([0, 1, 2])
    out = scaler.transform(cohort.clinical_matrix())
    assert out[:3, 0].min() == 0.0 and out[:3, 0].max() == 1.0
    assert out[3, 0] > 1.0  # the held-out patient is outside the training range, not rescaled into it
    assert out[1, 2] == 0.5  # missing sex imputed with the training median of {1, 0}


def test_scaler_round_trips_through_json() -> None:
    scaler = _cohort().fit_scaler([0, 1, 2], method="standard")
    again = ClinicalScaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
    x = _cohort().clinical_matrix()
    np.testing.assert_array_equal(again.transform(x), scaler.transform(x))
    assert again.names == scaler.names and again.method == "standard"


def test_scaler_errors() -> None:
    with pytest.raises(ConfigError, match="method"):
        ClinicalScaler(["a"], "robust")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="before fit"):
        ClinicalScaler(["a"]).transform(np.zeros((1, 1)))
    with pytest.raises(ConfigError, match="before fit"):
        ClinicalScaler(["a"]).to_dict()
    with pytest.raises(DataError, match=r"shape \(n, 2\)"):
        ClinicalScaler(["a", "b"]).fit(np.zeros((3, 3)))
    with pytest.raises(DataError, match="no rows"):
        ClinicalScaler(["a"]).fit(np.zeros((0, 1)))
    with pytest.raises(DataError, match="malformed"):
        ClinicalScaler.from_dict({"names": ["a"]})
    with pytest.raises(DataError, match="malformed"):
        ClinicalScaler.from_dict({"names": ["a", "b"], "fill": [0], "scale": [1], "offset": [0]})


def test_cohort_validation_names_the_patient() -> None:
    rec = BagRecord("A", 0, (Path("A/1.jpg"),))
    with pytest.raises(DataError, match="duplicate patient ID 'A'"):
        BagCohort([rec, rec])
    with pytest.raises(DataError, match="'B'.*label 5"):
        BagCohort([BagRecord("B", 5, (Path("B/1.jpg"),))])
    with pytest.raises(DataError, match="'C'.*1 clinical values"):
        BagCohort([BagRecord("C", 0, (Path("C/1.jpg"),), (1.0,))], clinical_names=("a", "b"))
    with pytest.raises(DataError, match="no clinical attributes"):
        BagCohort([rec]).fit_scaler()
    with pytest.raises(DataError, match="no patient 'Z'"):
        BagCohort([rec]).index_of("Z")


def test_cohort_views() -> None:
    cohort = _cohort()
    assert cohort.labelled().ids == ["A", "B", "C"]
    assert cohort[1:3].ids == ["B", "C"]
    assert cohort.index_of("C") == 2
    assert cohort.groups.tolist() == ["A", "B", "C", "D"]
    assert np.isnan(cohort.clinical_matrix()[1, 2])


def test_cellset() -> None:
    cells = CellSet(
        [CellRecord(Path("a/x.bmp"), 1, "p1"), CellRecord(Path("b/y.bmp"), 0, "p1")], ("hem", "all")
    )
    assert cells[0:1].labels.tolist() == [1]
    assert cells.groups.tolist() == ["p1", "p1"]
    assert cells[1].id == "y"
    with pytest.raises(DataError, match="x.bmp.*label 2"):
        CellSet([CellRecord(Path("a/x.bmp"), 2, "p1")], ("hem", "all"))
