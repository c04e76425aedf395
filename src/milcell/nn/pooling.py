"""Pooling operators: from a padded bag of instance features to one bag embedding.

Every pooling is a :class:`MILPooling` (an :class:`torch.nn.Module`) called as
``pool(x, mask)`` with ``x`` of shape ``(B, N, D)`` (``N`` = the largest bag of
the batch, ``D == in_dim``) and ``mask`` of shape ``(B, N)``, bool, ``True``
marking a real instance. It returns the bag embedding ``(B, out_dim)`` and,
with ``return_attention=True``, also the per-instance weights ``(B, N)``
(float32, exactly ``0`` at masked positions, summing to ``1`` over each bag).

Guarantees shared by all poolings:

* masked positions have exactly no influence, even when they hold NaN or
  inf: they are replaced by zeros with :func:`torch.where` before any
  arithmetic, so neither the outputs nor the gradients see them;
* a bag's output depends only on its own real instances, not on their order,
  on the other bags of the batch or on ``N_max``;
* a malformed ``x`` or ``mask`` raises :class:`~milcell.exceptions.ShapeError`
  naming the argument; with the value checks on (:func:`milcell.checks`,
  ``MILCELL_CHECKS=1``) a bag with no real instance raises
  :class:`~milcell.exceptions.DataError` naming its index (with them off,
  the default, nothing reads the mask's values on the host, so a forward
  pass never waits for the device);
* softmaxes over instances are computed in float32, also under autocast.

Poolings are built by name through a registry, like timm's ``create_model``:

====================  =====================================================
name                  bag embedding
====================  =====================================================
``mean``              masked mean of the instances
``max``               masked per-feature maximum
``lse``               log-sum-exp, a smooth maximum with temperature ``r``
``attention``         attention MIL (Ilse et al., 2018)
``gated_attention``   gated attention MIL (Ilse et al., 2018)
``conv``              instances ranked by a learned score, 1-D convolution
                      along the ranking, masked mean (or max)
``instance_mean``     prediction-level: per-instance classifier, then the
                      log of the masked mean of instance probabilities
====================  =====================================================

Examples
--------
>>> import torch
>>> from milcell.nn.pooling import create_pooling, list_poolings
>>> {"mean", "max", "lse", "attention", "gated_attention", "conv", "instance_mean"} <= set(list_poolings())
True
>>> pool = create_pooling("gated_attention", in_dim=8, hidden=16)
>>> x = torch.randn(2, 5, 8)
>>> mask = torch.tensor([[True, True, True, False, False], [True] * 5])
>>> emb, weights = pool(x, mask, return_attention=True)
>>> emb.shape, weights.shape, pool.out_dim
(torch.Size([2, 8]), torch.Size([2, 5]), 8)
>>> weights[0, 3:].tolist(), round(weights[0].sum().item(), 4)
([0.0, 0.0], 1.0)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

import torch
from torch import Tensor, nn

from milcell._checks import checks_enabled
from milcell._validation import check_choice, check_int, check_real, constraint_error
from milcell.exceptions import ConfigError, DataError, ShapeError
from milcell.registry import Registry

__all__ = [
    "AttentionPooling",
    "ConvPooling",
    "GatedAttentionPooling",
    "HiddenSizes",
    "InstanceMeanPooling",
    "LSEPooling",
    "MILPooling",
    "MaxPooling",
    "MeanPooling",
    "PoolingOutput",
    "create_pooling",
    "list_poolings",
    "masked_softmax",
    "register_pooling",
]

logger = logging.getLogger("milcell")

_POOLINGS: Registry[MILPooling] = Registry("pooling")

F = TypeVar("F", bound=Callable[..., Any])

#: A hidden-layer specification: one width (one hidden layer) or a sequence of widths, one per
#: hidden layer (``()``: none). Every ``hidden`` / ``*_hidden`` argument of the poolings and fusion
#: heads takes it; :func:`_check_hidden` is the one helper that reads it.
HiddenSizes = Union[int, Sequence[int]]  # noqa: UP007  (a runtime alias: Python 3.10 has no `type`)


# --------------------------------------------------------------------------- helpers


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A context that disables autocast on ``device`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _check_dropout(value: Any, name: str = "dropout") -> float:
    return check_real(value, name, low=0.0, high=1.0, high_open=True)


def _check_hidden(hidden: Any, name: str = "hidden", *, length: int | None = None) -> tuple[int, ...]:
    """Read a :data:`HiddenSizes`: an integer or a sequence of integers, each ``>= 1``.

    Returns the widths as a tuple of plain ints (``8 -> (8,)``, ``[16, 8] -> (16, 8)``). With
    ``length``, exactly that many widths are required (attention pooling has one hidden layer).
    """
    if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
        hidden = (hidden,)
    if length == 1:
        constraint = "an integer >= 1 (or a tuple of one)"
    elif length is None:
        constraint = "an integer >= 1 or a tuple of integers >= 1"
    else:
        constraint = f"a tuple of {length} integers >= 1"
    if not isinstance(hidden, Sequence) or isinstance(hidden, str):
        raise constraint_error(name, constraint, hidden)
    if length is not None and len(hidden) != length:
        raise constraint_error(name, constraint, hidden)
    if length == 1:
        return (check_int(hidden[0], name, low=1),)
    return tuple(check_int(h, f"{name}[{i}]", low=1) for i, h in enumerate(hidden))


def _renamed_kwargs(warn: bool = True, **renames: str) -> Callable[[F], F]:
    """Decorator: accept each old keyword of ``renames`` (``old="new"``) as its new name.

    The old keyword is mapped to the new one, with a :class:`DeprecationWarning` naming the new
    spelling when ``warn`` is True (``warn=False`` while an in-repo caller still uses it).
    Passing both spellings is a :class:`~milcell.exceptions.ConfigError`.
    """

    def decorate(fn: F) -> F:
        owner = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise ConfigError(f"{owner}: pass {new}= only ({old}= is its deprecated name)")
                    if warn:
                        warnings.warn(
                            f"{owner}: {old}= is deprecated, use {new}=", DeprecationWarning, stacklevel=2
                        )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _renamed_attribute(old: str, new: str, warn: bool = True) -> property:
    """A property ``old`` reading (and writing) the attribute ``new``.

    It warns with a :class:`DeprecationWarning` naming the new spelling when ``warn`` is True.
    """

    def _warn(obj: Any) -> None:
        if warn:
            warnings.warn(
                f"{type(obj).__name__}.{old} is deprecated, use .{new}", DeprecationWarning, stacklevel=3
            )

    def get(self: Any) -> Any:
        _warn(self)
        return getattr(self, new)

    def set_(self: Any, value: Any) -> None:
        _warn(self)
        setattr(self, new, value)

    return property(get, set_, doc=f"Deprecated spelling of ``{new}``.")


def _mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int, dropout: float) -> nn.Sequential:
    """``Linear-ReLU-Dropout`` blocks for each hidden size, then a final ``Linear``."""
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def _check_clinical(clinical: Any, batch: int, dim: int, owner: str) -> Tensor:
    """Validate a ``(B, F)`` clinical tensor: present, 2-D, right width; finite when checks are on."""
    if clinical is None:
        raise ShapeError(f"clinical is required by {owner} (expected a tensor of shape (B, {dim}))")
    if not isinstance(clinical, Tensor):
        raise ShapeError(
            f"clinical must be a torch.Tensor of shape (B, {dim}), got {type(clinical).__name__}"
        )
    if clinical.dim() != 2 or clinical.shape[1] != dim:
        raise ShapeError(f"clinical must have shape (B, {dim}) for {owner}, got {tuple(clinical.shape)}")
    if clinical.shape[0] != batch:
        raise ShapeError(f"clinical has {clinical.shape[0]} rows but the batch has {batch} bags")
    if not clinical.is_floating_point():
        raise ShapeError(f"clinical must be a floating-point tensor, got dtype {clinical.dtype}")
    if checks_enabled():
        bad = ~torch.isfinite(clinical).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise DataError(f"clinical holds NaN or inf in bag {rows[0]} (rows {rows})")
    return clinical


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the instance axis of real instances only, in float32.

    Parameters
    ----------
    scores : Tensor
        ``(B, N)`` scores of any floating dtype; values at masked positions
        are ignored (they may be NaN or inf).
    mask : Tensor
        ``(B, N)`` bool, ``True`` marks a real instance; every row needs at
        least one ``True``.

    Returns
    -------
    Tensor
        ``(B, N)`` float32 weights, exactly ``0`` where ``mask`` is False,
        summing to 1 over each row. Computed with autocast disabled.

    Examples
    --------
    >>> import torch
    >>> masked_softmax(torch.tensor([[0.0, 0.0, float("nan")]]), torch.tensor([[True, True, False]]))
    tensor([[0.5000, 0.5000, 0.0000]])
    """
    with _no_autocast(scores.device):
        s = torch.where(mask, scores.float(), float("-inf"))
        w = torch.softmax(s, dim=1)
        return torch.where(mask, w, 0.0)


# --------------------------------------------------------------------------- registry


def register_pooling(name: str) -> Callable[[F], F]:
    """Decorator registering a :class:`MILPooling` subclass (or factory) under ``name``.

    The factory is called as ``factory(in_dim, **kwargs)``.

    Examples
    --------
    >>> from milcell.nn.pooling import MILPooling, register_pooling, create_pooling
    >>> class FirstInstance(MILPooling):
    ...     '''Not permutation-invariant: for illustration only.'''
    ...     def _pool(self, x, mask, clinical):
    ...         first = mask.float().argmax(dim=1)
    ...         w = torch.nn.functional.one_hot(first, x.shape[1]).float()
    ...         return x[torch.arange(x.shape[0]), first], w
    >>> if "first_doc_example" not in list_poolings():
    ...     _ = register_pooling("first_doc_example")(FirstInstance)
    >>> create_pooling("first_doc_example", 3)(torch.ones(1, 2, 3), torch.tensor([[False, True]]))
    tensor([[1., 1., 1.]])
    """
    return _POOLINGS.register(name)


def create_pooling(name: str, in_dim: int, **kwargs: Any) -> MILPooling:
    """Build the pooling registered under ``name``.

    Parameters
    ----------
    name : str
        One of :func:`list_poolings`.
    in_dim : int
        Feature size ``D`` of the instances ``(B, N, D)``.
    **kwargs
        Options of that pooling (see its class).

    Returns
    -------
    MILPooling
        The module; ``out_dim`` gives the size of its bag embedding.

    Raises
    ------
    ConfigError
        For an unknown name (with a suggestion), an option the pooling
        does not take, or an invalid value (the message names the argument,
        the constraint and the value).

    Integers may be Python or numpy integers, reals Python or numpy numbers;
    they are stored as plain ``int`` / ``float``.

    Examples
    --------
    >>> import numpy as np
    >>> create_pooling("lse", 4, r=2.0).out_dim
    4
    >>> create_pooling("attention", np.int64(8), hidden=np.int32(16)).hidden
    16
    >>> create_pooling("attention", 8, hidden=0)
    Traceback (most recent call last):
    ...
    milcell.exceptions.ConfigError: hidden must be an integer >= 1, got 0
    >>> create_pooling("mean", 4, hidden=3)
    Traceback (most recent call last):
    ...
    milcell.exceptions.ConfigError: pooling 'mean' does not take ... 'hidden'...
    """
    factory = _POOLINGS.get(name)
    try:
        inspect.signature(factory).bind(in_dim, **kwargs)
    except TypeError as err:
        raise ConfigError(f"pooling {name!r} does not take these arguments: {err}") from None
    return factory(in_dim, **kwargs)


def list_poolings() -> list[str]:
    """Sorted names of the registered poolings.

    Examples
    --------
    >>> "gated_attention" in list_poolings()
    True
    """
    return _POOLINGS.names()


# --------------------------------------------------------------------------- base class


@dataclass
class PoolingOutput:
    """Everything a pooling computes for a batch: :meth:`MILPooling.forward_aux`.

    Attributes
    ----------
    embedding : Tensor
        ``(B, out_dim)`` bag embedding (class scores for a prediction-level pooling).
    attention : Tensor
        ``(B, N)`` float32 per-instance weights, exactly 0 at masked positions.
    aux : dict of str to Tensor
        Pooling-specific tensors (e.g. ``"instance_scores"`` ``(B, N, C)``,
        ``"class_attention"`` ``(B, C, N)``): what its
        :meth:`~MILPooling.auxiliary_losses` need, and what a user may want
        to inspect. Empty for the poolings without auxiliary outputs.

    Examples
    --------
    >>> import torch
    >>> out = MeanPooling(4).forward_aux(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    >>> out.embedding.shape, out.attention.shape, out.aux
    (torch.Size([2, 4]), torch.Size([2, 3]), {})
    """

    embedding: Tensor
    attention: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)


class MILPooling(nn.Module):
    """Base class of every pooling: validation, masking and the common ``forward``.

    Subclasses implement ``_pool(x, mask, clinical) -> (embedding, weights)``
    where ``x`` has already been cleaned (masked positions are exact zeros,
    whatever they held), ``mask`` is valid and every bag has at least one
    real instance. :meth:`forward` then forces the weights to exactly 0 at
    masked positions.

    A pooling with auxiliary outputs (instance scores, per-class attention,
    ...) implements ``_pool_aux(x, mask, clinical) -> (embedding, weights,
    aux)`` instead, with the same preconditions; :meth:`forward_aux` returns
    all three as a :class:`PoolingOutput`, and :meth:`forward` drops ``aux``.
    If its training objective has extra terms (CLAM's instance clustering,
    DSMIL's max-instance loss, ...), it sets :attr:`aux_loss_weights` and
    overrides :meth:`auxiliary_losses`; :meth:`milcell.nn.MILModel.loss`
    adds them, weighted, to the bag loss. This is the one mechanism for
    auxiliary losses; a pooling without them costs nothing extra.

    Parameters
    ----------
    in_dim : int
        Feature size ``D`` of the instances.

    Attributes
    ----------
    in_dim : int
        ``D``.
    out_dim : int
        Size of the bag embedding (``D`` unless the pooling says otherwise).
    prediction_level : bool
        ``True`` when the output is already class scores (``instance_mean``),
        so a model must not put a fusion head with hidden layers on it.
    use_clinical : bool
        ``True`` when :meth:`forward` needs the bag's ``clinical`` attributes.
        Poolings that do not use them ignore a ``clinical`` argument.
        (``uses_clinical``, its old spelling, still works with a
        :class:`DeprecationWarning`.)
    aux_loss_weights : dict of str to float
        Weight of each auxiliary loss by name (``{}``: none); set by the
        pooling's constructor arguments, overridable per call of
        :meth:`milcell.nn.MILModel.loss` (``aux_weights=``).

    Examples
    --------
    >>> pool = MeanPooling(3)
    >>> pool.prediction_level, pool.use_clinical, pool.out_dim, pool.aux_loss_weights
    (False, False, 3, {})
    """

    prediction_level: bool = False
    use_clinical: bool = False
    uses_clinical = _renamed_attribute("uses_clinical", "use_clinical")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        old = cls.__dict__.get("uses_clinical")
        if old is not None and not isinstance(old, property):  # a pooling written for the old name
            warnings.warn(
                f"{cls.__name__}.uses_clinical is deprecated, define use_clinical instead",
                DeprecationWarning,
                stacklevel=2,
            )
            cls.use_clinical = bool(old)
            del cls.uses_clinical

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.in_dim = check_int(in_dim, "in_dim", low=1)
        self.out_dim = self.in_dim
        self.aux_loss_weights: dict[str, float] = {}

    # -- validation -------------------------------------------------------------------
    def _validate(self, x: Any, mask: Any) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise ShapeError(
                f"x must be a torch.Tensor of shape (B, N, {self.in_dim}), got {type(x).__name__}"
            )
        if x.dim() != 3:
            raise ShapeError(f"x must have shape (B, N, D) with D={self.in_dim}, got {tuple(x.shape)}")
        if x.shape[2] != self.in_dim:
            raise ShapeError(
                f"x has feature size D={x.shape[2]} but this {name} was built with in_dim={self.in_dim}"
            )
        if not x.is_floating_point():
            raise ShapeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.shape[0] == 0:
            raise ShapeError("x is an empty batch (B = 0); a batch needs at least one bag")
        if not isinstance(mask, Tensor):
            raise ShapeError(f"mask must be a bool torch.Tensor of shape (B, N), got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise ShapeError(f"mask must have dtype torch.bool (True = real instance), got {mask.dtype}")
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ShapeError(
                f"mask must have shape (B, N) = {tuple(x.shape[:2])} to match x, got {tuple(mask.shape)}"
            )
        if mask.device != x.device:
            raise ShapeError(f"mask is on {mask.device} but x is on {x.device}")
        if not checks_enabled():
            return
        empty = ~mask.any(dim=1)
        if bool(empty.any()):
            bags = empty.nonzero().flatten().tolist()
            raise DataError(
                f"mask: bag {bags[0]} of the batch has no real instance (its mask row is all False; "
                f"empty bags: {bags}); every bag needs at least one instance"
            )

    def _prepare(self, x: Tensor, mask: Tensor) -> Tensor:
        """Validate and return ``x`` with masked positions replaced by exact zeros."""
        self._validate(x, mask)
        return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))

    # -- forward ------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        return_attention: bool = False,
        clinical: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Pool each bag of ``x`` into one embedding.

        Parameters
        ----------
        x : Tensor
            ``(B, N, D)`` instance features, ``D == in_dim``; values at masked
            positions are ignored (they may be NaN or inf).
        mask : Tensor
            ``(B, N)`` bool, ``True`` = real instance, at least one per bag.
        return_attention : bool, default False
            Also return the per-instance weights.
        clinical : Tensor or None, default None
            ``(B, F)`` clinical attributes; used only by poolings whose
            ``use_clinical`` is True, ignored by the others.

        Returns
        -------
        Tensor or (Tensor, Tensor)
            The bag embedding ``(B, out_dim)`` and, if asked, the weights
            ``(B, N)`` (float32, exactly 0 at masked positions).

        Raises
        ------
        ShapeError
            If ``x`` or ``mask`` has the wrong type, rank, size or dtype.
        DataError
            If a bag has no real instance (the message names its index);
            only while the value checks are on (:func:`milcell.checks`).
        """
        x_clean = self._prepare(x, mask)
        embedding, weights = self._pool(x_clean, mask, clinical)
        if not return_attention:
            return embedding
        return embedding, torch.where(mask, weights.float(), 0.0)

    def forward_aux(self, x: Tensor, mask: Tensor, clinical: Tensor | None = None) -> PoolingOutput:
        """Pool ``x`` and return the embedding, the weights and the auxiliary tensors.

        Same inputs, checks and guarantees as :meth:`forward`; the auxiliary
        tensors depend only on each bag's real instances too.

        Parameters
        ----------
        x : Tensor
            ``(B, N, D)`` instance features (masked positions are ignored).
        mask : Tensor
            ``(B, N)`` bool, ``True`` = real instance.
        clinical : Tensor or None, default None
            ``(B, F)`` for a pooling whose ``use_clinical`` is True.

        Returns
        -------
        PoolingOutput
            ``embedding (B, out_dim)``, ``attention (B, N)`` (float32, 0 at
            masked positions) and the pooling's ``aux`` dict.

        Examples
        --------
        >>> import torch
        >>> pool = create_pooling("attention", 4)
        >>> out = pool.forward_aux(torch.randn(2, 3, 4), torch.tensor([[True, True, False], [True] * 3]))
        >>> out.attention[0, 2].item(), sorted(out.aux)
        (0.0, [])
        """
        x_clean = self._prepare(x, mask)
        embedding, weights, aux = self._pool_aux(x_clean, mask, clinical)
        return PoolingOutput(embedding, torch.where(mask, weights.float(), 0.0), dict(aux))

    def _pool(self, x: Tensor, mask: Tensor, clinical: Tensor | None) -> tuple[Tensor, Tensor]:
        if type(self)._pool_aux is MILPooling._pool_aux:
            raise NotImplementedError(f"{type(self).__name__} implements neither _pool nor _pool_aux")
        embedding, weights, _ = self._pool_aux(x, mask, clinical)
        return embedding, weights

    def _pool_aux(
        self, x: Tensor, mask: Tensor, clinical: Tensor | None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        embedding, weights = self._pool(x, mask, clinical)
        return embedding, weights, {}

    def auxiliary_losses(self, aux: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """The pooling's own training losses, unweighted, by name.

        :meth:`milcell.nn.MILModel.loss` calls it with the ``aux`` of
        :meth:`forward_aux` and adds ``aux_loss_weights[name] * loss`` for
        each term (it skips the call when every weight is 0). The base
        pooling has none.

        Parameters
        ----------
        aux : mapping of str to Tensor
            :attr:`PoolingOutput.aux` of the batch.
        labels : Tensor
            ``(B,)`` int64 bag labels, ``-1`` = unlabelled (such bags add nothing).

        Returns
        -------
        dict of str to Tensor
            Scalar float32 losses, named as in :attr:`aux_loss_weights`.

        Examples
        --------
        >>> import torch
        >>> MeanPooling(2).auxiliary_losses({}, torch.tensor([0, 1]))
        {}
        """
        return {}

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}"


def _counts(mask: Tensor) -> Tensor:
    """``(B, 1)`` float32 number of real instances per bag."""
    return mask.sum(dim=1, keepdim=True).float()


# --------------------------------------------------------------------------- operators


@register_pooling("mean")
class MeanPooling(MILPooling):
    """Masked mean of the instances; weights ``1 / n_i`` on the ``n_i`` real instances.

    The sum is accumulated in float32 and cast back to ``x.dtype``.

    Parameters
    ----------
    in_dim : int
        Feature size ``D``; ``out_dim == D``.

    Examples
    --------
    >>> x = torch.tensor([[[1.0], [3.0], [float("nan")]]])
    >>> MeanPooling(1)(x, torch.tensor([[True, True, False]]), return_attention=True)
    (tensor([[2.]]), tensor([[0.5000, 0.5000, 0.0000]]))
    """

    def _pool(self, x: Tensor, mask: Tensor, clinical: Tensor | None) -> tuple[Tensor, Tensor]:
        n = _counts(mask)
        embedding = (x.float().sum(dim=1) / n).to(x.dtype)
        return embedding, mask.float() / n


@register_pooling("max")
class MaxPooling(MILPooling):
    """Masked per-feature maximum over the real instances.

    Weights: for each feature ``d`` the instances attaining the maximum of
    that feature share a weight of 1 (``1/k`` each for a ``k``-way tie); the
    reported weight of an instance is this share averaged over the ``D``
    features, i.e. the fraction of features for which it is the maximum.
    The weights sum to 1 over a bag; an instance that holds the maximum of
    every feature gets weight 1. Gradients of ties are split equally
    (:func:`torch.amax`).

    Parameters
    ----------
    in_dim : int
        Feature size ``D``; ``out_dim == D``.

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 5.0], [3.0, 2.0]]])
    >>> MaxPooling(2)(x, torch.ones(1, 2, dtype=torch.bool), return_attention=True)
    (tensor([[3., 5.]]), tensor([[0.5000, 0.5000]]))
    """

    def _pool(self, x: Tensor, mask: Tensor, clinical: Tensor | None) -> tuple[Tensor, Tensor]:
        m = mask.unsqueeze(-1)
        filled = torch.where(m, x, torch.full((), float("-inf"), dtype=x.dtype, device=x.device))
        embedding = filled.amax(dim=1)
        with torch.no_grad():
            hit = (filled == embedding.unsqueeze(1)) & m
            share = hit.float() / hit.sum(dim=1, keepdim=True).clamp_min(1).float()
            weights = share.mean(dim=-1)
        return embedding, weights


@register_pooling("lse")
class LSEPooling(MILPooling):
    """Log-sum-exp pooling, a smooth maximum with temperature ``r``.

    ``z_d = (1/r) * log( (1/n) * sum_i exp(r * x_id) )`` over the ``n`` real
    instances: ``r -> 0`` tends to the mean, ``r -> inf`` to the maximum, and
    a bag of identical instances gives that instance. Computed in float32 as
    ``max_d + log1p(mean_i expm1(r (x_id - max_d))) / r``, accurate for large
    and small ``r`` alike, and cast back to ``x.dtype``.
    Weights: ``softmax_i(r * x_id)`` over real instances, averaged over the
    ``D`` features.

    Parameters
    ----------
    in_dim : int
        Feature size ``D``; ``out_dim == D``.
    r : float, default 5.0
        Temperature, ``> 0``.
    learnable_r : bool, default False
        Learn ``r`` (parametrised as ``log r``, so it stays positive).

    Examples
    --------
    >>> x = torch.tensor([[[0.0], [1.0]]])
    >>> pool = LSEPooling(1, r=1.0)
    >>> pool(x, torch.ones(1, 2, dtype=torch.bool))  # log((1 + e) / 2)
    tensor([[0.6201]])
    """

    def __init__(self, in_dim: int, r: float = 5.0, learnable_r: bool = False) -> None:
        super().__init__(in_dim)
        log_r = torch.tensor(math.log(check_real(r, "r", low=0.0, low_open=True)))
        self.learnable_r = bool(learnable_r)
        if self.learnable_r:
            self.log_r = nn.Parameter(log_r)
        else:
            self.register_buffer("log_r", log_r)

    @property
    def r(self) -> float:
        """The current temperature."""
        return float(self.log_r.detach().exp())

    def _pool(self, x: Tensor, mask: Tensor, clinical: Tensor | None) -> tuple[Tensor, Tensor]:
        with _no_autocast(x.device):
            r = self.log_r.float().exp()
            m = mask.unsqueeze(-1)
            xf = x.float()
            top = torch.where(m, xf, float("-inf")).amax(dim=1, keepdim=True).detach()  # (B, 1, D)
            # log(mean_i exp(r (x_i - top))) = log1p(mean_i expm1(r (x_i - top))): exact for small r too
            e = torch.where(m, torch.expm1(r * (xf - top)), 0.0)
            embedding = top.squeeze(1) + torch.log1p(e.sum(dim=1) / _counts(mask)) / r
            z = torch.where(m, r * xf, float("-inf"))
            weights = torch.softmax(z, dim=1).mean(dim=-1)
        return embedding.to(x.dtype), weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r:.4g}, learnable_r={self.learnable_r}"


@register_pooling("attention")
class AttentionPooling(MILPooling):
    """Attention MIL pooling (Ilse et al., 2018).

    ``a_i = w^T tanh(V x_i)``, weights = masked float32 softmax of ``a`` over
    the real instances, embedding = ``sum_i weight_i x_i``. A bag of
    identical instances gives that instance.

    Parameters
    ----------
    in_dim : int
        Feature size ``D``; ``out_dim == D``.
    hidden : int or tuple of one int, default 128
        Size ``L`` of the attention MLP's one hidden layer (a
        :data:`HiddenSizes` of length 1; stored as an ``int``).
    dropout : float, default 0.0
        Dropout on the attention MLP's hidden activations.

    Examples
    --------
    >>> pool = AttentionPooling(4, hidden=8)
    >>> x = torch.ones(1, 3, 4)
    >>> pool(x, torch.tensor([[True, True, False]]))
    tensor([[1., 1., 1., 1.]], grad_fn=...)
    """

    gated: bool = False

    def __init__(self, in_dim: int, hidden: HiddenSizes = 128, dropout: float = 0.0) -> None:
        super().__init__(in_dim)
        self.hidden = _check_hidden(hidden, length=1)[0]
        self.attention_v = nn.Linear(self.in_dim, self.hidden)
        self.attention_u = nn.Linear(self.in_dim, self.hidden) if self.gated else None
        self.attention_w = nn.Linear(self.hidden, 1)
        self.dropout = nn.Dropout(_check_dropout(dropout))

    def scores(self, x: Tensor) -> Tensor:
        """Unnormalised attention scores ``(B, N)`` of cleaned instances ``(B, N, D)``."""
        h = torch.tanh(self.attention_v(x))
        if self.attention_u is not None:
            h = h * torch.sigmoid(self.attention_u(x))
        return self.attention_w(self.dropout(h)).squeeze(-1)

    def _pool(self, x: Tensor, mask: Tensor, clinical: Tensor | None) -> tuple[Tensor, Tensor]:
        weights = masked_softmax(self.scores(x), mask)
        embedding = torch.bmm(weights.unsqueeze(1).to(x.dtype), x).squeeze(1)
        return embedding, weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden={self.hidden}"


@register_pooling("gated_attention")
class GatedAttentionPooling(AttentionPooling):
    """Gated attention MIL pooling (Ilse et al., 2018).

    ``a_i = w^T (tanh(V x_i) * sigmoid(U x_i))``; otherwise as
    :class:`AttentionPooling`.

    Parameters
    ----------
    in_dim : int
        Feature size ``D``; ``out_dim == D``.
    hidden : int or tuple of one int, default 128
        Size ``L`` of the attention MLP's one hidden layer.
    dropout : float, default 0.0
        Dropout on the gated hidden activations.

    Examples
    --------
    >>> pool = GatedAttentionPooling(4, hidden=8)
    >>> _, w = pool(torch.randn(2, 3, 4), torch.tensor([[True] * 3, [True, False, False]]), True)
    >>> w[1].tolist()
    [1.0, 0.0, 0.0]
    """

    gated = True


def _dense_rank(key: Tensor) -> Tensor:
    """Dense rank (``0, 1, ...``) of each entry of ``key`` ``(B, N, K)`` along the instance axis.

    Ranks are per bag and per column; equal values share a rank (NaN, unequal to itself, gets
    one of its own). Sorting only, so no host-device sync.
    """
    sorted_key, order = torch.sort(key, dim=1, stable=True)
    step = torch.ne(sorted_key[:, 1:], sorted_key[:, :-1]).long()
    first = torch.zeros_like(sorted_key[:, :1], dtype=torch.long)
    ranks = torch.cat([first, step], dim=1).cumsum(dim=1)
    return torch.empty_like(ranks).scatter_(1, order, ranks)


def _lexicographic_rank(x: Tensor) -> Tensor:
    """``(B, N)`` long: rank of each instance of ``x`` ``(B, N, D)`` in lexicographic order.

    Ascending by ``x[..., 0]``, then ``x[..., 1]``, ... within each bag; identical instances
    share a rank. Columns are dense-ranked (ranks ``< N``), then neighbouring columns are merged
    pairwise (``r_a * N + r_b``, dense-ranked again) until one column is left: about
    ``log2(D)`` batched sorts, with no data-dependent branch. Features of at most 32 bits are
    first mapped to order-preserving ``int32`` keys and packed two per ``int64``, which halves
    the work (``-0.0`` then sorts just below ``0.0``).
    """
    n = x.shape[1]
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16):  # exact in float32
        bits = x.float().contiguous().view(torch.int32)
        keys = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()  # monotone in the float's value
        if keys.shape[2] % 2:
            keys = torch.cat([keys, torch.zeros_like(keys[..., :1])], dim=2)
        ranks = _dense_rank(keys[..., 0::2] * 2**32 + (keys[..., 1::2] + 2**31))
    else:
        ranks = _dense_rank(x)
    while ranks.shape[2] > 1:
        if ranks.shape[2] % 2:
            ranks = torch.cat([ranks, torch.zeros_like(ranks[..., :1])], dim=2)
        ranks = _dense_rank(ranks[..., 0::2] * n + ranks[..., 1::2])
    return ranks.squeeze(2)


def _rank_instances(scores: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    """Permutation ``(B, N)`` putting real instances first, by descending score.

    Ties in score between real instances are broken by the features
    themselves, lexicographically (descending ``x[..., 0]``, then
    ``x[..., 1]``, ...), so the order depends only on the bag's content.
    Instances equal in score and in every feature are interchangeable.
    The tie-break is always computed (no ``if ties.any()``), so ranking
    never waits for the device.
    """
    batch, n = scores.shape

    def stable_desc(perm: Tensor, key: Tensor) -> Tensor:
        return perm.gather(1, torch.sort(key.gather(1, perm), dim=1, descending=True, stable=True).indices)

    perm = torch.arange(n, device=scores.device).expand(batch, n)
    perm = stable_desc(perm, _lexicographic_rank(x))
    perm = stable_desc(perm, torch.where(mask, scores, float("-inf")))
    return stable_desc(perm, mask.to(torch.int8))


@register_pooling("conv")
class ConvPooling(MILPooling):
    """Learned convolutional aggregation made permutation-invariant by ranking.

    Exact semantics, for a bag with ``n`` real instances ``x_i`` (``D``):

    1. A linear score ``s_i = u^T x_i + c`` is computed for every real
       instance, in float64 (float32 on MPS) with autocast off, so the
       ranking does not depend on the batch or on reduced precision.
    2. The real instances are sorted by descending score; ties in score are
       broken by the features, lexicographically (descending ``x_i[0]``,
       then ``x_i[1]``, ...). Instances equal in score and features are
       interchangeable. Real instances occupy positions ``0 .. n-1``.
    3. Each ranked position carries the ``D + 1`` channels ``[x_i, s_i]``
       (the score channel gives the scorer its gradient). Positions
       ``n .. N_max-1`` carry exact zeros, the same zeros that the
       convolution's own padding places beyond ``N_max``.
    4. A ``Conv1d(D + 1, out_dim, kernel_size, padding=kernel_size // 2)``
       runs along the ranking, followed by ReLU and dropout: the window of
       a position sees its ``kernel_size // 2`` neighbours in rank on each
       side, and zeros past either end of the bag.
    5. The ``n`` outputs at the real positions are reduced by their mean
       (``reduce="mean"``) or per-channel maximum (``reduce="max"``).

    Hence the embedding depends only on the set of real instances: not on
    their order, on the other bags of the batch, or on ``N_max``. The
    returned weights are the masked float32 softmax of the ranking scores
    ``s_i`` (an importance for display, not mixing weights).

    Parameters
    ----------
    in_dim : int
        Feature size ``D``.
    out_dim : int or None, default None
        Number of conv channels, the size of the embedding; ``None`` = ``D``.
    kernel_size : int, default 3
        Odd window size along the ranking.
    reduce : {"mean", "max"}, default "mean"
        Reduction over the real positions.
    dropout : float, default 0.0
        Dropout after the ReLU.

    Examples
    --------
    >>> pool = ConvPooling(4, out_dim=6, kernel_size=3)
    >>> x = torch.randn(1, 5, 4)
    >>> mask = torch.tensor([[True, True, True, False, False]])
    >>> a = pool(x, mask)
    >>> b = pool(x[:, [2, 0, 1]], mask[:, :3])  # same bag, reordered, no padding
    >>> a.shape, torch.allclose(a, b, atol=1e-6)
    (torch.Size([1, 6]), True)
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        kernel_size: int = 3,
        reduce: str = "mean",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim)
        self.out_dim = self.in_dim if out_dim is None else check_int(out_dim, "out_dim", low=1)
        self.kernel_size = check_int(kernel_size, "kernel_size", low=1)
        if self.kernel_size % 2 == 0:
            raise constraint_error(
                "kernel_size", "an odd integer (a window centred on each instance)", kernel_size
            )
        self.reduce = check_choice(reduce, "reduce", ("mean", "max"))
        self.score = nn.Linear(self.in_dim, 1)
        self.conv = nn.Conv1d(self.in_dim + 1, self.out_dim, self.kernel_size, padding=self.kernel_size // 2)
        self.dropout = nn.Dropout(_check_dropout(dropout))

    def scores(self, x: Tensor) -> Tensor:
        """Ranking scores ``(B, N)`` of cleaned instances ``(B, N, D)``, float64 (float32 on MPS)."""
        dtype = torch.float32 if x.device.type == "mps" else torch.float64
        with _no_autocast(x.device):
            w = self.score.weight.to(dtype).squeeze(0)
            return (x.to(dtype) * w).sum(dim=-1) + self.score.bias.to(dtype)

    def _pool(self, x: Tensor, mask: Tensor, clinical: Tensor | None) -> tuple[Tensor, Tensor]:
        s = self.scores(x)
        perm = _rank_instances(s.detach(), x.detach(), mask)
        ranked_mask = mask.gather(1, perm)
        ranked_x = x.gather(1, perm.unsqueeze(-1).expand_as(x))
        ranked_s = s.gather(1, perm).to(x.dtype).unsqueeze(-1)
        inp = torch.cat([ranked_x, ranked_s], dim=-1)
        inp = torch.where(ranked_mask.unsqueeze(-1), inp, torch.zeros((), dtype=inp.dtype, device=inp.device))
        h = self.dropout(torch.relu(self.conv(inp.transpose(1, 2)))).transpose(1, 2)  # (B, N, out_dim)
        m = ranked_mask.unsqueeze(-1)
        if self.reduce == "mean":
            embedding = (torch.where(m, h, 0.0).float().sum(dim=1) / _counts(mask)).to(h.dtype)
        else:
            embedding = torch.where(m, h, torch.full((), float("-inf"), dtype=h.dtype, device=h.device)).amax(
                1
            )
        return embedding, masked_softmax(s, mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_size={self.kernel_size}, reduce={self.reduce!r}"


@register_pooling("instance_mean")
class InstanceMeanPooling(MILPooling):
    """Prediction-level aggregation: classify each instance, average the probabilities.

    Each real instance ``x_i`` (concatenated with the bag's clinical
    attributes when ``clinical_dim > 0``, the "per-instance concatenation"
    fusion) goes through an MLP classifier giving ``num_classes`` logits;
    the bag output is ``log( mean_i softmax(logits_i) )`` over the real
    instances, in float32, clamped away from ``log 0``. Since
    ``softmax(log p) = p``, it can be used directly as logits with
    :func:`torch.nn.functional.cross_entropy`. Weights are ``1 / n_i``.

    ``hidden=(1000, 500, 100)``, ``dropout > 0`` and ``clinical_dim=2``
    (age, lymphocyte concentration) reproduce the per-image classifier of
    the 2021 lymphocytosis report (which used one sigmoid output; here two
    classes with softmax).

    Parameters
    ----------
    in_dim : int
        Feature size ``D`` of the instances.
    num_classes : int, default 2
        Number of classes ``C >= 2``; ``out_dim == C``.
    hidden : int or tuple of int, default ()
        Hidden sizes of the instance classifier (a :data:`HiddenSizes`);
        ``()`` is a linear classifier.
    dropout : float, default 0.0
        Dropout after each hidden ReLU.
    clinical_dim : int, default 0
        Number ``F`` of clinical attributes broadcast to every instance; ``0``
        means none, and then ``use_clinical`` is False.

    Examples
    --------
    >>> pool = InstanceMeanPooling(4, num_classes=3, hidden=(8,), clinical_dim=2)
    >>> pool.prediction_level, pool.use_clinical, pool.out_dim
    (True, True, 3)
    >>> x, mask = torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool)
    >>> logp = pool(x, mask, clinical=torch.randn(2, 2))
    >>> logp.shape, torch.allclose(logp.exp().sum(dim=1), torch.ones(2))
    (torch.Size([2, 3]), True)
    >>> pool.instance_logits(x, mask, clinical=torch.randn(2, 2)).shape
    torch.Size([2, 5, 3])
    """

    prediction_level = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int = 2,
        hidden: HiddenSizes = (),
        dropout: float = 0.0,
        clinical_dim: int = 0,
    ) -> None:
        super().__init__(in_dim)
        self.num_classes = check_int(num_classes, "num_classes", low=2)
        self.hidden = _check_hidden(hidden)
        self.clinical_dim = check_int(clinical_dim, "clinical_dim", low=0)
        self.use_clinical = self.clinical_dim > 0
        self.out_dim = self.num_classes
        self.classifier = _mlp(
            self.in_dim + self.clinical_dim, self.hidden, self.num_classes, _check_dropout(dropout)
        )

    def _logits(self, x: Tensor, mask: Tensor, clinical: Tensor | None) -> Tensor:
        inp = x
        if self.use_clinical:
            c = _check_clinical(clinical, x.shape[0], self.clinical_dim, "this instance_mean pooling")
            c = c.to(device=x.device, dtype=x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
            inp = torch.cat([x, c], dim=-1)
        logits = self.classifier(inp)
        return torch.where(
            mask.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device)
        )

    def instance_logits(self, x: Tensor, mask: Tensor, clinical: Tensor | None = None) -> Tensor:
        """Per-instance class logits.

        Parameters
        ----------
        x : Tensor
            ``(B, N, D)`` instance features.
        mask : Tensor
            ``(B, N)`` bool, ``True`` = real instance.
        clinical : Tensor or None, default None
            ``(B, F)``; required when ``clinical_dim > 0``.

        Returns
        -------
        Tensor
            ``(B, N, num_classes)``, exactly 0 at masked positions.

        Examples
        --------
        >>> pool = InstanceMeanPooling(2)
        >>> pool.instance_logits(torch.randn(1, 3, 2), torch.tensor([[True, True, False]]))[0, 2]
        tensor([0., 0.], grad_fn=...)
        """
        return self._logits(self._prepare(x, mask), mask, clinical)

    def _pool(self, x: Tensor, mask: Tensor, clinical: Tensor | None) -> tuple[Tensor, Tensor]:
        logits = self._logits(x, mask, clinical)
        n = _counts(mask)
        with _no_autocast(x.device):
            p = torch.softmax(logits.float(), dim=-1)
            p = torch.where(mask.unsqueeze(-1), p, 0.0)
            mean = p.sum(dim=1) / n
            out = torch.log(mean.clamp_min(torch.finfo(torch.float32).tiny))
        return out, mask.float() / n

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_classes={self.num_classes}, hidden={self.hidden}, "
            f"clinical_dim={self.clinical_dim}"
        )


# The published aggregators register themselves here, after the base class exists.
from milcell.nn import aggregators as _aggregators  # noqa: E402,F401
