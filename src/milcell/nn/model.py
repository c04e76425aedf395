"""The MIL model: instance encoder → pad + mask → pooling → fusion head → logits.

:class:`MILModel` composes the parts of the data path. It takes a
:class:`~milcell.data.bag.BagBatch` whose packed instances ``(T, ...)`` are
images ``(T, C, H, W)`` (with an instance encoder) or features ``(T, D)``
(feature bags, no encoder), encodes them to ``(T, D)``, pads them to ``(B,
N_max, D)`` with the batch mask, pools each bag, and fuses the bag embedding
with the clinical attributes into logits ``(B, num_classes)``. A
prediction-level pooling (``instance_mean``) already outputs class scores, so
it gets no fusion head. Single-cell classification is the same model on bags
of one. The three steps are public: :meth:`MILModel.encode`,
:meth:`MILModel.pool` and :meth:`MILModel.forward_head`.

A training step (forward, :func:`mil_loss`, backward) reads no tensor value on
the host, so it never waits for an accelerator; the checks that would (NaN or
inf, labels) run only while :func:`milcell.checks` is on.

:func:`create_mil_model` builds one by names and records its arguments in
``model.config`` (JSON-serialisable) so a checkpoint can rebuild it with
:meth:`MILModel.from_config`. :func:`mil_loss` is the matching cross-entropy.

Examples
--------
>>> import torch
>>> from milcell.data.bag import Bag, collate_bags
>>> from milcell.nn.model import create_mil_model, mil_loss
>>> model = create_mil_model("milcell_mini_resnet_k8", pooling="gated_attention", fusion="concat",
...                          num_classes=2, clinical_dim=2, chunk_size=8)
>>> batch = collate_bags([
...     Bag(torch.rand(3, 3, 32, 32), label=1, clinical=torch.tensor([0.5, -1.0]), id="P1"),
...     Bag(torch.rand(5, 3, 32, 32), label=0, clinical=torch.tensor([1.5, 0.2]), id="P2"),
... ])
>>> out = model(batch)
>>> out.logits.shape, out.embedding.shape, out.attention.shape
(torch.Size([2, 2]), torch.Size([2, 64]), torch.Size([2, 5]))
>>> mil_loss(out, batch).ndim
0
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcell._checks import checks_enabled
from milcell._validation import check_choice, check_int, check_real, constraint_error
from milcell.data.bag import BagBatch
from milcell.exceptions import ConfigError, DataError, ShapeError
from milcell.nn.backbones import create_backbone
from milcell.nn.encoder import ENCODERS, InstanceEncoder, create_encoder
from milcell.nn.fusion import FusionHead, FusionOutput, create_fusion
from milcell.nn.pooling import (
    _POOLINGS,
    InstanceMeanPooling,
    MILPooling,
    _renamed_attribute,
    _renamed_kwargs,
    create_pooling,
)

__all__ = ["MILModel", "MILOutput", "create_mil_model", "mil_loss"]

logger = logging.getLogger("milcell")


@dataclass
class MILOutput:
    """What :class:`MILModel` returns for a batch of ``B`` bags.

    Attributes
    ----------
    logits : Tensor
        ``(B, num_classes)`` class scores for cross-entropy.
    embedding : Tensor
        ``(B, D')`` bag embedding from the pooling (class log-probabilities for
        a prediction-level pooling).
    attention : Tensor or None
        ``(B, N_max)`` per-instance weights (float32, 0 at padded positions).
    instance_logits : Tensor or None
        ``(B, N_max, C)`` per-instance class scores (prediction-level pooling only).
    experts : dict of str to Tensor
        ``(B, C)`` logits of each expert of the fusion head (``moe``, ``gated``).
    gate : Tensor or None
        ``(B, 1)`` gate of the ``gated`` fusion.
    aux : dict of str to Tensor
        The pooling's auxiliary tensors (:attr:`milcell.nn.pooling.PoolingOutput.aux`,
        e.g. per-class attention ``(B, C, N_max)``), read by its auxiliary
        losses in :meth:`MILModel.loss`; empty for most poolings.

    Examples
    --------
    >>> import torch
    >>> out = MILOutput(logits=torch.zeros(2, 3), embedding=torch.zeros(2, 8))
    >>> out.attention is None, out.experts, out.aux
    (True, {}, {})
    """

    logits: Tensor
    embedding: Tensor
    attention: Tensor | None = None
    instance_logits: Tensor | None = None
    experts: dict[str, Tensor] = field(default_factory=dict)
    gate: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)


class MILModel(nn.Module):
    """Multiple-instance model: optional encoder, pooling and fusion head.

    ``forward`` is the composition of three public steps, in the manner of
    timm's ``forward_features`` / ``forward_head``, each usable on its own
    (e.g. to cache features, or to inspect the bag embedding)::

        features = model.encode(batch)               # (T, D)
        embedding = model.pool(features, batch)      # (B, D')
        logits = model.forward_head(embedding, batch.clinical).logits   # (B, C)

    A forward pass reads no tensor value on the host (no ``.item()``, no
    ``if tensor.any()``), so on a GPU it never waits for the device: shape,
    dtype and bag-size checks use host data only, and the checks that must
    read values (NaN or inf in instances and clinical attributes) run only
    while :func:`milcell.checks` is on (off by default, on with
    ``MILCELL_CHECKS=1``).

    Parameters
    ----------
    pooling : MILPooling
        A :mod:`milcell.nn.pooling` module (``in_dim``, ``out_dim``,
        ``prediction_level``, ``use_clinical``).
    head : FusionHead or None
        A :mod:`milcell.nn.fusion` head mapping ``(B, out_dim)`` and clinical
        ``(B, F)`` to logits; must be ``None`` for a prediction-level pooling.
    encoder : nn.Module or None, default None
        Any module mapping packed instances ``(T, ...)`` to ``(T, D)``:
        images ``(T, C, H, W)`` through a backbone, feature vectors
        ``(T, F)`` through an MLP (:class:`~milcell.nn.encoder.MLPEncoder`),
        ...; wrap it in an :class:`~milcell.nn.encoder.InstanceEncoder` for
        chunking and checkpointing. Its output width ``D`` is read from its
        ``num_features`` attribute (give a custom encoder one) and checked
        against ``pooling.in_dim``. ``None`` for feature bags pooled as they
        are (instances ``(T, D)``).
    num_classes : int or None, default None
        Number of classes (``>= 2``); inferred from the head (or pooling) when ``None``.

    Attributes
    ----------
    in_dim : int
        ``D``, the width of the features the pooling takes (``pooling.in_dim``):
        the width of a feature bag's instances, or the encoder's
        ``num_features``.
    clinical_dim : int
        ``F`` the model reads (0 = no clinical input).
    use_image, use_clinical : bool
        Whether :meth:`forward` reads ``batch.instances`` / requires
        ``batch.clinical``.
    prediction_level : bool
        The pooling's ``prediction_level``: its output already is the logits.
    one_logit : bool
        The head outputs one logit ``z`` (logits ``[0, z]``): :meth:`loss`
        is then binary cross-entropy on ``z``.
    config : dict or None
        Builder arguments when made by :func:`create_mil_model`.

    Notes
    -----
    The old spellings ``feature_dim`` (of ``in_dim``), ``uses_image`` (of
    ``use_image``) and ``needs_clinical`` (of ``use_clinical``) still read
    these attributes, with a :class:`DeprecationWarning`.

    Raises
    ------
    ConfigError
        Parts that are not a :class:`~milcell.nn.pooling.MILPooling` /
        :class:`~milcell.nn.fusion.FusionHead`, or that do not fit together.

    Examples
    --------
    >>> import torch
    >>> from milcell.data.bag import Bag, collate_bags
    >>> from milcell.nn.pooling import create_pooling
    >>> from milcell.nn.fusion import create_fusion
    >>> model = MILModel(create_pooling("mean", 4), create_fusion("linear", 4, 0, 5))
    >>> batch = collate_bags([Bag(torch.randn(3, 4), 2), Bag(torch.randn(1, 4), 4)])
    >>> model(batch).logits.shape
    torch.Size([2, 5])
    >>> model(collate_bags([Bag(torch.randn(3, 7), 2)]))
    Traceback (most recent call last):
    ...
    milcell.exceptions.ShapeError: MILModel: batch.instances has feature size 7 but the model expects 4 ...
    """

    feature_dim = _renamed_attribute("feature_dim", "in_dim")
    uses_image = _renamed_attribute("uses_image", "use_image")
    needs_clinical = _renamed_attribute("needs_clinical", "use_clinical")

    def __init__(
        self,
        pooling: MILPooling,
        head: FusionHead | None,
        encoder: nn.Module | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(pooling, MILPooling):
            raise ConfigError(
                f"MILModel: pooling must be a milcell.nn.pooling.MILPooling (see create_pooling), "
                f"got {type(pooling).__name__}"
            )
        if head is not None and not isinstance(head, FusionHead):
            raise ConfigError(
                f"MILModel: head must be a milcell.nn.fusion.FusionHead (see create_fusion) or None, "
                f"got {type(head).__name__}"
            )
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise ConfigError(f"MILModel: encoder must be an nn.Module or None, got {type(encoder).__name__}")
        self.prediction_level = bool(pooling.prediction_level)
        if self.prediction_level and head is not None:
            raise ConfigError(
                "MILModel: a prediction-level pooling already outputs class scores; pass head=None"
            )
        if not self.prediction_level and head is None:
            raise ConfigError("MILModel: a fusion head is required for an embedding-level pooling")
        enc_dim = getattr(encoder, "num_features", None) if encoder is not None else None
        if enc_dim is not None and int(enc_dim) != pooling.in_dim:
            raise ConfigError(
                f"MILModel: the encoder gives {enc_dim} features but the pooling expects "
                f"in_dim={pooling.in_dim}"
            )
        inferred = head.num_classes if head is not None else pooling.out_dim
        num_classes = inferred if num_classes is None else check_int(num_classes, "num_classes", low=2)
        if num_classes < 2:
            raise constraint_error("num_classes", "an integer >= 2", num_classes)
        if inferred != num_classes:
            raise ConfigError(
                f"MILModel: num_classes={num_classes} but the {'head' if head is not None else 'pooling'} "
                f"outputs {inferred} classes"
            )
        self.encoder = encoder
        self.pooling: MILPooling = pooling
        self.head: FusionHead | None = head
        self.num_classes = num_classes
        self.one_logit: bool = bool(getattr(head, "one_logit", False))
        self.in_dim: int = pooling.in_dim
        self.use_image: bool = head.use_image if head is not None else True
        pool_clin = pooling.use_clinical and self.use_image
        head_clin = head.use_clinical if head is not None else False
        self.use_clinical: bool = pool_clin or head_clin
        dims = set()
        if pool_clin:
            dims.add(int(getattr(pooling, "clinical_dim", 0)))
        if head is not None and head_clin:
            dims.add(head.clinical_dim)
        if len(dims) > 1:
            raise ConfigError(f"MILModel: pooling and head expect different clinical widths {sorted(dims)}")
        self.clinical_dim = dims.pop() if dims else 0
        self.config: dict[str, Any] | None = None

    # ------------------------------------------------------------------ validation
    def _dtype(self) -> torch.dtype:
        # Floating inputs are cast to the parameters' dtype (float64 data into a float32 model).
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def _check_batch(self, batch: Any) -> BagBatch:
        """Type and bag sizes of ``batch``, from host data only (``batch.sizes``)."""
        if not isinstance(batch, BagBatch):
            raise ShapeError(
                f"MILModel: batch must be a BagBatch (from collate_bags), got {type(batch).__name__}"
            )
        sizes = batch.bag_sizes
        if not isinstance(sizes, Tensor) or sizes.ndim != 1 or sizes.is_floating_point():
            raise ShapeError("MILModel: batch.bag_sizes must be a 1-D integer tensor (B,) from collate_bags")
        if sizes.shape[0] == 0:
            raise ShapeError("MILModel: the batch is empty (B = 0); a batch needs at least one bag")
        host = batch.sizes
        empty = [i for i, n in enumerate(host) if n < 1]
        if empty:
            ids = [batch.ids[i] for i in empty if i < len(batch.ids)]
            raise DataError(
                f"MILModel: bags {ids or empty} have no instance (bag_sizes {[host[i] for i in empty]}); "
                "every bag needs at least one instance"
            )
        return batch

    def _clinical(self, batch: BagBatch) -> Tensor | None:
        if not self.use_clinical:
            return None
        clinical = batch.clinical
        if clinical is None:
            raise ShapeError(
                f"MILModel: batch.clinical is missing but the model needs clinical attributes "
                f"(clinical_dim={self.clinical_dim}); build it with clinical_dim=0 or use_clinical=False "
                "for an image-only model"
            )
        if clinical.ndim != 2 or clinical.shape[1] != self.clinical_dim:
            raise ShapeError(
                f"MILModel: batch.clinical must have shape (B, {self.clinical_dim}), "
                f"got {tuple(clinical.shape)}"
            )
        if clinical.shape[0] != len(batch):
            raise ShapeError(f"MILModel: batch.clinical has {clinical.shape[0]} rows for {len(batch)} bags")
        if not clinical.is_floating_point():
            raise ShapeError(f"MILModel: batch.clinical must be floating point, got {clinical.dtype}")
        clinical = clinical.to(self._dtype())
        if checks_enabled():
            bad = ~torch.isfinite(clinical).all(dim=1)
            if bool(bad.any()):
                rows = bad.nonzero().flatten().tolist()
                ids = [batch.ids[i] for i in rows if i < len(batch.ids)]
                raise DataError(f"MILModel: batch.clinical holds NaN or inf for bags {ids or rows}")
        return clinical

    def _instances(self, batch: BagBatch) -> Tensor:
        x = batch.instances
        if not isinstance(x, Tensor):
            raise ShapeError(f"MILModel: batch.instances must be a Tensor, got {type(x).__name__}")
        total = sum(batch.sizes)
        if x.ndim == 0 or x.shape[0] != total:
            raise ShapeError(
                f"MILModel: batch.instances has {x.shape[0] if x.ndim else 0} rows but bag_sizes sum to "
                f"{total}"
            )
        if self.encoder is None:
            if x.ndim != 2:
                raise ShapeError(
                    f"MILModel: this model has no encoder, so batch.instances must be features (T, D), "
                    f"got {tuple(x.shape)} (images need a backbone)"
                )
            if x.shape[1] != self.in_dim:
                raise ShapeError(
                    f"MILModel: batch.instances has feature size {x.shape[1]} but the model expects "
                    f"{self.in_dim} (in_dim)"
                )
        elif getattr(self.encoder, "in_chans", None) is not None and x.ndim != 4:  # an image encoder
            raise ShapeError(f"MILModel: batch.instances must be images (T, C, H, W), got {tuple(x.shape)}")
        elif isinstance(width := getattr(self.encoder, "in_dim", None), int) and (
            x.ndim != 2 or x.shape[1] != width
        ):  # a feature encoder (an MLP)
            raise ShapeError(f"MILModel: batch.instances must be features (T, {width}), got {tuple(x.shape)}")
        elif x.ndim < 2:  # any other encoder checks its own input
            raise ShapeError(
                f"MILModel: batch.instances must be packed instances (T, ...), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ShapeError(f"MILModel: batch.instances must be floating point, got {x.dtype}")
        x = x.to(self._dtype())
        if checks_enabled():
            # Row blocks of ~1M values: isfinite's temporaries stay bounded whatever the bag size
            # (on the whole bag they took ~1.75x its size).
            rows = max(1, (1 << 20) // max(1, x[:1].numel()))
            finite = torch.cat([torch.isfinite(part).flatten(1).all(dim=1) for part in x.split(rows)])
            if not bool(finite.all()):
                bags = batch.bag_index.to(finite.device)[~finite].unique().tolist()
                ids = [batch.ids[i] for i in bags if i < len(batch.ids)]
                raise DataError(f"MILModel: batch.instances holds NaN or inf in bags {ids or bags}")
        return x

    # ------------------------------------------------------------------ the three steps
    def encode(self, batch: BagBatch | Tensor) -> Tensor:
        """Step 1: packed instances → features ``(T, D)``.

        Parameters
        ----------
        batch : BagBatch or Tensor
            A batch, whose ``instances`` (images ``(T, C, H, W)``, or features
            ``(T, D)`` without an encoder) are checked and cast to the model's
            dtype as in :meth:`forward`; or a tensor of packed instances, used
            as given.

        Returns
        -------
        Tensor
            ``(T, D)`` features, ``D == pooling.in_dim`` (the instances
            themselves for a model without an encoder).

        Raises
        ------
        ShapeError, DataError
            As :meth:`forward`, for a batch.

        Examples
        --------
        >>> import torch
        >>> from milcell.data.bag import Bag, collate_bags
        >>> model = create_mil_model("milcell_mini_resnet_k8", pooling="mean")
        >>> batch = collate_bags([Bag(torch.rand(3, 3, 32, 32)), Bag(torch.rand(2, 3, 32, 32))])
        >>> model.encode(batch).shape
        torch.Size([5, 64])
        """
        if isinstance(batch, BagBatch):
            instances = self._instances(self._check_batch(batch))
        elif isinstance(batch, Tensor):
            instances = batch
        else:
            raise ShapeError(
                f"MILModel.encode: batch must be a BagBatch or a Tensor of packed instances, "
                f"got {type(batch).__name__}"
            )
        return instances if self.encoder is None else self.encoder(instances)

    def _pool(
        self, features: Tensor, batch: BagBatch, clinical: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
        """Pad ``(T, D)`` features with the batch's layout and pool.

        Returns the embedding, the attention, the instance logits (or None) and the pooling's aux dict.
        """
        if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[0] != sum(batch.sizes):
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ShapeError(
                f"MILModel.pool: features must have shape (T, D) with T = {sum(batch.sizes)} instances, "
                f"got {shape}"
            )
        x = batch.pad(features)
        mask = batch.mask.to(x.device)
        pool_clin = clinical if self.pooling.use_clinical else None
        pooled = self.pooling.forward_aux(x, mask, clinical=pool_clin)
        instance_logits = None
        if isinstance(self.pooling, InstanceMeanPooling):
            instance_logits = self.pooling.instance_logits(x, mask, clinical=pool_clin)
        return pooled.embedding, pooled.attention, instance_logits, pooled.aux

    @overload
    def pool(
        self,
        features: Tensor,
        batch: BagBatch,
        clinical: Tensor | None = ...,
        return_attention: Literal[False] = ...,
    ) -> Tensor: ...

    @overload
    def pool(
        self,
        features: Tensor,
        batch: BagBatch,
        clinical: Tensor | None = ...,
        *,
        return_attention: Literal[True],
    ) -> tuple[Tensor, Tensor]: ...

    def pool(
        self,
        features: Tensor,
        batch: BagBatch,
        clinical: Tensor | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Step 2: features ``(T, D)`` → bag embeddings ``(B, D')``.

        Pads the packed features to ``(B, N_max, D)`` with the batch's layout
        (from its host-side ``sizes``: no device read), builds the mask and
        runs the pooling.

        Parameters
        ----------
        features : Tensor
            ``(T, D)`` packed instance features, e.g. from :meth:`encode`.
        batch : BagBatch
            Gives the bag sizes (and, by default, the clinical attributes).
        clinical : Tensor or None, default None
            ``(B, F)`` for a pooling that reads clinical attributes
            (``instance_mean`` with ``clinical_dim > 0``); ``None`` takes
            ``batch.clinical``, checked as in :meth:`forward`.
        return_attention : bool, default False
            Also return the per-instance weights ``(B, N_max)``.

        Returns
        -------
        Tensor or (Tensor, Tensor)
            The embedding ``(B, pooling.out_dim)`` (class log-probabilities
            for a prediction-level pooling) and, if asked, the weights
            ``(B, N_max)``, float32, 0 at padded positions.

        Examples
        --------
        >>> import torch
        >>> from milcell.data.bag import Bag, collate_bags
        >>> model = create_mil_model(None, pooling="attention", in_dim=4)
        >>> batch = collate_bags([Bag(torch.randn(3, 4)), Bag(torch.randn(1, 4))])
        >>> embedding, attention = model.pool(model.encode(batch), batch, return_attention=True)
        >>> embedding.shape, attention.shape
        (torch.Size([2, 4]), torch.Size([2, 3]))
        """
        self._check_batch(batch)
        if clinical is None:
            clinical = self._clinical(batch)
        embedding, attention, _, _ = self._pool(features, batch, clinical)
        return (embedding, attention) if return_attention else embedding

    def forward_head(self, embedding: Tensor | None, clinical: Tensor | None = None) -> FusionOutput:
        """Step 3: bag embedding (and clinical attributes) → logits ``(B, C)``.

        Parameters
        ----------
        embedding : Tensor or None
            ``(B, pooling.out_dim)`` from :meth:`pool`; ``None`` for a
            clinical-only model (``use_image`` False).
        clinical : Tensor or None, default None
            ``(B, F)``, passed to the head only if it reads clinical
            attributes (and checked there).

        Returns
        -------
        FusionOutput
            ``(logits (B, C), experts, gate)``; for a prediction-level pooling
            the embedding itself is the logits (no experts, no gate).

        Examples
        --------
        >>> import torch
        >>> model = create_mil_model(None, pooling="mean", fusion="gated", in_dim=4, clinical_dim=2)
        >>> out = model.forward_head(torch.randn(3, 4), torch.randn(3, 2))
        >>> out.logits.shape, out.gate.shape
        (torch.Size([3, 2]), torch.Size([3, 1]))
        """
        if self.head is None:
            if embedding is None:
                raise ShapeError("MILModel.forward_head: a prediction-level model needs the embedding")
            return FusionOutput(embedding, {}, None)
        return self.head(embedding if self.use_image else None, clinical if self.head.use_clinical else None)

    def forward(self, batch: BagBatch) -> MILOutput:
        """Predict a batch of bags: ``forward_head(pool(encode(batch), batch), clinical)``.

        Parameters
        ----------
        batch : BagBatch
            Packed instances ``(T, C, H, W)`` or ``(T, D)``, ``bag_sizes (B,)``,
            and ``clinical (B, F)`` when the model reads clinical attributes.

        Returns
        -------
        MILOutput
            ``logits (B, num_classes)``, ``embedding``, ``attention (B, N_max)``,
            and, depending on the parts, ``instance_logits``, ``experts``, ``gate``.

        Raises
        ------
        ShapeError
            An empty batch, wrong rank, channels or feature size of
            ``batch.instances``, or a missing or mis-sized ``batch.clinical``.
        DataError
            A bag without instances (from the host-side sizes, always), or,
            while :func:`milcell.checks` is on, NaN or inf in the instances
            or clinical attributes (checked after casting floating inputs to
            the parameters' dtype).

        All checks run before the encoder is called.
        """
        self._check_batch(batch)
        instances = self._instances(batch) if self.use_image else None
        clinical = self._clinical(batch)
        embedding = attention = instance_logits = None
        aux: dict[str, Tensor] = {}
        if instances is not None:
            features = instances if self.encoder is None else self.encoder(instances)
            embedding, attention, instance_logits, aux = self._pool(features, batch, clinical)
        fused = self.forward_head(embedding, clinical)
        if embedding is None:
            embedding = fused.logits.new_zeros((len(batch), 0))
        return MILOutput(
            fused.logits, embedding, attention, instance_logits, dict(fused.experts), fused.gate, aux
        )

    def loss(
        self,
        output: MILOutput,
        batch: BagBatch,
        class_weights: Tensor | Any | None = None,
        expert_weight: float = 1.0,
        aux_weights: Mapping[str, float] | None = None,
        pos_weight: float | None = None,
    ) -> Tensor:
        """Scalar training loss of ``output`` for ``batch``: bag loss plus weighted auxiliary losses.

        The bag loss is :func:`mil_loss`: cross-entropy, or for a one-logit
        model (:attr:`one_logit`, logits ``[0, z]``) binary cross-entropy with
        logits on ``z`` (the same value without ``pos_weight``). A pooling with auxiliary losses
        (:meth:`milcell.nn.pooling.MILPooling.auxiliary_losses`, e.g. CLAM's
        instance clustering) adds ``weight * loss`` for each of them, with
        the pooling's :attr:`~milcell.nn.pooling.MILPooling.aux_loss_weights`
        updated by ``aux_weights``; terms of weight 0 are not computed. With
        soft labels (self-training), the auxiliary losses get the most
        probable class of each bag as its label.

        Parameters
        ----------
        output : MILOutput
            The model's output for ``batch``.
        batch : BagBatch
            Gives the labels.
        class_weights : Tensor or sequence of float, optional
            ``(C,)`` per-class weights of the bag loss.
        expert_weight : float, default 1.0
            Weight of each fusion expert's cross-entropy (see :func:`mil_loss`).
        aux_weights : mapping of str to float, optional
            Overrides of the pooling's auxiliary-loss weights, by name
            (``{"instance": 0.0}`` switches that term off).
        pos_weight : float, optional
            Binary problems: weight of the positive class's terms of the bag
            loss (see :func:`mil_loss`).

        Returns
        -------
        Tensor
            Scalar float32 loss.

        Raises
        ------
        ConfigError
            An ``aux_weights`` name the pooling does not define, or a negative weight.

        Examples
        --------
        >>> import torch
        >>> from milcell.data.bag import Bag, collate_bags
        >>> model = create_mil_model(None, pooling="attention", in_dim=4)
        >>> batch = collate_bags([Bag(torch.randn(3, 4), 1), Bag(torch.randn(2, 4), 0)])
        >>> loss = model.loss(model(batch), batch)
        >>> loss.shape, bool(torch.isfinite(loss))
        (torch.Size([]), True)
        """
        total = mil_loss(
            output,
            batch,
            class_weights=class_weights,
            expert_weight=expert_weight,
            pos_weight=pos_weight,
            binary=self.one_logit,
        )
        weights = self._aux_weights(aux_weights)
        if not any(weights.values()):
            return total
        if batch.soft_labels is not None:
            labels = batch.soft_labels.to(output.logits.device).argmax(dim=1)
        else:
            labels = batch.labels.to(output.logits.device)
        losses = self.pooling.auxiliary_losses(output.aux, labels)
        for name, weight in weights.items():
            if not weight:
                continue
            if name not in losses:
                raise ConfigError(
                    f"MILModel.loss: the {type(self.pooling).__name__} pooling declares an auxiliary loss "
                    f"{name!r} but auxiliary_losses returned only {sorted(losses)}"
                )
            total = total + weight * losses[name].float()
        return total

    def _aux_weights(self, overrides: Mapping[str, float] | None) -> dict[str, float]:
        """The pooling's auxiliary-loss weights updated by ``overrides`` (validated)."""
        weights = dict(getattr(self.pooling, "aux_loss_weights", {}) or {})
        for name, value in (overrides or {}).items():
            if name not in weights:
                raise ConfigError(
                    f"MILModel.loss: aux_weights names {name!r}, but the {type(self.pooling).__name__} "
                    f"pooling's auxiliary losses are {sorted(weights) or 'none'}"
                )
            weights[name] = check_real(value, f"aux_weights[{name!r}]", low=0.0)
        return weights

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MILModel:
        """Rebuild a model from ``model.config`` (never downloads: ``pretrained`` is forced off).

        Examples
        --------
        >>> from milcell.nn.model import create_mil_model
        >>> m = create_mil_model(None, pooling="mean", in_dim=6, num_classes=3)
        >>> MILModel.from_config(m.config).config == m.config
        True
        """
        kwargs = dict(copy.deepcopy(dict(config)))
        kwargs["pretrained"] = False
        if "feature_dim" in kwargs and "in_dim" not in kwargs:  # saved before the rename: no warning
            kwargs["in_dim"] = kwargs.pop("feature_dim")
        return create_mil_model(**kwargs)


_DEFAULT_BACKBONE = "milcell_mini_resnet_k8"


# ``feature_dim=`` is the old spelling of ``in_dim=`` (docs/pooling_fusion.rst, "Naming").
@_renamed_kwargs(feature_dim="in_dim")
def create_mil_model(
    backbone: str | None = _DEFAULT_BACKBONE,
    pooling: str = "gated_attention",
    fusion: str | None = "linear",
    num_classes: int = 2,
    clinical_dim: int = 0,
    in_dim: int | None = None,
    pretrained: bool = False,
    trainable: str | int = "all",
    chunk_size: int | None = None,
    checkpointing: bool = False,
    freeze_bn_stats: bool | None = None,
    pooling_kwargs: Mapping[str, Any] | None = None,
    fusion_kwargs: Mapping[str, Any] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    use_image: bool = True,
    use_clinical: bool = True,
    encoder: str | None = None,
    encoder_kwargs: Mapping[str, Any] | None = None,
    one_logit: bool = False,
) -> MILModel:
    """Build a :class:`MILModel` by names.

    Parameters
    ----------
    backbone : str or None, default "milcell_mini_resnet_k8"
        Backbone name for :func:`~milcell.nn.backbones.create_backbone`;
        ``None`` for feature bags (instances ``(T, in_dim)``).
    pooling : str, default "gated_attention"
        Name for :func:`~milcell.nn.pooling.create_pooling`.
    fusion : str or None, default "linear"
        Name for :func:`~milcell.nn.fusion.create_fusion`; ignored (must stay
        "linear" or None) for the prediction-level ``instance_mean`` pooling.
    num_classes : int, default 2
        Number of classes.
    clinical_dim : int, default 0
        Number ``F`` of clinical attributes per bag.
    in_dim : int or None, default None
        ``D``, the width of the instance features the pooling takes: required
        for feature bags (``backbone`` None); with a backbone, optional and
        checked against its ``num_features``. ``feature_dim=``, its old
        spelling, is still accepted (deprecated).
    pretrained : bool, default False
        Pretrained backbone weights (see ``create_backbone``).
    trainable : {"all", "head"} or int, default "all"
        Trainable part of the backbone.
    chunk_size : int or None, default None
        Instances per backbone call (see :class:`~milcell.nn.encoder.InstanceEncoder`).
    checkpointing : bool, default False
        Activation checkpointing per chunk.
    freeze_bn_stats : bool or None, default None
        Keep the backbone's BatchNorm layers in eval mode. ``None`` means
        True for a frozen backbone (``trainable="head"`` or ``0``: its running
        statistics must not drift either) and False otherwise.
    pooling_kwargs, fusion_kwargs, backbone_kwargs : dict or None
        Extra options; must be JSON-serialisable (they go into ``model.config``).
    use_image, use_clinical : bool, default True
        Input switches for ablations (clinical-only needs a head that takes
        ``use_image=False``: ``concat``, ``moe``, ``gated``).
    encoder : {None, "mlp"}, default None
        An instance encoder over feature bags: ``"mlp"`` is
        :class:`~milcell.nn.encoder.MLPEncoder` (the instance network of
        attention MIL on precomputed features, Ilse et al. 2018), with
        ``in_dim`` the width ``F`` of the instances ``(T, F)`` and the
        pooling on its ``hidden[-1]`` outputs; ``backbone`` must then be
        None or left at its default (it is recorded as None).
        ``chunk_size`` and ``checkpointing`` apply to it too. ``None``: the
        backbone, or no encoder for ``backbone=None``.
    encoder_kwargs : dict or None
        Options of the encoder (``hidden``, default ``(256, 128, 64)``;
        ``dropout``); JSON-serialisable.
    one_logit : bool, default False
        Binary problems (``num_classes=2``): the head's last layer outputs a
        single logit ``z``, the logits are ``[0, z]`` (``softmax`` gives
        ``sigmoid(z)``) and :meth:`MILModel.loss` is binary cross-entropy
        on ``z`` (see :mod:`milcell.nn.fusion`). Not for a prediction-level
        pooling.

    Returns
    -------
    MILModel
        With ``model.config`` holding these arguments.

    Raises
    ------
    ConfigError
        Inconsistent or unknown options.

    Examples
    --------
    >>> import torch
    >>> from milcell.data.bag import Bag, collate_bags
    >>> m = create_mil_model(None, pooling="instance_mean", in_dim=8, num_classes=5)
    >>> out = m(collate_bags([Bag(torch.randn(4, 8), 3)]))
    >>> out.logits.shape, out.instance_logits.shape
    (torch.Size([1, 5]), torch.Size([1, 4, 5]))

    Attention MIL on precomputed features (Ilse et al. 2018): an instance
    MLP 256-128-64 with dropout, attention pooling, one logit:

    >>> m = create_mil_model(encoder="mlp", encoder_kwargs={"hidden": (256, 128, 64), "dropout": 0.1},
    ...                      in_dim=512, pooling="attention", one_logit=True)
    >>> out = m(collate_bags([Bag(torch.randn(7, 512), 1), Bag(torch.randn(3, 512), 0)]))
    >>> out.logits.shape, out.logits[:, 0].tolist(), m.pooling.in_dim
    (torch.Size([2, 2]), [0.0, 0.0], 64)
    """
    num_classes = check_int(num_classes, "num_classes", low=2)
    if encoder is not None:
        check_choice(encoder, "encoder", ENCODERS)
        if backbone not in (None, _DEFAULT_BACKBONE):
            raise ConfigError(
                f"create_mil_model: encoder={encoder!r} encodes feature bags; backbone={backbone!r} would "
                "encode images: pass backbone=None (or leave it out)"
            )
        backbone = None
    elif encoder_kwargs:
        raise ConfigError(f"create_mil_model: encoder_kwargs={dict(encoder_kwargs)} given without an encoder")
    if not isinstance(one_logit, (bool, np.bool_)):
        raise constraint_error("one_logit", "a bool", one_logit)
    clinical_dim = check_int(clinical_dim, "clinical_dim", low=0)
    if in_dim is not None:
        in_dim = check_int(in_dim, "in_dim", low=1)
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size", low=1)
    if not isinstance(trainable, str):
        trainable = check_int(trainable, "trainable", low=0)
    if freeze_bn_stats is None:  # trainable=0 freezes the whole backbone, exactly as "head" does
        freeze_bn_stats = trainable in ("head", 0)
    config: dict[str, Any] = {
        "backbone": backbone,
        "pooling": pooling,
        "fusion": fusion,
        "num_classes": num_classes,
        "clinical_dim": clinical_dim,
        "in_dim": in_dim,
        "pretrained": pretrained,
        "trainable": trainable,
        "chunk_size": chunk_size,
        "checkpointing": checkpointing,
        "freeze_bn_stats": freeze_bn_stats,
        "pooling_kwargs": dict(pooling_kwargs or {}),
        "fusion_kwargs": dict(fusion_kwargs or {}),
        "backbone_kwargs": dict(backbone_kwargs or {}),
        "use_image": use_image,
        "use_clinical": use_clinical,
    }
    if encoder is not None:  # recorded only when used, so the configs of earlier models stay the same
        config["encoder"] = encoder
        config["encoder_kwargs"] = dict(encoder_kwargs or {})
    if one_logit:
        config["one_logit"] = True
    try:
        config = json.loads(json.dumps(config, default=_plain_scalar))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"create_mil_model: arguments must be JSON-serialisable for model.config: {exc}"
        ) from exc
    use_image, use_clinical = config["use_image"], config["use_clinical"]
    if not (use_image or use_clinical):
        raise ConfigError("create_mil_model: use_image and use_clinical cannot both be False")
    if not use_image and clinical_dim == 0:
        raise ConfigError("create_mil_model: use_image=False needs clinical_dim > 0")

    instance_encoder: InstanceEncoder | None = None
    if backbone is None:
        if in_dim is None:
            raise ConfigError("create_mil_model: in_dim is required when backbone is None (feature bags)")
        if encoder is not None:
            instance_encoder = create_encoder(
                encoder,
                in_dim,
                chunk_size=chunk_size,
                checkpointing=config["checkpointing"],
                **config["encoder_kwargs"],
            )
            assert instance_encoder.num_features is not None
            in_dim = instance_encoder.num_features
    else:
        net = create_backbone(
            backbone, pretrained=config["pretrained"], trainable=trainable, **config["backbone_kwargs"]
        )
        if in_dim is not None and in_dim != net.num_features:
            raise ConfigError(
                f"create_mil_model: in_dim={in_dim} but backbone {backbone!r} gives "
                f"{net.num_features} features"
            )
        instance_encoder = InstanceEncoder(
            net,
            chunk_size=chunk_size,
            checkpointing=config["checkpointing"],
            freeze_bn_stats=config["freeze_bn_stats"],
        )
        in_dim = net.num_features

    used_clinical = clinical_dim if use_clinical else 0
    pkw = dict(config["pooling_kwargs"])
    factory = _POOLINGS.get(pooling)
    accepted = inspect.signature(factory).parameters
    if "num_classes" in accepted:  # class-aware poolings (CLAM's branches, DSMIL's scores): the task's C
        pkw.setdefault("num_classes", num_classes)
    if getattr(factory, "prediction_level", False) and "clinical_dim" in accepted:  # its output is the logits
        pkw.setdefault("clinical_dim", used_clinical)
    pool = create_pooling(pooling, in_dim, **pkw)
    head: FusionHead | None = None
    if pool.prediction_level:
        if fusion not in (None, "linear") or config["fusion_kwargs"]:
            raise ConfigError(
                f"create_mil_model: pooling {pooling!r} is prediction-level (its output is the logits) and "
                f"uses no fusion head; got fusion={fusion!r}, fusion_kwargs={config['fusion_kwargs']}"
            )
        if not use_image:
            raise ConfigError(f"create_mil_model: pooling {pooling!r} needs images (use_image=True)")
        if one_logit:
            raise ConfigError(
                f"create_mil_model: one_logit=True needs a fusion head; pooling {pooling!r} is "
                "prediction-level (its own classifier gives the logits)"
            )
    else:
        if fusion is None:
            raise ConfigError(
                f"create_mil_model: pooling {pooling!r} needs a fusion head (fusion=None given)"
            )
        fkw = dict(config["fusion_kwargs"])
        if not use_image:
            fkw.setdefault("use_image", False)
        if one_logit:
            fkw["one_logit"] = True
        head = create_fusion(fusion, pool.out_dim, used_clinical, num_classes, **fkw)
    model = MILModel(pool, head, encoder=instance_encoder, num_classes=num_classes)
    model.config = config
    return model


def _plain_scalar(value: Any) -> Any:
    """``json.dumps`` hook: numpy scalars become plain ``bool`` / ``int`` / ``float``."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _check_class_weights(class_weights: Any, num_classes: int, device: torch.device) -> Tensor | None:
    """``(C,)`` float32 weights on ``device``.

    Weights given on the host (a sequence, an array, a CPU tensor) are checked there, always; a
    tensor already on another device is checked for its shape, and for its values only while the
    value checks are on (reading them would wait for the device).
    """
    if class_weights is None:
        return None
    on_device = isinstance(class_weights, Tensor) and class_weights.device.type != "cpu"
    if on_device:
        weights = class_weights.to(device=device, dtype=torch.float32)
        shape = tuple(weights.shape)
    else:
        if isinstance(class_weights, Tensor):
            class_weights = class_weights.detach().numpy()
        try:
            host = np.asarray(class_weights, dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigError(
                f"mil_loss: class_weights must be ({num_classes},) numbers, got {class_weights!r}"
            ) from None
        shape = host.shape
    if shape != (num_classes,):
        raise ConfigError(f"mil_loss: class_weights must have shape ({num_classes},), got {shape}")
    if on_device:
        if checks_enabled():
            _check_weight_values(weights.detach().cpu().numpy())
        return weights
    _check_weight_values(host)
    return torch.as_tensor(host, dtype=torch.float32, device=device)


def _check_weight_values(weights: np.ndarray) -> None:
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ConfigError(
            f"mil_loss: class_weights must be finite, >= 0 and not all 0, got {weights.tolist()}"
        )


def mil_loss(
    output: MILOutput,
    batch: BagBatch,
    class_weights: Tensor | Any | None = None,
    expert_weight: float = 1.0,
    pos_weight: float | None = None,
    binary: bool = False,
) -> Tensor:
    """Cross-entropy of a batch, with class weights, soft labels and expert terms.

    Binary problems can use binary cross-entropy with logits on ``z = l_1 -
    l_0`` instead (``binary=True``, what a one-logit model's
    :meth:`MILModel.loss` does: its logits are ``[0, z]``), with the
    positive-class terms scaled by ``pos_weight``, as
    :func:`torch.nn.functional.binary_cross_entropy_with_logits` computes
    it. Without ``pos_weight`` it equals the cross-entropy on ``[l_0, l_1]``
    (``-log softmax = log(1 + e^z) - y z``).

    Hard labels: bags labelled ``-1`` (unlabelled) are ignored. Soft labels
    (``batch.soft_labels``, ``(B, C)`` probabilities, e.g. pseudo-labels of
    self-training) are used as targets for every bag when present. When the
    fusion head exposes experts (``moe``, ``gated``), ``expert_weight`` times
    the cross-entropy of each expert's logits is added (this is what trains
    the experts of a ``detach_experts=True`` MoE; set 0 to turn it off).
    Computed in float32.

    Parameters
    ----------
    output : MILOutput
        The model's output for ``batch``.
    batch : BagBatch
        Gives ``labels (B,)`` and optionally ``soft_labels (B, C)``.
    class_weights : Tensor or sequence of float, optional
        ``(C,)`` per-class weights (e.g. inverse frequencies).
    expert_weight : float, default 1.0
        Weight of each expert's auxiliary cross-entropy.
    pos_weight : float, optional
        Binary problems only: weight ``> 0`` of the positive class's terms
        (e.g. ``n_negative / n_positive`` for imbalance); implies ``binary``.
    binary : bool, default False
        Binary cross-entropy with logits on ``z = l_1 - l_0`` (two classes only).

    Returns
    -------
    Tensor
        Scalar loss.

    Raises
    ------
    DataError
        While :func:`milcell.checks` is on: no bag of the batch is labelled,
        a label is out of range, or soft labels are not probabilities. With
        the checks off (the default: they would read device values), a batch
        without labelled bags gives a loss of 0 with no gradient, and an
        out-of-range label fails inside :func:`torch.nn.functional.cross_entropy`.
    ConfigError
        For malformed ``class_weights`` (checked on the host when given as a
        sequence, an array or a CPU tensor; for a tensor on the accelerator,
        only its shape unless the checks are on), a negative ``expert_weight``,
        or ``binary`` / ``pos_weight`` with more than two classes.

    Examples
    --------
    >>> import torch
    >>> from milcell.data.bag import Bag, collate_bags
    >>> batch = collate_bags([Bag(torch.zeros(1, 2), 1), Bag(torch.zeros(1, 2), -1)])
    >>> out = MILOutput(logits=torch.tensor([[0.0, 0.0], [5.0, -5.0]]), embedding=torch.zeros(2, 2))
    >>> round(mil_loss(out, batch).item(), 4)   # only the labelled bag counts: log 2
    0.6931
    >>> round(mil_loss(out, batch, pos_weight=3.0).item(), 4)   # its positive term, 3 times
    2.0794
    """
    logits = output.logits.float()
    if logits.ndim != 2 or logits.shape[0] != len(batch):
        raise ShapeError(
            f"mil_loss: output.logits must be (B, C) with B={len(batch)}, got {tuple(logits.shape)}"
        )
    num_classes = logits.shape[1]
    expert_weight = check_real(expert_weight, "expert_weight", low=0.0)
    weights = _check_class_weights(class_weights, num_classes, logits.device)
    binary = bool(binary) or pos_weight is not None
    pw = 1.0
    if binary:
        if num_classes != 2:
            raise ConfigError(
                "mil_loss: binary cross-entropy (a one-logit head, pos_weight) needs 2 classes, "
                f"got {num_classes}"
            )
        if pos_weight is not None:
            pw = check_real(pos_weight, "pos_weight", low=0.0, low_open=True)

    def bce(scores: Tensor, target: Tensor) -> Tensor:
        """Per-bag binary cross-entropy with logits on ``z = l_1 - l_0``, class- and pos-weighted."""
        z = scores[:, 1].float() - scores[:, 0].float()
        w0, w1 = (1.0, 1.0) if weights is None else (weights[0], weights[1])
        return -(w1 * pw * target * F.logsigmoid(z) + w0 * (1.0 - target) * F.logsigmoid(-z))

    checking = checks_enabled()
    if batch.soft_labels is not None:
        target = batch.soft_labels.to(device=logits.device, dtype=torch.float32)
        if target.shape != logits.shape:
            raise DataError(
                f"mil_loss: batch.soft_labels has shape {tuple(target.shape)}, logits {tuple(logits.shape)}"
            )
        if checking:
            if not bool(torch.isfinite(target).all()) or bool((target < 0).any()):
                raise DataError("mil_loss: batch.soft_labels must be finite and non-negative")
            if not torch.allclose(target.sum(dim=1), torch.ones_like(target[:, 0]), atol=1e-4):
                raise DataError("mil_loss: each row of batch.soft_labels must sum to 1")

        def ce(scores: Tensor) -> Tensor:
            if binary:
                return bce(scores, target[:, 1]).mean()
            return F.cross_entropy(scores.float(), target, weight=weights)

    else:
        labels = batch.labels.to(logits.device)
        if checking:
            if bool((labels >= num_classes).any()):
                raise DataError(
                    f"mil_loss: label {int(labels.max())} is out of range for {num_classes} classes "
                    f"(bag indices {(labels >= num_classes).nonzero().flatten().tolist()[:5]})"
                )
            if not bool((labels >= 0).any()):
                raise DataError(
                    f"mil_loss: no labelled bag in the batch (all labels are -1): {batch.ids[:5]}"
                )
        labelled = labels >= 0
        # Weighted mean over the labelled bags, as cross_entropy(..., ignore_index=-1) computes it,
        # but 0 (not 0 / 0) for a batch without any labelled bag: no boolean indexing, no sync.
        if weights is None:
            total_weight = labelled.sum().float()
        else:
            total_weight = torch.where(labelled, weights[labels.clamp_min(0)], 0.0).sum()
        total_weight = total_weight.clamp_min(torch.finfo(torch.float32).tiny)

        def ce(scores: Tensor) -> Tensor:
            if binary:
                per_bag = torch.where(labelled, bce(scores, labels.clamp_min(0).float()), 0.0)
            else:
                per_bag = F.cross_entropy(
                    scores.float(), labels, weight=weights, ignore_index=-1, reduction="none"
                )
            return per_bag.sum() / total_weight

    total = ce(logits)
    if expert_weight:
        for scores in output.experts.values():
            total = total + expert_weight * ce(scores)
    return total
