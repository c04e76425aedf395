"""Samplers for imbalanced classes, usable as ``DataLoader(sampler=...)``.

* :class:`ClassBalancedSampler` draws, each epoch, indices with probability
  inverse to their class frequency, so every class is seen about equally often.
* :class:`MinorityOversampler` repeats the minority classes' indices up to the
  majority count (or by a factor: the backbone-zoo report doubled the HEM
  class) and shuffles them.
* :class:`DistributedBagSampler` shuffles every bag once per epoch and shards
  the order across the ranks of a ``torchrun`` job, like
  :class:`~torch.utils.data.DistributedSampler`, but gives each rank bags of
  similar total size (instances), so no rank waits for the others.

**Sharding.** All three take ``num_replicas`` and ``rank`` (default: one
process). Every rank draws the same *global* order from ``(seed, epoch)``,
pads it by repeating its first indices to a multiple of ``num_replicas``, and
cuts it into consecutive groups of ``num_replicas`` indices; each group gives
one index to each rank. Without bag sizes, rank ``r`` takes the ``r``-th of
each group (``DistributedSampler``'s assignment). With ``sizes``, the group's
bags are dealt greedily, largest first, to the rank with the fewest instances
so far (ties: lower rank). Either way the ``k``-th batch of ``b`` bags of every
rank comes from the same ``b * num_replicas`` consecutive global indices, so
the *global* batch is the one a single process with batch ``b * num_replicas``
sees: a data-parallel run computes the single-process run's updates.

Both take labels or anything with a ``labels`` attribute (a dataset, a
:class:`~milcell.data.BagCohort`, a :class:`~milcell.data.CellSet`); unlabelled
samples (``-1``) are never drawn. Randomness comes from a ``torch.Generator``
seeded by ``(seed, epoch)``. The epoch advances by one after every pass over the
sampler; :meth:`ClassBalancedSampler.set_epoch` sets it explicitly (e.g. when
resuming), as with ``DistributedSampler``.

Examples
--------
>>> import torch
>>> from torch.utils.data import DataLoader, TensorDataset
>>> labels = [0] * 8 + [1] * 2
>>> sampler = MinorityOversampler(labels, seed=0)
>>> len(sampler)
16
>>> loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=4, sampler=sampler)
>>> sum(len(b[0]) for b in loader)
16
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Sampler

from milcell._validation import check_int, check_real
from milcell.exceptions import ConfigError, DataError

__all__ = ["ClassBalancedSampler", "DistributedBagSampler", "MinorityOversampler", "bag_sizes", "shard_order"]


def _labels_of(source: Any) -> np.ndarray:
    values = getattr(source, "labels", source)
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    y = np.asarray(values)
    if y.ndim != 1 or y.size == 0:
        raise DataError(f"sampler labels must be a non-empty 1-D sequence, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"sampler labels must be integers (class indices, -1 = unlabelled), got dtype {y.dtype}"
        )
    if (y < -1).any():
        raise DataError(f"sampler labels must be >= -1, got {int(y.min())} at position {int(np.argmin(y))}")
    if not (y >= 0).any():
        raise DataError("sampler: every sample is unlabelled (-1); nothing to draw")
    return y.astype(np.int64)


def bag_sizes(dataset: Any) -> np.ndarray | None:
    """Instances per item of ``dataset`` when known without loading any image, else None.

    Read from a ``bag_size(i)`` method (:class:`~milcell.data.BagDataset` counts the image
    files of the patient, after the ``max_instances`` cap;
    :class:`~milcell.data.FeatureBagDataset` the feature rows), through a
    :class:`~torch.utils.data.Subset` (or any view with ``dataset`` and ``indices``) and a
    :class:`~torch.utils.data.ConcatDataset` (when every part's sizes are known), or from
    the lengths of an in-memory sequence of :class:`~milcell.data.Bag`. The sharded samplers
    deal bags by these sizes; without them they fall back to
    :class:`~torch.utils.data.DistributedSampler`'s assignment.

    Parameters
    ----------
    dataset : Dataset or sequence of Bag
        ``n`` items.

    Returns
    -------
    ndarray or None
        ``(n,)`` int64 instances per item, or None when unknown.

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import ConcatDataset, Subset
    >>> from milcell.data import Bag
    >>> bags = [Bag(torch.rand(3, 2)), Bag(torch.rand(5, 2))]
    >>> bag_sizes(bags).tolist()
    [3, 5]
    >>> bag_sizes(ConcatDataset([Subset(bags, [1]), bags])).tolist()
    [5, 3, 5]
    >>> bag_sizes(range(4)) is None
    True
    """
    from milcell.data.bag import Bag

    size_of = getattr(dataset, "bag_size", None)
    if callable(size_of):
        return np.array([int(size_of(i)) for i in range(len(dataset))], dtype=np.int64)
    inner, indices = getattr(dataset, "dataset", None), getattr(dataset, "indices", None)
    if inner is not None and indices is not None:  # torch.utils.data.Subset
        sizes = bag_sizes(inner)
        return None if sizes is None else sizes[np.asarray(indices, dtype=np.int64).reshape(-1)]
    parts = getattr(dataset, "datasets", None)
    if isinstance(dataset, ConcatDataset) and parts:
        found = [bag_sizes(part) for part in parts]
        if any(sizes is None for sizes in found):
            return None
        return np.concatenate([sizes for sizes in found if sizes is not None]).astype(np.int64)
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(b, Bag) for b in dataset):
        return np.array([len(b) for b in dataset], dtype=np.int64)
    return None


def _check_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    from milcell.train.distributed import get_rank, get_world_size

    replicas = get_world_size() if num_replicas is None else check_int(num_replicas, "num_replicas", low=1)
    rank = get_rank() if rank is None else check_int(rank, "rank", low=0)
    if rank >= replicas:
        raise ConfigError(f"rank must be < num_replicas={replicas}, got {rank}")
    return replicas, rank


def shard_order(
    order: torch.Tensor | Sequence[int],
    num_replicas: int,
    rank: int,
    sizes: Sequence[int] | np.ndarray | None = None,
) -> list[int]:
    """Rank ``rank``'s share of a global index order (see the module docstring, "Sharding").

    Parameters
    ----------
    order : Tensor or sequence of int
        ``(n,)`` global order of dataset indices (repeats allowed), ``n >= 1``.
    num_replicas, rank : int
        Number of ranks and this rank, ``0 <= rank < num_replicas``.
    sizes : sequence of int or None
        Instances of every dataset item (indexed by dataset index); ``None`` gives
        ``DistributedSampler``'s assignment.

    Returns
    -------
    list of int
        ``ceil(n / num_replicas)`` indices.

    Examples
    --------
    >>> shard_order([0, 1, 2, 3, 4], 2, 1)  # padded with index 0, then every second
    [1, 3, 0]
    >>> shard_order([0, 1, 2, 3], 2, 0, sizes=[10, 1, 9, 2])  # 10 then 2: 12 instances
    [0, 3]
    >>> shard_order([0, 1, 2, 3], 2, 1, sizes=[10, 1, 9, 2])  # 1 then 9: 10 instances
    [1, 2]
    """
    flat = [int(i) for i in (order.tolist() if isinstance(order, torch.Tensor) else order)]
    if not flat:
        raise ConfigError("shard_order: the order is empty")
    per_rank = -(-len(flat) // num_replicas)
    padded = flat + [flat[i % len(flat)] for i in range(per_rank * num_replicas - len(flat))]
    if sizes is None or num_replicas == 1:
        return padded[rank::num_replicas]
    load = [0] * num_replicas
    mine = []
    for start in range(0, len(padded), num_replicas):
        group = padded[start : start + num_replicas]
        # largest bag first (ties: earlier in the group) to the least loaded rank (ties: lower rank)
        bags = sorted(range(num_replicas), key=lambda j: (-int(sizes[group[j]]), j))
        ranks = sorted(range(num_replicas), key=lambda r: (load[r], r))
        for j, r in zip(bags, ranks, strict=True):
            load[r] += int(sizes[group[j]])
            if r == rank:
                mine.append(group[j])
    return mine


class _EpochSampler(Sampler[int]):
    seed: int
    epoch: int
    num_replicas: int = 1
    rank: int = 0
    sizes: np.ndarray | None = None

    def _shard_setup(
        self, num_replicas: int | None, rank: int | None, sizes: Sequence[int] | np.ndarray | None
    ) -> None:
        self.num_replicas, self.rank = _check_replicas(num_replicas, rank)
        self.sizes = None if sizes is None else np.asarray(sizes, dtype=np.int64)

    def _global_len(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return -(-self._global_len() // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose seed the next pass uses (then it advances by one per pass)."""
        self.epoch = check_int(epoch, "epoch", low=0)

    def _generator(self) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator()
        gen.manual_seed(int(state[0]) << 32 | int(state[1]))
        return gen

    def __iter__(self) -> Iterator[int]:
        order = self._draw(self._generator())
        self.epoch += 1
        mine = (
            order.tolist()
            if self.num_replicas == 1
            else shard_order(order, self.num_replicas, self.rank, self.sizes)
        )
        self.last_indices: list[int] = (
            mine  # what the last pass yielded (to put gathered predictions in order)
        )
        return iter(mine)

    def _draw(self, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class ClassBalancedSampler(_EpochSampler):
    """Draw indices with weights inverse to their class frequency.

    Sample ``i`` of class ``c`` has weight ``1 / count(c)``, so every class has
    the same total weight; unlabelled samples have weight 0.

    Parameters
    ----------
    labels : sequence of int, Tensor, or object with ``.labels``
        ``(n,)`` class index per sample, ``-1`` for unlabelled.
    num_samples : int or None, default None
        Indices per epoch; default the number of labelled samples.
    replacement : bool, default True
        Draw with replacement. Without it ``num_samples`` may not exceed the
        number of labelled samples.
    seed : int, default 0
        Seed; epoch ``e`` uses a generator seeded by ``(seed, e)``.
    num_replicas : int or None, default 1
        Ranks to shard the epoch's draw across (see "Sharding" in the module docstring);
        ``None`` = the ``torchrun`` world size. Each rank yields ``ceil(n / num_replicas)``.
    rank : int or None, default 0
        This rank; ``None`` = the ``torchrun`` rank.
    sizes : sequence of int or None, default None
        Instances per sample, for the bag-size-aware assignment of the sharded draw.

    Raises
    ------
    DataError
        Malformed labels, or no labelled sample.
    ConfigError
        An invalid ``num_samples``, ``seed``, ``num_replicas`` or ``rank``.

    Examples
    --------
    >>> import numpy as np
    >>> s = ClassBalancedSampler([0] * 90 + [1] * 10, num_samples=2000, seed=0)
    >>> drawn = np.array(list(s))
    >>> bool(0.4 < (drawn >= 90).mean() < 0.6)
    True
    >>> s.set_epoch(0); bool((np.array(list(s)) == drawn).all())
    True
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor | Any,
        num_samples: int | None = None,
        replacement: bool = True,
        seed: int = 0,
        num_replicas: int | None = 1,
        rank: int | None = 0,
        sizes: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        y = _labels_of(labels)
        self._shard_setup(num_replicas, rank, sizes)
        self.seed = check_int(seed, "seed", low=0)
        self.epoch = 0
        self.labels = y
        labelled = y >= 0
        counts = np.bincount(y[labelled])
        weights = np.zeros(y.size, dtype=np.float64)
        weights[labelled] = 1.0 / counts[y[labelled]]
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        n_labelled = int(labelled.sum())
        self.num_samples: int = (
            n_labelled if num_samples is None else check_int(num_samples, "num_samples", low=1)
        )
        self.replacement: bool = bool(replacement)
        if not self.replacement and self.num_samples > n_labelled:
            raise ConfigError(
                f"num_samples={self.num_samples} exceeds the {n_labelled} labelled samples "
                "with replacement=False"
            )

    def _global_len(self) -> int:
        return self.num_samples

    def _draw(self, gen: torch.Generator) -> torch.Tensor:
        return torch.multinomial(self.weights, self.num_samples, self.replacement, generator=gen)


class MinorityOversampler(_EpochSampler):
    """Repeat the indices of minority classes, then shuffle.

    Each class smaller than the majority is grown to a target count: the
    majority count (``factor=None``), or ``round(factor * count)``. Whole
    copies of the class come first; the remainder is a random subset drawn
    afresh each epoch. The majority class is kept once. Unlabelled samples
    are left out.

    Parameters
    ----------
    labels : sequence of int, Tensor, or object with ``.labels``
        ``(n,)`` class index per sample, ``-1`` for unlabelled.
    factor : float or None, default None
        ``None``: oversample every minority class to the majority count. A
        number ``>= 1``: multiply each minority class's count by it (``2.0``
        doubles it, as for the HEM class of the backbone-zoo report).
    shuffle : bool, default True
        Shuffle the epoch's indices; otherwise they come sorted by class,
        then position.
    seed : int, default 0
        Seed; epoch ``e`` uses a generator seeded by ``(seed, e)``.
    num_replicas : int or None, default 1
        Ranks to shard the epoch's draw across (see "Sharding" in the module docstring);
        ``None`` = the ``torchrun`` world size. Each rank yields ``ceil(n / num_replicas)``.
    rank : int or None, default 0
        This rank; ``None`` = the ``torchrun`` rank.
    sizes : sequence of int or None, default None
        Instances per sample, for the bag-size-aware assignment of the sharded draw.

    Attributes
    ----------
    class_counts : dict of int to tuple of int
        For each class, ``(original count, count per epoch)``.

    Raises
    ------
    DataError
        Malformed labels, or no labelled sample.
    ConfigError
        An invalid ``factor``, ``seed``, ``num_replicas`` or ``rank``.

    Examples
    --------
    >>> s = MinorityOversampler([1, 0, 0, 0, 0, 1, 0], factor=2.0, seed=3)
    >>> s.class_counts
    {0: (5, 5), 1: (2, 4)}
    >>> sorted(s)
    [0, 0, 1, 2, 3, 4, 5, 5, 6]
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor | Any,
        factor: float | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = 1,
        rank: int | None = 0,
        sizes: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        y = _labels_of(labels)
        self._shard_setup(num_replicas, rank, sizes)
        self.factor = None if factor is None else check_real(factor, "factor", low=1.0)
        self.seed = check_int(seed, "seed", low=0)
        self.epoch = 0
        self.labels = y
        self.shuffle = bool(shuffle)
        classes, counts = np.unique(y[y >= 0], return_counts=True)
        majority = int(counts.max())
        self._members = {int(c): torch.as_tensor(np.flatnonzero(y == c)) for c in classes}
        self.class_counts: dict[int, tuple[int, int]] = {}
        for c, n in zip(classes.tolist(), counts.tolist(), strict=True):
            target = n if n == majority else (majority if self.factor is None else round(self.factor * n))
            self.class_counts[int(c)] = (int(n), int(target))

    def _global_len(self) -> int:
        return sum(target for _, target in self.class_counts.values())

    def _draw(self, gen: torch.Generator) -> torch.Tensor:
        parts = []
        for c, (n, target) in self.class_counts.items():
            members = self._members[c]
            copies, rest = divmod(target, n)
            parts.append(members.repeat(copies))
            if rest:
                parts.append(members[torch.randperm(n, generator=gen)[:rest]].sort().values)
        order = torch.cat(parts)
        if self.shuffle:
            order = order[torch.randperm(order.numel(), generator=gen)]
        return order


class DistributedBagSampler(_EpochSampler):
    """Every bag once per epoch, shuffled, sharded across ranks with similar instance counts.

    :class:`~torch.utils.data.DistributedSampler` semantics (a seeded global permutation per
    epoch, padded by repetition to a multiple of ``num_replicas``, ``ceil(n / num_replicas)``
    indices per rank, ``set_epoch``), plus the bag-size-aware assignment described under
    "Sharding" in the module docstring when ``sizes`` is given: each group of
    ``num_replicas`` consecutive bags of the permutation is dealt largest first to the rank with
    the fewest instances so far. The union of the ranks' indices is the permutation (each bag
    exactly once, plus the padding), the same on every rank for a given ``(seed, epoch)``. With
    two ranks their instance totals differ by at most the largest bag (the greedy step never lets
    the gap exceed the larger bag of a pair); with more ranks the greedy deal keeps them close
    in the same way, without that exact bound.

    Parameters
    ----------
    dataset : Dataset or int
        The dataset (its length is used, and its sizes via :func:`bag_sizes` when ``sizes`` is
        ``"auto"``) or the number of items ``n >= 1``.
    sizes : "auto", sequence of int or None, default "auto"
        Instances per item; ``"auto"`` reads them with :func:`bag_sizes` (None when unknown);
        ``None`` gives ``DistributedSampler``'s assignment.
    num_replicas, rank : int or None, default None
        Ranks and this rank; ``None`` = from ``torchrun`` (1 and 0 in a single process).
    shuffle : bool, default True
        Permute each epoch; otherwise the global order is ``0 .. n-1``.
    seed : int, default 0
        Epoch ``e`` permutes with a generator seeded by ``(seed, e)``.

    Raises
    ------
    ConfigError
        An invalid ``seed``, ``num_replicas``, ``rank``, or ``sizes`` of the wrong length.

    Examples
    --------
    >>> sizes = [50, 3, 4, 40, 5, 6]
    >>> ranks = [DistributedBagSampler(6, sizes=sizes, num_replicas=2, rank=r, seed=1) for r in range(2)]
    >>> parts = [list(s) for s in ranks]
    >>> sorted(parts[0] + parts[1])
    [0, 1, 2, 3, 4, 5]
    >>> [sum(sizes[i] for i in p) for p in parts]
    [48, 60]
    """

    def __init__(
        self,
        dataset: Any,
        sizes: str | Sequence[int] | np.ndarray | None = "auto",
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        n = dataset if isinstance(dataset, int) and not isinstance(dataset, bool) else len(dataset)
        self.n = check_int(n, "dataset length", low=1)
        if isinstance(sizes, str):
            if sizes != "auto":
                raise ConfigError(f"sizes must be 'auto', a sequence of int or None, got {sizes!r}")
            sizes = None if isinstance(dataset, int) else bag_sizes(dataset)
        if sizes is not None and len(sizes) != self.n:
            raise ConfigError(f"sizes has {len(sizes)} entries for a dataset of {self.n} items")
        self._shard_setup(num_replicas, rank, sizes)
        self.shuffle = bool(shuffle)
        self.seed = check_int(seed, "seed", low=0)
        self.epoch = 0

    def _global_len(self) -> int:
        return self.n

    def _draw(self, gen: torch.Generator) -> torch.Tensor:
        if self.shuffle:
            return torch.randperm(self.n, generator=gen)
        return torch.arange(self.n)
