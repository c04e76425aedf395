"""Tests of fit_model, schedulers given at construction, and numpy scalars as arguments in train/."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from milcell._utils import json_safe, write_dict_csv
from milcell.data import Bag, FeatureBagDataset
from milcell.exceptions import ConfigError
from milcell.nn.model import create_mil_model
from milcell.train.crossval import cross_validate, feature_subset
from milcell.train.distributed import make_loader
from milcell.train.features import extract_features
from milcell.train.fit import FitResult, fit_model
from milcell.train.noisy_student import noisy_student
from milcell.train.trainer import Trainer
from tests.train.test_trainer import MeanMIL, make_bags


def _loaders(n: int = 8) -> tuple[Any, Any]:
    bags = make_bags(n)
    return make_loader(bags, 4, shuffle=True, seed=0), make_loader(bags, 4, shuffle=False)


def _features(n: int = 8) -> FeatureBagDataset:
    g = torch.Generator().manual_seed(0)
    labels = [i % 2 for i in range(n)]
    return FeatureBagDataset([torch.randn(3, 4, generator=g) + y for y in labels], labels=labels)


# ---------------------------------------------------------------- numpy scalars


def test_trainer_accepts_numpy_scalars() -> None:
    # Regression: Trainer(model, max_epochs=np.int64(2)) raised ConfigError.
    trainer = Trainer(
        MeanMIL(),
        max_epochs=np.int64(2),
        accumulate_grad_batches=np.int32(1),
        patience=np.int64(3),
        lr=np.float32(0.05),
        gradient_clip_norm=np.float64(1.0),
        min_delta=np.float64(0.0),
        threshold=np.float32(0.5),
        seed=np.int64(3),
        progress=False,
    )
    assert type(trainer.max_epochs) is int and type(trainer.threshold) is float and trainer.seed == 3
    history = trainer.fit(*_loaders())
    assert len(history) == 2
    with pytest.raises(ConfigError, match="max_epochs must be an integer >= 1, got 1.5"):
        Trainer(MeanMIL(), max_epochs=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="lr must be a finite number >= 0.0, got nan"):
        Trainer(MeanMIL(), lr=math.nan)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        Trainer(MeanMIL(), seed=True)  # type: ignore[arg-type]


def test_loaders_features_crossval_and_noisy_student_accept_numpy_scalars() -> None:
    # Regression: make_loader, extract_features and noisy_student refused numpy integers.
    bags = make_bags(4)
    assert len(make_loader(bags, np.int64(2), shuffle=False, seed=np.int64(1))) == 2
    images = [Bag(torch.rand(3, 3, 4, 4), label=i % 2, id=f"P{i}") for i in range(3)]
    net = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(48, 5))
    ds = extract_features(net, images, None, batch_size=np.int64(2), chunk_size=np.int16(2), progress=False)
    assert ds[0].instances.shape == (3, 5)
    feats = _features(8)
    result = cross_validate(
        lambda: create_mil_model(None, pooling="mean", in_dim=4),
        lambda fold: (feature_subset(feats, fold.train), feature_subset(feats, fold.val)),
        feats.labels,
        n_splits=np.int64(2),
        n_repeats=np.int32(1),
        batch_size=np.int64(2),
        seed=np.int64(0),
        trainer_kwargs={"max_epochs": np.int64(1), "progress": False},
    )
    assert len(result.folds) == 2
    hidden = FeatureBagDataset(feats.features, labels=[-1] * len(feats))
    ns = noisy_student(
        lambda: create_mil_model(None, pooling="mean", in_dim=4),
        lambda: create_mil_model(None, pooling="mean", in_dim=4),
        feats,
        hidden,
        iterations=np.int64(1),
        batch_size=np.int64(4),
        threshold=np.float64(0.0),
        seed=np.int64(0),
        trainer_kwargs={"max_epochs": 1},
    )
    assert len(ns.models) == 2


# ---------------------------------------------------------------- schedulers at construction


def test_scheduler_factory_is_built_over_the_default_optimizer() -> None:
    trainer = Trainer(
        MeanMIL(),
        lr=0.1,
        max_epochs=3,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        progress=False,
    )
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.StepLR)
    assert trainer.scheduler.optimizer is trainer.optimizer
    history = trainer.fit(_loaders()[0])
    assert [row["lr"] for row in history] == pytest.approx([0.1, 0.05, 0.025])


def test_plateau_factory_is_stepped_with_the_monitor() -> None:
    trainer = Trainer(
        MeanMIL(),
        lr=0.1,
        max_epochs=3,
        monitor="val_balanced_accuracy",
        scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", patience=0, factor=0.5
        ),
        progress=False,
    )
    seen: list[float] = []
    original = trainer.scheduler.step  # type: ignore[union-attr]
    trainer.scheduler.step = lambda value=None: (seen.append(value), original(value))  # type: ignore[union-attr,method-assign]
    history = trainer.fit(*_loaders())
    assert seen == [row["val_balanced_accuracy"] for row in history]


def test_scheduler_errors() -> None:
    model = MeanMIL()
    other = torch.optim.SGD(MeanMIL().parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="another optimizer"):
        # Regression: the scheduler silently stepped an optimizer the trainer never used.
        Trainer(model, scheduler=torch.optim.lr_scheduler.StepLR(other, step_size=1))
    with pytest.raises(ConfigError, match="factory must return a learning-rate scheduler"):
        Trainer(model, scheduler=lambda opt: 0.5)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match="scheduler must be a learning-rate scheduler or a callable"):
        Trainer(model, scheduler="step")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ReduceLROnPlateau needs scheduler_interval='epoch'"):
        Trainer(
            model,
            scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
            scheduler_interval="step",
        )


def test_crossval_checks_a_plateau_factory_with_step_interval() -> None:
    # Regression: the fold scheduler was patched onto the trainer after construction, bypassing its
    # checks; a ReduceLROnPlateau stepped per batch failed inside training with a TypeError.
    feats = _features(8)
    with pytest.raises(ConfigError, match="ReduceLROnPlateau"):
        cross_validate(
            lambda: create_mil_model(None, pooling="mean", in_dim=4),
            lambda fold: (feature_subset(feats, fold.train), feature_subset(feats, fold.val)),
            feats.labels,
            n_splits=2,
            batch_size=2,
            trainer_kwargs={"max_epochs": 1, "progress": False, "scheduler_interval": "step"},
            build_scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
        )


# ---------------------------------------------------------------- fit_model


def test_fit_model_restores_the_best_weights() -> None:
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Snap:
        def on_epoch_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
            snapshots[int(logs["epoch"])] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    model = MeanMIL(dropout=0.3)
    fitted = fit_model(
        model,
        *_loaders(),
        trainer_kwargs={"max_epochs": 4, "lr": 0.5, "progress": False},
        callbacks=[Snap()],
    )
    assert isinstance(fitted, FitResult) and fitted.model is model and len(fitted.history) == 4
    best = fitted.trainer.best_epoch
    assert all(torch.equal(v, snapshots[best][k]) for k, v in model.state_dict().items())
    kept = fit_model(
        MeanMIL(), *_loaders(), trainer_kwargs={"max_epochs": 2, "progress": False}, restore_best=False
    )
    assert all(torch.equal(v, kept.trainer.model.state_dict()[k]) for k, v in kept.model.state_dict().items())


def test_fit_model_resumes_from_its_output_dir(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = fit_model(
        MeanMIL(), *_loaders(), trainer_kwargs={"max_epochs": 2, "progress": False}, output_dir=tmp_path
    )
    assert len(first.history) == 2
    again = fit_model(
        MeanMIL(),
        *_loaders(),
        trainer_kwargs={"max_epochs": 3, "progress": False},
        output_dir=tmp_path,
        resume=True,
    )
    assert [row["epoch"] for row in again.history] == [1, 2, 3]
    assert again.history[:2] == first.history


def test_fit_model_errors() -> None:
    for key in ("optimizer", "scheduler", "output_dir", "callbacks"):
        with pytest.raises(ConfigError, match=f"may not set \\['{key}'\\]"):
            fit_model(MeanMIL(), _loaders()[0], trainer_kwargs={key: None})
    with pytest.raises(ConfigError, match="build_optimizer must return a torch.optim.Optimizer"):
        fit_model(MeanMIL(), _loaders()[0], build_optimizer=lambda m: "adam")  # type: ignore[arg-type,return-value]


# ---------------------------------------------------------------- shared writers


def test_json_safe_and_crossval_records_survive_non_finite_values(tmp_path: Path) -> None:
    record = json_safe({"auc": math.nan, "n": np.int64(3), "ok": np.bool_(True), "rows": ({"x": -math.inf},)})
    assert record == {"auc": "nan", "n": 3, "ok": True, "rows": [{"x": "-inf"}]}
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    write_dict_csv([{"a": 1}, {"b": "x", "a": 2}], tmp_path / "rows.csv")
    assert (tmp_path / "rows.csv").read_text().splitlines() == ["a,b", "1,", "2,x"]
