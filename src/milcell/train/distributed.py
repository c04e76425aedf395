"""Small helpers for data-parallel training launched with ``torchrun``.

``torchrun --nproc_per_node=N script.py`` starts ``N`` processes and sets
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. These helpers read that
environment, start the process group (``nccl`` on CUDA, ``gloo`` on the CPU),
build loaders that shard bags across ranks with a
:class:`~milcell.data.samplers.DistributedBagSampler` (``DistributedSampler``
semantics, plus similar instance counts per rank when the bag sizes are known),
and gather Python objects across ranks. In a plain single process every helper
degrades to the obvious no-op, so the same script runs both ways.

Examples
--------
>>> from milcell.train.distributed import get_rank, get_world_size, is_main_process
>>> get_rank(), get_world_size(), is_main_process()
(0, 1, True)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from milcell._validation import check_int, check_real
from milcell.data.bag import collate_bags
from milcell.exceptions import ConfigError

__all__ = [
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "cleanup_distributed",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "launched_distributed",
    "make_loader",
]

logger = logging.getLogger("milcell")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from exc


def launched_distributed() -> bool:
    """True when the environment says several processes were launched (``WORLD_SIZE > 1``).

    Examples
    --------
    >>> launched_distributed()
    False
    """
    return _env_int("WORLD_SIZE", 1) > 1


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised.

    Examples
    --------
    >>> is_distributed()
    False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Global rank of this process (the process group's, else ``RANK``, else 0).

    Examples
    --------
    >>> get_rank()
    0
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_world_size() -> int:
    """Number of processes (the process group's, else ``WORLD_SIZE``, else 1).

    Examples
    --------
    >>> get_world_size()
    1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def is_main_process() -> bool:
    """True on rank 0, the only rank that writes files.

    Examples
    --------
    >>> is_main_process()
    True
    """
    return get_rank() == 0


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> torch.device:
    """Start the process group when launched by ``torchrun``; return this rank's device.

    Parameters
    ----------
    backend : {"nccl", "gloo"} or None
        Default: ``nccl`` when CUDA is available, else ``gloo``.
    timeout_s : float, default 600
        Timeout of collective operations.

    Returns
    -------
    torch.device
        ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``. In a single
        process nothing is initialised and the default device is returned.

    Raises
    ------
    ConfigError
        If ``torch.distributed`` is unavailable in this torch build, or ``timeout_s <= 0``.

    Examples
    --------
    >>> init_distributed().type in {"cpu", "cuda"}
    True
    """
    timeout_s = check_real(timeout_s, "init_distributed: timeout_s", low=0.0, low_open=True)
    use_cuda = torch.cuda.is_available()
    local_rank = _env_int("LOCAL_RANK", 0)
    device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if use_cuda else None
    if device is not None:
        torch.cuda.set_device(device)
    if launched_distributed() and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
        chosen = backend or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend=chosen, timeout=timedelta(seconds=timeout_s), device_id=device)
        logger.info(
            "initialised %s process group: rank %d of %d", chosen, dist.get_rank(), dist.get_world_size()
        )
    return device if device is not None else torch.device("cpu")


def cleanup_distributed() -> None:
    """Destroy the process group if one is initialised (call at the end of a script).

    Examples
    --------
    >>> cleanup_distributed()  # no-op in a single process
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank, in rank order.

    Examples
    --------
    >>> all_gather_objects({"ids": ["P1"]})  # single process: a list of one
    [{'ids': ['P1']}]
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns a new tensor; identity in a single process).

    Examples
    --------
    >>> all_reduce_sum(torch.tensor([1.0, 2.0]))
    tensor([1., 2.])
    """
    out = value.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    distributed: bool | None = None,
    collate_fn: Callable[[list[Any]], Any] = collate_bags,
    **kwargs: Any,
) -> DataLoader[Any]:
    """A :class:`~torch.utils.data.DataLoader` of bags, sharded across ranks when distributed.

    Parameters
    ----------
    dataset : Dataset
        Map-style dataset of :class:`~milcell.data.Bag`.
    batch_size : int
        Bags per batch *per rank*; the global batch is ``batch_size * world_size``.
    shuffle : bool
        Shuffle the bags each epoch.
    seed : int, default 0
        Seed of the shuffle: the seed of the loader's ``torch.Generator`` in a
        single process (the :class:`~milcell.train.Trainer` reseeds it with
        ``seed + epoch`` each epoch), of the distributed sampler otherwise
        (the trainer calls ``set_epoch``).
    distributed : bool or None, default None
        Shard with a :class:`~milcell.data.samplers.DistributedBagSampler`; ``None``
        decides from the environment (``WORLD_SIZE > 1``). The sampler pads the
        dataset by repeating bags so every rank gets as many (predictions are
        de-duplicated by bag id), and, when the bag sizes are known without loading
        (:func:`~milcell.data.samplers.bag_sizes`), deals each group of
        ``world_size`` bags so that the ranks hold similar numbers of instances.
        Batch ``k`` of every rank comes from the same ``batch_size * world_size``
        consecutive bags of the global order, so the global batch is the one a
        single process with that batch size sees.
    collate_fn : callable, default :func:`~milcell.data.collate_bags`
    **kwargs
        Passed to ``DataLoader`` (``num_workers``, ``pin_memory``, ``drop_last``...).

    Returns
    -------
    torch.utils.data.DataLoader

    Raises
    ------
    ConfigError
        For a non-positive batch size, or ``sampler`` / ``generator`` in ``kwargs``.

    Examples
    --------
    >>> import torch
    >>> from milcell.data import Bag
    >>> bags = [Bag(torch.rand(2, 4), i % 2, id=f"P{i}") for i in range(5)]
    >>> loader = make_loader(bags, batch_size=2, shuffle=True, seed=1)
    >>> [len(b) for b in loader]
    [2, 2, 1]
    >>> make_loader(bags, batch_size=0, shuffle=False)
    Traceback (most recent call last):
    ...
    milcell.exceptions.ConfigError: make_loader: batch_size must be an integer >= 1, got 0
    """
    batch_size = check_int(batch_size, "make_loader: batch_size", low=1)
    seed = check_int(seed, "make_loader: seed")
    for key in ("sampler", "generator", "batch_sampler", "shuffle"):
        if key in kwargs:
            raise ConfigError(f"make_loader: {key!r} is chosen by make_loader; build a DataLoader yourself")
    if distributed is None:
        distributed = is_distributed() or launched_distributed()
    if distributed:
        from milcell.data.samplers import DistributedBagSampler

        sampler = DistributedBagSampler(
            dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=shuffle, seed=seed
        )
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collate_fn,
        **kwargs,
    )
