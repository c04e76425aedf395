"""Tests of milcell.train.trainer.Trainer with a tiny model that follows MILModelLike."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from milcell.data import Bag, BagBatch, collate_bags
from milcell.exceptions import CheckpointError, ConfigError, DataError
from milcell.metrics import binary_report
from milcell.train.callbacks import Callback, LambdaCallback
from milcell.train.distributed import make_loader
from milcell.train.trainer import MILModelLike, Trainer
from tests._factories import MeanMIL, MeanMILOutput

Out = MeanMILOutput


class ConvMIL(MeanMIL):
    """Tiny conv encoder over (T, 3, H, W) images, then MeanMIL on (T, 8) features."""

    def __init__(self) -> None:
        super().__init__(dim=8)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.formats: list[bool] = []

    def forward(self, batch: BagBatch) -> Out:
        self.formats.append(batch.instances.is_contiguous(memory_format=torch.channels_last))
        feats = self.conv(batch.instances).mean(dim=(2, 3))
        return super().forward(BagBatch(feats, batch.bag_sizes, batch.labels, ids=batch.ids))


def make_bags(n: int = 16, dim: int = 8, num_classes: int = 2, seed: int = 0) -> list[Bag]:
    g = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n):
        label = i % num_classes
        size = 1 + i % 4
        x = torch.randn(size, dim, generator=g) * 0.5
        x[:, label] += 1.5
        bags.append(Bag(x, label=label, id=f"P{i:02d}"))
    return bags


def test_model_follows_protocol() -> None:
    assert isinstance(MeanMIL(), MILModelLike)


def test_fit_learns_writes_csv_and_checkpoints(tmp_path: Path) -> None:
    bags = make_bags()
    model = MeanMIL()
    trainer = Trainer(
        model, lr=0.05, max_epochs=5, monitor="val_balanced_accuracy", output_dir=tmp_path, progress=False
    )
    history = trainer.fit(make_loader(bags, 4, True, seed=1), make_loader(bags, 8, False))
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_balanced_accuracy"] == 1.0
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5
    assert list(rows[0])[:4] == ["epoch", "lr", "train_loss", "val_loss"]
    for key in ("val_balanced_accuracy", "val_sensitivity", "val_specificity", "val_auc", "val_kappa"):
        assert key in rows[0]
    assert float(rows[2]["train_loss"]) == pytest.approx(history[2]["train_loss"])
    meta = json.loads((tmp_path / "checkpoints" / "best" / "checkpoint.json").read_text())
    assert meta["epoch"] == trainer.best_epoch
    assert meta["monitor"] == "val_balanced_accuracy"
    assert meta["monitor_value"] == trainer.best_value == 1.0
    assert meta["model_config"] == model.config
    last = json.loads((tmp_path / "checkpoints" / "last" / "checkpoint.json").read_text())
    assert last["epoch"] == 5
    assert trainer.mode == "max"


def test_evaluate_and_predict_use_eval_and_inference_mode() -> None:
    bags = make_bags(9)
    bags.append(Bag(torch.randn(3, 8), label=-1, id="U1"))
    model = MeanMIL(dropout=0.5)
    trainer = Trainer(model, max_epochs=1, progress=False)
    loader = make_loader(bags, 4, False)
    model.train()
    preds = trainer.predict(loader)
    assert all(c["inference"] and not c["training"] for c in model.calls)
    assert model.training  # mode restored afterwards
    assert preds.ids == [b.id for b in bags]
    assert preds.probabilities.shape == (10, 2)
    torch.testing.assert_close(preds.probabilities.sum(1), torch.ones(10))
    assert preds.labels.tolist() == [b.label for b in bags]
    assert preds.attention is not None
    assert [a.shape[0] for a in preds.attention] == [len(b) for b in bags]
    torch.testing.assert_close(preds.attention[3], torch.full((4,), 0.25))
    again = trainer.predict(loader)  # eval mode: dropout off, deterministic
    torch.testing.assert_close(again.probabilities, preds.probabilities)
    metrics = trainer.evaluate(loader)
    assert metrics["n_unlabelled"] == 1.0 and metrics["n_samples"] == 9.0
    expected = binary_report(preds.labels.numpy(), preds.probabilities[:, 1].numpy()).as_dict()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, nan_ok=True)
    with torch.no_grad():
        batch = collate_bags(bags[:9])
        ref = model.loss(model.eval()(batch), batch)
    assert metrics["loss"] == pytest.approx(ref.item(), rel=1e-5)


def test_evaluate_without_labels_reports_only_counts() -> None:
    bags = [Bag(torch.randn(2, 8), label=-1, id=f"U{i}") for i in range(3)]
    out = Trainer(MeanMIL(), progress=False).evaluate(make_loader(bags, 2, False))
    assert math.isnan(out["loss"]) and out["n_unlabelled"] == 3.0 and "auc" not in out


def test_model_without_attention_gives_none() -> None:
    class NoAtt(MeanMIL):
        def forward(self, batch: BagBatch) -> Out:
            return Out(super().forward(batch).logits, None)

    preds = Trainer(NoAtt(), progress=False).predict(make_loader(make_bags(4), 2, False))
    assert preds.attention is None


def _train(
    epochs: int,
    output_dir: Path | None = None,
    resume_from: Path | None = None,
    init_seed: int = 0,
) -> tuple[nn.Module, Trainer]:
    torch.manual_seed(init_seed)
    model = MeanMIL(dropout=0.3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    bags = make_bags(12)
    train_loader = DataLoader(
        bags,
        batch_size=3,
        shuffle=True,
        generator=torch.Generator().manual_seed(123),
        collate_fn=collate_bags,
    )
    val_loader = make_loader(bags, 6, False)
    trainer = Trainer(
        model,
        optimizer=optimizer,
        scheduler=scheduler,
        max_epochs=epochs,
        output_dir=output_dir,
        progress=False,
        seed=7,
    )
    trainer.fit(train_loader, val_loader, resume_from=resume_from)
    return model, trainer


def test_resume_gives_identical_weights(tmp_path: Path) -> None:
    straight, t_straight = _train(4)
    _train(2, output_dir=tmp_path)
    # A fresh process-like start: different init and a scrambled global RNG.
    torch.manual_seed(999)
    resumed, t_resumed = _train(
        4, output_dir=tmp_path, resume_from=tmp_path / "checkpoints" / "last", init_seed=5
    )
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [r["train_loss"] for r in t_resumed.history] == [r["train_loss"] for r in t_straight.history]
    assert [r["lr"] for r in t_resumed.history] == [r["lr"] for r in t_straight.history]
    assert t_resumed.best_epoch == t_straight.best_epoch
    with open(tmp_path / "metrics.csv", newline="") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4]


def test_resume_without_fixed_generator_seed_restores_generator_state(tmp_path: Path) -> None:
    def run(epochs: int, resume: bool) -> nn.Module:
        torch.manual_seed(0)
        model = MeanMIL(dropout=0.2)
        loader = DataLoader(
            make_bags(8),
            batch_size=2,
            shuffle=True,
            generator=torch.Generator().manual_seed(3),
            collate_fn=collate_bags,
        )
        trainer = Trainer(model, lr=0.01, max_epochs=epochs, output_dir=tmp_path, progress=False, seed=None)
        trainer.fit(loader, resume_from=tmp_path / "checkpoints" / "last" if resume else None)
        return model

    straight = copy.deepcopy(run(3, False).state_dict())
    run(1, False)
    resumed = run(3, True)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, straight[name]), name


def test_resume_errors(tmp_path: Path) -> None:
    trainer = Trainer(MeanMIL(), max_epochs=1, progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer.fit(make_loader(make_bags(4), 2, True), resume_from=tmp_path / "nope")


def test_gradient_accumulation_matches_large_batch() -> None:
    def run(batch_size: int, accumulate: int) -> dict[str, Tensor]:
        torch.manual_seed(0)
        model = MeanMIL()
        trainer = Trainer(
            model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            max_epochs=2,
            accumulate_grad_batches=accumulate,
            progress=False,
        )
        trainer.fit(make_loader(make_bags(12), batch_size, False))
        assert trainer.global_step == 2 * 12 // (batch_size * accumulate)
        return model.state_dict()

    big, accumulated = run(4, 1), run(2, 2)
    for name, value in big.items():
        torch.testing.assert_close(accumulated[name], value, atol=1e-6, rtol=1e-5)


def test_gradient_clipping_bounds_each_step() -> None:
    def step_norms(clip: float | None) -> list[float]:
        torch.manual_seed(0)
        model = MeanMIL()
        norms: list[float] = []
        previous = [torch.cat([p.detach().flatten() for p in model.parameters()])]

        def record(trainer: Trainer, logs: dict[str, float]) -> None:
            now = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
            norms.append(float((now - previous[0]).norm()))
            previous[0] = now

        trainer = Trainer(
            model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            gradient_clip_norm=clip,
            max_epochs=1,
            callbacks=[LambdaCallback(on_batch_end=record)],
            progress=False,
        )
        trainer.fit(make_loader(make_bags(8), 2, False))
        return norms

    clipped, free = step_norms(1e-3), step_norms(None)
    assert len(clipped) == 4
    assert max(clipped) <= 1e-3 * (1 + 1e-4)
    assert max(free) > 1e-2


def test_early_stopping_and_callbacks() -> None:
    events: dict[str, int] = {"batch": 0, "epoch": 0}

    class Counter(Callback):
        def on_batch_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
            events["batch"] += 1
            assert set(logs) == {"epoch", "batch", "loss", "lr"}

        def on_epoch_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
            events["epoch"] += 1
            assert "val_auc" in logs

    model = MeanMIL()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing ever improves
    trainer = Trainer(
        model,
        optimizer=optimizer,
        max_epochs=20,
        monitor="val_loss",
        patience=2,
        callbacks=[Counter()],
        progress=False,
    )
    bags = make_bags(8)
    history = trainer.fit(make_loader(bags, 4, True), make_loader(bags, 4, False))
    assert len(history) == 3 and trainer.best_epoch == 1
    assert events == {"batch": 6, "epoch": 3}


def test_callback_can_stop_training() -> None:
    def stop(trainer: Trainer, logs: dict[str, float]) -> None:
        trainer.should_stop = logs["epoch"] >= 2

    trainer = Trainer(MeanMIL(), max_epochs=10, callbacks=[LambdaCallback(on_epoch_end=stop)], progress=False)
    assert len(trainer.fit(make_loader(make_bags(4), 2, True))) == 2


def test_reduce_on_plateau_steps_with_monitored_value() -> None:
    model = MeanMIL()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=0, factor=0.5)
    trainer = Trainer(
        model,
        optimizer=optimizer,
        scheduler=plateau,
        monitor="val_auc",
        max_epochs=3,
        progress=False,
    )
    bags = make_bags(8)
    history = trainer.fit(make_loader(bags, 4, True), make_loader(bags, 4, False))
    assert plateau.best == pytest.approx(max(row["val_auc"] for row in history))
    assert plateau.last_epoch == 3  # stepped once per epoch
    assert history[0]["val_auc"] != pytest.approx(history[0]["val_loss"])


def test_step_scheduler_and_parameter_groups(tmp_path: Path) -> None:
    model = MeanMIL()
    optimizer = torch.optim.SGD(
        [{"params": model.hidden.parameters(), "lr": 0.1}, {"params": model.head.parameters(), "lr": 0.01}]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    trainer = Trainer(
        model,
        optimizer=optimizer,
        scheduler=scheduler,
        scheduler_interval="step",
        max_epochs=2,
        output_dir=tmp_path,
        progress=False,
    )
    trainer.fit(make_loader(make_bags(6), 2, True))
    assert trainer.global_step == 6 and scheduler.last_epoch == 6
    assert [row["lr"] for row in trainer.history] == pytest.approx([0.1, 0.1 * 0.5**3])
    assert [row["lr_1"] for row in trainer.history] == pytest.approx([0.01, 0.01 * 0.5**3])
    assert "lr_1" in (tmp_path / "metrics.csv").read_text().splitlines()[0]


def test_restore_best_in_memory() -> None:
    snapshots: dict[int, dict[str, Tensor]] = {}

    def snap(trainer: Trainer, logs: dict[str, float]) -> None:
        snapshots[int(logs["epoch"])] = copy.deepcopy(trainer.model.state_dict())

    model = MeanMIL()
    bags = make_bags(8)
    trainer = Trainer(
        model,
        lr=0.5,  # large steps: the loss jumps around
        max_epochs=4,
        restore_best=True,
        callbacks=[LambdaCallback(on_epoch_end=snap)],
        progress=False,
    )
    trainer.fit(make_loader(bags, 2, True), make_loader(bags, 8, False))
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[trainer.best_epoch][name])
    losses = [row["val_loss"] for row in trainer.history]
    assert trainer.best_value == min(losses)


def test_load_best_before_training_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no best weights"):
        Trainer(MeanMIL(), progress=False).load_best()
    with pytest.raises(CheckpointError, match="no best checkpoint"):
        Trainer(MeanMIL(), output_dir=tmp_path, progress=False).load_best()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(precision: str, tmp_path: Path) -> None:
    model = MeanMIL()
    trainer = Trainer(model, precision=precision, lr=0.05, max_epochs=2, output_dir=tmp_path, progress=False)
    bags = make_bags(8)
    history = trainer.fit(make_loader(bags, 4, True), make_loader(bags, 4, False))
    expected = torch.bfloat16 if precision == "bf16" else torch.float16
    assert all(c["autocast"] and c["autocast_dtype"] == expected for c in model.calls)
    assert all(math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]) for row in history)
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # The scaler state travels with the checkpoint and resumes.
    resumed = Trainer(MeanMIL(), precision=precision, max_epochs=3, output_dir=tmp_path, progress=False)
    resumed.fit(
        make_loader(bags, 4, True), make_loader(bags, 4, False), resume_from=tmp_path / "checkpoints" / "last"
    )
    assert len(resumed.history) == 3
    if precision == "fp16":
        assert resumed.scaler.get_scale() > 0


def test_full_precision_does_not_autocast() -> None:
    model = MeanMIL()
    Trainer(model, max_epochs=1, progress=False).fit(make_loader(make_bags(4), 2, True))
    assert not any(c["autocast"] for c in model.calls)


def test_channels_last_applies_to_model_and_images() -> None:
    g = torch.Generator().manual_seed(0)
    bags = [Bag(torch.rand(1 + i % 3, 3, 16, 16, generator=g), label=i % 2, id=f"I{i}") for i in range(6)]
    model = ConvMIL()
    trainer = Trainer(model, channels_last=True, max_epochs=1, progress=False)
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.fit(make_loader(bags, 3, True))
    assert trainer.predict(make_loader(bags, 3, False)).probabilities.shape == (6, 2)
    assert model.formats and all(model.formats)


def test_multiclass_metrics_and_class_names() -> None:
    bags = make_bags(12, num_classes=3)
    trainer = Trainer(
        MeanMIL(num_classes=3),
        lr=0.05,
        max_epochs=2,
        monitor="val_auc",
        class_names=["neu", "lym", "mon"],
        progress=False,
    )
    history = trainer.fit(make_loader(bags, 4, True), make_loader(bags, 4, False))
    for key in ("val_f1_macro", "val_f1_weighted", "val_recall_lym", "val_auc_mon", "val_kappa"):
        assert key in history[-1]
    assert trainer.mode == "max"


def test_class_weights_reach_the_loss() -> None:
    seen: list[Tensor | None] = []

    class Spy(MeanMIL):
        def loss(self, output: Out, batch: BagBatch, class_weights: Tensor | None = None) -> Tensor:
            seen.append(class_weights)
            return super().loss(output, batch, class_weights)

    weights = torch.tensor([1.0, 3.0])
    Trainer(Spy(), class_weights=weights, max_epochs=1, progress=False).fit(
        make_loader(make_bags(4), 2, True)
    )
    assert seen and all(torch.equal(w, weights) for w in seen if w is not None)


def test_unlabelled_bags_in_training_do_not_poison_the_loss() -> None:
    bags = make_bags(4) + [Bag(torch.randn(2, 8), label=-1, id=f"U{i}") for i in range(2)]
    trainer = Trainer(MeanMIL(), max_epochs=1, progress=False)
    history = trainer.fit(make_loader(bags, 2, False))  # the last batch holds only unlabelled bags
    assert math.isfinite(history[0]["train_loss"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_progress_bar_can_be_on(capsys: pytest.CaptureFixture[str]) -> None:
    Trainer(MeanMIL(), max_epochs=1, progress=True).fit(make_loader(make_bags(4), 2, True))
    assert "epoch 1/1" in capsys.readouterr().err


def test_configuration_errors() -> None:
    model = MeanMIL()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD(model.parameters(), lr=0.1))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"precision": "16"}, "precision must be one of"),
        ({"scheduler_interval": "batch"}, "scheduler_interval"),
        ({"scheduler": plateau, "scheduler_interval": "step"}, "ReduceLROnPlateau"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
        ({"patience": 0}, "patience"),
        ({"gradient_clip_norm": -1.0}, "gradient_clip_norm"),
        ({"mode": "up"}, "mode must be"),
        ({"min_delta": -0.1}, "min_delta"),
        ({"threshold": 1.5}, "threshold"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            Trainer(model, progress=False, **kwargs)
    with pytest.raises(ConfigError, match="loss"):
        Trainer(nn.Linear(2, 2))
    frozen = MeanMIL().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        Trainer(frozen)


def test_fit_errors() -> None:
    loader = make_loader(make_bags(4), 2, True)
    with pytest.raises(ConfigError, match="needs a validation loader"):
        Trainer(MeanMIL(), monitor="val_auc", progress=False).fit(loader)
    with pytest.raises(ConfigError, match="not among the epoch logs"):
        Trainer(MeanMIL(), monitor="train_auc", progress=False).fit(loader)
    raw = DataLoader(make_bags(4), batch_size=2, collate_fn=list)  # yields lists, not BagBatch
    with pytest.raises(DataError, match="collate_fn=collate_bags"):
        Trainer(MeanMIL(), progress=False).fit(raw)


def test_with_milcell_mil_model() -> None:
    model_mod = pytest.importorskip("milcell.nn.model")
    model = model_mod.create_mil_model(backbone=None, pooling="mean", fusion="linear", in_dim=8)
    bags = make_bags(8)
    trainer = Trainer(model, lr=0.05, max_epochs=3, progress=False)
    history = trainer.fit(make_loader(bags, 4, True), make_loader(bags, 4, False))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    preds = trainer.predict(make_loader(bags, 4, False))
    assert preds.probabilities.shape == (8, 2)
    if preds.attention is not None:
        assert [a.shape[0] for a in preds.attention] == [len(b) for b in bags]


def test_batch_of_only_unlabelled_bags_with_mil_model() -> None:
    # Regression: MILModel.loss raises on a batch without labels; the trainer must not call it then.
    from milcell.nn.model import create_mil_model

    model = create_mil_model(backbone=None, pooling="mean", fusion="linear", in_dim=8)
    bags = [*make_bags(3), Bag(torch.randn(2, 8), label=-1, id="U0")]
    trainer = Trainer(model, max_epochs=1, progress=False)
    history = trainer.fit(make_loader(bags, 1, False))
    assert math.isfinite(history[0]["train_loss"])


def test_set_epoch_reaches_samplers_and_datasets_behind_the_loader() -> None:
    # Regression: a BagDataset capping instances drew the same subset every epoch because
    # only DistributedSampler.set_epoch was called.
    from torch.utils.data import ConcatDataset, Subset

    from milcell.data.samplers import ClassBalancedSampler

    class EpochBags(torch.utils.data.Dataset):
        def __init__(self, bags: list[Bag]) -> None:
            self.bags, self.epochs = bags, []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

        def __len__(self) -> int:
            return len(self.bags)

        def __getitem__(self, i: int) -> Bag:
            return self.bags[i]

    a, b = EpochBags(make_bags(4)), EpochBags(make_bags(4, seed=1))
    dataset = Subset(ConcatDataset([a, b]), list(range(8)))
    sampler = ClassBalancedSampler([i % 2 for i in range(8)], seed=0)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collate_bags)
    Trainer(MeanMIL(), max_epochs=3, progress=False).fit(loader)
    assert a.epochs == b.epochs == [0, 1, 2]
    assert sampler.epoch >= 3
