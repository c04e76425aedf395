"""milcell.tune: the search space, the Optuna and Ray backends, and ``milcell tune`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from milcell.exceptions import ConfigError
from milcell.tune import SearchSpace, TrialReporter, optimize

SPACE = {
    "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    "inner_fraction": {"type": "uniform", "low": 0.1, "high": 0.3},
    "max_instances": {"type": "int", "low": 8, "high": 64, "log": True},
    "epochs": {"type": "int", "low": 2, "high": 8, "step": 2},
    "pooling": {"type": "categorical", "choices": ["mean", "attention"]},
}


def test_space_validation_names_the_entry() -> None:
    for spec, match in [
        ({"lr": {"type": "gauss"}}, "type must be one of"),
        ({"lr": {"type": "loguniform", "low": 0, "high": 1}}, "low > 0"),
        ({"lr": {"type": "uniform", "low": 1, "high": 1}}, "must be below"),
        ({"lr": {"type": "uniform", "low": "a", "high": 1}}, "finite number"),
        ({"epochs": {"type": "int", "low": 1.5, "high": 3}}, "whole numbers"),
        ({"pooling": {"type": "categorical", "choices": []}}, "non-empty list"),
        ({"pooling": {"type": "categorical", "choices": ["a"], "low": 1}}, "unknown key"),
        ({}, "non-empty mapping"),
    ]:
        with pytest.raises(ConfigError, match=match):
            SearchSpace.from_mapping(spec)


def test_space_draws_stay_in_bounds_for_optuna_and_the_plain_sampler() -> None:
    optuna = pytest.importorskip(
        "optuna", reason="the Optuna backend needs optuna (pip install 'milcell[tune]')"
    )
    space = SearchSpace.from_mapping(SPACE)
    fixed = {"lr": 1e-3, "inner_fraction": 0.2, "max_instances": 16, "epochs": 4, "pooling": "mean"}
    assert space.suggest(optuna.trial.FixedTrial(fixed)) == fixed
    for seed in range(5):
        draw = space.sample(seed)
        assert 1e-4 <= draw["lr"] <= 1e-2 and 0.1 <= draw["inner_fraction"] <= 0.3
        assert 8 <= draw["max_instances"] <= 64 and draw["epochs"] in (2, 4, 6, 8)
        assert draw["pooling"] in ("mean", "attention")


def test_space_translates_to_ray_domains() -> None:
    pytest.importorskip("ray.tune", reason="the Ray backend needs ray[tune] (pip install 'milcell[ray]')")
    from ray.tune.search.sample import Categorical, Float, Integer

    domains = SearchSpace.from_mapping(SPACE).to_ray()
    assert isinstance(domains["lr"], Float) and (domains["lr"].lower, domains["lr"].upper) == (1e-4, 1e-2)
    assert type(domains["lr"].get_sampler()).__name__.lstrip("_") == "LogUniform"
    assert type(domains["inner_fraction"].get_sampler()).__name__.lstrip("_") == "Uniform"
    # Ray's integer upper bound is exclusive: 64 must stay reachable.
    assert isinstance(domains["max_instances"], Integer) and domains["max_instances"].upper == 65
    assert type(domains["max_instances"].get_sampler()).__name__.lstrip("_") == "LogUniform"
    assert domains["epochs"].get_sampler().q == 2
    assert isinstance(domains["pooling"], Categorical) and domains["pooling"].categories == [
        "mean",
        "attention",
    ]


class _Trainer:
    max_epochs = 3


def _fake_trial(params: dict, folder: Path, reporter: TrialReporter) -> float:
    """A trial without training: two folds of three epochs whose value is the parameter ``x``."""
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        reporter.on_fit_start(_Trainer(), {})
        for epoch in (1, 2, 3):
            reporter.on_epoch_end(_Trainer(), {"epoch": epoch, "val_auc": params["x"] * epoch / 3})
    (folder / "done").write_text("1")
    return float(params["x"])


def test_optuna_study_prunes_resumes_and_keeps_the_best(tmp_path: Path) -> None:
    optuna = pytest.importorskip(
        "optuna", reason="the Optuna backend needs optuna (pip install 'milcell[tune]')"
    )
    space = {"x": {"type": "uniform", "low": 0.0, "high": 1.0}}
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    first = optimize(_fake_trial, space, tmp_path, metric="auc", n_trials=6, pruner=pruner, seed=1)
    assert len(first.trials) == 6
    states = [t["state"] for t in first.trials]
    complete = [t for t in first.trials if t["state"] == "complete"]
    assert first.best_value == max(t["value"] for t in complete) == first.best_params["x"]
    # A pruned trial stopped before its end: no "done" file; every complete one has it.
    for trial in first.trials:
        assert (tmp_path / "trials" / trial["name"] / "done").exists() == (trial["state"] == "complete")
    # Values grow with x at every step, so the median rule prunes exactly the trials whose x is below the
    # median x of the trials completed before them (from the third trial on).
    assert "pruned" in states
    for k, trial in enumerate(first.trials[2:], start=2):
        earlier = [t["params"]["x"] for t in first.trials[:k] if t["state"] == "complete"]
        below = trial["params"]["x"] < float(np.median(earlier))
        assert (trial["state"] == "pruned") == below, (k, trial, earlier)
    # Rerunning continues the study (study.db): 6 finished trials already, 2 more to reach 8.
    again = optimize(_fake_trial, space, tmp_path, metric="auc", n_trials=8, pruner=pruner, seed=1)
    assert len(again.trials) == 8 and [t["params"] for t in again.trials[:6]] == [
        t["params"] for t in first.trials
    ]
    assert json.loads((tmp_path / "best.json").read_text())["best_value"] == again.best_value


def test_reporter_stops_a_pruned_trial() -> None:
    class Pruned(Exception):
        pass

    reporter = TrialReporter("balanced_accuracy", lambda value, step: step >= 2, Pruned)
    reporter.on_fit_start(_Trainer(), {})
    reporter.on_epoch_end(_Trainer(), {"epoch": 1, "val_balanced_accuracy": 0.5})
    reporter.on_epoch_end(_Trainer(), {"epoch": 2, "val_balanced_accuracy": math.nan})  # not reported
    with pytest.raises(Pruned):
        reporter.on_epoch_end(_Trainer(), {"epoch": 2, "val_balanced_accuracy": 0.5})


@pytest.mark.slow
def test_ray_backend_runs_the_same_space_and_objective(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="the Ray backend needs ray[tune] (pip install 'milcell[ray]')")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        space = {"x": {"type": "uniform", "low": 0.0, "high": 1.0}}
        result = optimize(
            _fake_trial, space, tmp_path, metric="auc", n_trials=3, backend="ray", pruner="none"
        )
    finally:
        if started:
            ray.shutdown()
    assert result.backend == "ray" and len(result.trials) == 3
    assert result.best_value == max(t["value"] for t in result.trials) == result.best_params["x"]


# --------------------------------------------------------------------------- the command, end to end


@pytest.fixture(scope="module")
def dlmi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from milcell.data.synthetic import make_cohort

    return make_cohort(
        tmp_path_factory.mktemp("tune") / "dlmi", n_patients=20, seed=0, image_size=32, bag_size=(2, 4)
    )


@pytest.fixture(scope="module")
def cohort(dlmi: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from milcell.data.datasets import BagDataset
    from milcell.data.formats.dlmi import load_dlmi
    from milcell.nn.backbones import create_backbone
    from milcell.runs import Preprocessing
    from milcell.train.features import extract_features

    root = tmp_path_factory.mktemp("tune_cache")
    torch.manual_seed(0)
    backbone = create_backbone("milcell_mini_resnet_k8", trainable="head")
    transform = Preprocessing.from_backbone("milcell_mini_resnet_k8", 32).transform(train=False)
    extract_features(
        backbone,
        BagDataset(load_dlmi(dlmi, "all"), transform),
        root / "cache",
        progress=False,
        key_extra={"image_size": 32},
    )
    return {"dlmi": dlmi, "cache": root / "cache"}


@pytest.mark.slow
def test_cli_tune_writes_a_best_config_that_milcell_train_reproduces(
    cohort: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("optuna", reason="milcell tune needs optuna (pip install 'milcell[tune]')")
    from milcell.cli import main

    out = tmp_path / "study"
    search = {
        "train": {
            "data-dir": str(cohort["dlmi"]),
            "format": "dlmi",
            "features": str(cohort["cache"]),
            "image-size": 32,
            "folds": 2,
            "epochs": 2,
            "batch-size": 2,
            "device": "cpu",
            "seed": 3,
        },
        "space": {
            "lr": {"type": "loguniform", "low": 1e-3, "high": 3e-2},
            "pooling": {"type": "categorical", "choices": ["mean", "attention"]},
        },
        "n-trials": 2,
        "metric": "auc",
        "output-dir": str(out),
    }
    file = tmp_path / "space.yaml"
    file.write_text(yaml.safe_dump(search))
    assert main(["tune", "--config", str(file)]) == 0
    assert "rerun it with: milcell train --config" in capsys.readouterr().out
    best = json.loads((out / "best.json").read_text())
    saved = yaml.safe_load((out / "best" / "config.yaml").read_text())
    assert saved["lr"] == best["best_params"]["lr"] and saved["pooling"] == best["best_params"]["pooling"]
    trial_run = json.loads((out / "trials" / best["best_trial"] / "run.json").read_text())
    assert trial_run["summary"]["auc"][0] == best["best_value"]
    # The best configuration, rerun by `milcell train`, gives the trial's score exactly.
    assert main(["train", "--config", str(out / "best" / "config.yaml"), "--no-progress"]) == 0
    rerun = json.loads((out / "best" / "run.json").read_text())
    assert rerun["summary"]["auc"][0] == best["best_value"]
    assert rerun["settings"] == trial_run["settings"]
    # A flag overrides the file; the study resumes (study.db): one more trial on top of the two.
    assert main(["tune", "--config", str(file), "--n-trials", "3"]) == 0
    assert len(json.loads((out / "best.json").read_text())["trials"]) == 3


def test_cli_tune_refuses_bad_files(dlmi: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from milcell.cli import main

    cases = [
        (
            {"space": {"lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "train": {"format": "dlmi"}},
            "data_dir",
        ),
        ({"train": {"data-dir": str(dlmi), "format": "dlmi"}}, "no 'space'"),
        ({"space": {"dropout": {"type": "uniform", "low": 0, "high": 1}}}, "not an option of a run"),
        ({"space": {"lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "trials": 3}, "unknown key"),
        (
            {"space": {"lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "train": {"epoch": 3}},
            "unknown key",
        ),
        (
            {
                "space": {"lr": {"type": "uniform", "low": 0.1, "high": 0.2}},
                "train": {"data-dir": str(dlmi), "format": "dlmi", "lr": 0.1},
            },
            "both in 'train' and in 'space'",
        ),
    ]
    for content, match in cases:
        file = tmp_path / "space.yaml"
        file.write_text(yaml.safe_dump(content))
        assert main(["tune", "--config", str(file), "--output-dir", str(tmp_path / "out")]) == 2
        assert match in capsys.readouterr().err
