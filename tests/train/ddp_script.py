"""Helper for tests/train/test_distributed.py: train a tiny MIL model, save the result.

Run as ``python -m torch.distributed.run --nproc_per_node=2 ddp_script.py OUT BATCH`` (DDP, one
process per rank) or import :func:`run` for the single-process reference. Rank 0 writes
``OUT/result.pt`` (final weights and predictions) and ``OUT/metrics.csv``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file by torchrun: find tests/

from milcell.data import Bag
from milcell.train.distributed import cleanup_distributed, is_main_process, make_loader
from milcell.train.trainer import Trainer
from tests._factories import MeanMIL, make_bags


def make_ddp_bags(n: int) -> list[Bag]:
    """``n`` feature bags of 1-3 instances; bag 1 unlabelled, so ranks see different labelled counts."""
    labels = [-1 if i == 1 else i % 2 for i in range(n)]
    return make_bags([1 + i % 3 for i in range(n)], dim=6, labels=labels, seed=11, prefix="B", signal=1.0)


def run(out_dir: Path, batch_size: int, distributed: bool | None = None) -> dict[str, object]:
    torch.manual_seed(0)
    model = MeanMIL(dim=6, hidden=12)  # no dropout, no BatchNorm: DDP equals one process exactly
    trainer = Trainer(
        model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
        max_epochs=3,
        output_dir=out_dir,
        progress=False,
        distributed=distributed,
    )
    train_bags = make_ddp_bags(8)
    trainer.fit(
        make_loader(train_bags, batch_size, shuffle=False, distributed=distributed),
        make_loader(train_bags, batch_size, shuffle=False, distributed=distributed),
    )
    preds = trainer.predict(make_loader(make_ddp_bags(9), batch_size, shuffle=False, distributed=distributed))
    result = {
        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "ids": preds.ids,
        "probabilities": preds.probabilities,
        "attention_sizes": [int(a.shape[0]) for a in preds.attention or []],
        "history": trainer.history,
    }
    if is_main_process():
        torch.save(result, out_dir / "result.pt")
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(Path(sys.argv[1]), int(sys.argv[2]))
    cleanup_distributed()
