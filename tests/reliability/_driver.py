"""Training driver for the fault tests: run in a child process, killed with SIGKILL, then resumed.

Not a test module (its name does not start with ``test_``). The tests fork a child that calls
:func:`main`; as a script::

    python _driver.py train --out DIR --epochs 3 [--resume] [--pause-at E:B --marker FILE]
                            [--kill-write FILE:DIR:N] [--kill-at STEP:DIR:N] [--always-improve]
    python _driver.py cv --out DIR [--pause-at E:B --marker FILE --pause-fold K]

``train`` fits a tiny feature-bag MILModel (gated attention with dropout, shuffled
loader, StepLR) with ``Trainer(output_dir=DIR/run)`` and writes the final weights to
``DIR/final.safetensors``. ``cv`` runs a 3-fold :func:`cross_validate` with
``output_dir=DIR/cv`` and writes ``DIR/cv_result.json`` and the folds it trained
to ``DIR/cv_calls.txt``.

Faults:

``--pause-at E:B --marker FILE``
    After batch ``B`` (0-based) of epoch ``E`` (1-based) write ``FILE`` and sleep,
    so the test kills the process in the middle of that epoch.
``--kill-write FILE:DIR:N``
    On the ``N``-th checkpoint save into ``checkpoints/DIR`` (``last`` or ``best``),
    write only half of ``FILE`` (``state`` = training_state.pt, ``weights`` =
    model.safetensors), then SIGKILL the process itself.
``--kill-at STEP:DIR:N``
    On the ``N``-th checkpoint save into ``checkpoints/DIR``, SIGKILL the process
    right after publish step ``STEP`` (a name passed to
    ``milcell.train.checkpoint._reached``, e.g. ``committed``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from milcell.data import FeatureBagDataset
from milcell.nn.model import create_mil_model
from milcell.train import Trainer
from milcell.train.crossval import cross_validate, feature_subset
from milcell.train.distributed import make_loader

D = 6


def dataset(n: int = 16) -> FeatureBagDataset:
    g = torch.Generator().manual_seed(0)
    labels = [i % 2 for i in range(n)]
    feats = [torch.randn(3 + i % 4, D, generator=g) + 0.8 * y for i, y in enumerate(labels)]
    return FeatureBagDataset(feats, labels=labels, ids=[f"P{i:02d}" for i in range(n)])


def build_model() -> torch.nn.Module:
    return create_mil_model(
        None, pooling="gated_attention", in_dim=D, pooling_kwargs={"hidden": 8, "dropout": 0.3}
    )


class Pause:
    """Write a marker and sleep after a given batch, so a SIGKILL lands mid-epoch."""

    def __init__(self, epoch: int, batch: int, marker: Path) -> None:
        self.epoch, self.batch, self.marker = epoch, batch, marker

    def on_batch_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        if trainer.epoch == self.epoch and int(logs["batch"]) == self.batch:
            self.marker.write_text(f"{trainer.epoch}:{int(logs['batch'])}\n")
            time.sleep(600)


def install_write_kill(spec: str) -> None:
    """Make the ``N``-th save into ``checkpoints/DIR`` die half-way through ``FILE``."""
    which, folder, nth = spec.split(":")
    counts: dict[str, int] = {}
    original_torch_save = torch.save
    original_save_model = safetensors.torch.save_model

    def die_half_way(filename: Any) -> None:
        path = Path(filename)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    def counted(filename: Any, kind: str) -> bool:
        parent = Path(filename).parent.parent.name  # checkpoints/DIR/<version folder>/FILE
        if kind == "state":  # the first file of every checkpoint save
            counts[parent] = counts.get(parent, 0) + 1
        return kind == which and parent == folder and counts.get(parent, 0) == int(nth)

    def torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        original_torch_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)) and counted(f, "state"):
            die_half_way(f)

    def save_model(model: torch.nn.Module, filename: str, *args: Any, **kwargs: Any) -> None:
        original_save_model(model, filename, *args, **kwargs)
        if counted(filename, "weights"):
            die_half_way(filename)

    torch.save = torch_save  # type: ignore[assignment]
    safetensors.torch.save_model = save_model


def install_step_kill(spec: str) -> None:
    """SIGKILL the process right after publish step ``STEP`` of the ``N``-th save into ``checkpoints/DIR``."""
    from milcell.train import checkpoint

    step, folder, nth = spec.split(":")
    counts: dict[str, int] = {}

    def reached(name: str, directory: Path) -> None:
        if name == "version folder created":  # the first step of every save
            counts[directory.name] = counts.get(directory.name, 0) + 1
        if name == step and directory.name == folder and counts.get(folder, 0) == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._reached = reached  # type: ignore[assignment]


def train(args: argparse.Namespace) -> None:
    out = Path(args.out)
    ds = dataset()
    torch.manual_seed(11 if args.resume else 0)  # a resumed run must not depend on its own init
    model = build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    callbacks = []
    if args.pause_at:
        epoch, batch = (int(x) for x in args.pause_at.split(":"))
        callbacks.append(Pause(epoch, batch, Path(args.marker)))
    trainer = Trainer(
        model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.8),
        max_epochs=args.epochs,
        output_dir=out / "run",
        progress=False,
        seed=5,
        callbacks=callbacks,
        # "epoch" always grows: every epoch improves and writes ``best`` (the kill targets need it).
        monitor="epoch" if args.always_improve else "val_loss",
        mode="max" if args.always_improve else None,
    )
    last = out / "run" / "checkpoints" / "last"
    trainer.fit(
        make_loader(ds, 4, shuffle=True, seed=3),
        make_loader(ds, 8, shuffle=False),
        resume_from=last if args.resume else None,
    )
    safetensors.torch.save_model(model, str(out / "final.safetensors"))


def cv(args: argparse.Namespace) -> None:
    out = Path(args.out)
    ds = dataset(12)
    out.mkdir(parents=True, exist_ok=True)
    calls = out / "cv_calls.txt"

    def make(fold: Any) -> tuple[FeatureBagDataset, FeatureBagDataset]:
        with open(calls, "a", encoding="utf-8") as fh:
            fh.write(f"{fold.fold}\n")
        return feature_subset(ds, fold.train), feature_subset(ds, fold.val)

    def callbacks(fold: Any) -> list[Pause]:
        if args.pause_at and fold.fold == args.pause_fold:
            epoch, batch = (int(x) for x in args.pause_at.split(":"))
            return [Pause(epoch, batch, Path(args.marker))]
        return []

    result = cross_validate(
        build_model,
        make,
        ds.labels,
        n_splits=3,
        batch_size=3,
        trainer_kwargs={"max_epochs": 3, "lr": 0.02, "progress": False},
        output_dir=out / "cv",
        callbacks_factory=callbacks,
    )
    record = {
        "folds": result.folds,
        "histories": result.histories,
        "oof": result.oof.probabilities.tolist(),
        "ids": result.oof.ids,
    }
    (out / "cv_result.json").write_text(json.dumps(record), encoding="utf-8")


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "cv"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause-at")
    parser.add_argument("--pause-fold", type=int, default=1)
    parser.add_argument("--marker")
    parser.add_argument("--kill-write")
    parser.add_argument("--kill-at")
    parser.add_argument("--always-improve", action="store_true")
    args = parser.parse_args(argv)
    if args.kill_write:
        install_write_kill(args.kill_write)
    if args.kill_at:
        install_step_kill(args.kill_at)
    train(args) if args.mode == "train" else cv(args)


if __name__ == "__main__":
    main(sys.argv[1:])
