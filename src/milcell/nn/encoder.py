"""The instance encoder: a backbone run over packed instances in chunks.

:class:`InstanceEncoder` maps the packed cell images of a batch ``(T, C, H,
W)`` to features ``(T, D)``. It never sees a padded instance. To keep memory
bounded for bags of hundreds of images it can run the backbone over chunks of
``chunk_size`` instances, and recompute each chunk in the backward pass
instead of storing its activations (``checkpointing=True``, per chunk, with
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``).

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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from milcell._validation import check_int
from milcell.exceptions import ConfigError, ShapeError

__all__ = ["InstanceEncoder", "encode_in_chunks"]


def encode_in_chunks(
    backbone: nn.Module,
    instances: Tensor,
    chunk_size: int | None = None,
    *,
    checkpointing: bool = False,
    device: torch.device | str | None = None,
) -> Tensor:
    """Run ``backbone`` over ``instances (T, C, H, W)`` in chunks of ``chunk_size`` → ``(T, D)``.

    The one chunked backbone call of milcell: :class:`InstanceEncoder` and
    :func:`~milcell.train.features.extract_features` use it.

    Parameters
    ----------
    backbone : nn.Module
        Maps ``(n, C, H, W)`` to ``(n, D)``.
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


class InstanceEncoder(nn.Module):
    """Run a backbone over packed instances ``(T, C, H, W)`` → ``(T, D)`` in bounded memory.

    Parameters
    ----------
    backbone : nn.Module
        Maps ``(n, C, H, W)`` to ``(n, D)``, e.g. a
        :class:`~milcell.nn.backbones.Backbone`. Its ``num_features`` (``D``)
        and ``in_chans`` attributes are used when present.
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
        Expected channels ``C``, taken from the backbone.

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
        self.num_features: int | None = int(features) if features is not None else None
        self.in_chans: int | None = int(chans) if chans is not None else None
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
        if instances.ndim != 4:
            raise ShapeError(
                f"InstanceEncoder: instances must have shape (T, C, H, W), got {tuple(instances.shape)}"
            )
        if self.in_chans is not None and instances.shape[1] != self.in_chans:
            raise ShapeError(
                f"InstanceEncoder: instances has {instances.shape[1]} channels but the backbone "
                f"expects in_chans={self.in_chans}"
            )
        if instances.shape[0] == 0:
            raise ShapeError("InstanceEncoder: instances is empty (T = 0); every bag needs >= 1 instance")
        if not instances.is_floating_point():
            raise ShapeError(
                f"InstanceEncoder: instances must be floating point images, got {instances.dtype}"
            )

    def forward(self, instances: Tensor) -> Tensor:
        """Encode packed instances.

        Parameters
        ----------
        instances : Tensor
            ``(T, C, H, W)`` floating point, ``T >= 1``.

        Returns
        -------
        Tensor
            ``(T, D)`` features, on the device and in the dtype the backbone produces.

        Raises
        ------
        ShapeError
            Wrong rank, wrong channel count, non-float or empty ``instances``.
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
