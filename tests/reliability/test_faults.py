"""Faults survived, nothing lost: SIGKILL mid-epoch and mid-write, interrupted caches and folds.

The child-process tests run ``_driver.py`` (a tiny feature-bag MILModel with dropout,
shuffling and a scheduler, on the CPU with fixed seeds) in a process forked from this one,
kill it with SIGKILL at a deterministic point, check what is left on disk, resume it in
this process and compare the result bit for bit with an uninterrupted run. (A fork, not a
fresh interpreter: the child is a separate process that really dies by SIGKILL, without
paying a second or more for importing torch every time.) Corruption of single
files is covered in ``tests/train/test_checkpoint.py`` (load_checkpoint); here the
same files are corrupted under every *entry point* that reads them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
import traceback
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import Tensor, nn

from milcell.data import Bag
from milcell.exceptions import CheckpointError
from milcell.nn.backbones import create_backbone
from milcell.train import Trainer
from milcell.train.checkpoint import checkpoint_file, load_checkpoint, load_weights
from milcell.train.crossval import cross_validate, feature_subset
from milcell.train.distributed import make_loader
from milcell.train.features import FEATURES_NAME, MANIFEST_NAME, extract_features
from tests.reliability import _driver

KILLED = -signal.SIGKILL


# --------------------------------------------------------------------------- helpers


def _in_process(*args: str) -> None:
    """Run the driver in this process (its ``main`` pins torch to one thread; restore it)."""
    threads = torch.get_num_threads()
    try:
        _driver.main(list(args))
    finally:
        torch.set_num_threads(threads)


class _Child:
    """The driver's ``main(args)`` in a forked child process (its output goes to ``log``)."""

    def __init__(self, args: tuple[str, ...], log: Path) -> None:
        self.log = log
        self.returncode: int | None = None
        with warnings.catch_warnings():  # Python >= 3.12 warns about forking a threaded process
            warnings.simplefilter("ignore", DeprecationWarning)
            self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                with open(log, "w", encoding="utf-8") as fh:
                    os.dup2(fh.fileno(), 1)
                    os.dup2(fh.fileno(), 2)
                    try:
                        _driver.main(list(args))
                        code = 0
                    except BaseException:
                        traceback.print_exc(file=fh)
                        fh.flush()
            finally:
                os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        """The exit code (``-signal`` when killed); SIGKILL it and fail after ``timeout`` s."""
        start = time.monotonic()
        while self.poll() is None:
            if time.monotonic() - start > timeout:
                os.kill(self.pid, signal.SIGKILL)
                self.wait(60)
                pytest.fail(f"the driver did not finish within {timeout} s:\n{self.output()}")
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8") if self.log.exists() else ""


def _spawn(*args: str) -> _Child:
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    return _Child(args, out / "driver.log")


def _kill_when(marker: Path, proc: _Child, timeout: float = 240.0) -> None:
    """SIGKILL ``proc`` as soon as it has written ``marker`` (it then sleeps mid-epoch)."""
    start = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the driver exited with {proc.returncode} before the pause:\n{proc.output()}")
        if time.monotonic() - start > timeout:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(60)
            pytest.fail("the driver never reached the pause")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == KILLED


def _assert_same_weights(a: Path, b: Path) -> None:
    left, right = safetensors.torch.load_file(str(a)), safetensors.torch.load_file(str(b))
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def _stale(folder: Path) -> list[str]:
    """Files of ``folder`` that the checkpoint it records does not use (left by a killed writer)."""
    current = checkpoint_file(folder).parent.name
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".milcell.lock" and p.parent != folder and p.parent.name != current
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs: 3 epochs on val_loss, and 2 epochs that improve every epoch."""
    root = tmp_path_factory.mktemp("reference")
    _in_process("train", "--out", str(root / "plain"), "--epochs", "3")
    _in_process("train", "--out", str(root / "improve"), "--epochs", "2", "--always-improve")
    return {"plain": root / "plain", "improve": root / "improve"}


# --------------------------------------------------------------------------- SIGKILL mid-epoch


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, reference: dict[str, Path]
) -> None:
    marker = tmp_path / "paused"
    proc = _spawn(
        "train", "--out", str(tmp_path), "--epochs", "3", "--pause-at", "2:1", "--marker", str(marker)
    )
    _kill_when(marker, proc)
    # Killed after two batches of epoch 2: epoch 1 is the last checkpoint, nothing else was written.
    last = tmp_path / "run" / "checkpoints" / "last"
    assert load_checkpoint(last, _driver.build_model()).epoch == 1
    assert not (tmp_path / "final.safetensors").exists()

    torch.manual_seed(1234)  # the resuming process's global RNG must not matter
    _in_process("train", "--out", str(tmp_path), "--epochs", "3", "--resume")
    ref = reference["plain"]
    _assert_same_weights(tmp_path / "final.safetensors", ref / "final.safetensors")
    for name in ("last", "best"):
        _assert_same_weights(
            checkpoint_file(tmp_path / "run" / "checkpoints" / name),
            checkpoint_file(ref / "run" / "checkpoints" / name),
        )
    metrics = (tmp_path / "run" / "metrics.csv").read_text()
    assert metrics == (ref / "run" / "metrics.csv").read_text()
    assert metrics.count("\n") == 4  # header and epochs 1-3, each once


# --------------------------------------------------------------------------- SIGKILL mid-write


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        # Half of model.safetensors of the epoch-2 ``last`` written (before the fix the state
        # file was already renamed into place: ``last`` became unloadable).
        "weights:last:2",
        # Half of training_state.pt of the epoch-2 ``best`` written (before the fix ``last``
        # was saved first, claimed best epoch 2, and ``best`` still held epoch 1).
        "state:best:2",
    ],
)
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(
    spec: str, tmp_path: Path, reference: dict[str, Path]
) -> None:
    proc = _spawn("train", "--out", str(tmp_path), "--epochs", "2", "--always-improve", "--kill-write", spec)
    assert proc.wait(timeout=300) == KILLED, proc.output()
    ckpts = tmp_path / "run" / "checkpoints"
    which, folder, _ = spec.split(":")
    half_written = _stale(ckpts / folder)
    assert any(
        {"weights": "model.safetensors", "state": "training_state.pt"}[which] in n for n in half_written
    )

    last = load_checkpoint(ckpts / "last", _driver.build_model())
    best = load_checkpoint(ckpts / "best", _driver.build_model())
    assert last.epoch == 1
    # What ``last`` says about the best epoch is what ``best`` holds (or ``best`` is newer).
    assert best.epoch >= last.state["trainer"]["best_epoch"]

    _in_process("train", "--out", str(tmp_path), "--epochs", "2", "--always-improve", "--resume")
    ref = reference["improve"]
    _assert_same_weights(tmp_path / "final.safetensors", ref / "final.safetensors")
    for name in ("last", "best"):
        _assert_same_weights(
            checkpoint_file(ckpts / name), checkpoint_file(ref / "run" / "checkpoints" / name)
        )
    assert (tmp_path / "run" / "metrics.csv").read_text() == (ref / "run" / "metrics.csv").read_text()
    assert _stale(ckpts / "last") == [] and _stale(ckpts / "best") == []  # cleaned by the next save


PUBLISH_STEPS = [
    "version folder created",
    "state written",
    "weights written",
    "version written",
    "committed",
    "cleaned",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [f"{step}:last:2" for step in PUBLISH_STEPS] + ["version written:best:2", "committed:best:2"],
)
def test_sigkill_at_every_step_of_a_checkpoint_publish_leaves_a_resumable_run(
    spec: str, tmp_path: Path, reference: dict[str, Path]
) -> None:
    # Before the single commit point, a kill between the three renames left ``last`` with files of
    # two epochs: unresumable.
    proc = _spawn("train", "--out", str(tmp_path), "--epochs", "2", "--always-improve", "--kill-at", spec)
    assert proc.wait(timeout=300) == KILLED, proc.output()
    step, folder, _ = spec.split(":")
    ckpts = tmp_path / "run" / "checkpoints"
    committed = PUBLISH_STEPS.index(step) >= PUBLISH_STEPS.index("committed")
    last = load_checkpoint(ckpts / "last", _driver.build_model())
    best = load_checkpoint(ckpts / "best", _driver.build_model())
    assert last.epoch == (2 if committed and folder == "last" else 1)
    assert best.epoch == (1 if folder == "best" and not committed else 2)
    assert best.epoch >= last.state["trainer"]["best_epoch"]

    _in_process("train", "--out", str(tmp_path), "--epochs", "2", "--always-improve", "--resume")
    ref = reference["improve"]
    _assert_same_weights(tmp_path / "final.safetensors", ref / "final.safetensors")
    for name in ("last", "best"):
        _assert_same_weights(
            checkpoint_file(ckpts / name), checkpoint_file(ref / "run" / "checkpoints" / name)
        )
    assert (tmp_path / "run" / "metrics.csv").read_text() == (ref / "run" / "metrics.csv").read_text()


# --------------------------------------------------------------------------- cross-validation


@pytest.mark.slow
def test_cross_validation_killed_in_fold_1_resumes_there_without_retraining_fold_0(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    _in_process("cv", "--out", str(ref))
    run = tmp_path / "run"
    marker = tmp_path / "paused"
    proc = _spawn("cv", "--out", str(run), "--pause-fold", "1", "--pause-at", "2:0", "--marker", str(marker))
    _kill_when(marker, proc)
    assert (run / "cv" / "fold_0_0" / "result.json").is_file()
    assert not (run / "cv" / "fold_0_1" / "result.json").exists()
    assert load_checkpoint(run / "cv" / "fold_0_1" / "checkpoints" / "last").epoch == 1
    # Nested selection: make_datasets builds each fold twice (the reported fold, the selection set).
    assert (run / "cv_calls.txt").read_text().split() == ["0", "0", "1", "1"]

    _in_process("cv", "--out", str(run))
    # Fold 0 was loaded, not rebuilt; fold 1 resumed from its epoch-1 checkpoint; fold 2 ran.
    assert (run / "cv_calls.txt").read_text().split() == ["0", "0", "1", "1", "1", "1", "2", "2"]
    got = json.loads((run / "cv_result.json").read_text())
    want = json.loads((ref / "cv_result.json").read_text())
    assert got == want  # same folds, histories and out-of-fold probabilities, exactly


def test_cross_validation_with_a_corrupt_finished_fold_names_the_file(tmp_path: Path) -> None:
    ds = _driver.dataset(9)

    def run() -> None:
        cross_validate(
            _driver.build_model,
            lambda fold: (feature_subset(ds, fold.train), feature_subset(ds, fold.val)),
            ds.labels,
            n_splits=3,
            trainer_kwargs={"max_epochs": 1, "progress": False},
            output_dir=tmp_path,
        )

    run()
    weights = tmp_path / "fold_0_1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"fold_0_1/model\.safetensors is truncated or corrupt"):
        run()


# --------------------------------------------------------------------------- corrupt checkpoints


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # garbage header
        path.write_bytes(b"\xff" * 16 + data[16:])


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    trainer = Trainer(_driver.build_model(), max_epochs=1, output_dir=out, progress=False)
    trainer.fit(make_loader(_driver.dataset(8), 4, shuffle=True, seed=0))
    return out / "checkpoints" / "last"


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
@pytest.mark.parametrize("name", ["model.safetensors", "training_state.pt", "checkpoint.json"])
def test_corrupt_checkpoint_file_on_resume_names_it(
    name: str, how: str, saved_run: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "last"
    shutil.copytree(saved_run, ckpt)
    file = checkpoint_file(ckpt, name)
    _corrupt(file, how)
    trainer = Trainer(_driver.build_model(), max_epochs=2, progress=False)
    with pytest.raises(CheckpointError, match=rf"{file}\b.*(truncated|corrupt|unreadable)"):
        trainer.fit(make_loader(_driver.dataset(8), 4, shuffle=True), resume_from=ckpt)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_corrupt_weights_file_names_it_in_every_weights_loader(
    how: str, saved_run: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(checkpoint_file(saved_run).read_bytes())
    _corrupt(weights, how)
    with pytest.raises(CheckpointError, match=rf"{weights}.*(truncated|corrupt)"):
        load_weights(weights, _driver.build_model())
    backbone_file = tmp_path / "backbone.safetensors"
    safetensors.torch.save_model(create_backbone("milcell_mini_resnet_k8").model, str(backbone_file))
    _corrupt(backbone_file, how)
    with pytest.raises(CheckpointError, match=rf"{backbone_file}.*not a valid safetensors"):
        create_backbone("milcell_mini_resnet_k8", checkpoint_path=backbone_file)
    pt_file = tmp_path / "backbone.pt"
    torch.save(create_backbone("milcell_mini_resnet_k8").model.state_dict(), pt_file)
    _corrupt(pt_file, how)
    with pytest.raises(CheckpointError, match=rf"{pt_file}.*corrupt"):
        create_backbone("milcell_mini_resnet_k8", checkpoint_path=pt_file)


# --------------------------------------------------------------------------- feature cache


class _Net(nn.Module):
    """A small frozen backbone with a buffer (BatchNorm statistics) and a data_config."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.name = "net"
        self.data_config = {"input_size": (3, 8, 8), "mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2)}
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.norm(self.conv(x)).mean((2, 3))


@pytest.fixture
def bags() -> list[Bag]:
    g = torch.Generator().manual_seed(0)
    return [Bag(torch.rand(2 + i % 2, 3, 8, 8, generator=g), label=i % 2, id=f"P{i}") for i in range(5)]


class _Killed(BaseException):
    """Stands for the process dying: not an Exception, so no library handler catches it."""


def test_interrupted_cache_write_is_detected_and_rebuilt(
    bags: list[Bag], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clean = extract_features(_Net(), bags, tmp_path / "clean", progress=False)
    original = safetensors.torch.save_file

    def half_then_die(
        tensors: dict[str, Tensor], filename: str, metadata: dict[str, str] | None = None
    ) -> None:
        original(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise _Killed

    cache = tmp_path / "cache"
    monkeypatch.setattr(safetensors.torch, "save_file", half_then_die)
    with pytest.raises(_Killed):
        extract_features(_Net(), bags, cache, progress=False)
    monkeypatch.undo()
    assert not (cache / MANIFEST_NAME).exists()

    net = _Net()
    with caplog.at_level(logging.INFO, logger="milcell"):
        rebuilt = extract_features(net, bags, cache, progress=False)
    assert net.calls > 0, "an incomplete cache was reused"
    assert all(torch.equal(a.instances, b.instances) for a, b in zip(rebuilt, clean, strict=True))
    # The rebuilt cache is complete: the next run reuses it without calling the backbone.
    again = _Net()
    extract_features(again, bags, cache, progress=False)
    assert again.calls == 0


def test_interrupted_rebuild_never_serves_the_old_features(
    bags: list[Bag], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _Net()
    extract_features(old, bags, tmp_path, progress=False)
    new = _Net()
    with torch.no_grad():
        new.conv.weight.mul_(2.0)
    original = safetensors.torch.save_file

    def die(tensors: dict[str, Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
        original(tensors, filename, metadata=metadata)
        raise _Killed  # dies after writing the temporary file, before it is renamed

    monkeypatch.setattr(safetensors.torch, "save_file", die)
    with pytest.raises(_Killed):
        extract_features(new, bags, tmp_path, progress=False)
    monkeypatch.undo()
    # The old features file is still there, but without a manifest neither backbone reuses it.
    assert (tmp_path / FEATURES_NAME).is_file() and not (tmp_path / MANIFEST_NAME).exists()
    for net in (_Net(), new):
        net.calls = 0
        extract_features(net, bags, tmp_path, progress=False)
        assert net.calls > 0


def _changed(kind: str) -> nn.Module:
    net = _Net()
    with torch.no_grad():
        if kind == "one weight by one ulp":
            w = net.conv.weight
            w[0, 0, 0, 0] = torch.nextafter(w[0, 0, 0, 0], torch.tensor(1.0))
        elif kind == "buffer only":
            net.norm.running_mean += 0.5
        elif kind == "normalisation":
            net.data_config = {**net.data_config, "mean": (0.4, 0.5, 0.5)}
        elif kind == "input size":
            net.data_config = {**net.data_config, "input_size": (3, 16, 16)}
        elif kind == "backbone name":
            net.name = "other"
    return net


@pytest.mark.parametrize(
    "kind", ["one weight by one ulp", "buffer only", "normalisation", "input size", "backbone name"]
)
def test_cache_of_other_weights_or_preprocessing_is_never_reused(
    kind: str, bags: list[Bag], tmp_path: Path
) -> None:
    extract_features(_Net(), bags, tmp_path, progress=False)
    net = _changed(kind)
    out = extract_features(net, bags, tmp_path, progress=False)
    assert net.calls > 0, f"a cache built with other {kind} was reused"
    net.eval()
    with torch.no_grad():
        assert torch.equal(out[0].instances, net(bags[0].instances))


def test_cache_with_other_precision_or_instances_is_not_reused(bags: list[Bag], tmp_path: Path) -> None:
    extract_features(_Net(), bags, tmp_path, progress=False)
    net = _Net()
    extract_features(net, bags, tmp_path, progress=False, precision="bf16")
    assert net.calls > 0
    smaller = [Bag(b.instances[:1], label=b.label, id=b.id) for b in bags]
    net = _Net()
    extract_features(net, smaller, tmp_path, progress=False)
    assert net.calls > 0
