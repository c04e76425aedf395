"""Tests of milcell.metrics: clinical definitions, validation, bootstrap, fold summaries."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from milcell.exceptions import ConfigError, DataError
from milcell.metrics import (
    binary_report,
    format_mean_std,
    format_summary,
    multiclass_report,
    summarize_folds,
)


def _hand_checked() -> tuple[np.ndarray, np.ndarray]:
    """10 positives, 20 negatives; at threshold 0.5: TP=8, FN=2, TN=15, FP=5."""
    y = np.array([1] * 10 + [0] * 20)
    score = np.array([0.9] * 8 + [0.2] * 2 + [0.1] * 15 + [0.7] * 5)
    return y, score


def test_binary_definitions_on_hand_checked_confusion_matrix() -> None:
    y, score = _hand_checked()
    r = binary_report(y, score)
    assert r.confusion_matrix.tolist() == [[15, 5], [2, 8]]  # [[TN, FP], [FN, TP]]
    assert r.sensitivity == pytest.approx(8 / 10)  # TP / (TP + FN)
    assert r.specificity == pytest.approx(15 / 20)  # TN / (TN + FP)
    assert r.ppv == pytest.approx(8 / 13)  # TP / (TP + FP)
    assert r.npv == pytest.approx(15 / 17)  # TN / (TN + FN)
    assert r.accuracy == pytest.approx(23 / 30)
    assert r.balanced_accuracy == pytest.approx((0.8 + 0.75) / 2)
    assert r.f1 == pytest.approx(16 / 23)
    assert r.kappa == pytest.approx(22 / 43)
    assert r.n_samples == 30 and r.n_unlabelled == 0
    d = r.as_dict()
    assert (d["tp"], d["fp"], d["fn"], d["tn"]) == (8.0, 5.0, 2.0, 15.0)
    for key in ("balanced_accuracy", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auc"):
        assert isinstance(d[key], float)
    assert d["kappa"] == pytest.approx(22 / 43)


def test_binary_auc_matches_sklearn_and_uses_scores_not_labels() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50)
    score = np.clip(0.3 * y + rng.random(50) * 0.7, 0, 1)
    r = binary_report(y, score)
    assert r.auc == pytest.approx(roc_auc_score(y, score))
    assert r.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, score >= 0.5))


def test_binary_threshold_is_inclusive_and_configurable() -> None:
    y = np.array([1, 0, 1, 0])
    score = np.array([0.5, 0.49, 0.8, 0.6])
    assert binary_report(y, score).confusion_matrix.tolist() == [[1, 1], [0, 2]]
    assert binary_report(y, score, threshold=0.7).confusion_matrix.tolist() == [[2, 0], [1, 1]]


def test_binary_accepts_two_column_probabilities() -> None:
    y, score = _hand_checked()
    prob = np.stack([1 - score, score], axis=1)
    assert binary_report(y, prob).as_dict() == binary_report(y, score).as_dict()


@pytest.mark.parametrize("bad", [[2.3, -0.5, 0.1, 0.9], [0.1, float("nan"), 0.3, 0.4]])
def test_binary_refuses_logits_and_nan(bad: list[float]) -> None:
    with pytest.raises(DataError, match="probabilities are expected"):
        binary_report([0, 1, 0, 1], bad)


def test_binary_validation_errors() -> None:
    with pytest.raises(DataError, match="outside 0..1"):
        binary_report([0, 2], [0.1, 0.9])
    with pytest.raises(DataError, match="3 samples but the scores have 2"):
        binary_report([0, 1, 1], [0.1, 0.9])
    with pytest.raises(DataError, match="must be 1-D"):
        binary_report([[0, 1]], [0.1, 0.9])
    with pytest.raises(DataError, match="integer class indices"):
        binary_report([0.5, 1.0], [0.1, 0.9])
    with pytest.raises(DataError, match=r"y_score must be \(n,\)"):
        binary_report([0, 1], [[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]])
    with pytest.raises(ConfigError, match="threshold"):
        binary_report([0, 1], [0.1, 0.9], threshold=1.0)
    with pytest.raises(ConfigError, match="n_bootstrap"):
        binary_report([0, 1], [0.1, 0.9], n_bootstrap=-1)
    with pytest.raises(ConfigError, match="ci must lie"):
        binary_report([0, 1], [0.1, 0.9], n_bootstrap=10, ci=1.5)


def test_unlabelled_samples_are_excluded_and_counted() -> None:
    y, score = _hand_checked()
    y_mixed = np.concatenate([y, [-1, -1, -1]])
    score_mixed = np.concatenate([score, [0.99, 0.01, 0.6]])
    r = binary_report(y_mixed, score_mixed)
    ref = binary_report(y, score)
    assert r.n_unlabelled == 3 and r.as_dict()["n_unlabelled"] == 3.0
    assert r.n_samples == 30
    assert r.confusion_matrix.tolist() == ref.confusion_matrix.tolist()
    assert r.auc == ref.auc


def test_all_unlabelled_is_an_error() -> None:
    with pytest.raises(DataError, match="no labelled samples"):
        binary_report([-1, -1], [0.2, 0.4])
    with pytest.raises(DataError, match="no labelled samples"):
        multiclass_report([-1], [[0.2, 0.3, 0.5]])


def test_auc_with_one_class_is_nan_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="milcell"):
        r = binary_report([1, 1, 1], [0.9, 0.4, 0.8])
    assert math.isnan(r.auc)
    assert math.isnan(r.specificity)  # no negatives: undefined, not zero
    assert r.sensitivity == pytest.approx(2 / 3)
    assert "AUC is undefined" in caplog.text


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    y, score = _hand_checked()
    a = binary_report(y, score, n_bootstrap=30, seed=5)
    b = binary_report(y, score, n_bootstrap=30, seed=5)
    c = binary_report(y, score, n_bootstrap=30, seed=6)
    assert a.ci == b.ci
    assert a.ci != c.ci
    low, high = a.ci["sensitivity"]
    assert low <= a.sensitivity <= high and low < high
    narrow = binary_report(y, score, n_bootstrap=30, seed=5, ci=0.5).ci["sensitivity"]
    assert low <= narrow[0] <= narrow[1] <= high
    d = a.as_dict()
    assert d["auc_ci_low"] == a.ci["auc"][0] and d["auc_ci_high"] == a.ci["auc"][1]
    assert "auc_ci_low" not in binary_report(y, score).as_dict()


def test_multiclass_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = np.tile(np.arange(4), 10)
    logits = rng.normal(size=(40, 4)) + 1.5 * np.eye(4)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    r = multiclass_report(y, prob, class_names=["bas", "eos", "lym", "mon"])
    pred = prob.argmax(1)
    assert r.accuracy == pytest.approx((pred == y).mean())
    assert r.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, pred))
    assert r.f1_macro == pytest.approx(f1_score(y, pred, average="macro"))
    assert r.f1_weighted == pytest.approx(f1_score(y, pred, average="weighted"))
    assert r.auc == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    for k in range(4):
        assert r.recall[k] == pytest.approx(((pred == k) & (y == k)).sum() / (y == k).sum())
    assert r.confusion_matrix.sum() == 40
    d = r.as_dict()
    assert d["recall_eos"] == pytest.approx(r.recall[1])
    assert d["auc_mon"] == pytest.approx(r.auc_per_class[3])


def test_multiclass_missing_class_gives_nan_auc(caplog: pytest.LogCaptureFixture) -> None:
    prob = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    with caplog.at_level(logging.WARNING, logger="milcell"):
        r = multiclass_report([0, 1, 0, -1], prob)
    assert math.isnan(r.auc_per_class[2]) and r.auc == 1.0
    assert math.isnan(r.recall[2])
    assert r.n_unlabelled == 1 and r.n_samples == 3
    assert "classes [2]" in caplog.text


def test_multiclass_validation_errors() -> None:
    with pytest.raises(DataError, match="rows must sum to 1"):
        multiclass_report([0, 1], [[0.5, 0.2], [0.4, 0.6]])
    with pytest.raises(DataError, match="probabilities are expected"):
        multiclass_report([0, 1], [[3.0, -2.0], [0.4, 0.6]])
    with pytest.raises(DataError, match="outside 0..2"):
        multiclass_report([0, 3], [[0.5, 0.3, 0.2], [0.4, 0.3, 0.3]])
    with pytest.raises(DataError, match=r"\(n, C\)"):
        multiclass_report([0, 1], [0.5, 0.5])
    with pytest.raises(ConfigError, match="class_names has 1 names"):
        multiclass_report([0, 1], [[0.5, 0.5], [0.4, 0.6]], class_names=["a"])


def test_multiclass_bootstrap_is_reproducible() -> None:
    prob = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]] * 5)
    y = [0, 1, 2, 0] * 5
    a = multiclass_report(y, prob, n_bootstrap=20, seed=1)
    assert a.ci == multiclass_report(y, prob, n_bootstrap=20, seed=1).ci
    assert set(a.ci) == {"accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "kappa", "auc"}


@settings(max_examples=40)
@given(
    pairs=st.lists(
        st.tuples(
            st.integers(0, 1),
            st.floats(0, 1).filter(lambda s: s != 0.5),
        ),
        min_size=2,
        max_size=40,
    ),
    seed=st.integers(0, 1000),
)
def test_binary_invariances(pairs: list[tuple[int, float]], seed: int) -> None:
    y = np.array([p[0] for p in pairs])
    s = np.array([p[1] for p in pairs])
    r = binary_report(y, s).as_dict()
    # Permuting samples changes nothing.
    perm = np.random.default_rng(seed).permutation(len(y))
    np.testing.assert_equal(binary_report(y[perm], s[perm]).as_dict(), r)
    # Swapping the classes (and the scores) swaps sensitivity/specificity and PPV/NPV.
    flipped = binary_report(1 - y, 1 - s).as_dict()
    np.testing.assert_allclose(
        [flipped["sensitivity"], flipped["specificity"], flipped["ppv"], flipped["npv"]],
        [r["specificity"], r["sensitivity"], r["npv"], r["ppv"]],
    )
    # Balanced accuracy is the mean of sensitivity and specificity when both exist.
    if 0 < y.sum() < len(y):
        assert r["balanced_accuracy"] == pytest.approx((r["sensitivity"] + r["specificity"]) / 2)
        assert 0.0 <= r["auc"] <= 1.0


def test_summarize_folds_and_format() -> None:
    folds = [
        {"auc": 0.9, "f1": 0.8, "n": 1},
        {"auc": 0.8, "f1": float("nan")},
        {"auc": 1.0, "f1": 0.6},
    ]
    s = summarize_folds(folds)
    assert s["auc"] == pytest.approx((0.9, 0.1))
    assert s["f1"] == pytest.approx((0.7, np.std([0.8, 0.6], ddof=1)))
    assert s["n"][0] == 1.0 and math.isnan(s["n"][1])
    assert summarize_folds(folds, ddof=0)["auc"][1] == pytest.approx(np.std([0.9, 0.8, 1.0]))
    assert format_mean_std(0.91234, 0.0479) == "0.91 ± 0.05"
    assert format_summary(s, names=["auc", "f1"], digits=3).splitlines() == [
        "auc  0.900 ± 0.100",
        "f1   0.700 ± 0.141",
    ]


def test_summarize_folds_errors() -> None:
    with pytest.raises(DataError, match="no folds"):
        summarize_folds([])
    with pytest.raises(DataError, match="fold 1 metric 'auc' is not a number"):
        summarize_folds([{"auc": 0.5}, {"auc": "high"}])
    with pytest.raises(ConfigError, match="unknown metrics"):
        format_summary({"auc": (0.5, 0.1)}, names=["kappa"])


# --------------------------------------------------------------------------- calibration metrics


def test_ece_uniform_bins_hand_computed_binary() -> None:
    from milcell.metrics import calibration_bins, expected_calibration_error, maximum_calibration_error

    # Bins of width 0.25 on P(class 1): (0, .25] holds 0.1, 0.2 (labels 0, 1); (.5, .75] holds 0.6, 0.7
    # (labels 1, 1); (.75, 1] holds 0.9 (label 0).
    y = [0, 1, 1, 1, 0]
    p = [0.1, 0.2, 0.6, 0.7, 0.9]
    bins = calibration_bins(y, p, n_bins=4)
    assert bins.counts.tolist() == [2, 0, 2, 1]
    assert bins.confidence[[0, 2, 3]] == pytest.approx([0.15, 0.65, 0.9])
    assert bins.frequency[[0, 2, 3]] == pytest.approx([0.5, 1.0, 0.0])
    assert math.isnan(bins.confidence[1])
    expected = (2 * 0.35 + 2 * 0.35 + 1 * 0.9) / 5
    assert expected_calibration_error(y, p, n_bins=4) == pytest.approx(expected)
    assert maximum_calibration_error(y, p, n_bins=4) == pytest.approx(0.9)


def test_ece_equal_mass_bins_hand_computed() -> None:
    from milcell.metrics import calibration_bins, expected_calibration_error

    y = [0, 1, 1, 1, 0, 1]
    p = [0.1, 0.2, 0.6, 0.7, 0.9, 0.95]
    bins = calibration_bins(y, p, n_bins=3, strategy="quantile")
    assert bins.counts.tolist() == [2, 2, 2]
    assert bins.lower.tolist() == [0.1, 0.6, 0.9] and bins.upper.tolist() == [0.2, 0.7, 0.95]
    expected = (abs(0.5 - 0.15) + abs(1.0 - 0.65) + abs(0.5 - 0.925)) / 3
    assert expected_calibration_error(y, p, n_bins=3, strategy="quantile") == pytest.approx(expected)


def test_ece_top_label_and_classwise_hand_computed() -> None:
    from milcell.metrics import expected_calibration_error

    prob = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
    y = np.array([0, 1, 2, 2])
    # One bin: top-label confidence mean (0.8 + 0.6 + 0.5 + 0.8) / 4 = 0.675, accuracy 3/4.
    assert expected_calibration_error(y, prob, n_bins=1) == pytest.approx(abs(0.75 - 0.675))
    # Class-wise, one bin: |mean p_k - freq_k| averaged over k.
    freq = np.array([0.25, 0.25, 0.5])
    expected = np.mean(np.abs(prob.mean(axis=0) - freq))
    assert expected_calibration_error(y, prob, n_bins=1, mode="classwise") == pytest.approx(expected)
    # A (n, 2) matrix in binary mode equals the (n,) positive-class form.
    p1 = np.array([0.2, 0.7, 0.4, 0.9])
    yb = [0, 1, 1, 1]
    assert expected_calibration_error(yb, np.stack([1 - p1, p1], 1)) == expected_calibration_error(yb, p1)


def test_ece_of_a_perfect_step_is_zero_and_unlabelled_are_ignored() -> None:
    from milcell.metrics import expected_calibration_error

    assert expected_calibration_error([0, 0, 1, 1], [0.0, 0.0, 1.0, 1.0]) == 0.0
    assert expected_calibration_error([0, 1, -1], [0.0, 1.0, 0.9]) == 0.0


def test_brier_and_nll_match_scikit_learn() -> None:
    from sklearn.metrics import brier_score_loss, log_loss

    from milcell.metrics import brier_score, negative_log_likelihood

    rng = np.random.default_rng(3)
    p1 = rng.uniform(0.01, 0.99, size=50)
    y = rng.integers(0, 2, size=50)
    assert brier_score(y, p1) == pytest.approx(brier_score_loss(y, p1))
    assert negative_log_likelihood(y, p1) == pytest.approx(log_loss(y, p1))
    prob = rng.dirichlet([1.0, 2.0, 3.0], size=60)
    y3 = rng.integers(0, 3, size=60)
    assert brier_score(y3, prob) == pytest.approx(brier_score_loss(y3, prob, labels=[0, 1, 2]))
    assert negative_log_likelihood(y3, prob) == pytest.approx(log_loss(y3, prob, labels=[0, 1, 2]))


def test_calibration_report_bootstrap_intervals_bracket_the_estimate() -> None:
    from milcell.metrics import calibration_report

    rng = np.random.default_rng(0)
    prob = rng.dirichlet([1.0, 1.0, 1.0], size=120)
    y = rng.integers(0, 3, size=120)
    r = calibration_report(y, prob, n_bins=5, n_bootstrap=60, seed=2)
    assert r.mode == "top_label" and r.n_samples == 120
    for name in ("ece", "mce", "classwise_ece", "brier", "nll"):
        low, high = r.ci[name]
        assert low <= high
        assert f"{name}_ci_low" in r.as_dict()
    assert r.ci["brier"][0] <= r.brier <= r.ci["brier"][1]
    again = calibration_report(y, prob, n_bins=5, n_bootstrap=60, seed=2)
    assert again.ci == r.ci


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_bins": 0}, "n_bins"),
        ({"strategy": "log"}, "strategy"),
        ({"mode": "binary"}, "two classes"),
        ({"mode": "per_class"}, "mode"),
    ],
)
def test_calibration_metric_arguments_are_checked(kwargs: dict[str, object], message: str) -> None:
    from milcell.metrics import expected_calibration_error

    with pytest.raises(ConfigError, match=message):
        expected_calibration_error([0, 1, 2], np.eye(3), **kwargs)  # type: ignore[arg-type]


def test_calibration_metrics_refuse_logits() -> None:
    from milcell.metrics import brier_score, calibration_report

    with pytest.raises(DataError, match="probabilities"):
        brier_score([0, 1], [[2.0, -1.0], [0.5, 0.5]])
    with pytest.raises(DataError, match="sum to 1"):
        calibration_report([0, 1], [[0.9, 0.9], [0.5, 0.5]])


@settings(max_examples=20)
@given(st.integers(min_value=1, max_value=40), st.integers(min_value=0, max_value=10_000))
def test_ece_lies_in_unit_interval_and_below_mce(n: int, seed: int) -> None:
    from milcell.metrics import expected_calibration_error, maximum_calibration_error

    rng = np.random.default_rng(seed)
    prob = rng.dirichlet([1.0, 1.0, 1.0], size=n)
    y = rng.integers(0, 3, size=n)
    for strategy in ("uniform", "quantile"):
        ece = expected_calibration_error(y, prob, n_bins=7, strategy=strategy)
        mce = maximum_calibration_error(y, prob, n_bins=7, strategy=strategy)
        assert 0.0 <= ece <= mce + 1e-12 <= 1.0 + 1e-12


def test_risk_coverage_curve_hand_computed_with_ties() -> None:
    from milcell.metrics import aurc, risk_coverage_curve

    # Sorted by confidence: 0.9 (right), 0.7 (wrong), 0.7 (right), 0.2 (wrong); the tie is one point.
    rc = risk_coverage_curve([1, 0, 1, 0], [0.9, 0.7, 0.7, 0.2])
    assert rc.coverage.tolist() == [1.0, 0.75, 0.25]
    assert rc.risk.tolist() == pytest.approx([0.5, 1 / 3, 0.0])
    assert rc.threshold.tolist() == [0.2, 0.7, 0.9]
    # AURC: k=1 -> 0; k=2, 3 (tied group) -> 1/3 each; k=4 -> 1/2.
    assert aurc([1, 0, 1, 0], [0.9, 0.7, 0.7, 0.2]) == pytest.approx((0 + 2 / 3 + 0.5) / 4)
    with pytest.raises(DataError, match="same length|one length"):
        risk_coverage_curve([1, 0], [0.5])
