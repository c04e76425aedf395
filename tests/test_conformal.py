"""Tests of milcell.conformal: the finite-sample coverage guarantee, checked by simulation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from milcell.calibration import CalibrationError
from milcell.conformal import ConformalPredictor, conformal_quantile, conformal_scores
from milcell.exceptions import ConfigError

ALPHA = 0.1
N_SPLITS = 200
#: Monte-Carlo tolerance of a mean coverage over N_SPLITS independent splits: about four standard
#: errors. Per split, the coverage of a split-conformal set varies with sd about
#: sqrt(alpha (1 - alpha) / (n_cal + 2) + alpha (1 - alpha) / n_test) (~0.035 with 100/400 patients),
#: so the mean over 200 splits has a standard error of ~0.0025.
MARGINAL_TOLERANCE = 0.01
#: Per class in Mondrian mode the minority class has ~30 calibration and ~40 test patients per split
#: (sd per split ~0.07, standard error of the mean ~0.005): four standard errors.
CLASS_TOLERANCE = 0.02
PRIORS = np.log(np.array([0.6, 0.3, 0.1]))


def _cohort(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Patients of three imbalanced classes; the 'model' is over-confident and under-rates class 2."""
    signal = rng.normal(size=(n, 3)) * 1.5
    true_logits = signal + PRIORS
    true_p = np.exp(true_logits) / np.exp(true_logits).sum(axis=1, keepdims=True)
    labels = (rng.uniform(size=(n, 1)) > np.cumsum(true_p, axis=1)).sum(axis=1)
    model_logits = 2.0 * signal + np.array([0.0, 0.0, -2.0])
    model_p = np.exp(model_logits) / np.exp(model_logits).sum(axis=1, keepdims=True)
    return model_p, labels


def _simulate(
    score: str, mondrian: bool, n_cal: int, n_test: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Coverage per split (N_SPLITS,) and per split and class (N_SPLITS, 3), on fresh patients each time."""
    rng = np.random.default_rng(seed)
    marginal = np.empty(N_SPLITS)
    per_class = np.full((N_SPLITS, 3), np.nan)
    for i in range(N_SPLITS):
        p_cal, y_cal = _cohort(rng, n_cal)
        p_test, y_test = _cohort(rng, n_test)
        sets = (
            ConformalPredictor(score, mondrian=mondrian).fit(p_cal, y_cal, alpha=ALPHA).predict_sets(p_test)
        )
        covered = sets[np.arange(n_test), y_test]
        marginal[i] = covered.mean()
        for c in range(3):
            if (y_test == c).any():
                per_class[i, c] = covered[y_test == c].mean()
    return marginal, per_class


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_marginal_coverage_holds_over_random_splits(score: str) -> None:
    n_cal = 100
    marginal, _ = _simulate(score, False, n_cal, 400, seed=11)
    assert marginal.mean() >= 1 - ALPHA - MARGINAL_TOLERANCE
    if score == "lac":  # continuous scores: coverage is also at most 1 - alpha + 1 / (n + 1)
        assert marginal.mean() <= 1 - ALPHA + 1 / (n_cal + 1) + MARGINAL_TOLERANCE


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_mondrian_coverage_holds_within_every_class(score: str) -> None:
    marginal, per_class = _simulate(score, True, 300, 400, seed=12)
    class_means = np.nanmean(per_class, axis=0)
    assert (class_means >= 1 - ALPHA - CLASS_TOLERANCE).all(), class_means
    assert marginal.mean() >= 1 - ALPHA - MARGINAL_TOLERANCE


def test_without_mondrian_the_minority_class_is_under_covered() -> None:
    # What Mondrian mode is for: the marginal guarantee says nothing per class, and here the
    # minority class (prior 0.1) is covered well below 1 - alpha.
    _, per_class = _simulate("lac", False, 300, 400, seed=13)
    assert np.nanmean(per_class, axis=0)[2] < 1 - ALPHA - CLASS_TOLERANCE


def test_the_finite_sample_rank_is_ceil_n_plus_one_times_one_minus_alpha() -> None:
    scores = np.arange(1, 21) / 20  # n = 20
    assert conformal_quantile(scores, 0.1) == pytest.approx(19 / 20)  # ceil(21 * 0.9) = 19
    assert conformal_quantile(scores, 0.2) == pytest.approx(17 / 20)  # ceil(21 * 0.8) = 17
    assert conformal_quantile(scores, 0.5) == pytest.approx(11 / 20)  # ceil(10.5) = 11
    assert conformal_quantile(np.arange(1, 10) / 10, 0.1) == pytest.approx(0.9)  # ceil(10 * 0.9) = 9 = n
    # The plain empirical (1 - alpha) quantile (rank ceil(n (1 - alpha)) = 18) would under-cover.
    assert conformal_quantile(scores, 0.1) > np.quantile(scores, 0.9, method="inverted_cdf")


def test_alpha_too_small_for_n_gives_all_class_sets(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    p, y = _cohort(rng, 8)
    cp = ConformalPredictor("lac").fit(p, y, alpha=0.1)  # needs n >= 9
    assert np.isinf(cp.thresholds).all()
    assert cp.predict_sets(p).all()
    assert "too few calibration patients" in caplog.text
    assert math.isfinite(ConformalPredictor("lac").fit(p, y, alpha=0.2).thresholds[0])  # 8 >= 1/0.2 - 1


def test_mondrian_all_class_only_for_the_sparse_class() -> None:
    p = np.array([[0.8, 0.2]] * 20 + [[0.3, 0.7]] * 3)
    y = np.array([0] * 20 + [1] * 3)
    cp = ConformalPredictor("lac", mondrian=True).fit(p, y, alpha=0.1)
    assert math.isfinite(cp.thresholds[0]) and math.isinf(cp.thresholds[1])
    assert cp.n_calibration.tolist() == [20, 3]
    assert cp.predict_sets([[0.99, 0.01]]).tolist() == [[True, True]]


def test_aps_scores_and_sets_are_never_empty() -> None:
    p = np.array([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
    # Ties do not count each other: both 0.4 classes score 0.4.
    np.testing.assert_allclose(conformal_scores(p, "aps"), [[0.5, 0.8, 1.0], [0.4, 0.4, 1.0]])
    rng = np.random.default_rng(1)
    p_cal, y_cal = _cohort(rng, 200)
    cp = ConformalPredictor("aps").fit(p_cal, y_cal, alpha=0.3)
    assert cp.predict_sets(_cohort(rng, 300)[0]).any(axis=1).all()


def test_round_trip_and_errors() -> None:
    rng = np.random.default_rng(2)
    p, y = _cohort(rng, 50)
    cp = ConformalPredictor("aps", mondrian=True).fit(p, y, alpha=0.2)
    again = ConformalPredictor.from_dict(json.loads(json.dumps(cp.to_dict())))
    assert (again.predict_sets(p) == cp.predict_sets(p)).all()
    with pytest.raises(CalibrationError, match="not fitted"):
        ConformalPredictor().predict_sets(p)
    with pytest.raises(ConfigError, match="alpha"):
        ConformalPredictor().fit(p, y, alpha=1.0)
    with pytest.raises(ConfigError, match="score"):
        ConformalPredictor("raps")
    with pytest.raises(CalibrationError, match="no labelled"):
        ConformalPredictor().fit(p[:2], [-1, -1])
    with pytest.raises(CalibrationError, match="classes"):
        cp.predict_sets(np.full((1, 2), 0.5))
