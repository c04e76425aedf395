"""Tests of the record collections and the clinical scaler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
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


def _sklearn_statistics(x: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fill, scale, offset as scikit-learn computes them (what ClinicalScaler used before numpy)."""
    imputer = SimpleImputer(strategy="median", keep_empty_features=True)
    imputed = imputer.fit_transform(x)
    if method == "minmax":
        minmax = MinMaxScaler().fit(imputed)
        return imputer.statistics_, minmax.scale_, minmax.min_
    standard = StandardScaler().fit(imputed)
    scale = 1.0 / standard.scale_
    return imputer.statistics_, scale, -standard.mean_ * scale


def _random_clinical(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 7): random columns with NaNs, an all-NaN column, constant and near-constant columns."""
    x = rng.normal(rng.normal(0, 100, 7), rng.uniform(1e-3, 50, 7), size=(n, 7))
    x[rng.random((n, 7)) < 0.3] = np.nan
    x[:, 0] = np.nan  # no observed value: imputed with 0
    x[:, 1] = 7.25  # constant
    x[:, 2] = 1e8 + rng.normal(0, 1e-9, n)  # constant up to rounding
    x[:, 3] = np.where(rng.random(n) < 0.5, np.nan, -3.0)  # constant where observed
    return x


@pytest.mark.parametrize("method", ["minmax", "standard"])
@pytest.mark.parametrize("seed", range(20))
def test_scaler_statistics_equal_scikit_learn(method: str, seed: int) -> None:
    # The numpy fit reproduces SimpleImputer(median, keep_empty_features) + Min-Max/StandardScaler.
    rng = np.random.default_rng(seed)
    x = _random_clinical(rng, int(rng.integers(1, 40)))
    ours = ClinicalScaler([f"c{i}" for i in range(7)], method).fit(x)  # type: ignore[arg-type]
    fill, scale, offset = _sklearn_statistics(x, method)
    np.testing.assert_array_equal(ours.fill, fill)
    np.testing.assert_allclose(ours.scale, scale, rtol=1e-12, atol=0)
    np.testing.assert_allclose(ours.offset, offset, rtol=1e-12, atol=1e-12)
    assert ours.fill is not None and ours.fill[0] == 0.0 and ours.scale is not None and ours.scale[1] == 1.0
    out = ours.transform(x)
    assert np.isfinite(out).all() and (out[:, 1] == 0.0).all()
    again = ClinicalScaler.from_dict(json.loads(json.dumps(ours.to_dict())))
    np.testing.assert_array_equal(again.transform(x), out)


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
        elements=st.floats(-1e6, 1e6, allow_subnormal=False) | st.just(float("nan")),
    ),
    method=st.sampled_from(["minmax", "standard"]),
)
def test_scaler_statistics_equal_scikit_learn_property(x: np.ndarray, method: str) -> None:
    ours = ClinicalScaler([f"c{i}" for i in range(x.shape[1])], method).fit(x)  # type: ignore[arg-type]
    fill, scale, offset = _sklearn_statistics(x, method)
    np.testing.assert_array_equal(ours.fill, fill)
    np.testing.assert_allclose(ours.scale, scale, rtol=1e-9, atol=0)
    np.testing.assert_allclose(ours.offset, offset, rtol=1e-9, atol=1e-9)


def test_scaler_fit_rejects_infinite_values_naming_the_attribute() -> None:
    x = np.array([[1.0, 2.0, 3.0], [np.inf, 4.0, -np.inf]])
    with pytest.raises(DataError, match=r"infinite values in attribute\(s\) \['age', 'sex'\]"):
        ClinicalScaler(["age", "lymph_count", "sex"]).fit(x)


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
