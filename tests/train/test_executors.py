"""cross_validate(executor=...): folds in local processes or Ray tasks give the sequential result."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from milcell.data import FeatureBagDataset
from milcell.exceptions import ConfigError
from milcell.nn.model import create_mil_model
from milcell.train.crossval import cross_validate, feature_subset
from tests._factories import make_bags

N_BAGS = 16


def _dataset() -> FeatureBagDataset:
    bags = make_bags([3, 4, 2, 5] * (N_BAGS // 4), dim=4, signal=1.0, seed=3)
    return FeatureBagDataset(
        [b.instances for b in bags], labels=[int(b.label) for b in bags], ids=[b.id for b in bags]
    )


def build_model() -> torch.nn.Module:
    """Module level, so that it pickles for the process executor."""
    return create_mil_model(None, pooling="attention", in_dim=4)


def make_datasets(dataset: FeatureBagDataset, fold):  # type: ignore[no-untyped-def]
    return feature_subset(dataset, fold.train), feature_subset(dataset, fold.val)


def _run(executor: str, tmp_path=None, **options):  # type: ignore[no-untyped-def]
    dataset = _dataset()
    return cross_validate(
        build_model,
        functools.partial(make_datasets, dataset),
        np.asarray(dataset.labels),
        n_splits=2,
        batch_size=4,
        seed=5,
        trainer_kwargs={"max_epochs": 2, "lr": 0.05, "progress": False},
        output_dir=tmp_path,
        executor=executor,
        executor_options=options or None,
    )


def _assert_same(a, b) -> None:  # type: ignore[no-untyped-def]
    # (as JSON: NaN metrics, e.g. an undefined npv, compare equal)
    assert json.dumps(a.folds) == json.dumps(b.folds)
    assert json.dumps(a.histories) == json.dumps(b.histories)
    np.testing.assert_array_equal(a.oof.probabilities, b.oof.probabilities)
    assert a.oof.ids == b.oof.ids
    for m, n in zip(a.models, b.models, strict=True):
        for (k, v), (k2, w) in zip(m.state_dict().items(), n.state_dict().items(), strict=True):
            assert k == k2
            assert torch.equal(v, w), k


@pytest.mark.slow
def test_process_executor_matches_sequential(tmp_path) -> None:
    sequential = _run("sequential")
    in_processes = _run("process", tmp_path / "cv", max_workers=2)
    _assert_same(sequential, in_processes)
    # The folds were written by the workers: a rerun loads them (no training) and agrees again.
    assert sorted(p.name for p in (tmp_path / "cv").glob("fold_*")) == ["fold_0_0", "fold_0_1"]
    _assert_same(sequential, _run("process", tmp_path / "cv"))


def test_process_executor_refuses_what_does_not_pickle() -> None:
    dataset = _dataset()
    with pytest.raises(ConfigError, match="pickle"):
        cross_validate(
            lambda: build_model(),
            functools.partial(make_datasets, dataset),
            np.asarray(dataset.labels),
            n_splits=2,
            trainer_kwargs={"max_epochs": 1, "progress": False},
            executor="process",
        )


def test_unknown_executor_and_options() -> None:
    dataset = _dataset()
    common = {"n_splits": 2, "trainer_kwargs": {"max_epochs": 1, "progress": False}}
    with pytest.raises(ConfigError, match="executor"):
        cross_validate(
            build_model,
            functools.partial(make_datasets, dataset),
            np.asarray(dataset.labels),
            executor="threads",
            **common,
        )
    with pytest.raises(ConfigError, match="address"):
        cross_validate(
            build_model,
            functools.partial(make_datasets, dataset),
            np.asarray(dataset.labels),
            executor="process",
            executor_options={"address": "auto"},
            **common,
        )


@pytest.mark.slow
def test_ray_executor_matches_sequential() -> None:
    ray = pytest.importorskip("ray", reason="executor='ray' needs ray (pip install 'milcell[ray]')")
    started = not ray.is_initialized()
    try:
        _assert_same(_run("sequential"), _run("ray", init_kwargs={"num_cpus": 2}))
    finally:
        if started:
            ray.shutdown()
