"""Samplers for imbalanced classes, usable as ``DataLoader(sampler=...)``.

* :class:`ClassBalancedSampler` draws, each epoch, indices with probability
  inverse to their class frequency, so every class is seen about equally often.
* :class:`MinorityOversampler` repeats the minority classes' indices up to the
  majority count (or by a factor: the backbone-zoo report doubled the HEM
  class) and shuffles them.

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
from torch.utils.data import Sampler

from milcell._validation import check_int, check_real
from milcell.exceptions import ConfigError, DataError

__all__ = ["ClassBalancedSampler", "MinorityOversampler"]


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


class _EpochSampler(Sampler[int]):
    seed: int
    epoch: int

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
        return iter(order.tolist())

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

    Raises
    ------
    DataError
        Malformed labels, or no labelled sample.
    ConfigError
        An invalid ``num_samples`` or ``seed``.

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
    ) -> None:
        y = _labels_of(labels)
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

    def __len__(self) -> int:
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

    Attributes
    ----------
    class_counts : dict of int to tuple of int
        For each class, ``(original count, count per epoch)``.

    Raises
    ------
    DataError
        Malformed labels, or no labelled sample.
    ConfigError
        An invalid ``factor`` or ``seed``.

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
    ) -> None:
        y = _labels_of(labels)
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

    def __len__(self) -> int:
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
