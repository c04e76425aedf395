"""Security: no code runs from loaded files, no path leaves the dataset, no network is used.

* Every loading entry point is handed a pickle whose unpickling would create a
  marker file; each refuses it with a milcell error and the marker never appears.
* Patient IDs and file names from CSVs, symlinks swapped in after loading, and
  model paths in a shared run record cannot reach outside their root.
* A representative end-to-end workload runs with ``socket`` connections and
  name resolution made to fail and records that nothing tried to connect.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from milcell.cli import main
from milcell.data import BagDataset, FeatureBagDataset, build_transforms
from milcell.data.formats.dlmi import load_dlmi
from milcell.data.synthetic import make_cohort
from milcell.exceptions import CheckpointError, DataError
from milcell.nn.backbones import create_backbone
from milcell.nn.model import create_mil_model
from milcell.train import Trainer
from milcell.train.checkpoint import (
    checkpoint_file,
    file_sha256,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from milcell.train.crossval import cross_validate, feature_subset
from milcell.train.distributed import make_loader
from milcell.train.features import extract_features
from milcell.viz import plot_roc

CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
FAST = ["--folds", "2", "--epochs", "1", "--no-progress", "--threads", "1", "--batch-size", "2"]


# --------------------------------------------------------------------------- network


class _Blocker:
    """Replace socket connection and name resolution by functions that record and raise."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self._mp = pytest.MonkeyPatch()

    def _refuse(self, name: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            self.attempts.append(f"{name}{args[1:2] if name.startswith('socket.socket') else args[:1]}")
            raise OSError(f"network blocked by the test ({name})")

        return refuse

    def __enter__(self) -> _Blocker:
        for attr in ("connect", "connect_ex"):
            self._mp.setattr(socket.socket, attr, self._refuse(f"socket.socket.{attr}"))
        for attr in ("create_connection", "getaddrinfo"):
            self._mp.setattr(socket, attr, self._refuse(f"socket.{attr}"))
        self._mp.delenv("HF_HUB_OFFLINE", raising=False)  # no help from the offline switch
        return self

    def __exit__(self, *exc: object) -> None:
        self._mp.undo()


@pytest.fixture(scope="module")
def offline_workload(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path, Path]:
    """Synthetic cohort -> loader -> dataset -> model -> fit/predict -> CV -> features -> viz -> CLI."""
    tmp = tmp_path_factory.mktemp("offline")
    threads = torch.get_num_threads()
    with _Blocker() as blocker:
        root = make_cohort(tmp / "dlmi", n_patients=8, seed=0, image_size=32, bag_size=(2, 3))
        ds = BagDataset(load_dlmi(root, split="train"), transform=build_transforms(CFG, train=False))
        torch.manual_seed(0)
        model = create_mil_model("milcell_mini_resnet_k8", pooling="gated_attention", pretrained=False)
        trainer = Trainer(model, max_epochs=1, progress=False, output_dir=tmp / "fit")
        trainer.fit(make_loader(ds, 2, shuffle=True), make_loader(ds, 4, shuffle=False))
        assert trainer.predict(make_loader(ds, 4, shuffle=False)).probabilities.shape == (len(ds), 2)
        feats = extract_features(
            create_backbone("milcell_mini_resnet_k8", trainable="head"), ds, tmp / "cache", progress=False
        )
        result = cross_validate(
            lambda: create_mil_model(None, pooling="mean", in_dim=feats.dim),
            lambda fold: (feature_subset(feats, fold.train), feature_subset(feats, fold.val)),
            feats.labels,
            n_splits=2,
            trainer_kwargs={"max_epochs": 1, "progress": False},
        )
        plot_roc([(result.oof.labels, result.oof.probabilities[:, 1])]).savefig(tmp / "roc.png")
        assert main(["info"]) == 0
        run = tmp / "run"
        args = ["train", "--data-dir", str(root), "--format", "dlmi", "--image-size", "32"]
        assert main([*args, *FAST, "--output-dir", str(run)]) == 0
    torch.set_num_threads(threads)
    return blocker.attempts, run, root


@pytest.mark.slow
def test_end_to_end_workload_opens_no_network_connection(
    offline_workload: tuple[list[str], Path, Path],
) -> None:
    attempts, run, _ = offline_workload
    assert attempts == []
    assert (run / "run.json").is_file()  # the workload really ran to the end


def test_the_blocker_catches_a_connection_attempt() -> None:
    with _Blocker() as blocker, pytest.raises(OSError, match="network blocked"):
        socket.create_connection(("example.org", 443), timeout=1)
    with _Blocker() as blocker2, pytest.raises(OSError, match="network blocked"):
        socket.socket().connect(("127.0.0.1", 9))
    assert blocker.attempts and blocker2.attempts


@pytest.mark.parametrize("name", ["resnet18", "torchvision/resnet18"])
def test_pretrained_without_network_fails_fast_with_the_hint(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.monotonic()
    with _Blocker() as blocker, pytest.raises(CheckpointError, match=r"pretrained weights.*checkpoint_path"):
        create_backbone(name, pretrained=True)
    assert time.monotonic() - start < 30.0
    # Whatever was tried, it was timm's / torchvision's own download code, and it stopped at once.
    assert len(blocker.attempts) <= 3, blocker.attempts


# --------------------------------------------------------------------------- pickles


class _Exploit:
    """Unpickling runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _evil(path: Path, marker: Path) -> Path:
    torch.save({"epoch": 1, "conv1.weight": _Exploit(marker)}, path)
    return path


def test_the_payload_really_runs_code_when_unpickled_unsafely(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.load(_evil(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.fixture
def marker(tmp_path: Path) -> Any:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a loaded file executed code"


def _forge_digests(ckpt: Path) -> None:
    """Record the digests of the files now in ``ckpt``, as an attacker rewriting checkpoint.json would."""
    record = json.loads((ckpt / "checkpoint.json").read_text())
    for name, entry in record["files"].items():
        entry["sha256"] = file_sha256(checkpoint_file(ckpt, name))
    (ckpt / "checkpoint.json").write_text(json.dumps(record))


def test_trainer_resume_and_load_checkpoint_refuse_a_pickle(tmp_path: Path, marker: Path) -> None:
    model = create_mil_model(None, pooling="mean", in_dim=4)
    ckpt = save_checkpoint(tmp_path / "last", model, epoch=1)
    _evil(checkpoint_file(ckpt, "training_state.pt"), marker)
    with pytest.raises(CheckpointError, match=r"training_state\.pt is truncated or corrupt: its SHA-256"):
        load_checkpoint(ckpt, model)  # refused before it is even unpickled
    _forge_digests(ckpt)  # whoever can replace the file can rewrite the record too
    with pytest.raises(CheckpointError, match=r"training_state\.pt was refused.*nothing was executed"):
        load_checkpoint(ckpt, model)
    trainer = Trainer(model, max_epochs=2, progress=False)
    bags = FeatureBagDataset([torch.randn(2, 4) for _ in range(4)], labels=[0, 1, 0, 1])
    with pytest.raises(CheckpointError, match=r"training_state\.pt was refused"):
        trainer.fit(make_loader(bags, 2, shuffle=True), resume_from=ckpt)


def test_load_weights_refuses_a_pickle_named_safetensors(tmp_path: Path, marker: Path) -> None:
    model = create_mil_model(None, pooling="mean", in_dim=4)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, epoch=1)
    _evil(checkpoint_file(ckpt), marker)
    _forge_digests(ckpt)
    for target in (ckpt, ckpt / "model.safetensors", checkpoint_file(ckpt)):
        with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
            load_weights(target, model)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt", ".safetensors"])
def test_create_backbone_refuses_a_pickle_checkpoint(suffix: str, tmp_path: Path, marker: Path) -> None:
    path = _evil(tmp_path / f"evil{suffix}", marker)
    with pytest.raises(
        CheckpointError, match=rf"evil\{suffix}.*(not a weights-only|not a valid safetensors)"
    ):
        create_backbone("milcell_mini_resnet_k8", checkpoint_path=path)


def test_feature_files_refuse_pickles(tmp_path: Path, marker: Path) -> None:
    path = _evil(tmp_path / "features.safetensors", marker)
    with pytest.raises(DataError, match=r"features\.safetensors"):
        FeatureBagDataset.from_safetensors(path)
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "P1.npy", np.zeros((2, 3), np.float32))
    np.save(folder / "P2.npy", np.array([_Exploit(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"P2\.npy"):
        FeatureBagDataset.from_numpy_dir(folder)


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_cli_refuses_a_saved_run_holding_a_pickle(
    command: str,
    offline_workload: tuple[list[str], Path, Path],
    tmp_path: Path,
    marker: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(offline_workload[1], run)
    for entry in json.loads((run / "run.json").read_text())["models"]:
        _evil(run / entry["path"] / "model.safetensors", marker)
    capsys.readouterr()
    code = main([command, "--run", str(run), "--output", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert "model.safetensors is truncated or corrupt" in _error(capsys)


# --------------------------------------------------------------------------- paths


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    root = make_cohort(tmp_path / "data", n_patients=8, seed=0, image_size=32, bag_size=(2, 3))
    outside = tmp_path / "outside"  # a plausible patient folder outside the dataset root
    outside.mkdir()
    first = sorted((root / "trainset").glob("*/*.jpg"))[0]
    shutil.copy(first, outside / "0.jpg")
    return root


def _set_first_id(root: Path, new_id: str) -> str:
    csv_path = next((root / "trainset").glob("*.csv"))
    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    old = rows[1][rows[0].index("ID")]
    rows[1][rows[0].index("ID")] = new_id
    with open(csv_path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return old


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "nested", "dir symlink", "image symlink"])
def test_csv_names_and_symlinks_cannot_leave_the_root_through_the_cli(
    kind: str, cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "outside"
    if kind == "dotdot":
        shutil.rmtree(cohort / "trainset" / _set_first_id(cohort, "../../outside"))
        expected = r"patient ID '\.\./\.\./outside'.*not a plain name"
    elif kind == "absolute":
        shutil.rmtree(cohort / "trainset" / _set_first_id(cohort, str(outside)))
        expected = "not a plain name"
    elif kind == "nested":
        shutil.rmtree(cohort / "trainset" / _set_first_id(cohort, "P1/../../../outside"))
        expected = "not a plain name"
    elif kind == "dir symlink":
        pid = _set_first_id(cohort, "Pevil")
        shutil.rmtree(cohort / "trainset" / pid)
        (cohort / "trainset" / "Pevil").symlink_to(outside, target_is_directory=True)
        expected = "Pevil' resolves to .*outside the dataset root"
    else:
        image = sorted((cohort / "trainset").glob("*/*.jpg"))[0]
        image.unlink()
        image.symlink_to(outside / "0.jpg")
        expected = rf"{image.name}' resolves to .*outside the dataset root"
    with pytest.raises(DataError, match=expected):
        load_dlmi(cohort, split="train")
    capsys.readouterr()
    args = ["train", "--data-dir", str(cohort), "--format", "dlmi", "--image-size", "32"]
    assert main([*args, *FAST, "--output-dir", str(tmp_path / "run")]) == 2
    line = _error(capsys)
    assert line.startswith("milcell: error: ")
    assert any(s in line for s in ("not a plain name", "outside the dataset root")), line
    assert not (tmp_path / "run" / "run.json").exists()


def test_image_swapped_for_an_outside_symlink_after_loading_is_refused_at_read_time(
    cohort: Path, tmp_path: Path
) -> None:
    ds = BagDataset(load_dlmi(cohort, split="train"), transform=build_transforms(CFG, train=False))
    ds[0]  # readable as loaded
    image = ds.cohort[0].paths[0]
    image.unlink()
    image.symlink_to(tmp_path / "outside" / "0.jpg")
    with pytest.raises(DataError, match=rf"{image.name}' resolves to .*outside the dataset root"):
        ds[0]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["../elsewhere", "/tmp", ".", ""])
def test_run_record_cannot_point_outside_the_run(
    path: str,
    offline_workload: tuple[list[str], Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(offline_workload[1], run)
    shutil.copytree(
        run / json.loads((run / "run.json").read_text())["models"][0]["path"], tmp_path / "elsewhere"
    )
    record = json.loads((run / "run.json").read_text())
    record["models"][0]["path"] = path
    (run / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--output", str(tmp_path / "e.json"), "--no-progress"]) == 2
    assert "is not a folder inside the run" in _error(capsys)
