"""Tests of milcell.calibration: calibrators, uncertainty scores, MC-dropout and referral."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from milcell.calibration import (
    CalibrationError,
    Calibrator,
    ReferralRule,
    ensemble_log_probabilities,
    entropy,
    fit_referral,
    margin,
    max_probability,
    mc_dropout,
    mutual_information,
    uncertainty_scores,
    vote_disagreement,
)
from milcell.exceptions import ConfigError, ShapeError
from milcell.metrics import expected_calibration_error, negative_log_likelihood


def _overconfident(n: int, n_classes: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), logits reported as scale * z (over-confident for scale > 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, n_classes))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(n_classes, p=row) for row in p])
    return scale * z, y


@pytest.mark.parametrize("method", ["temperature", "vector", "platt"])
def test_identity_changes_nothing(method: str) -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 2)) * 3
    softmax = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert Calibrator.identity(2, method).transform(z) == pytest.approx(softmax)


def test_temperature_one_is_the_identity_for_many_classes() -> None:
    z = np.random.default_rng(1).normal(size=(5, 4))
    cal = Calibrator.from_dict(
        {
            "format": "milcell-calibrator",
            "version": 1,
            "method": "temperature",
            "num_classes": 4,
            "temperature": 1.0,
        }
    )
    assert cal.transform(z) == pytest.approx(torch.softmax(torch.tensor(z), dim=1).numpy())
    assert cal.calibrated_logits(z) == pytest.approx(z)


def test_temperature_recovers_the_overconfidence_factor() -> None:
    z, y = _overconfident(3000, 3, scale=3.0, seed=0)
    cal = Calibrator("temperature").fit(z, y)
    assert cal.temperature == pytest.approx(3.0, rel=0.15)
    before = expected_calibration_error(y, torch.softmax(torch.tensor(z), 1).numpy())
    after = expected_calibration_error(y, cal.transform(z))
    assert after < before / 2
    # Temperature scaling keeps the argmax.
    assert (cal.transform(z).argmax(1) == z.argmax(1)).all()


def test_binary_single_logit_matches_two_column_logits() -> None:
    z, y = _overconfident(400, 2, scale=2.5, seed=4)
    diff = z[:, 1] - z[:, 0]
    one = Calibrator().fit(diff, y)
    two = Calibrator().fit(z, y)
    assert one.temperature == pytest.approx(two.temperature, rel=1e-4)
    assert one.transform(diff) == pytest.approx(two.transform(z), abs=1e-6)


@settings(max_examples=20)
@given(
    st.sampled_from(["temperature", "vector", "platt"]),
    st.floats(min_value=0.2, max_value=5.0),
    st.integers(min_value=0, max_value=10_000),
)
def test_calibration_never_increases_nll_on_its_fitting_data(method: str, scale: float, seed: int) -> None:
    n_classes = 2 if method == "platt" else 3
    z, y = _overconfident(60, n_classes, scale, seed)
    if np.unique(y).size < 2:
        return
    cal = Calibrator(method).fit(z, y)
    raw = torch.softmax(torch.tensor(z), dim=1).numpy()
    assert negative_log_likelihood(y, cal.transform(z)) <= negative_log_likelihood(y, raw) + 1e-9
    assert cal.nll_after <= cal.nll_before


@pytest.mark.parametrize("method", ["temperature", "vector", "platt"])
def test_json_round_trip_gives_the_same_probabilities(method: str) -> None:
    z, y = _overconfident(200, 2, scale=2.0, seed=2)
    cal = Calibrator(method).fit(z, y)
    text = json.dumps(cal.to_dict())
    again = Calibrator.from_dict(json.loads(text))
    assert again.transform(z) == pytest.approx(cal.transform(z))
    assert again.nll_after == pytest.approx(cal.nll_after)


def test_fit_refuses_too_few_samples_and_one_class() -> None:
    z = np.zeros((30, 2))
    with pytest.raises(CalibrationError, match="min_samples=10"):
        Calibrator().fit(z[:5], [0, 1, 0, 1, 0])
    with pytest.raises(CalibrationError, match="single class"):
        Calibrator().fit(z, [1] * 30)
    with pytest.raises(CalibrationError, match="platt"):
        Calibrator("platt").fit(np.zeros((30, 3)), [0, 1, 2] * 10)
    # Unlabelled rows are left out before counting.
    with pytest.raises(CalibrationError, match="9 labelled"):
        Calibrator().fit(np.zeros((12, 2)), [0, 1] * 4 + [1, -1, -1, -1])
    with pytest.raises(ConfigError, match="method"):
        Calibrator("isotonic")
    with pytest.raises(CalibrationError, match="not fitted"):
        Calibrator().transform(z)


def test_transform_checks_the_number_of_classes_and_from_dict_validates() -> None:
    cal = Calibrator.identity(3)
    with pytest.raises(ShapeError, match="3"):
        cal.transform(np.zeros((2, 4)))
    with pytest.raises(CalibrationError, match="format"):
        Calibrator.from_dict({"method": "temperature"})
    with pytest.raises(CalibrationError, match="temperature"):
        Calibrator.from_dict(
            {"format": "milcell-calibrator", "version": 1, "method": "temperature", "num_classes": 2}
        )
    with pytest.raises(CalibrationError, match="version"):
        Calibrator.from_dict({"format": "milcell-calibrator", "version": 99, "method": "temperature"})


def test_ensemble_is_calibrated_on_its_averaged_log_probabilities() -> None:
    z, y = _overconfident(500, 3, scale=3.0, seed=5)
    rng = np.random.default_rng(0)
    members = np.stack(
        [torch.softmax(torch.tensor(z + rng.normal(0, 0.3, z.shape)), 1).numpy() for _ in range(4)]
    )
    log_mean = ensemble_log_probabilities(members)
    assert np.exp(log_mean) == pytest.approx(members.mean(axis=0))
    cal = Calibrator().fit(log_mean, y)
    assert negative_log_likelihood(y, cal.transform(log_mean)) < negative_log_likelihood(y, members.mean(0))
    assert cal.transform_probabilities(members.mean(0)) == pytest.approx(cal.transform(log_mean), abs=1e-6)


def test_uncertainty_scores_hand_computed() -> None:
    p = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    assert max_probability(p).tolist() == pytest.approx([0.7, 1 / 3])
    assert margin(p).tolist() == pytest.approx([0.5, 0.0])
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert entropy(p).tolist() == pytest.approx([h, math.log(3)])
    members = np.array([[[0.9, 0.1]], [[0.1, 0.9]], [[0.5, 0.5]]])
    mean_h = (2 * -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) + math.log(2)) / 3
    assert mutual_information(members).tolist() == pytest.approx([math.log(2) - mean_h])
    assert vote_disagreement(np.array([[[0.9, 0.1]], [[0.2, 0.8]], [[0.7, 0.3]]])).tolist() == pytest.approx(
        [1 / 3]
    )
    scores = uncertainty_scores(members.mean(0), members)
    assert set(scores) == {"max_probability", "entropy", "margin", "mutual_information", "vote_disagreement"}
    with pytest.raises(ShapeError, match="do not match"):
        uncertainty_scores(np.array([[0.5, 0.5], [0.5, 0.5]]), members)


class _DropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 2)
        self.norm_modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.norm_modes.append(self.norm.training)
        return self.head(self.drop(self.norm(self.linear(x))))


def test_mc_dropout_samples_vary_keeps_batchnorm_in_eval_and_restores_modes() -> None:
    torch.manual_seed(0)
    model = _DropNet()
    model.train()
    stats = model.norm.running_mean.clone()
    x = torch.randn(6, 4)
    samples = mc_dropout(model, x, n_samples=5, seed=1)
    assert samples.shape == (5, 6, 2)
    assert not torch.allclose(samples[0], samples[1])  # dropout was active
    assert model.norm_modes == [False] * 5  # BatchNorm in eval mode during the passes
    assert torch.equal(model.norm.running_mean, stats)  # and its statistics untouched
    assert model.training and model.norm.training  # modes restored
    again = mc_dropout(model, x, n_samples=5, seed=1)
    assert torch.equal(samples, again)
    with pytest.raises(ConfigError, match="no dropout"):
        mc_dropout(nn.Linear(4, 2), x)


def test_referral_refers_the_fewest_patients_meeting_the_target_on_calibration_data() -> None:
    # Confidence order: 0.95 (pos, right), 0.9 (pos, right), 0.8 (neg, right), 0.6 (pos, wrong),
    # 0.55 (pos, right). Keeping all: sensitivity 3/4; dropping 0.55 alone: 2/3; dropping both: 1.
    p = np.array([[0.05, 0.95], [0.1, 0.9], [0.8, 0.2], [0.6, 0.4], [0.45, 0.55]])
    y = np.array([1, 1, 0, 1, 1])
    rule = fit_referral(p, y, target=1.0)
    assert rule.threshold == pytest.approx(0.8)
    assert rule.refer(p).tolist() == [False, False, False, True, True]
    assert rule.calibration["sensitivity_kept"] == 1.0 and rule.calibration["referred"] == pytest.approx(0.4)
    loose = fit_referral(p, y, target=0.75)
    assert not loose.refer(p).any()
    acc = fit_referral(p, y, target=0.8, metric="accuracy")
    assert acc.evaluate(p, y)["accuracy_kept"] >= 0.8
    assert ReferralRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule


def test_referral_refers_everyone_when_the_target_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    p = np.array([[0.1, 0.9], [0.2, 0.8]])
    rule = fit_referral(p, [0, 0], target=0.9, metric="accuracy")
    assert math.isinf(rule.threshold) and rule.refer(p).all()
    assert "refers every patient" in caplog.text
    assert ReferralRule.from_dict(json.loads(json.dumps(rule.to_dict()))).threshold == math.inf


def test_referral_generalises_on_evaluation_data() -> None:
    z, y = _overconfident(2000, 2, scale=1.0, seed=9)
    p = torch.softmax(torch.tensor(z), 1).numpy()
    rule = fit_referral(p[:1000], y[:1000], target=0.9, metric="accuracy")
    held_out = rule.evaluate(p[1000:], y[1000:])
    assert 0.0 < held_out["referred"] < 1.0
    assert held_out["metric"] > held_out["metric_all"]
    assert held_out["metric"] == pytest.approx(0.9, abs=0.04)


# --------------------------------------------------------------------------- cross_validate(calibrate=)


def _feature_cohort(n: int, seed: int = 0) -> Any:
    from milcell.data import FeatureBagDataset

    g = torch.Generator().manual_seed(seed)
    labels = [i % 2 for i in range(n)]
    feats = [torch.randn(3, 4, generator=g) + 0.8 * y for y in labels]
    return FeatureBagDataset(feats, labels=labels, ids=[f"P{i:03d}" for i in range(n)])


@pytest.mark.slow
def test_cross_validate_calibrates_each_fold_on_its_inner_selection_set(tmp_path: Any) -> None:
    from milcell.data.splits import Fold
    from milcell.nn.model import create_mil_model
    from milcell.train.crossval import cross_validate, feature_subset

    ds = _feature_cohort(80)  # 2 folds: 40 training patients, 10 held out to calibrate on
    calls: list[Fold] = []

    def make(fold: Fold) -> Any:
        calls.append(fold)
        return feature_subset(ds, fold.train), feature_subset(ds, fold.val)

    def run(out: Any) -> Any:
        return cross_validate(
            lambda: create_mil_model(None, pooling="mean", in_dim=4),
            make,
            ds.labels,
            n_splits=2,
            batch_size=16,
            trainer_kwargs={"max_epochs": 2, "lr": 0.2, "progress": False},
            inner_fraction=0.25,
            calibrate="temperature",
            output_dir=out,
        )

    result = run(tmp_path)
    assert len(result.calibrators) == 2
    assert result.oof.calibrated is not None and result.oof.calibrated.shape == result.oof.probabilities.shape
    for row, record in zip(result.folds, result.calibrators, strict=True):
        for key in ("ece", "brier", "nll", "ece_calibrated", "brier_calibrated", "nll_calibrated"):
            assert math.isfinite(row[key])
        assert row["temperature"] == pytest.approx(Calibrator.from_dict(record).temperature)
    # The calibration set (the third make_datasets call per fold) lies in the training fold, never in
    # the reported one, and is disjoint from what the model trained on.
    for i in range(2):
        fit_fold, select_fold, cal_fold = calls[3 * i : 3 * i + 3]
        assert np.array_equal(cal_fold.val, select_fold.val)
        assert not set(cal_fold.val.tolist()) & set(fit_fold.val.tolist())
        assert not set(cal_fold.val.tolist()) & set(fit_fold.train.tolist())
    # Calibrated OOF rows are the fold calibrators applied to the raw rows.
    fold0 = result.oof.fold == 0
    expected = Calibrator.from_dict(result.calibrators[0]).transform_probabilities(
        result.oof.probabilities[fold0].astype(np.float64)
        / result.oof.probabilities[fold0].sum(1, keepdims=True)
    )
    assert result.oof.calibrated[fold0] == pytest.approx(expected, abs=1e-5)
    # A resumed run loads the folds and calibrates them again, identically.
    again = run(tmp_path)
    assert again.calibrators == result.calibrators


def test_cross_validate_calibrate_arguments_are_checked() -> None:
    from milcell.data.splits import Fold
    from milcell.nn.model import create_mil_model
    from milcell.train.crossval import cross_validate, feature_subset

    ds = _feature_cohort(20)

    def make(fold: Fold) -> Any:
        return feature_subset(ds, fold.train), feature_subset(ds, fold.val)

    build = lambda: create_mil_model(None, pooling="mean", in_dim=4)  # noqa: E731
    fast = {"max_epochs": 1, "progress": False}
    with pytest.raises(ConfigError, match="calibrate"):
        cross_validate(build, make, ds.labels, n_splits=2, trainer_kwargs=fast, calibrate="isotonic")
    with pytest.raises(ConfigError, match="selection='inner'"):
        cross_validate(
            build,
            make,
            ds.labels,
            n_splits=2,
            trainer_kwargs=fast,
            calibrate="temperature",
            selection="outer",
        )
    # 20 patients, 2 folds: 10 training patients, 2 or 3 held out: too few to calibrate.
    with pytest.raises(CalibrationError, match="inner_fraction"):
        cross_validate(build, make, ds.labels, n_splits=2, trainer_kwargs=fast, calibrate="temperature")
