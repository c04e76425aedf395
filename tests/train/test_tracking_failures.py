"""Tracking runs an error interrupts end FAILED (KILLED: an interrupt, a pruned trial), never RUNNING."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from milcell.data import FeatureBagDataset
from milcell.nn.model import create_mil_model
from milcell.train import Trainer, make_loader
from milcell.train.callbacks import Callback
from milcell.train.crossval import cross_validate, feature_subset
from milcell.train.loggers import MLflowLogger, error_status, finish_on_error
from tests._factories import MemoryLogger as Memory
from tests._factories import make_bags

pytestmark = pytest.mark.usefixtures("one_thread")


class Boom(RuntimeError):
    pass


def _dataset() -> FeatureBagDataset:
    bags = make_bags([3, 4, 2, 5] * 3, dim=4, signal=1.0, seed=1)
    return FeatureBagDataset(
        [b.instances for b in bags], labels=[int(b.label) for b in bags], ids=[b.id for b in bags]
    )


def _cv(loggers: list[Any], build_model: Any = None, callbacks: list[Any] | None = None) -> Any:
    ds = _dataset()
    return cross_validate(
        build_model or (lambda: create_mil_model(None, pooling="mean", in_dim=4)),
        lambda fold: (feature_subset(ds, fold.train), feature_subset(ds, fold.val)),
        np.asarray(ds.labels),
        n_splits=3,
        batch_size=4,
        trainer_kwargs={"max_epochs": 1, "lr": 0.05, "progress": False},
        loggers=loggers,
        callbacks_factory=None if callbacks is None else (lambda fold: callbacks),
    )


def _fails_on_call(n: int) -> Any:
    """A build function whose ``n``-th call (the ``n``-th fold's model) raises :class:`Boom`."""
    calls = {"n": 0}

    def build() -> torch.nn.Module:
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"model of fold {n} cannot be built")
        return create_mil_model(None, pooling="mean", in_dim=4)

    return build


def _mlflow_runs(lg: MLflowLogger) -> dict[str, Any]:
    """Name -> run of the logger's experiment."""
    return {r.info.run_name: r for r in lg.client.search_runs([lg.experiment_id])}


def test_a_fold_that_raises_fails_the_mlflow_parent_and_its_child_and_the_error_propagates(
    tmp_path: Path,
) -> None:
    pytest.importorskip("mlflow", reason="MLflowLogger needs mlflow (pip install 'milcell[track]')")
    lg = MLflowLogger(tmp_path, name="cv")
    with pytest.raises(Boom, match="fold 2"):
        _cv([lg], build_model=_fails_on_call(2))
    runs = _mlflow_runs(lg)
    assert set(runs) == {"cv", "fold_0_0", "fold_0_1"}  # fold 3 never started
    assert runs["cv"].info.status == "FAILED"
    assert runs["fold_0_1"].info.status == "FAILED"
    assert runs["fold_0_1"].data.tags["mlflow.parentRunId"] == runs["cv"].info.run_id
    assert runs["fold_0_0"].info.status == "FINISHED"  # it ended before the error
    assert not lg.active and lg.finished


def test_an_interrupt_kills_the_runs_and_a_callers_parent_is_left_to_the_caller() -> None:
    class Interrupt(Callback):
        def on_epoch_end(self, trainer: Any, logs: Any) -> None:
            raise KeyboardInterrupt

    mine, theirs = Memory("mine"), Memory("theirs").start()
    with pytest.raises(KeyboardInterrupt):
        _cv([mine, theirs], callbacks=[Interrupt()])
    assert mine.status == "KILLED" and not mine.active
    assert [c.status for c in mine.children] == ["KILLED"]
    assert [c.status for c in theirs.children] == ["KILLED"]
    # Started by the caller: still open (as on success), for the caller to close.
    assert theirs.active and theirs.status is None


def test_noisy_student_fails_its_runs_when_a_student_cannot_be_built() -> None:
    from milcell.train.noisy_student import noisy_student

    def teacher() -> torch.nn.Module:
        return create_mil_model(None, pooling="mean", in_dim=4)

    def student() -> torch.nn.Module:
        raise Boom("student cannot be built")

    labelled = make_bags([3] * 8, dim=4, signal=1.0, seed=2)
    unlabelled = make_bags([3] * 6, dim=4, signal=1.0, seed=3, labels=[-1] * 6, prefix="U")
    parent = Memory()
    with pytest.raises(Boom):
        noisy_student(
            teacher, student, labelled, unlabelled, labelled, iterations=1, batch_size=4,
            trainer_kwargs={"max_epochs": 1, "lr": 0.05}, loggers=[parent],
        )  # fmt: skip
    assert parent.status == "FAILED"
    assert [(c.name, c.status) for c in parent.children] == [("teacher", "FINISHED"), ("student_1", "FAILED")]


def test_train_run_fails_its_tracking_runs_and_a_pruned_trial_kills_them(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="MLflowLogger needs mlflow (pip install 'milcell[track]')")
    from mlflow.tracking import MlflowClient

    from milcell.data.formats.dlmi import load_dlmi
    from milcell.data.synthetic import make_cohort
    from milcell.runs import train_run
    from milcell.tune import TrialReporter

    class SecondFoldFails(Callback):
        def __init__(self) -> None:
            self.fits = 0

        def on_fit_start(self, trainer: Any, logs: Any) -> None:
            self.fits += 1
            if self.fits == 2:
                raise Boom("fold 2 broke")

    root = make_cohort(tmp_path / "dlmi", n_patients=12, seed=0, image_size=32, bag_size=(2, 3))
    common: dict[str, Any] = {
        "folds": 2, "epochs": 1, "batch_size": 2, "image_size": 32, "max_instances": 2,
        "figures": False, "device": "cpu", "pooling": "mean", "backbone": "milcell_mini_resnet_k8",
        "loggers": ["mlflow"],
    }  # fmt: skip
    pruned = TrialReporter("balanced_accuracy", lambda value, step: True, RuntimeError)
    cases = [("failed", SecondFoldFails(), Boom, "FAILED"), ("pruned", pruned, RuntimeError, "KILLED")]
    for name, callback, error, status in cases:
        out = tmp_path / name
        with pytest.raises(error):
            train_run(load_dlmi(root, "train"), out, callbacks=[callback], **common)
        client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
        experiment = client.get_experiment_by_name("milcell")
        runs = {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}
        if name == "failed":
            assert runs == {name: "FAILED", "fold_0_0": "FINISHED", "fold_0_1": "FAILED"}
        else:  # pruned after the first epoch: stopped, not broken
            assert runs == {name: status, "fold_0_0": status}


def test_error_status_and_a_run_that_cannot_be_closed(caplog: pytest.LogCaptureFixture) -> None:
    pruned = RuntimeError("pruned")
    pruned.tracking_status = "KILLED"  # type: ignore[attr-defined]
    assert [error_status(e) for e in (ValueError(), KeyboardInterrupt(), SystemExit(0), pruned)] == [
        "FAILED",
        "KILLED",
        "KILLED",
        "KILLED",
    ]

    class Unreachable(Memory):
        def _close(self, status: str) -> None:
            raise ConnectionError("tracking server gone")

    broken, fine = Unreachable("broken").start(), Memory("fine").start()
    done = Memory("done").start()
    done.finish()
    with pytest.raises(Boom), finish_on_error(fine, broken, done):
        raise Boom("the error that matters")
    assert fine.status == "FAILED" and not fine.active
    assert done.status == "FINISHED"  # finished before the error: left as it was
    assert broken.active and "could not close" in caplog.text and "tracking server gone" in caplog.text
    with finish_on_error(fine := Memory("ok").start()):
        pass
    assert fine.active  # no error: nothing is closed


class _RaiseAtEpoch(Callback):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def on_epoch_end(self, trainer: Any, logs: Any) -> None:
        raise self.error


@pytest.mark.parametrize(("error", "status"), [(Boom("epoch 1"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_bare_trainer_closes_its_logger_when_fit_raises(error: BaseException, status: str) -> None:
    ds = _dataset()
    lg = Memory("bare")
    trainer = Trainer(
        create_mil_model(None, pooling="mean", in_dim=4),
        max_epochs=2,
        progress=False,
        callbacks=[lg, _RaiseAtEpoch(error)],
    )
    with pytest.raises(type(error)):
        trainer.fit(make_loader(ds, batch_size=4, shuffle=False))
    assert (lg.finished, lg.status) == (True, status)


def test_bare_trainer_leaves_its_logger_open_after_a_normal_fit() -> None:
    lg = Memory("bare")
    Trainer(
        create_mil_model(None, pooling="mean", in_dim=4), max_epochs=1, progress=False, callbacks=[lg]
    ).fit(make_loader(_dataset(), batch_size=4, shuffle=False))
    assert lg.active and not lg.finished and lg.status is None
    lg.finish()
    assert lg.status == "FINISHED"


def test_a_failing_error_hook_does_not_hide_the_training_error(caplog: pytest.LogCaptureFixture) -> None:
    class BadHook(Callback):
        def on_fit_error(self, trainer: Any, error: BaseException) -> None:
            raise OSError("tracking server gone")

    trainer = Trainer(
        create_mil_model(None, pooling="mean", in_dim=4),
        max_epochs=1,
        progress=False,
        callbacks=[BadHook(), _RaiseAtEpoch(Boom("epoch 1"))],
    )
    with caplog.at_level("WARNING", logger="milcell"), pytest.raises(Boom):
        trainer.fit(make_loader(_dataset(), batch_size=4, shuffle=False))
    assert "tracking server gone" in caplog.text
