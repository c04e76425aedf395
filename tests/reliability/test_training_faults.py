"""Training and inference never fail silently or cryptically (issue 10, items 12 and 17).

* A non-finite loss or gradient norm stops :meth:`Trainer.fit` with a :class:`TrainingError` naming
  the epoch, the first bad batch and its bags, and nothing of the poisoned epoch is saved: the
  checkpoint on disk stays the last good one. The check costs no per-step host-device sync: the
  step flags are read once per ``log_every_n_steps`` batches (the guard below proves it).
* :func:`milcell.train.inference.predict` (and ``Trainer.evaluate``) never return NaN
  probabilities: a :class:`DataError` names the bags.
* A milcell error raised inside a DataLoader worker reaches the user as its own one-line message;
  a worker killed by SIGKILL (what the out-of-memory killer sends) becomes a :class:`TrainingError`
  saying so, not ``exited unexpectedly`` or ``Connection reset by peer``.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

import milcell
from milcell.data import Bag, BagBatch
from milcell.exceptions import DataError, TrainingError
from milcell.nn.model import create_mil_model
from milcell.train.callbacks import LambdaCallback
from milcell.train.checkpoint import load_weights
from milcell.train.distributed import make_loader
from milcell.train.inference import predict
from milcell.train.trainer import Trainer

DIM = 4


class Out(NamedTuple):
    logits: Tensor
    attention: Tensor | None


class TinyMIL(nn.Module):
    """Mean pooling + a two-layer head over feature bags (follows MILModelLike)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(DIM, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, batch: BagBatch) -> Out:
        pooled = batch.pad(batch.instances).sum(1) / batch.bag_sizes.unsqueeze(1)
        return Out(self.head(torch.relu(self.hidden(pooled))), None)

    def loss(self, output: Out, batch: BagBatch, class_weights: Tensor | None = None) -> Tensor:
        return F.cross_entropy(output.logits.float(), batch.labels, ignore_index=-1)


class SqrtAtZero(TinyMIL):
    """A finite loss whose gradient is infinite: d sqrt(u)/du at u = 0."""

    def forward(self, batch: BagBatch) -> Out:
        out = super().forward(batch)
        return Out(out.logits + torch.sqrt(self.hidden.weight.sum() * 0.0), None)


def _bags(n: int = 8) -> list[Bag]:
    g = torch.Generator().manual_seed(0)
    return [Bag(torch.randn(3, DIM, generator=g) + i % 2, label=i % 2, id=f"P{i}") for i in range(n)]


def _loader(bags: Any, **kwargs: Any) -> Any:
    return make_loader(bags, 2, shuffle=False, distributed=False, **kwargs)


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values())


# ---------------------------------------------------------------------------- non-finite training


def test_lr_1e30_stops_at_the_first_bad_step_naming_epoch_batch_and_bags(tmp_path: Path) -> None:
    trainer = Trainer(TinyMIL(), lr=1e30, max_epochs=3, progress=False, output_dir=tmp_path)
    with pytest.raises(TrainingError) as info:
        trainer.fit(_loader(_bags()), _loader(_bags()))
    message = str(info.value)
    # step 1 is finite; its update sends the weights to ~1e30 and batch 2 (P2, P3) overflows
    assert "non-finite training loss at epoch 1, batch 2 (bags ['P2', 'P3'])" in message
    assert "lr=1e+30" in message and "\n" not in message
    assert not (tmp_path / "checkpoints").exists()  # nothing of the poisoned epoch was saved


def test_the_last_good_checkpoint_survives_a_diverging_epoch(tmp_path: Path) -> None:
    saved: dict[str, Tensor] = {}

    def diverge(trainer: Trainer, logs: Any) -> None:
        # end of epoch 1: remember the weights that are about to be saved, then break the lr
        saved.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        for group in trainer.optimizer.param_groups:
            group["lr"] = 1e30

    trainer = Trainer(
        TinyMIL(),
        lr=1e-2,
        max_epochs=3,
        progress=False,
        output_dir=tmp_path,
        log_every_n_steps=3,
        callbacks=[LambdaCallback(on_epoch_end=lambda t, logs: diverge(t, logs) if t.epoch == 1 else None)],
    )
    with pytest.raises(TrainingError, match=r"at epoch 2, batch 2 \(bags \['P2', 'P3'\]\)") as info:
        trainer.fit(_loader(_bags()), _loader(_bags()))
    last = tmp_path / "checkpoints" / "last"
    assert f"the last good checkpoint, {last}, holds epoch 1" in str(info.value)
    assert not _finite(trainer.model)  # the model in memory is poisoned...
    restored = load_weights(last, TinyMIL())  # ...the checkpoint on disk is epoch 1's
    assert _finite(restored)
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 2  # header + epoch 1


def test_a_forward_overflow_stops_at_batch_1() -> None:
    model = TinyMIL()
    with torch.no_grad():
        model.hidden.weight.fill_(1e30)  # finite weights, finite inputs, inf activations
        model.head.weight.fill_(1e30)
    trainer = Trainer(model, lr=1e-3, max_epochs=1, progress=False)
    with pytest.raises(TrainingError, match=r"loss at epoch 1, batch 1 \(bags \['P0', 'P1'\]\)"):
        trainer.fit(_loader(_bags()))


def test_a_non_finite_gradient_with_a_finite_loss_is_caught() -> None:
    trainer = Trainer(SqrtAtZero(), lr=1e-3, max_epochs=1, progress=False)
    with pytest.raises(TrainingError, match=r"gradient norm at epoch 1, batch 1 \(bags \['P0', 'P1'\]\)"):
        trainer.fit(_loader(_bags()))


def test_gradient_accumulation_and_clipping_report_the_step_batch() -> None:
    trainer = Trainer(
        SqrtAtZero(), lr=1e-3, max_epochs=1, progress=False, accumulate_grad_batches=2, gradient_clip_norm=1.0
    )
    # the optimizer steps after batch 2: that is where the gradient norm is read
    with pytest.raises(TrainingError, match=r"gradient norm at epoch 1, batch 2 \(bags \['P2', 'P3'\]\)"):
        trainer.fit(_loader(_bags()))


# ---------------------------------------------------------------------------- non-finite predictions


def test_predict_and_evaluate_name_the_bags_with_non_finite_outputs() -> None:
    model = create_mil_model(None, pooling="mean", in_dim=DIM)
    bags = _bags(4)
    bags[2] = Bag(torch.full((3, DIM), 1e38), label=0, id="P2")  # finite input, overflows in the head
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1e10)
    with pytest.raises(DataError, match=r"NaN or inf for 1 of 4 bags \['P2'\]"):
        predict(model, _loader(bags))
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)  # poisoned weights: every bag
    with pytest.raises(DataError, match=r"NaN or inf for 4 of 4 bags \['P0', 'P1', 'P2', 'P3'\]"):
        predict(model, _loader(bags))
    with pytest.raises(DataError, match=r"NaN or inf for 4 of 4 bags"):
        Trainer(model, progress=False).evaluate(_loader(bags))


# ---------------------------------------------------------------------------- no per-step sync

SYNCING = ("item", "tolist", "__bool__", "__index__", "__int__", "__float__")


class HostSync(AssertionError):
    """A tensor value was read on the host inside the guarded region."""


class Guard:
    """Make every tensor-to-Python conversion raise, except inside :meth:`lifted`."""

    def __init__(self) -> None:
        self.saved = {name: torch.Tensor.__dict__.get(name) for name in SYNCING}

    def _restore(self) -> None:
        for name, original in self.saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)

    def _refuse(self) -> None:
        def refusing(name: str) -> Any:
            def method(self: Tensor, *args: object, **kwargs: object) -> None:
                raise HostSync(f"Tensor.{name} was called: a host-device sync")

            return method

        for name in SYNCING:
            setattr(torch.Tensor, name, refusing(name))

    @contextmanager
    def on(self) -> Iterator[None]:
        self._refuse()
        try:
            yield
        finally:
            self._restore()

    @contextmanager
    def lifted(self) -> Iterator[None]:
        self._restore()
        try:
            yield
        finally:
            self._refuse()


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_training_epoch_reads_the_device_only_once_per_interval(
    monkeypatch: pytest.MonkeyPatch, clip: float | None
) -> None:
    model = create_mil_model(None, pooling="gated_attention", in_dim=DIM).train()
    trainer = Trainer(
        model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        max_epochs=1,
        progress=False,
        log_every_n_steps=3,
        gradient_clip_norm=clip,
        callbacks=[LambdaCallback(on_batch_end=lambda t, logs: None)],  # ignores the (lazy) loss
    )
    guard = Guard()
    reads: list[int] = []
    original = Trainer._read_interval

    def read_interval(self: Trainer, flags: list[Tensor], *args: Any) -> float:
        reads.append(len(flags))
        with guard.lifted():
            return original(self, flags, *args)

    monkeypatch.setattr(Trainer, "_read_interval", read_interval)
    # 7 collated batches (a DataLoader draws its CPU base seed with .item() when iteration starts,
    # once per epoch on the host generator): reads after batches 3 and 6, and at the end (1 batch)
    batches = list(_loader(_bags(14)))
    trainer.epoch = 1
    with milcell.checks(False), guard.on():
        loss = trainer._train_epoch(batches)
    assert reads == [3, 3, 1]
    assert math.isfinite(loss) and trainer.global_step == 7


def test_the_guard_sees_a_batch_callback_that_reads_the_loss() -> None:
    """The guard is not vacuous: reading the batch loss in a callback is a sync, and it fires."""
    model = create_mil_model(None, pooling="mean", in_dim=DIM).train()
    trainer = Trainer(
        model,
        max_epochs=1,
        progress=False,
        callbacks=[LambdaCallback(on_batch_end=lambda t, logs: logs["loss"])],
    )
    batches = list(_loader(_bags(4)))
    trainer.epoch = 1
    with milcell.checks(False), Guard().on(), pytest.raises(HostSync):
        trainer._train_epoch(batches)


# ---------------------------------------------------------------------------- DataLoader workers


class FailingBags(Dataset[Bag]):
    """Feature bags; item 1 fails in the way ``mode`` says (inside a worker process)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.bags = _bags(4)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> Bag:
        if index == 1 and self.mode == "data":
            raise DataError("cannot decode image /data/P1/cell_3.png: truncated file")
        if index == 1 and self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
        return self.bags[index]


@pytest.mark.parametrize("where", ["fit", "predict"])
def test_a_data_error_in_a_worker_arrives_as_its_own_one_line_message(where: str) -> None:
    loader = make_loader(FailingBags("data"), 2, shuffle=False, distributed=False, num_workers=1)
    model = TinyMIL()
    with pytest.raises(DataError) as info:
        if where == "fit":
            Trainer(model, max_epochs=1, progress=False).fit(loader)
        else:
            predict(model, loader)
    assert str(info.value) == "cannot decode image /data/P1/cell_3.png: truncated file"


@pytest.mark.parametrize("where", ["fit", "predict"])
def test_a_killed_worker_is_reported_as_out_of_memory(where: str) -> None:
    loader = make_loader(FailingBags("kill"), 2, shuffle=False, distributed=False, num_workers=1)
    model = TinyMIL()
    with pytest.raises(TrainingError) as info:
        if where == "fit":
            Trainer(model, max_epochs=1, progress=False).fit(loader)
        else:
            predict(model, loader)
    message = str(info.value)
    assert message.startswith("a data-loading worker was killed (out of memory?)")
    assert "num_workers" in message and "\n" not in message
