"""Tests of milcell.train.checkpoint: round trip, atomic writes, corrupt and malicious files."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from milcell.exceptions import CheckpointError
from milcell.train.checkpoint import (
    capture_rng_state,
    checkpoint_file,
    file_sha256,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)


class Configured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = {"pooling": "mean", "dims": (8, 2), "lr": 1e-3}
        self.lin = nn.Linear(8, 2)
        self.norm = nn.BatchNorm1d(2)


def _trained() -> tuple[Configured, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = Configured()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        model.norm(model.lin(torch.randn(4, 8))).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_round_trip(tmp_path: Path) -> None:
    model, opt, sched = _trained()
    path = save_checkpoint(
        tmp_path / "last",
        model,
        epoch=2,
        optimizer=opt,
        scheduler=sched,
        monitor="val_auc",
        monitor_value=0.75,
        trainer_state={"best_value": 0.75, "history": [{"epoch": 1, "loss": 0.5}]},
    )
    meta = json.loads((path / "checkpoint.json").read_text())
    assert meta["epoch"] == 2 and meta["monitor"] == "val_auc" and meta["monitor_value"] == 0.75
    assert meta["model_config"] == {"pooling": "mean", "dims": [8, 2], "lr": 1e-3}
    assert meta["model_class"] == "Configured"

    fresh = Configured()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
    ckpt = load_checkpoint(path, fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name  # buffers included
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert fresh_sched.last_epoch == 2
    state_a, state_b = opt.state_dict()["state"][0], fresh_opt.state_dict()["state"][0]
    assert torch.equal(state_a["exp_avg"], state_b["exp_avg"])
    assert ckpt.state["trainer"]["history"] == [{"epoch": 1, "loss": 0.5}]
    # Weights alone load from the directory or the file, without the training state.
    other = Configured()
    load_weights(path / "model.safetensors", other)
    assert torch.equal(other.lin.weight, model.lin.weight)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(4)
    torch.rand(3, generator=gen)
    save_checkpoint(tmp_path, nn.Linear(1, 1), epoch=0, rng_state=capture_rng_state([gen]))
    expected = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen))  # noqa: NPY002
    random.seed(1)
    np.random.seed(1)  # noqa: NPY002
    torch.manual_seed(1)
    gen.manual_seed(1)
    ckpt = load_checkpoint(tmp_path)
    restore_rng_state(ckpt.state["rng"], [gen])
    got = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen))  # noqa: NPY002
    assert got[:2] == expected[:2]
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
    with pytest.raises(CheckpointError, match="1 DataLoader generator states but 0"):
        restore_rng_state(ckpt.state["rng"], [])


def test_channels_last_model_and_nan_monitor(tmp_path: Path) -> None:
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    path = save_checkpoint(tmp_path, conv, epoch=1, monitor="val_auc", monitor_value=float("nan"))
    assert json.loads((path / "checkpoint.json").read_text())["monitor_value"] == "nan"
    other = nn.Conv2d(3, 4, 3)
    load_weights(path, other)
    assert torch.equal(other.weight, conv.weight)


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent")
    path = save_checkpoint(tmp_path / "c", nn.Linear(2, 2), epoch=1)
    checkpoint_file(path, "training_state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"training_state\.pt does not exist"):
        load_checkpoint(path)
    checkpoint_file(path, "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not exist"):
        load_weights(path, nn.Linear(2, 2))
    (path / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint.json"):
        load_checkpoint(path)


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _forge_digests(path: Path) -> None:
    """Record the current digests of a tampered checkpoint, as an attacker writing the record would."""
    record = json.loads((path / "checkpoint.json").read_text())
    for name, entry in record["files"].items():
        entry["sha256"] = file_sha256(checkpoint_file(path, name))
        entry["size"] = checkpoint_file(path, name).stat().st_size
    (path / "checkpoint.json").write_text(json.dumps(record))


def test_truncated_weights_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, nn.Linear(16, 16), epoch=1)
    _truncate(checkpoint_file(path))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt: its SHA-256"):
        load_checkpoint(path, nn.Linear(16, 16))
    # Caught by the reader itself when the record is rewritten to match.
    _forge_digests(path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        load_checkpoint(path, nn.Linear(16, 16))


def test_truncated_and_garbage_state_file(tmp_path: Path) -> None:
    model = nn.Linear(16, 16)
    path = save_checkpoint(tmp_path, model, epoch=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    state = checkpoint_file(path, "training_state.pt")
    _truncate(state)
    with pytest.raises(CheckpointError, match=r"training_state\.pt is truncated or corrupt"):
        load_checkpoint(path)
    _forge_digests(path)
    with pytest.raises(CheckpointError, match=r"training_state\.pt is truncated or corrupt"):
        load_checkpoint(path)
    state.write_bytes(b"\x00garbage" * 10)
    _forge_digests(path)
    with pytest.raises(CheckpointError, match=r"training_state\.pt"):
        load_checkpoint(path)


def test_corrupt_json(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, nn.Linear(2, 2), epoch=1)
    (path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"checkpoint\.json is unreadable or corrupt"):
        load_checkpoint(path)
    (path / "checkpoint.json").write_text("[]")
    with pytest.raises(CheckpointError, match="lacks the 'epoch' field"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this object opens (creates) a marker file: arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    # The payload really runs code when unpickled the unsafe way ...
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps({"epoch": 1, "x": _Payload(proof)})).get("x").close()
    assert proof.exists()
    # ... but the checkpoint loader refuses it and nothing runs.
    marker = tmp_path / "pwned"
    path = save_checkpoint(tmp_path / "ckpt", nn.Linear(2, 2), epoch=1)
    torch.save({"epoch": 1, "optimizer": _Payload(marker)}, checkpoint_file(path, "training_state.pt"))
    with pytest.raises(CheckpointError, match=r"training_state\.pt is truncated or corrupt: its SHA-256"):
        load_checkpoint(path)
    _forge_digests(path)  # whoever can write the pickle can write the record too
    with pytest.raises(CheckpointError, match=r"training_state\.pt was refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_inconsistent_epochs_are_detected(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, nn.Linear(2, 2), epoch=3)
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["epoch"] = 4
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="inconsistent: checkpoint.json says epoch 4"):
        load_checkpoint(path)


def test_mismatched_model_and_optimizer(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    path = save_checkpoint(tmp_path, model, epoch=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(CheckpointError, match="does not fit Linear"):
        load_checkpoint(path, nn.Linear(5, 2))
    other = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="saved optimizer state does not fit"):
        load_checkpoint(path, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = nn.Linear(3, 3)
    path = save_checkpoint(tmp_path, old, epoch=1)

    def crash(model: nn.Module, filename: str, **kwargs: object) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", crash)
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        save_checkpoint(tmp_path, nn.Linear(3, 3), epoch=2)
    monkeypatch.undo()
    names = sorted(p.name for p in path.iterdir())
    assert names[0] == "checkpoint.json" and len(names) == 2 and names[1].startswith("v000001-")
    restored = nn.Linear(3, 3)
    load_weights(path, restored)
    assert torch.equal(restored.weight, old.weight)
    # No file was renamed into place before all were written: the epoch-1 checkpoint is whole.
    assert load_checkpoint(path).epoch == 1


@pytest.mark.parametrize("epoch", [None, "abc", -1, True, 1.5])
def test_malformed_epoch_in_the_record_names_file_and_key(tmp_path: Path, epoch: object) -> None:
    # Regression (issue 10.18): epoch null / "abc" gave a deep traceback instead of a milcell error.
    from milcell.train.checkpoint import load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path / "ckpt", nn.Linear(2, 1), epoch=2)
    record = path / "checkpoint.json"
    meta = json.loads(record.read_text())
    meta["epoch"] = epoch
    record.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: key 'epoch' must be a non-negative"):
        load_checkpoint(path, nn.Linear(2, 1))


def test_training_state_without_rng_names_file_and_key(tmp_path: Path) -> None:
    # Regression (issue 10.18): a training state without 'rng' failed deep inside the resume.
    from milcell.train.checkpoint import _read_state

    file = tmp_path / "training_state.pt"
    torch.save({"epoch": 3, "format_version": 2, "trainer": {}}, file)
    with pytest.raises(CheckpointError, match=r"training_state\.pt: key 'rng' .* is missing"):
        _read_state(file, "cpu")
    torch.save({"epoch": "abc", "rng": {}}, file)
    with pytest.raises(CheckpointError, match=r"training_state\.pt: key 'epoch' must be a non-negative"):
        _read_state(file, "cpu")
