"""The instance encoder: any module run over packed instances in chunks.

:class:`InstanceEncoder` maps the packed instances of a batch ``(T, ...)`` to
features ``(T, D)``: cell images ``(T, C, H, W)`` through a backbone, or
feature vectors ``(T, F)`` through an MLP (:class:`MLPEncoder`, the instance
network of attention MIL on precomputed features, Ilse et al. 2018), or any
``nn.Module`` with that contract. It never sees a padded instance. To keep memory
bounded for bags of hundreds of images it can run the backbone over chunks of
``chunk_size`` instances, and recompute each chunk in the backward pass
instead of storing its activations (``checkpointing=True``, per chunk, with
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``), whatever
the module.

**A custom encoder** is an ``nn.Module`` mapping ``(n, ...)`` to ``(n, D)``;
give it an integer attribute ``num_features`` (``D``): :class:`InstanceEncoder`
and :class:`~milcell.nn.model.MILModel` read the output width from it (and
check it against the pooling's ``in_dim``). An ``in_chans`` attribute marks
an image encoder (instances must be ``(T, C, H, W)``); an ``in_dim``
attribute, a feature encoder (instances must be ``(T, in_dim)``).

**Chunking and BatchNorm.** Chunking changes nothing for a backbone whose normalisation does not depend
on the batch (LayerNorm, GroupNorm, or BatchNorm in eval mode or with frozen
statistics): outputs and gradients equal those of one pass, to float
tolerance. A BatchNorm in *train* mode, however, normalises each chunk with
that chunk's own mean and variance and updates its running statistics once
per chunk, so results depend on ``chunk_size`` (and checkpointing recomputes
the forward pass, updating the running statistics a second time). Use
``freeze_bn_stats=True`` (every BatchNorm kept in eval mode, its affine
parameters still trainable), a GroupNorm backbone, or no chunking when that
matters.

Examples
--------
>>> import torch
>>> from milcell.nn.backbones import create_backbone
>>> from milcell.nn.encoder import InstanceEncoder
>>> enc = InstanceEncoder(create_backbone("milcell_mini_resnet_k8"), chunk_size=4, checkpointing=True)
>>> enc(torch.rand(10, 3, 32, 32)).shape
torch.Size([10, 64])
>>> mlp = InstanceEncoder(MLPEncoder(32, hidden=(16, 8)), chunk_size=100)
>>> mlp(torch.randn(250, 32)).shape
torch.Size([250, 8])
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from milcell._validation import check_int
from milcell.exceptions import ConfigError, ShapeError
from milcell.nn.pooling import HiddenSizes, _check_dropout, _check_hidden

__all__ = ["ENCODERS", "InstanceEncoder", "MLPEncoder", "create_encoder", "encode_in_chunks"]


def encode_in_chunks(
    backbone: nn.Module,
    instances: Tensor,
    chunk_size: int | None = None,
    *,
    checkpointing: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Run ``backbone`` over ``instances (T, ...)`` in chunks of ``chunk_size`` → ``(T, D)``.

    The one chunked backbone call of milcell: :class:`InstanceEncoder` and
    :func:`~milcell.train.features.extract_features` use it.

    Parameters
    ----------
    backbone : nn.Module
        Maps ``(n, ...)`` to ``(n, D)`` (images ``(n, C, H, W)``, features ``(n, F)``...).
    instances : Tensor
        ``(T, ...)`` packed instances, ``T >= 1``.
    chunk_size : int or None, default None
        Instances per backbone call; ``None`` runs all ``T`` at once.
    checkpointing : bool, default False
        Recompute each chunk's activations in the backward pass
        (``torch.utils.checkpoint``, ``use_reentrant=False``) when gradients are needed.
    device : torch.device or str, optional
        Move each chunk there before its call (the instances themselves stay
        where they are, so only one chunk of images is on the device at a time).

    Returns
    -------
    Tensor
        ``(T, D)`` features, on the device and in the dtype the backbone produces.

    Raises
    ------
    ConfigError
        A ``chunk_size`` that is not an integer ``>= 1``.
    ShapeError
        A backbone output that is not ``(n, D)`` for a chunk of ``n`` instances.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(12, 5))
    >>> x = torch.rand(7, 3, 2, 2)
    >>> torch.allclose(encode_in_chunks(net, x, chunk_size=3), net(x))
    True
    """
    size = instances.shape[0] if chunk_size is None else check_int(chunk_size, "chunk_size", low=1)
    target = None if device is None else torch.device(device)
    needs_params = any(p.requires_grad for p in backbone.parameters())
    outputs = []
    for chunk in instances.split(max(1, size)):
        if target is not None:
            chunk = chunk.to(target, non_blocking=target.type == "cuda")
        needs_grad = torch.is_grad_enabled() and (chunk.requires_grad or needs_params)
        out = (
            checkpoint(backbone, chunk, use_reentrant=False)
            if checkpointing and needs_grad
            else backbone(chunk)
        )
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != chunk.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ShapeError(
                f"the backbone must return (T, D) features, got {shape} for {chunk.shape[0]} instances"
            )
        outputs.append(out)
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class MLPEncoder(nn.Module):
    """Instance MLP over feature vectors ``(T, F)`` → ``(T, D)``: ``Linear-ReLU[-Dropout]`` per layer.

    The instance network of attention MIL on precomputed features (Ilse et
    al., 2018): e.g. ``hidden=(256, 128, 64)`` with dropout before attention
    pooling. Every layer, the last included, ends with a ReLU (and dropout),
    so ``D = hidden[-1]`` features go to the pooling.

    Parameters
    ----------
    in_dim : int
        ``F``, the width of the instances.
    hidden : int or tuple of int, default (256, 128, 64)
        Layer widths, at least one.
    dropout : float, default 0.0
        Dropout after each ReLU, in [0, 1).

    Attributes
    ----------
    in_dim : int
        ``F``.
    num_features : int
        ``D = hidden[-1]``.

    Examples
    --------
    >>> enc = MLPEncoder(20, hidden=(16, 8), dropout=0.1)
    >>> enc(torch.randn(5, 20)).shape, enc.num_features
    (torch.Size([5, 8]), 8)
    >>> enc(torch.randn(5, 3))
    Traceback (most recent call last):
    ...
    milcell.exceptions.ShapeError: MLPEncoder: instances must have shape (T, 20), got (5, 3)
    """

    def __init__(self, in_dim: int, hidden: HiddenSizes = (256, 128, 64), dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim = check_int(in_dim, "in_dim", low=1)
        self.hidden = _check_hidden(hidden)
        if not self.hidden:
            raise ConfigError("MLPEncoder: hidden must name at least one layer width, got ()")
        self.dropout = _check_dropout(dropout)
        layers: list[nn.Module] = []
        width = self.in_dim
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if self.dropout > 0:
                layers.append(nn.Dropout(self.dropout))
            width = h
        self.net = nn.Sequential(*layers)
        self.num_features = self.hidden[-1]

    def forward(self, instances: Tensor) -> Tensor:
        """``(T, F)`` → ``(T, D)``.

        Raises
        ------
        ShapeError
            Instances that are not ``(T, in_dim)``.
        """
        if not isinstance(instances, Tensor) or instances.ndim != 2 or instances.shape[1] != self.in_dim:
            shape = tuple(instances.shape) if isinstance(instances, Tensor) else type(instances).__name__
            raise ShapeError(f"MLPEncoder: instances must have shape (T, {self.in_dim}), got {shape}")
        out: Tensor = self.net(instances)
        return out


#: Encoder names of :func:`create_encoder` (and ``create_mil_model(encoder=...)``).
ENCODERS = ("mlp",)


def create_encoder(
    name: str,
    in_dim: int,
    *,
    chunk_size: int | None = None,
    checkpointing: bool = False,
    **kwargs: Any,
) -> InstanceEncoder:
    """Build a named instance encoder over feature vectors, wrapped in an :class:`InstanceEncoder`.

    Parameters
    ----------
    name : {"mlp"}
        ``"mlp"``: :class:`MLPEncoder`.
    in_dim : int
        ``F``, the width of the feature instances.
    chunk_size, checkpointing
        As for :class:`InstanceEncoder`.
    **kwargs
        Options of the encoder (``hidden``, ``dropout``).

    Returns
    -------
    InstanceEncoder
        Its ``num_features`` is the encoder's output width ``D``.

    Raises
    ------
    ConfigError
        An unknown name or option.

    Examples
    --------
    >>> enc = create_encoder("mlp", 32, hidden=(16, 8), chunk_size=64)
    >>> enc.num_features, enc.in_dim
    (8, 32)
    """
    if name not in ENCODERS:
        raise ConfigError(f"encoder must be one of {list(ENCODERS)}, got {name!r}")
    try:
        inspect.signature(MLPEncoder).bind(in_dim, **kwargs)
    except TypeError as err:
        raise ConfigError(f"encoder {name!r} does not take these arguments: {err}") from None
    return InstanceEncoder(MLPEncoder(in_dim, **kwargs), chunk_size=chunk_size, checkpointing=checkpointing)


class InstanceEncoder(nn.Module):
    """Run a module over packed instances ``(T, ...)`` → ``(T, D)`` in bounded memory.

    Parameters
    ----------
    backbone : nn.Module
        Maps ``(n, ...)`` to ``(n, D)``: e.g. a
        :class:`~milcell.nn.backbones.Backbone` over images ``(n, C, H, W)``
        or an :class:`MLPEncoder` over features ``(n, F)``. Its
        ``num_features`` (``D``), ``in_chans`` (images: the channels ``C``)
        and ``in_dim`` (features: the width ``F``) attributes are used when
        present.
    chunk_size : int or None, default None
        Instances per backbone call (``>= 1``, a numpy integer is fine);
        ``None`` runs all ``T`` at once.
    checkpointing : bool, default False
        Recompute each chunk's activations in the backward pass
        (``torch.utils.checkpoint``, ``use_reentrant=False``) instead of storing them.
    freeze_bn_stats : bool, default False
        Keep every BatchNorm layer in eval mode (running statistics used and
        never updated) even when the encoder is in train mode, so chunking
        does not change the results. The affine parameters still train.

    Attributes
    ----------
    num_features : int or None
        ``D``, taken from the backbone.
    in_chans : int or None
        Expected channels ``C`` of image instances, taken from the backbone.
    in_dim : int or None
        Expected width ``F`` of feature instances, taken from the backbone.

    Examples
    --------
    >>> import torch
    >>> from milcell.nn.backbones import create_backbone
    >>> enc = InstanceEncoder(create_backbone("milcell_mini_resnet_k8"), freeze_bn_stats=True).train()
    >>> enc.backbone.model.bn1.training, enc.training
    (False, True)
    >>> enc(torch.rand(2, 1, 32, 32))
    Traceback (most recent call last):
    ...
    milcell.exceptions.ShapeError: InstanceEncoder: instances has 1 channels but ... in_chans=3
    """

    def __init__(
        self,
        backbone: nn.Module,
        chunk_size: int | None = None,
        checkpointing: bool = False,
        freeze_bn_stats: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise ConfigError(
                f"InstanceEncoder: backbone must be an nn.Module, got {type(backbone).__name__}"
            )
        self.backbone = backbone
        self.chunk_size = None if chunk_size is None else check_int(chunk_size, "chunk_size", low=1)
        self.checkpointing = bool(checkpointing)
        self.freeze_bn_stats = bool(freeze_bn_stats)
        features = getattr(backbone, "num_features", None)
        chans = getattr(backbone, "in_chans", None)
        width = getattr(backbone, "in_dim", None)
        self.num_features: int | None = int(features) if features is not None else None
        self.in_chans: int | None = int(chans) if chans is not None else None
        self.in_dim: int | None = int(width) if isinstance(width, int) and chans is None else None
        self.train(self.training)

    def train(self, mode: bool = True) -> InstanceEncoder:
        """Set train/eval mode; with ``freeze_bn_stats`` every BatchNorm stays in eval mode."""
        super().train(mode)
        if self.freeze_bn_stats:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def _check(self, instances: Tensor) -> None:
        if not isinstance(instances, Tensor):
            raise ShapeError(f"InstanceEncoder: instances must be a Tensor, got {type(instances).__name__}")
        if self.in_chans is not None and instances.ndim != 4:
            raise ShapeError(
                f"InstanceEncoder: instances must have shape (T, C, H, W) (images) for this backbone, got "
                f"{tuple(instances.shape)}"
            )
        if instances.ndim < 2:
            raise ShapeError(
                f"InstanceEncoder: instances must have shape (T, ...), got {tuple(instances.shape)}"
            )
        if self.in_dim is not None and (instances.ndim != 2 or instances.shape[1] != self.in_dim):
            raise ShapeError(
                f"InstanceEncoder: instances must be features (T, {self.in_dim}), "
                f"got {tuple(instances.shape)}"
            )
        if self.in_chans is not None and instances.shape[1] != self.in_chans:
            raise ShapeError(
                f"InstanceEncoder: instances has {instances.shape[1]} channels but the backbone "
                f"expects in_chans={self.in_chans}"
            )
        if instances.shape[0] == 0:
            raise ShapeError("InstanceEncoder: instances is empty (T = 0); every bag needs >= 1 instance")
        if not instances.is_floating_point():
            raise ShapeError(f"InstanceEncoder: instances must be floating point, got {instances.dtype}")

    def forward(self, instances: Tensor) -> Tensor:
        """Encode packed instances.

        Parameters
        ----------
        instances : Tensor
            ``(T, ...)`` floating point, ``T >= 1``: ``(T, C, H, W)`` for an
            image backbone (``in_chans``), ``(T, F)`` for a feature encoder
            (``in_dim``).

        Returns
        -------
        Tensor
            ``(T, D)`` features, on the device and in the dtype the backbone produces.

        Raises
        ------
        ShapeError
            Wrong rank, wrong channel count or width, non-float or empty ``instances``.
        """
        self._check(instances)
        try:
            return encode_in_chunks(
                self.backbone, instances, self.chunk_size, checkpointing=self.checkpointing
            )
        except ShapeError as exc:
            raise ShapeError(f"InstanceEncoder: {exc}") from exc

    def extra_repr(self) -> str:
        return (
            f"chunk_size={self.chunk_size}, checkpointing={self.checkpointing}, "
            f"freeze_bn_stats={self.freeze_bn_stats}"
        )
