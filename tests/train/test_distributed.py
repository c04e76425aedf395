"""Tests of milcell.train.distributed and of DDP training launched with torchrun."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from milcell.data import Bag
from milcell.data.samplers import DistributedBagSampler
from milcell.exceptions import ConfigError, DataError
from milcell.train.distributed import (
    all_gather_objects,
    all_reduce_sum,
    get_rank,
    get_world_size,
    launched_distributed,
    make_loader,
)
from milcell.train.trainer import Predictions, _merge_predictions
from tests._factories import make_bags

SCRIPT = Path(__file__).with_name("ddp_script.py")


def _bags(n: int) -> list[Bag]:
    return make_bags([1 + i % 2 for i in range(n)], dim=3)


def test_make_loader_single_process_is_seeded() -> None:
    bags = _bags(10)
    order = [b.ids for b in make_loader(bags, 3, shuffle=True, seed=4)]
    assert order == [b.ids for b in make_loader(bags, 3, shuffle=True, seed=4)]
    assert order != [b.ids for b in make_loader(bags, 3, shuffle=True, seed=5)]
    assert next(iter(make_loader(bags, 5, shuffle=False))).ids == [f"P{i}" for i in range(5)]
    assert not isinstance(make_loader(bags, 2, shuffle=True).sampler, DistributedBagSampler)


def test_make_loader_shards_under_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launched_distributed() and get_world_size() == 2 and get_rank() == 1
    loader = make_loader(_bags(5), 2, shuffle=False)
    assert isinstance(loader.sampler, DistributedBagSampler)
    # Bags of 1, 2, 1, 2, 1 instances padded with bag 0, dealt in pairs by size: (P1 | P0),
    # (P2 | P3), (P4 | P0); rank 1 holds 1 + 2 + 1 instances, rank 0 2 + 1 + 1.
    assert [i for b in loader for i in b.ids] == ["P0", "P3", "P0"]
    monkeypatch.setenv("RANK", "0")
    assert [i for b in make_loader(_bags(5), 2, shuffle=False) for i in b.ids] == ["P1", "P2", "P4"]
    assert not isinstance(
        make_loader(_bags(5), 2, shuffle=False, distributed=False).sampler, DistributedBagSampler
    )


def test_make_loader_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        make_loader(_bags(2), 0, shuffle=True)
    with pytest.raises(ConfigError, match="'sampler' is chosen by make_loader"):
        make_loader(_bags(2), 1, shuffle=True, sampler=None)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        launched_distributed()


def test_single_process_collectives_are_identity() -> None:
    assert all_gather_objects([1, 2]) == [[1, 2]]
    assert torch.equal(all_reduce_sum(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))


def test_merge_predictions_drops_padded_duplicates() -> None:
    def part(ids: list[str]) -> Predictions:
        n = len(ids)
        return Predictions(ids, torch.rand(n, 2), torch.zeros(n, dtype=torch.long), [torch.ones(2)] * n)

    merged = _merge_predictions([part(["a", "c", "e"]), part(["b", "d", "a"])])
    assert merged.ids == ["a", "c", "e", "b", "d"]
    ordered = _merge_predictions([part(["a", "c", "e"]), part(["b", "d", "a"])], [[0, 2, 4], [1, 3, 0]])
    assert ordered.ids == ["a", "b", "c", "d", "e"]
    assert merged.probabilities.shape == (5, 2) and len(merged.attention or []) == 5
    with pytest.raises(DataError, match="non-empty ids"):
        _merge_predictions([part(["", "x"])])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("milcell_ddp_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _torchrun(out_dir: Path, *args: str) -> None:
    """Run ddp_script.py on two gloo CPU ranks (rank 0 writes its results under ``out_dir``)."""
    env = {k: v for k, v in os.environ.items() if k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK"}}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(SCRIPT),
        str(out_dir),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:  # each rank's own traceback first: the agent's report alone hides the cause
        ranks = [line for line in proc.stderr.splitlines() if line.startswith(("[rank0]", "[rank1]"))]
        pytest.fail(
            "\n".join(ranks[-80:])
            + "\n--- stdout:\n"
            + proc.stdout[-2000:]
            + "\n--- stderr:\n"
            + proc.stderr[-2000:]
        )


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One torchrun launch (two ranks, batch 2 each) of both the training and the cross-validation.

    Starting the ranks dominates the cost; the tests below read the results (``train``, ``cv``).
    """
    out = tmp_path_factory.mktemp("ddp")
    _torchrun(out, "2", "both")
    return out


def _result(folder: Path) -> dict[str, Any]:
    return dict(torch.load(folder / "result.pt", weights_only=True))


@pytest.mark.slow
def test_two_cpu_ranks_match_one_process(tmp_path: Path, ddp_runs: Path) -> None:
    single = _script().run(tmp_path / "single", 4, distributed=False)
    ddp = _result(ddp_runs / "train")

    for name, value in single["state"].items():
        torch.testing.assert_close(ddp["state"][name], value, atol=1e-5, rtol=1e-5)
    for a, b in zip(ddp["history"], single["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_auc"] == pytest.approx(b["val_auc"], abs=1e-6)
        assert a["val_n_unlabelled"] == b["val_n_unlabelled"] == 1.0
    # 9 bags over 2 ranks: the padded repeat is dropped; every bag appears once.
    assert sorted(ddp["ids"]) == sorted(single["ids"]) and len(ddp["ids"]) == 9
    order = [ddp["ids"].index(i) for i in single["ids"]]
    torch.testing.assert_close(ddp["probabilities"][order], single["probabilities"], atol=1e-5, rtol=1e-5)
    assert len(ddp["attention_sizes"]) == 9
    rows = (ddp_runs / "train" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("epoch,lr,train_loss,val_loss")


@pytest.mark.slow
def test_two_cpu_ranks_cross_validate_like_one_process(tmp_path: Path, ddp_runs: Path) -> None:
    # Oversampled training loaders and validation loaders sharded over 2 ranks (batch 2 each)
    # against one process with the same global batch (4): same weights, same out-of-fold predictions.
    single = _script().run_cv(tmp_path / "single", 4)
    ddp = _result(ddp_runs / "cv")
    assert len(ddp["states"]) == len(single["states"]) == 2
    for mine, ref in zip(ddp["states"], single["states"], strict=True):
        for name, value in ref.items():
            torch.testing.assert_close(mine[name], value, atol=1e-6, rtol=0)
    # Every bag once, in the same order: gathered predictions follow the dataset order, so each
    # out-of-fold row is filed under its own sample (regression: they were in rank order).
    assert ddp["oof_ids"] == single["oof_ids"] and len(set(ddp["oof_ids"])) == 12
    torch.testing.assert_close(ddp["oof_probabilities"], single["oof_probabilities"], atol=1e-6, rtol=0)
