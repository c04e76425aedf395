"""Integrity of the files milcell writes: folder locks, digests, concurrent feature-cache writers.

Issue 10, items 5-7: two processes in one folder, another backbone's features served
from the cache, and byte flips in checkpoint and feature files that went undetected.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import Tensor, nn

from milcell._locks import LOCK_NAME, folder_lock, lock_holder
from milcell.data import Bag
from milcell.exceptions import CacheError, CheckpointError, LockError, MilcellError
from milcell.train.checkpoint import checkpoint_file, load_checkpoint, load_weights, save_checkpoint
from milcell.train.features import FEATURES_NAME, MANIFEST_NAME, extract_features

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from milcell._locks import folder_lock
    with folder_lock(sys.argv[1], what="run folder"):
        Path(sys.argv[2]).write_text("held")
        time.sleep(600)
    """
)


def _hold(folder: Path, marker: Path) -> subprocess.Popen[bytes]:
    """Another process holding the lock on ``folder`` (it writes ``marker`` once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(marker)], stderr=subprocess.PIPE)
    start = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() - start > 120:
            proc.kill()
            pytest.fail(
                f"the lock holder did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        time.sleep(0.05)
    return proc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    if proc.stderr:
        proc.stderr.close()


# --------------------------------------------------------------------------- locks


def test_a_second_process_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    proc = _hold(folder, tmp_path / "held")
    try:
        with pytest.raises(LockError) as info, folder_lock(folder, what="run folder"):
            pass
        message = str(info.value)
        assert isinstance(info.value, MilcellError) and "\n" not in message
        assert f"the run folder {folder} is in use by process {proc.pid} on host" in message
        assert lock_holder(folder)["pid"] == proc.pid  # type: ignore[index]
        # save_checkpoint in a folder another process holds is refused, and removes nothing.
        before = sorted(p.name for p in folder.iterdir())
        with pytest.raises(LockError, match=str(proc.pid)):
            save_checkpoint(folder, nn.Linear(2, 2), epoch=1)
        assert sorted(p.name for p in folder.iterdir()) == before
    finally:
        _kill(proc)
    # The killed holder's lock file is left behind, but the OS released its lock: it does not block.
    assert (folder / LOCK_NAME).is_file() and lock_holder(folder) is None
    with folder_lock(folder, what="run folder"):
        assert lock_holder(folder)["pid"] == os.getpid()  # type: ignore[index]
    assert not (folder / LOCK_NAME).exists()


def test_lock_is_reentrant_in_one_process(tmp_path: Path) -> None:
    with folder_lock(tmp_path, what="run folder"):
        with folder_lock(tmp_path / ".", what="checkpoint folder"):
            save_checkpoint(tmp_path / "last", nn.Linear(2, 2), epoch=1)
        assert lock_holder(tmp_path) is not None
    assert lock_holder(tmp_path) is None


def test_save_checkpoint_keeps_a_live_writers_files(tmp_path: Path) -> None:
    # Before the lock, save_checkpoint deleted every ".*.tmp" file in the folder as stale,
    # including those of a writer still running.
    path = save_checkpoint(tmp_path / "last", nn.Linear(2, 2), epoch=1)
    theirs = path / "v000002-theirs"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"being written")
    proc = _hold(path, tmp_path / "held")
    try:
        with pytest.raises(LockError):
            save_checkpoint(path, nn.Linear(2, 2), epoch=2)
        assert (theirs / "model.safetensors").read_bytes() == b"being written"
    finally:
        _kill(proc)
    # The writer died: its leftovers are garbage, removed by the next save.
    save_checkpoint(path, nn.Linear(2, 2), epoch=2)
    assert not theirs.exists() and load_checkpoint(path).epoch == 2


# --------------------------------------------------------------------------- digests


def _flip_safetensors_data(file: Path) -> None:
    data = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start + (len(data) - start) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def _flip_zip_tensor_data(file: Path) -> None:
    with zipfile.ZipFile(file) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(file.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x01
    file.write_bytes(bytes(data))


def _checkpoint(tmp_path: Path) -> tuple[Path, nn.Module]:
    model = nn.Linear(8, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return save_checkpoint(tmp_path / "last", model, epoch=1, optimizer=opt), model


def test_a_flipped_byte_in_the_weights_is_refused_naming_the_file(tmp_path: Path) -> None:
    path, _ = _checkpoint(tmp_path)
    file = checkpoint_file(path)
    _flip_safetensors_data(file)
    # The flip is in the tensor data: safetensors itself reads it without complaint.
    safetensors.torch.load_file(str(file))
    for target in (path, path / "model.safetensors", file):
        with pytest.raises(CheckpointError, match=rf"{file} is truncated or corrupt: its SHA-256"):
            load_weights(target, nn.Linear(8, 4))
    with pytest.raises(CheckpointError, match=rf"{file} is truncated or corrupt"):
        load_checkpoint(path, nn.Linear(8, 4))


def test_a_flipped_byte_in_the_training_state_is_refused_naming_the_file(tmp_path: Path) -> None:
    path, _ = _checkpoint(tmp_path)
    file = checkpoint_file(path, "training_state.pt")
    _flip_zip_tensor_data(file)
    torch.load(file, weights_only=True)  # torch's zip reader does not check CRCs
    with pytest.raises(CheckpointError, match=rf"{file} is truncated or corrupt: its SHA-256"):
        load_checkpoint(path, nn.Linear(8, 4))
    load_checkpoint(path, nn.Linear(8, 4), load_state=False)  # the weights are intact


def test_an_untouched_checkpoint_loads_and_is_verified(tmp_path: Path) -> None:
    path, model = _checkpoint(tmp_path)
    record = json.loads((path / "checkpoint.json").read_text())
    assert set(record["files"]) == {"model.safetensors", "training_state.pt"}
    other = nn.Linear(8, 4)
    assert load_checkpoint(path, other).epoch == 1
    assert torch.equal(other.weight, model.weight)


def test_a_checkpoint_without_digests_still_loads_logged_unverified(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The layout milcell wrote before versions and digests: three files side by side.
    model = nn.Linear(3, 2)
    old = tmp_path / "last"
    old.mkdir()
    safetensors.torch.save_model(model, str(old / "model.safetensors"), metadata={"epoch": "2"})
    torch.save({"format_version": 1, "epoch": 2, "rng": {}, "trainer": {}}, old / "training_state.pt")
    record = {"format_version": 1, "epoch": 2, "monitor": None, "monitor_value": None}
    (old / "checkpoint.json").write_text(json.dumps(record))
    other = nn.Linear(3, 2)
    with caplog.at_level(logging.INFO, logger="milcell"):
        assert load_checkpoint(old, other).epoch == 2
    assert torch.equal(other.weight, model.weight)
    assert "no recorded digest" in caplog.text and "unverified" in caplog.text
    # Saving over it replaces the old files with a verified version.
    save_checkpoint(old, model, epoch=3)
    assert not (old / "model.safetensors").exists() and not (old / "training_state.pt").exists()
    assert load_checkpoint(old, other).epoch == 3


# --------------------------------------------------------------------------- feature cache


class _Net(nn.Module):
    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(12, 4)
        with torch.no_grad():
            self.lin.weight.mul_(scale)
        self.name = "net"
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.lin(x.flatten(1))


@pytest.fixture
def bags() -> list[Bag]:
    g = torch.Generator().manual_seed(0)
    return [Bag(torch.rand(2, 3, 2, 2, generator=g), label=i % 2, id=f"P{i}") for i in range(4)]


def test_features_file_of_another_backbone_is_never_served(bags: list[Bag], tmp_path: Path) -> None:
    # Two writers of one architecture with different weights: the manifest of one, the
    # features file of the other (what a reader saw in 85 of 600 reads). Even when the manifest's
    # size and digest match the file, the key embedded in the file does not.
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    extract_features(_Net(), bags, mine, progress=False)
    extract_features(_Net(scale=2.0), bags, theirs, progress=False)
    (mine / FEATURES_NAME).write_bytes((theirs / FEATURES_NAME).read_bytes())
    manifest = json.loads((mine / MANIFEST_NAME).read_text())
    other = json.loads((theirs / MANIFEST_NAME).read_text())
    manifest.update(size=other["size"], sha256=other["sha256"])
    (mine / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=rf"{mine / FEATURES_NAME} holds features of another cache key"):
        extract_features(_Net(), bags, mine, progress=False, recompute=False)
    net = _Net()
    out = extract_features(net, bags, mine, progress=False)
    assert net.calls > 0
    with torch.no_grad():
        assert torch.equal(out[0].instances, _Net()(bags[0].instances))


def test_a_flipped_byte_in_the_features_is_detected(
    bags: list[Bag], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clean = extract_features(_Net(), bags, tmp_path, progress=False)
    _flip_safetensors_data(tmp_path / FEATURES_NAME)
    with pytest.raises(CacheError, match=rf"{tmp_path / FEATURES_NAME} is corrupt or was replaced"):
        extract_features(_Net(), bags, tmp_path, progress=False, recompute=False)
    net = _Net()
    with caplog.at_level(logging.WARNING, logger="milcell"):
        again = extract_features(net, bags, tmp_path, progress=False)
    assert net.calls > 0 and "SHA-256" in caplog.text
    assert all(torch.equal(a.instances, b.instances) for a, b in zip(again, clean, strict=True))
    extract_features(_Net(), bags, tmp_path, progress=False, recompute=False)  # rebuilt and intact


def test_a_cache_locked_by_another_process_is_left_to_it(
    bags: list[Bag], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    proc = _hold(cache, tmp_path / "held")
    try:
        net = _Net()
        with caplog.at_level(logging.WARNING, logger="milcell"):
            out = extract_features(net, bags, cache, progress=False)
        assert net.calls > 0 and len(out) == len(bags)
        assert "not written" in caplog.text and str(proc.pid) in caplog.text
        assert not (cache / FEATURES_NAME).exists()
    finally:
        _kill(proc)
    extract_features(_Net(), bags, cache, progress=False)
    assert (cache / MANIFEST_NAME).is_file()
