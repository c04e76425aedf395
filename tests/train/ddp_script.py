"""Helper for tests/train/test_distributed.py: train a tiny MIL model, save the result.

Run as ``python -m torch.distributed.run --nproc_per_node=2 ddp_script.py OUT BATCH`` (DDP, one
process per rank) or import :func:`run` for the single-process reference. Rank 0 writes
``OUT/result.pt`` (final weights and predictions) and ``OUT/metrics.csv``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcell.data import Bag, BagBatch
from milcell.train.distributed import cleanup_distributed, is_main_process, make_loader
from milcell.train.trainer import Trainer


class Out(NamedTuple):
    logits: Tensor
    attention: Tensor | None


class MeanMIL(nn.Module):
    """Mean pooling + MLP head; no BatchNorm, no dropout (so DDP equals one process exactly)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = {"dim": 6}
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 2))

    def forward(self, batch: BagBatch) -> Out:
        mask = batch.mask
        pooled = (batch.pad(batch.instances) * mask.unsqueeze(-1)).sum(1) / batch.bag_sizes.unsqueeze(1)
        return Out(self.net(pooled), mask.float() / batch.bag_sizes.unsqueeze(1))

    def loss(self, output: Out, batch: BagBatch, class_weights: Tensor | None = None) -> Tensor:
        return F.cross_entropy(output.logits, batch.labels, weight=class_weights, ignore_index=-1)


def make_bags(n: int) -> list[Bag]:
    g = torch.Generator().manual_seed(11)
    bags = []
    for i in range(n):
        label = -1 if i == 1 else i % 2  # one unlabelled bag: ranks see different labelled counts
        x = torch.randn(1 + i % 3, 6, generator=g)
        bags.append(Bag(x + (label == 1), label=label, id=f"B{i}"))
    return bags


def run(out_dir: Path, batch_size: int, distributed: bool | None = None) -> dict[str, object]:
    torch.manual_seed(0)
    model = MeanMIL()
    trainer = Trainer(
        model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
        max_epochs=3,
        output_dir=out_dir,
        progress=False,
        distributed=distributed,
    )
    train_bags = make_bags(8)
    trainer.fit(
        make_loader(train_bags, batch_size, shuffle=False, distributed=distributed),
        make_loader(train_bags, batch_size, shuffle=False, distributed=distributed),
    )
    preds = trainer.predict(make_loader(make_bags(9), batch_size, shuffle=False, distributed=distributed))
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
