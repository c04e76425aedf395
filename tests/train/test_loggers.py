"""Experiment loggers (CSV, TensorBoard, MLflow) as trainer callbacks and in cross_validate / train_run."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from milcell.data import FeatureBagDataset
from milcell.exceptions import ConfigError
from milcell.nn.model import create_mil_model
from milcell.train.crossval import cross_validate, feature_subset
from milcell.train.loggers import (
    CSVLogger,
    MLflowLogger,
    TensorBoardLogger,
    make_loggers,
    parse_logger_names,
)
from tests._factories import MemoryLogger as Memory
from tests._factories import make_bags

EPOCHS = 2


def _dataset() -> FeatureBagDataset:
    bags = make_bags([3, 4, 2, 5] * 4, dim=4, signal=1.0, seed=1)
    return FeatureBagDataset(
        [b.instances for b in bags], labels=[int(b.label) for b in bags], ids=[b.id for b in bags]
    )


def _cv(loggers, output_dir=None):  # type: ignore[no-untyped-def]
    ds = _dataset()
    return cross_validate(
        lambda: create_mil_model(None, pooling="mean", in_dim=4),
        lambda fold: (feature_subset(ds, fold.train), feature_subset(ds, fold.val)),
        np.asarray(ds.labels),
        n_splits=2,
        batch_size=4,
        trainer_kwargs={"max_epochs": EPOCHS, "lr": 0.05, "progress": False},
        output_dir=output_dir,
        loggers=loggers,
    )


def _epoch_rows(lg: Memory) -> str:
    """The epoch rows as JSON (NaN metrics, e.g. an undefined npv, then compare equal)."""
    return _json([row for step, row in lg.metrics if step is not None])


def _json(rows) -> str:  # type: ignore[no-untyped-def]
    return json.dumps([{k: float(v) for k, v in row.items()} for row in rows])


def test_cross_validate_logs_a_parent_and_one_child_per_fold(tmp_path: Path) -> None:
    parent = Memory()
    result = _cv([parent])
    assert parent.status == "FINISHED" and not parent.active
    assert parent.params["cross_validation"]["n_splits"] == 2  # type: ignore[index]
    summary = parent.metrics[-1][1]
    assert summary["balanced_accuracy_mean"] == pytest.approx(result.summary["balanced_accuracy"][0])
    assert [c.name for c in parent.children] == ["fold_0_0", "fold_0_1"]
    for child, history, row in zip(parent.children, result.histories, result.folds, strict=True):
        assert child.status == "FINISHED"
        assert child.params["repeat"] == 0 and "trainer" in child.params
        assert child.params["trainer"]["max_epochs"] == EPOCHS  # type: ignore[index]
        assert _epoch_rows(child) == _json(history)  # live, one row per epoch
        assert child.metrics[-1][1]["auc"] == row["auc"]


def test_a_started_parent_is_left_open_and_loaded_folds_are_logged_from_their_history(tmp_path: Path) -> None:
    first = _cv([], output_dir=tmp_path)
    parent = Memory().start({"run": "mine"})
    again = _cv([parent], output_dir=tmp_path)  # every fold loaded from disk
    assert parent.active and parent.status is None
    assert [_epoch_rows(c) for c in parent.children] == [_json(h) for h in first.histories]
    assert first.histories[0][0]["val_loss"] == again.histories[0][0]["val_loss"]


def test_csv_logger_writes_epoch_rows_but_never_over_the_trainers_file(tmp_path: Path) -> None:
    lg = CSVLogger(tmp_path / "csv")
    result = _cv([lg])
    for k, history in enumerate(result.histories):
        with open(tmp_path / "csv" / f"fold_0_{k}" / "metrics.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert [float(r["val_loss"]) for r in rows] == [h["val_loss"] for h in history]
    assert not (tmp_path / "csv" / "metrics.csv").exists()  # summaries are not epoch rows
    # Pointed at the folder where cross_validate's trainers write, it leaves their files alone.
    _cv([], output_dir=tmp_path / "cv")
    before = {p: p.read_bytes() for p in (tmp_path / "cv").rglob("metrics.csv")}
    _cv([CSVLogger(tmp_path / "cv")], output_dir=tmp_path / "cv")
    assert {p: p.read_bytes() for p in (tmp_path / "cv").rglob("metrics.csv")} == before


@pytest.mark.slow
def test_mlflow_logger_nests_fold_runs_under_the_parent(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="MLflowLogger needs mlflow (pip install 'milcell[track]')")
    lg = MLflowLogger(tmp_path, name="cv")
    result = _cv([lg])
    client = lg.client
    parent = client.get_run(lg.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["auc_mean"] == pytest.approx(result.summary["auc"][0])
    assert parent.data.params["cross_validation.n_splits"] == "2"
    children = client.search_runs([lg.experiment_id], f"tags.mlflow.parentRunId = '{lg.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["fold_0_0", "fold_0_1"]
    for child in children:
        k = int(child.info.run_name[-1])
        losses = client.get_metric_history(child.info.run_id, "val_loss")
        assert [m.value for m in sorted(losses, key=lambda m: m.step)] == pytest.approx(
            [h["val_loss"] for h in result.histories[k]]
        )
        assert [m.step for m in sorted(losses, key=lambda m: m.step)] == list(range(1, EPOCHS + 1))
        assert child.data.params["trainer.lr"] == "0.05"
    assert (tmp_path / "mlruns").is_dir()


def test_tensorboard_logger_writes_one_folder_per_fold(tmp_path: Path) -> None:
    pytest.importorskip(
        "tensorboard", reason="TensorBoardLogger needs tensorboard (pip install 'milcell[track]')"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _cv([TensorBoardLogger(tmp_path / "tb")])
    for k, history in enumerate(result.histories):
        events = EventAccumulator(str(tmp_path / "tb" / f"fold_0_{k}"))
        events.Reload()
        values = [e.value for e in events.Scalars("val_loss")]
        assert values == pytest.approx([h["val_loss"] for h in history])
        assert "params" in events.Tags()["tensors"] or "params/text_summary" in events.Tags()["tensors"]
    parent = EventAccumulator(str(tmp_path / "tb"))
    parent.Reload()
    assert parent.Scalars("auc_mean")[0].value == pytest.approx(result.summary["auc"][0])


def test_logger_names_and_missing_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_logger_names("csv, mlflow") == ["csv", "mlflow"]
    with pytest.raises(ConfigError, match="unknown logger 'wandb'"):
        parse_logger_names(["csv", "wandb"])
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"milcell\[track\]"):
        make_loggers(["mlflow"], tmp_path)
    with pytest.raises(ConfigError, match=r"'tensorboard' package.*milcell\[track\]"):
        make_loggers("tensorboard", tmp_path)
    with pytest.raises(ConfigError, match="RunLogger"):
        _cv([object()])


def test_trainer_calls_fit_start_and_fit_end(tmp_path: Path) -> None:
    from milcell.train.distributed import make_loader
    from milcell.train.trainer import Trainer

    calls: list[str] = []

    class Hooks:
        def on_fit_start(self, trainer, logs):  # type: ignore[no-untyped-def]
            calls.append(f"start {logs['epoch']:.0f}")

        def on_fit_end(self, trainer, logs):  # type: ignore[no-untyped-def]
            calls.append(f"end {logs['epoch']:.0f} {logs['best_epoch']:.0f}")

    bags = make_bags([2, 3] * 4, dim=4)
    trainer = Trainer(
        create_mil_model(None, pooling="mean", in_dim=4),
        max_epochs=2,
        progress=False,
        callbacks=[Hooks()],
        monitor="train_loss",
    )
    torch.manual_seed(0)
    trainer.fit(make_loader(bags, 4, shuffle=True))
    assert calls[0] == "start 0" and calls[1].startswith("end 2 ")


@pytest.mark.slow
def test_importing_milcell_loads_no_tracking_or_tuning_package() -> None:
    code = (
        "import sys, json, milcell, milcell.train.loggers, milcell.tune, milcell.cli, milcell.runs\n"
        "print(json.dumps(sorted(m for m in ('mlflow', 'optuna', 'ray', 'tensorboard') if m in sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_cli_train_with_loggers_tracks_the_run_and_leaves_its_files_as_they_were(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="--logger mlflow needs mlflow (pip install 'milcell[track]')")
    pytest.importorskip(
        "tensorboard", reason="--logger tensorboard needs tensorboard (pip install 'milcell[track]')"
    )
    import yaml

    from milcell.cli import main
    from milcell.data.synthetic import make_cohort

    dlmi = make_cohort(tmp_path / "dlmi", n_patients=12, seed=0, image_size=32, bag_size=(2, 3))
    common = ["train", "--data-dir", str(dlmi), "--format", "dlmi", "--image-size", "32", "--folds", "2"]
    common += ["--epochs", "1", "--batch-size", "2", "--device", "cpu", "--no-progress", "--backbone"]
    common += ["milcell_mini_resnet_k8", "--pooling", "mean"]
    assert main([*common, "--output-dir", str(tmp_path / "plain")]) == 0
    tracked = tmp_path / "tracked"
    argv = [*common, "--output-dir", str(tracked), "--logger", "csv", "--logger", "mlflow,tensorboard"]
    assert main(argv) == 0

    def files(root: Path) -> set[str]:  # checkpoint versions have random suffixes
        return {
            re.sub(r"/v\d+-\w+/", "/v/", str(p.relative_to(root))) for p in root.rglob("*") if p.is_file()
        }

    assert files(tmp_path / "plain") == {
        f for f in files(tracked) if not f.startswith(("mlruns", "tensorboard"))
    }
    assert yaml.safe_load((tracked / "config.yaml").read_text())["logger"] == "csv,mlflow,tensorboard"
    plain = json.loads((tmp_path / "plain" / "run.json").read_text())["summary"]
    assert json.loads((tracked / "run.json").read_text())["summary"] == plain

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("milcell")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "tracked")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["fold_0_0", "fold_0_1"]
    assert parent.data.params["run.pooling"] == "mean"
    assert parent.data.metrics["auc_mean"] == pytest.approx(plain["auc"][0])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"run.json", "config.yaml", "models", "folds.csv"} <= artifacts
    assert any((tracked / "tensorboard" / "fold_0_1").iterdir())


def test_noisy_student_logs_a_child_run_per_model() -> None:
    from milcell.train.noisy_student import noisy_student

    def build() -> torch.nn.Module:
        return create_mil_model(None, pooling="mean", in_dim=4)

    labelled = make_bags([3] * 8, dim=4, signal=1.0, seed=2)
    unlabelled = make_bags([3] * 6, dim=4, signal=1.0, seed=3, labels=[-1] * 6, prefix="U")
    parent = Memory()
    result = noisy_student(
        build, build, labelled, unlabelled, labelled, iterations=1, batch_size=4,
        trainer_kwargs={"max_epochs": 2, "lr": 0.05}, loggers=[parent],
    )  # fmt: skip
    assert parent.status == "FINISHED" and parent.params["noisy_student"]["iterations"] == 1  # type: ignore[index]
    assert [c.name for c in parent.children] == ["teacher", "student_1"]
    for child, history, row in zip(parent.children, result.histories, result.iterations, strict=True):
        assert child.status == "FINISHED" and _epoch_rows(child) == _json(history)
        assert child.metrics[-1][1]["val_auc"] == row["val_auc"]
    assert parent.children[1].metrics[-1][1]["pseudo_n_kept"] == result.pseudo_label_stats[0]["n_kept"]
    assert parent.metrics[-1][1] == result.iterations[-1]
