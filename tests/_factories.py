"""Shared test factories: random bags and batches, and a tiny hand-written MIL model.

Imported by the tests (``from tests._factories import make_bags``); the ``one_thread`` fixture
lives in ``tests/conftest.py``. Everything is deterministic: each call draws from its own
``torch.Generator`` seeded with ``seed``, never from the global generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcell.data.bag import Bag, BagBatch, collate_bags
from milcell.train.loggers import RunLogger

__all__ = ["MeanMIL", "MeanMILOutput", "make_bags", "make_batch"]


def make_bags(
    sizes: Sequence[int],
    *,
    dim: int = 6,
    image_size: int | None = None,
    clinical_dim: int = 0,
    labels: Sequence[int] | None = None,
    seed: int = 0,
    prefix: str = "P",
    ordered: bool = False,
    signal: float = 0.0,
) -> list[Bag]:
    """One :class:`~milcell.data.bag.Bag` per entry of ``sizes`` (its number of instances).

    Parameters
    ----------
    sizes : sequence of int
        Instances per bag.
    dim : int, default 6
        Feature width ``D`` of feature bags: instances ``(n, D)``, standard normal.
    image_size : int or None, default None
        When given, the instances are images ``(n, 3, S, S)``, uniform in ``[0, 1)``,
        instead of features (``dim`` is then unused).
    clinical_dim : int, default 0
        Clinical attributes per bag ``(F,)``, standard normal, drawn after the bag's
        instances; ``0`` = none.
    labels : sequence of int or None, default None
        One label per bag; ``None`` gives ``i % 2``.
    seed : int, default 0
        Seed of the generator the values are drawn from.
    prefix : str, default "P"
        Bag ids are ``f"{prefix}{i}"``.
    ordered : bool, default False
        Instead of random values, feature instance ``t`` of the whole list (counting across
        the bags) holds ``t`` in every feature, and the clinical attributes of bag ``i`` hold
        ``i``: the order of bags and instances can then be checked exactly.
    signal : float, default 0.0
        Added to every feature of a bag labelled ``c >= 0``, times ``c``: with ``signal > 0``
        the classes are separable by the mean feature (unlabelled bags, ``-1``, get no shift).

    Examples
    --------
    >>> bags = make_bags([2, 1], dim=3, clinical_dim=2)
    >>> [tuple(b.instances.shape) for b in bags], [b.label for b in bags], bags[1].id
    ([(2, 3), (1, 3)], [0, 1], 'P1')
    >>> make_bags([2], image_size=8)[0].instances.shape
    torch.Size([2, 3, 8, 8])
    >>> make_bags([2, 1], dim=1, ordered=True)[1].instances.tolist()
    [[2.0]]
    >>> [b.instances.mean().item() > 5 for b in make_bags([50, 50], dim=2, signal=10.0)]
    [False, True]
    """
    labels = [i % 2 for i in range(len(sizes))] if labels is None else list(labels)
    if len(labels) != len(sizes):
        raise ValueError(f"make_bags: {len(labels)} labels for {len(sizes)} bags")
    g = torch.Generator().manual_seed(seed)
    bags, start = [], 0
    for i, (n, label) in enumerate(zip(sizes, labels, strict=True)):
        if ordered:
            x = torch.arange(start, start + n, dtype=torch.float32).unsqueeze(1).repeat(1, dim)
            clinical = torch.full((clinical_dim,), float(i)) if clinical_dim else None
        else:
            if image_size is not None:
                x = torch.rand(n, 3, image_size, image_size, generator=g)
            else:
                x = torch.randn(n, dim, generator=g)
            if signal:
                x = x + signal * max(label, 0)
            clinical = torch.randn(clinical_dim, generator=g) if clinical_dim else None
        start += n
        bags.append(Bag(x, label=label, clinical=clinical, id=f"{prefix}{i}"))
    return bags


def make_batch(sizes: Sequence[int], **kwargs: Any) -> BagBatch:
    """:func:`~milcell.data.bag.collate_bags` of :func:`make_bags` ``(sizes, **kwargs)``.

    Examples
    --------
    >>> batch = make_batch([3, 1], dim=4, clinical_dim=2)
    >>> tuple(batch.instances.shape), batch.sizes, tuple(batch.clinical.shape)
    ((4, 4), (3, 1), (2, 2))
    """
    return collate_bags(make_bags(sizes, **kwargs))


class MeanMILOutput(NamedTuple):
    """What :class:`MeanMIL` returns: ``logits (B, C)`` and uniform ``attention (B, N_max)``."""

    logits: Tensor
    attention: Tensor | None


class MeanMIL(nn.Module):
    """A tiny model following the trainer's protocol, independent of :mod:`milcell.nn`.

    Masked mean of feature bags ``(T, dim)`` → ``Linear(dim, hidden)`` → ReLU → dropout →
    ``Linear(hidden, num_classes)``. It records how it was called in ``calls`` (training mode,
    inference mode, autocast and its dtype), so tests can check what a trainer did.

    Examples
    --------
    >>> model = MeanMIL(dim=4)
    >>> out = model(make_batch([2, 3], dim=4))
    >>> tuple(out.logits.shape), model.calls[0]["training"]
    ((2, 2), True)
    """

    def __init__(self, dim: int = 8, num_classes: int = 2, dropout: float = 0.0, hidden: int = 16) -> None:
        super().__init__()
        self.config = {"dim": dim, "num_classes": num_classes, "dropout": dropout}
        self.hidden = nn.Linear(dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)
        self.calls: list[dict[str, Any]] = []

    def forward(self, batch: BagBatch) -> MeanMILOutput:
        self.calls.append(
            {
                "training": self.training,
                "inference": torch.is_inference_mode_enabled(),
                "autocast": torch.is_autocast_enabled("cpu"),
                "autocast_dtype": torch.get_autocast_dtype("cpu"),
            }
        )
        padded = batch.pad(batch.instances)  # (B, N_max, D)
        mask = batch.mask
        pooled = (padded * mask.unsqueeze(-1)).sum(1) / batch.bag_sizes.unsqueeze(1)
        logits = self.head(self.drop(torch.relu(self.hidden(pooled))))
        return MeanMILOutput(logits, mask.float() / batch.bag_sizes.unsqueeze(1))

    def loss(self, output: MeanMILOutput, batch: BagBatch, class_weights: Tensor | None = None) -> Tensor:
        return F.cross_entropy(output.logits.float(), batch.labels, weight=class_weights, ignore_index=-1)


class MemoryLogger(RunLogger):
    """An experiment logger that keeps everything in lists: params, metrics, children, close status."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.params: dict[str, object] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.children: list[MemoryLogger] = []
        self.status: str | None = None

    def _new_child(self, name: str) -> RunLogger:
        child = MemoryLogger(name)
        self.children.append(child)
        return child

    def log_params(self, params) -> None:  # type: ignore[no-untyped-def]
        self.params.update(params)

    def log_metrics(self, metrics, step=None) -> None:  # type: ignore[no-untyped-def]
        self.metrics.append((step, dict(metrics)))

    def _close(self, status: str) -> None:
        self.status = status
