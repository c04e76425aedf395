"""Helper for tests/train/test_distributed.py: train a tiny MIL model, save the result.

Run as ``python -m torch.distributed.run --nproc_per_node=2 ddp_script.py OUT BATCH [cv|both]``
(DDP, one process per rank) or import :func:`run` / :func:`run_cv` for the single-process
reference. Rank 0 writes ``OUT/result.pt`` (final weights and predictions; with ``cv``, those of a
cross-validation: every fold's weights and the out-of-fold predictions) and ``OUT/metrics.csv``.
``both`` runs the two in one launch (one process group), into ``OUT/train`` and then ``OUT/cv``:
starting the ranks costs more than the training.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file by torchrun: find tests/

from milcell.data import Bag
from milcell.train.crossval import cross_validate
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


def run_cv(out_dir: Path, batch_size: int) -> dict[str, object]:
    """2-fold cross-validation of 12 bags of 1-6 instances with the minority oversampled.

    Each fold trains on 4 + 2 bags, oversampled to 4 + 4: an even epoch, so sharding over two
    ranks pads nothing and every global batch is the single process's.
    """
    bags = make_bags([1 + (5 * i) % 6 for i in range(12)], dim=6, labels=[int(i % 3 == 0) for i in range(12)])
    labels = np.array([b.label for b in bags])

    def make_datasets(fold: object) -> tuple[Subset[Bag], Subset[Bag]]:
        return Subset(bags, fold.train.tolist()), Subset(bags, fold.val.tolist())  # type: ignore[attr-defined]

    result = cross_validate(
        lambda: MeanMIL(dim=6, hidden=12),
        make_datasets,
        labels,
        n_splits=2,
        seed=3,
        batch_size=batch_size,
        sampler="oversample",
        selection="outer",
        build_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.2),
        trainer_kwargs={"max_epochs": 3, "progress": False},
        output_dir=out_dir,
    )
    out = {
        "states": [{k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for m in result.models],
        "oof_ids": list(result.oof.ids),
        "oof_probabilities": torch.as_tensor(np.asarray(result.oof.probabilities)),
    }
    if is_main_process():
        torch.save(out, out_dir / "result.pt")
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[3:] == ["cv"]:
        run_cv(Path(sys.argv[1]), int(sys.argv[2]))
    elif sys.argv[3:] == ["both"]:
        run(Path(sys.argv[1]) / "train", int(sys.argv[2]))
        run_cv(Path(sys.argv[1]) / "cv", int(sys.argv[2]))
    else:
        run(Path(sys.argv[1]), int(sys.argv[2]))
    cleanup_distributed()
