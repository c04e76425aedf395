"""Bags, batches of bags, and the collate that packs them.

A *bag* is one patient: a variable number of instances (cell images or their
feature vectors), one label, optional clinical attributes. A batch never pads
images: :func:`collate_bags` concatenates the real instances of every bag
along the first axis into a packed tensor ``(T, ...)``, with ``T`` the sum of
the bag sizes, and records the sizes. The padded view ``(B, N_max, ...)`` and
its boolean mask (``True`` = real instance) are derived from the sizes only
when a step needs them, after the backbone has run on the real instances.

Examples
--------
>>> import torch
>>> from milcell.data import Bag, collate_bags
>>> batch = collate_bags([
...     Bag(torch.zeros(2, 4), label=1, id="P1"),
...     Bag(torch.ones(3, 4), label=0, id="P2"),
... ])
>>> batch.instances.shape, batch.bag_sizes.tolist()
(torch.Size([5, 4]), [2, 3])
>>> batch.mask
tensor([[ True,  True, False],
        [ True,  True,  True]])
>>> batch.pad(batch.instances).shape
torch.Size([2, 3, 4])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from milcell._validation import check_int
from milcell.exceptions import ConfigError, DataError, ShapeError

__all__ = ["Bag", "BagBatch", "collate_bags"]


@dataclass
class Bag:
    """One sample of multiple-instance learning: a patient and its instances.

    Parameters
    ----------
    instances : Tensor
        ``(N, ...)`` with ``N >= 1``: images ``(N, C, H, W)`` or features
        ``(N, D)``. A single cell is a bag of one, ``(1, C, H, W)``.
    label : int, default -1
        Class index of the bag; ``-1`` marks an unlabelled bag. A numpy
        integer or a 0-d integer tensor is stored as a plain ``int``.
    clinical : Tensor or None, default None
        ``(F,)`` float clinical attributes (age, lymphocyte count, ...).
    id : str, default ""
        Patient or sample identifier, carried through to predictions.
    instance_names : tuple of str or None, default None
        One name per instance (typically the image file name), so attention
        weights can be traced back to cells.
    soft_label : Tensor or None, default None
        ``(num_classes,)`` probability target, used by self-training with soft
        pseudo-labels instead of ``label``.

    Raises
    ------
    DataError
        If the bag is empty or its fields are inconsistent; the message names
        the bag.

    Examples
    --------
    >>> import torch
    >>> bag = Bag(torch.rand(5, 3, 32, 32), label=1, clinical=torch.tensor([63.0, 12.5]), id="P7")
    >>> len(bag), bag.instances.shape
    (5, torch.Size([5, 3, 32, 32]))
    """

    instances: Tensor
    label: int = -1
    clinical: Tensor | None = None
    id: str = ""
    instance_names: tuple[str, ...] | None = None
    soft_label: Tensor | None = None

    def __post_init__(self) -> None:
        name = self.id or "<unnamed>"
        if not isinstance(self.instances, Tensor):
            raise DataError(
                f"bag {name!r}: instances must be a torch.Tensor, got {type(self.instances).__name__}"
            )
        if self.instances.ndim < 1 or self.instances.shape[0] == 0:
            raise DataError(f"bag {name!r} is empty: instances has shape {tuple(self.instances.shape)}")
        label: Any = self.label
        if isinstance(label, Tensor) and label.ndim == 0 and not label.is_floating_point():
            label = int(label)  # a 0-d integer tensor from a dataset; Bags are built on the host
        try:
            self.label = check_int(label, "label", low=-1)
        except ConfigError as err:
            raise DataError(f"bag {name!r}: {err}") from None
        if self.clinical is not None:
            self.clinical = torch.as_tensor(self.clinical, dtype=torch.float32)
            if self.clinical.ndim != 1:
                raise DataError(
                    f"bag {name!r}: clinical must have shape (F,), got {tuple(self.clinical.shape)}"
                )
        if self.instance_names is not None:
            self.instance_names = tuple(self.instance_names)
            if len(self.instance_names) != self.instances.shape[0]:
                raise DataError(
                    f"bag {name!r}: {len(self.instance_names)} instance names for "
                    f"{self.instances.shape[0]} instances"
                )
        if self.soft_label is not None:
            self.soft_label = torch.as_tensor(self.soft_label, dtype=torch.float32)
            if self.soft_label.ndim != 1:
                raise DataError(
                    f"bag {name!r}: soft_label must have shape (num_classes,), "
                    f"got {tuple(self.soft_label.shape)}"
                )

    def __len__(self) -> int:
        return int(self.instances.shape[0])


@dataclass
class BagBatch:
    """A batch of bags with the instances packed, never padded.

    Build it with :func:`collate_bags`. The mask and the padding index are
    derived from the bag sizes on first use and cached. The bag sizes exist
    twice: as the tensor ``bag_sizes``, which moves with the batch, and as
    :attr:`sizes`, a tuple of Python ints that stays on the host (filled by
    :func:`collate_bags` from the bags' lengths), so that ``N_max``, ``T``
    and the padded layout are known without reading a device tensor: padding
    a batch on a GPU never waits for the device.

    Attributes
    ----------
    instances : Tensor
        ``(T, ...)`` real instances of every bag, bag after bag, ``T = bag_sizes.sum()``.
    bag_sizes : Tensor
        ``(B,)`` long, number of instances of each bag (all >= 1).
    labels : Tensor
        ``(B,)`` long class indices, ``-1`` for unlabelled bags.
    clinical : Tensor or None
        ``(B, F)`` float clinical attributes, or None.
    ids : list of str
        ``B`` bag identifiers.
    instance_names : list of tuple of str, or None
        Per-bag instance names when every bag carried them.
    soft_labels : Tensor or None
        ``(B, num_classes)`` probability targets when every bag carried one.

    Examples
    --------
    >>> import torch
    >>> batch = collate_bags([Bag(torch.rand(1, 8), 0, id="a"), Bag(torch.rand(4, 8), 1, id="b")])
    >>> batch.batch_size, batch.num_instances, batch.max_bag_size, batch.sizes
    (2, 5, 4, (1, 4))
    >>> padded = batch.pad(batch.instances)          # (B, N_max, D)
    >>> torch.equal(batch.unpad(padded), batch.instances)
    True
    """

    instances: Tensor
    bag_sizes: Tensor
    labels: Tensor
    clinical: Tensor | None = None
    ids: list[str] = field(default_factory=list)
    instance_names: list[tuple[str, ...]] | None = None
    soft_labels: Tensor | None = None

    def __len__(self) -> int:
        return int(self.bag_sizes.shape[0])

    @property
    def batch_size(self) -> int:
        """Number of bags ``B``."""
        return len(self)

    @property
    def num_instances(self) -> int:
        """Total number of real instances ``T``."""
        return int(self.instances.shape[0])

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """``B`` bag sizes as Python ints, kept on the host (``bag_sizes`` as a tuple).

        :func:`collate_bags`, :meth:`to` and :meth:`pin_memory` fill it without
        touching a tensor; a batch built by hand (or with
        :func:`dataclasses.replace`) reads it once from ``bag_sizes``.

        Examples
        --------
        >>> import torch
        >>> collate_bags([Bag(torch.rand(3, 2)), Bag(torch.rand(1, 2))]).to("cpu").sizes
        (3, 1)
        """
        return tuple(int(n) for n in self.bag_sizes.tolist())

    @cached_property
    def max_bag_size(self) -> int:
        """``N_max``, the size of the largest bag (from :attr:`sizes`, no device read)."""
        return max(self.sizes, default=0)

    @cached_property
    def mask(self) -> Tensor:
        """``(B, N_max)`` bool on ``bag_sizes.device``; ``True`` marks a real instance."""
        positions = torch.arange(self.max_bag_size, device=self.bag_sizes.device)
        return positions.unsqueeze(0) < self.bag_sizes.unsqueeze(1)

    @cached_property
    def bag_index(self) -> Tensor:
        """``(T,)`` long, the bag each packed instance belongs to."""
        bags = torch.arange(len(self), device=self.bag_sizes.device)
        return torch.repeat_interleave(bags, self.bag_sizes, output_size=sum(self.sizes))

    @cached_property
    def _flat_index(self) -> Tensor:
        # Position of each packed instance in the flattened (B * N_max) padded layout, computed on
        # the device from sizes known on the host (no nonzero(), whose output size needs a sync).
        starts = torch.cumsum(self.bag_sizes, dim=0) - self.bag_sizes
        bag = self.bag_index
        position = torch.arange(bag.shape[0], device=bag.device) - starts[bag]
        return bag * self.max_bag_size + position

    def pad(self, values: Tensor, fill: float = 0.0) -> Tensor:
        """Scatter packed per-instance values into a padded per-bag layout.

        Parameters
        ----------
        values : Tensor
            ``(T, ...)``, one row per packed instance (e.g. features ``(T, D)``).
        fill : float, default 0.0
            Value written at padded positions (where ``mask`` is False).

        Returns
        -------
        Tensor
            ``(B, N_max, ...)``; differentiable with respect to ``values``.

        Raises
        ------
        ShapeError
            If ``values`` does not have ``T`` rows.

        Examples
        --------
        >>> import torch
        >>> b = collate_bags([Bag(torch.ones(1, 2)), Bag(torch.ones(2, 2))])
        >>> b.pad(torch.arange(3.0), fill=-1.0)
        tensor([[ 0., -1.],
                [ 1.,  2.]])
        """
        if values.shape[0] != self.num_instances:
            raise ShapeError(
                f"pad: values has {values.shape[0]} rows but the batch packs {self.num_instances} instances"
            )
        rest = values.shape[1:]
        out = values.new_full((len(self) * self.max_bag_size, *rest), fill)
        index = self._flat_index.to(values.device)
        out = out.index_copy(0, index, values)
        return out.view(len(self), self.max_bag_size, *rest)

    def unpad(self, padded: Tensor) -> Tensor:
        """Inverse of :meth:`pad`: keep the real instances of a padded tensor.

        Parameters
        ----------
        padded : Tensor
            ``(B, N_max, ...)``.

        Returns
        -------
        Tensor
            ``(T, ...)`` in packed order.

        Examples
        --------
        >>> import torch
        >>> b = collate_bags([Bag(torch.ones(1, 2)), Bag(torch.ones(2, 2))])
        >>> b.unpad(torch.tensor([[5.0, 0.0], [6.0, 7.0]]))
        tensor([5., 6., 7.])
        """
        if tuple(padded.shape[:2]) != (len(self), self.max_bag_size):
            raise ShapeError(
                f"unpad: expected leading shape ({len(self)}, {self.max_bag_size}), "
                f"got {tuple(padded.shape[:2])}"
            )
        flat = padded.reshape(len(self) * self.max_bag_size, *padded.shape[2:])
        return flat.index_select(0, self._flat_index.to(padded.device))

    def split(self, values: Tensor) -> list[Tensor]:
        """Split packed ``(T, ...)`` values into one ``(N_i, ...)`` tensor per bag.

        Examples
        --------
        >>> import torch
        >>> b = collate_bags([Bag(torch.ones(1, 2)), Bag(torch.ones(2, 2))])
        >>> [t.tolist() for t in b.split(torch.arange(3))]
        [[0], [1, 2]]
        """
        return list(torch.split(values, list(self.sizes)))

    def _map(self, fn: Any) -> BagBatch:
        out = BagBatch(
            instances=fn(self.instances),
            bag_sizes=fn(self.bag_sizes),
            labels=fn(self.labels),
            clinical=None if self.clinical is None else fn(self.clinical),
            ids=list(self.ids),
            instance_names=self.instance_names,
            soft_labels=None if self.soft_labels is None else fn(self.soft_labels),
        )
        out.__dict__["sizes"] = self.sizes  # the host copy travels without a device read
        return out

    def to(
        self,
        device: torch.device | str,
        non_blocking: bool = False,
        dtype: torch.dtype | None = None,
    ) -> BagBatch:
        """Move every tensor to ``device``; ``dtype`` casts floating tensors only.

        Examples
        --------
        >>> import torch
        >>> b = collate_bags([Bag(torch.ones(2, 3), 1)]).to("cpu", dtype=torch.float64)
        >>> b.instances.dtype, b.labels.dtype
        (torch.float64, torch.int64)
        """

        def move(t: Tensor) -> Tensor:
            target = dtype if (dtype is not None and t.is_floating_point()) else None
            return t.to(device=device, dtype=target, non_blocking=non_blocking)

        return self._map(move)

    def pin_memory(self) -> BagBatch:
        """Return a copy in page-locked memory (used by ``DataLoader(pin_memory=True)``)."""
        return self._map(lambda t: t.pin_memory())


def _stack_optional(values: Sequence[Tensor | None], what: str, ids: Sequence[str]) -> Tensor | None:
    present = [v is not None for v in values]
    if not any(present):
        return None
    if not all(present):
        missing = [i for i, v in zip(ids, values, strict=True) if v is None]
        raise DataError(f"collate_bags: {what} is missing for bags {missing[:5]} but present for others")
    shapes = {tuple(v.shape) for v in values if v is not None}
    if len(shapes) > 1:
        detail = ", ".join(
            f"{i}: {tuple(v.shape)}" for i, v in zip(ids, values, strict=True) if v is not None
        )
        raise DataError(f"collate_bags: mismatched {what} dimensions within a batch ({detail})")
    return torch.stack([v for v in values if v is not None])


def collate_bags(bags: Sequence[Bag]) -> BagBatch:
    """Pack a list of bags into a :class:`BagBatch` (use as ``DataLoader(collate_fn=...)``).

    Instances are concatenated along the first axis, never padded.

    Parameters
    ----------
    bags : sequence of Bag
        At least one bag; every bag has ``N_i >= 1`` instances with the same
        trailing shape, and either all or none carry clinical attributes (of
        one width ``F``).

    Returns
    -------
    BagBatch
        ``instances (T, ...)``, ``bag_sizes (B,)``, ``labels (B,)``,
        ``clinical (B, F)`` or None, ``ids``.

    Raises
    ------
    DataError
        For an empty list, an empty bag, mismatched instance shapes or
        mismatched clinical dimensions; the message names the bags.

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> bags = [Bag(torch.rand(n, 3, 8, 8), label=n % 2, id=f"P{n}") for n in (3, 1, 2)]
    >>> batch = next(iter(DataLoader(bags, batch_size=3, collate_fn=collate_bags)))
    >>> batch.instances.shape, batch.ids
    (torch.Size([6, 3, 8, 8]), ['P3', 'P1', 'P2'])
    """
    if len(bags) == 0:
        raise DataError("collate_bags: got an empty list of bags")
    ids = [b.id for b in bags]
    for b in bags:
        if b.instances.ndim < 1 or b.instances.shape[0] == 0:
            raise DataError(f"collate_bags: bag {b.id!r} is empty")
    trailing = {tuple(b.instances.shape[1:]) for b in bags}
    if len(trailing) > 1:
        detail = ", ".join(f"{b.id}: {tuple(b.instances.shape[1:])}" for b in bags[:8])
        raise DataError(f"collate_bags: instances have different shapes within a batch ({detail})")
    instances = torch.cat([b.instances for b in bags]) if len(bags) > 1 else bags[0].instances
    names = [b.instance_names for b in bags]
    batch = BagBatch(
        instances=instances,
        bag_sizes=torch.tensor([len(b) for b in bags], dtype=torch.long),
        labels=torch.tensor([b.label for b in bags], dtype=torch.long),
        clinical=_stack_optional([b.clinical for b in bags], "clinical", ids),
        ids=ids,
        instance_names=None if any(n is None for n in names) else [n for n in names if n is not None],
        soft_labels=_stack_optional([b.soft_label for b in bags], "soft_label", ids),
    )
    batch.__dict__["sizes"] = tuple(len(b) for b in bags)
    return batch
