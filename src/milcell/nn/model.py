"""The MIL model: instance encoder → pad + mask → pooling → fusion head → logits.

:class:`MILModel` composes the parts of the data path. It takes a
:class:`~milcell.data.bag.BagBatch` whose packed instances ``(T, ...)`` are
images ``(T, C, H, W)`` (with an instance encoder) or features ``(T, D)``
(feature bags, no encoder), encodes them to ``(T, D)``, pads them to ``(B,
N_max, D)`` with the batch mask, pools each bag, and fuses the bag embedding
with the clinical attributes into logits ``(B, num_classes)``. A
prediction-level pooling (``instance_mean``) already outputs class scores, so
it gets no fusion head. Single-cell classification is the same model on bags
of one.

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
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milcell.data.bag import BagBatch
from milcell.exceptions import ConfigError, DataError, ShapeError
from milcell.nn.backbones import create_backbone
from milcell.nn.encoder import InstanceEncoder
from milcell.nn.fusion import create_fusion
from milcell.nn.pooling import create_pooling

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

    Examples
    --------
    >>> import torch
    >>> out = MILOutput(logits=torch.zeros(2, 3), embedding=torch.zeros(2, 8))
    >>> out.attention is None, out.experts
    (True, {})
    """

    logits: Tensor
    embedding: Tensor
    attention: Tensor | None = None
    instance_logits: Tensor | None = None
    experts: dict[str, Tensor] = field(default_factory=dict)
    gate: Tensor | None = None


class MILModel(nn.Module):
    """Multiple-instance model: optional encoder, pooling and fusion head.

    Parameters
    ----------
    pooling : nn.Module
        A :mod:`milcell.nn.pooling` module (``in_dim``, ``out_dim``,
        ``prediction_level``, ``uses_clinical``).
    head : nn.Module or None
        A :mod:`milcell.nn.fusion` head mapping ``(B, out_dim)`` and clinical
        ``(B, F)`` to logits; must be ``None`` for a prediction-level pooling.
    encoder : nn.Module or None, default None
        Maps packed images ``(T, C, H, W)`` to ``(T, D)`` (an
        :class:`~milcell.nn.encoder.InstanceEncoder`); ``None`` for feature
        bags, whose instances are already ``(T, D)``.
    num_classes : int or None, default None
        Number of classes; inferred from the head (or pooling) when ``None``.

    Attributes
    ----------
    clinical_dim : int
        ``F`` the model reads (0 = no clinical input).
    needs_clinical : bool
        Whether :meth:`forward` requires ``batch.clinical``.
    config : dict or None
        Builder arguments when made by :func:`create_mil_model`.

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

    def __init__(
        self,
        pooling: nn.Module,
        head: nn.Module | None,
        encoder: nn.Module | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(pooling, nn.Module) or not hasattr(pooling, "out_dim"):
            raise ConfigError("MILModel: pooling must be a milcell pooling module (with out_dim)")
        self.prediction_level = bool(getattr(pooling, "prediction_level", False))
        if self.prediction_level and head is not None:
            raise ConfigError(
                "MILModel: a prediction-level pooling already outputs class scores; pass head=None"
            )
        if not self.prediction_level and head is None:
            raise ConfigError("MILModel: a fusion head is required for an embedding-level pooling")
        in_dim = getattr(pooling, "in_dim", None)
        enc_dim = getattr(encoder, "num_features", None) if encoder is not None else None
        if enc_dim is not None and in_dim is not None and int(enc_dim) != int(in_dim):
            raise ConfigError(
                f"MILModel: the encoder gives {enc_dim} features but the pooling expects in_dim={in_dim}"
            )
        inferred = (
            getattr(head, "num_classes", None) if head is not None else getattr(pooling, "out_dim", None)
        )
        if num_classes is None:
            num_classes = inferred
        if num_classes is None or int(num_classes) < 2:
            raise ConfigError(f"MILModel: num_classes must be >= 2, got {num_classes!r}")
        if inferred is not None and int(inferred) != int(num_classes):
            raise ConfigError(
                f"MILModel: num_classes={num_classes} but the {'head' if head is not None else 'pooling'} "
                f"outputs {inferred} classes"
            )
        self.encoder = encoder
        self.pooling = pooling
        self.head = head
        self.num_classes = int(num_classes)
        self.feature_dim: int | None = None if in_dim is None else int(in_dim)
        self.uses_image = bool(getattr(head, "use_image", True)) if head is not None else True
        pool_clin = bool(getattr(pooling, "uses_clinical", False))
        head_clin = bool(getattr(head, "use_clinical", False)) if head is not None else False
        self.needs_clinical = (pool_clin and self.uses_image) or head_clin
        dims = set()
        if pool_clin and self.uses_image:
            dims.add(int(getattr(pooling, "clinical_dim", 0)))
        if head_clin:
            dims.add(int(getattr(head, "clinical_dim", 0)))
        if len(dims) > 1:
            raise ConfigError(f"MILModel: pooling and head expect different clinical widths {sorted(dims)}")
        self.clinical_dim = dims.pop() if dims else 0
        self.config: dict[str, Any] | None = None

    # ------------------------------------------------------------------ validation
    def _dtype(self) -> torch.dtype:
        # Floating inputs are cast to the parameters' dtype (float64 data into a float32 model).
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def _check_sizes(self, batch: BagBatch) -> None:
        sizes = batch.bag_sizes
        if not isinstance(sizes, Tensor) or sizes.ndim != 1 or sizes.is_floating_point():
            raise ShapeError("MILModel: batch.bag_sizes must be a 1-D integer tensor (B,) from collate_bags")
        if sizes.shape[0] == 0:
            raise ShapeError("MILModel: the batch is empty (B = 0); a batch needs at least one bag")
        empty = (sizes < 1).nonzero().flatten().tolist()
        if empty:
            ids = [batch.ids[i] for i in empty if i < len(batch.ids)]
            raise DataError(
                f"MILModel: bags {ids or empty} have no instance (bag_sizes {sizes[empty].tolist()}); "
                "every bag needs at least one instance"
            )

    def _clinical(self, batch: BagBatch) -> Tensor | None:
        if not self.needs_clinical:
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
        if x.ndim == 0 or x.shape[0] != int(batch.bag_sizes.sum()):
            raise ShapeError(
                f"MILModel: batch.instances has {x.shape[0] if x.ndim else 0} rows but bag_sizes sum to "
                f"{int(batch.bag_sizes.sum())}"
            )
        if self.encoder is None:
            if x.ndim != 2:
                raise ShapeError(
                    f"MILModel: this model has no encoder, so batch.instances must be features (T, D), "
                    f"got {tuple(x.shape)} (images need a backbone)"
                )
            if self.feature_dim is not None and x.shape[1] != self.feature_dim:
                raise ShapeError(
                    f"MILModel: batch.instances has feature size {x.shape[1]} but the model expects "
                    f"{self.feature_dim} (feature_dim)"
                )
        elif x.ndim != 4:
            raise ShapeError(f"MILModel: batch.instances must be images (T, C, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ShapeError(f"MILModel: batch.instances must be floating point, got {x.dtype}")
        x = x.to(self._dtype())
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            bags = batch.bag_index.to(finite.device)[~finite].unique().tolist()
            ids = [batch.ids[i] for i in bags if i < len(batch.ids)]
            raise DataError(f"MILModel: batch.instances holds NaN or inf in bags {ids or bags}")
        return x

    # ------------------------------------------------------------------ forward
    def encode(self, instances: Tensor) -> Tensor:
        """Packed instances ``(T, ...)`` → features ``(T, D)`` (identity for feature bags)."""
        return instances if self.encoder is None else self.encoder(instances)

    def forward(self, batch: BagBatch) -> MILOutput:
        """Predict a batch of bags.

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
            A bag without instances, or NaN or inf in the instances or
            clinical attributes (checked after casting floating inputs to the
            parameters' dtype).

        All checks run before the encoder is called.
        """
        if not isinstance(batch, BagBatch):
            raise ShapeError(
                f"MILModel: batch must be a BagBatch (from collate_bags), got {type(batch).__name__}"
            )
        self._check_sizes(batch)
        instances = self._instances(batch) if self.uses_image else None
        clinical = self._clinical(batch)
        attention = instance_logits = None
        if instances is not None:
            features = self.encode(instances)
            x = batch.pad(features)
            mask = batch.mask.to(x.device)
            pool_clin = clinical if getattr(self.pooling, "uses_clinical", False) else None
            embedding, attention = self.pooling(x, mask, return_attention=True, clinical=pool_clin)
            if self.prediction_level and hasattr(self.pooling, "instance_logits"):
                instance_logits = self.pooling.instance_logits(x, mask, clinical=pool_clin)
        else:
            embedding = None
        if self.head is None:
            assert embedding is not None
            return MILOutput(embedding, embedding, attention, instance_logits, {}, None)
        fused = self.head(embedding, clinical if getattr(self.head, "use_clinical", False) else None)
        if embedding is None:
            embedding = fused.logits.new_zeros((len(batch), 0))
        return MILOutput(fused.logits, embedding, attention, instance_logits, dict(fused.experts), fused.gate)

    def loss(
        self,
        output: MILOutput,
        batch: BagBatch,
        class_weights: Tensor | Any | None = None,
        expert_weight: float = 1.0,
    ) -> Tensor:
        """Scalar training loss of ``output`` for ``batch``; see :func:`mil_loss`."""
        return mil_loss(output, batch, class_weights=class_weights, expert_weight=expert_weight)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> MILModel:
        """Rebuild a model from ``model.config`` (never downloads: ``pretrained`` is forced off).

        Examples
        --------
        >>> from milcell.nn.model import create_mil_model
        >>> m = create_mil_model(None, pooling="mean", feature_dim=6, num_classes=3)
        >>> MILModel.from_config(m.config).config == m.config
        True
        """
        kwargs = dict(copy.deepcopy(dict(config)))
        kwargs["pretrained"] = False
        return create_mil_model(**kwargs)


def create_mil_model(
    backbone: str | None = "milcell_mini_resnet_k8",
    pooling: str = "gated_attention",
    fusion: str | None = "linear",
    num_classes: int = 2,
    clinical_dim: int = 0,
    feature_dim: int | None = None,
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
) -> MILModel:
    """Build a :class:`MILModel` by names.

    Parameters
    ----------
    backbone : str or None, default "milcell_mini_resnet_k8"
        Backbone name for :func:`~milcell.nn.backbones.create_backbone`;
        ``None`` for feature bags (instances ``(T, feature_dim)``).
    pooling : str, default "gated_attention"
        Name for :func:`~milcell.nn.pooling.create_pooling`.
    fusion : str or None, default "linear"
        Name for :func:`~milcell.nn.fusion.create_fusion`; ignored (must stay
        "linear" or None) for the prediction-level ``instance_mean`` pooling.
    num_classes : int, default 2
        Number of classes.
    clinical_dim : int, default 0
        Number ``F`` of clinical attributes per bag.
    feature_dim : int or None, default None
        ``D`` of feature bags; required when ``backbone`` is None.
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
        True for a frozen backbone (``trainable="head"``: its running
        statistics must not drift either) and False otherwise.
    pooling_kwargs, fusion_kwargs, backbone_kwargs : dict or None
        Extra options; must be JSON-serialisable (they go into ``model.config``).
    use_image, use_clinical : bool, default True
        Input switches for ablations (clinical-only needs a head that takes
        ``use_image=False``: ``concat``, ``moe``, ``gated``).

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
    >>> m = create_mil_model(None, pooling="instance_mean", feature_dim=8, num_classes=5)
    >>> out = m(collate_bags([Bag(torch.randn(4, 8), 3)]))
    >>> out.logits.shape, out.instance_logits.shape
    (torch.Size([1, 5]), torch.Size([1, 4, 5]))
    """
    if freeze_bn_stats is None:
        freeze_bn_stats = trainable == "head"
    config: dict[str, Any] = {
        "backbone": backbone,
        "pooling": pooling,
        "fusion": fusion,
        "num_classes": num_classes,
        "clinical_dim": clinical_dim,
        "feature_dim": feature_dim,
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
    try:
        config = json.loads(json.dumps(config))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"create_mil_model: arguments must be JSON-serialisable for model.config: {exc}"
        ) from exc
    for name in ("num_classes", "clinical_dim"):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"create_mil_model: {name} must be a non-negative int, got {value!r}")
    if num_classes < 2:
        raise ConfigError(f"create_mil_model: num_classes must be >= 2, got {num_classes}")
    if not (use_image or use_clinical):
        raise ConfigError("create_mil_model: use_image and use_clinical cannot both be False")
    if not use_image and clinical_dim == 0:
        raise ConfigError("create_mil_model: use_image=False needs clinical_dim > 0")

    encoder: InstanceEncoder | None = None
    if backbone is None:
        if feature_dim is None:
            raise ConfigError(
                "create_mil_model: feature_dim is required when backbone is None (feature bags)"
            )
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ConfigError(f"create_mil_model: feature_dim must be a positive int, got {feature_dim!r}")
        in_dim = feature_dim
    else:
        net = create_backbone(
            backbone, pretrained=pretrained, trainable=trainable, **config["backbone_kwargs"]
        )
        if feature_dim is not None and feature_dim != net.num_features:
            raise ConfigError(
                f"create_mil_model: feature_dim={feature_dim} but backbone {backbone!r} gives "
                f"{net.num_features} features"
            )
        encoder = InstanceEncoder(
            net, chunk_size=chunk_size, checkpointing=checkpointing, freeze_bn_stats=freeze_bn_stats
        )
        in_dim = net.num_features

    used_clinical = clinical_dim if use_clinical else 0
    pkw = dict(config["pooling_kwargs"])
    if pooling == "instance_mean":
        pkw.setdefault("num_classes", num_classes)
        pkw.setdefault("clinical_dim", used_clinical)
    pool = create_pooling(pooling, in_dim, **pkw)
    head: nn.Module | None = None
    if getattr(pool, "prediction_level", False):
        if fusion not in (None, "linear") or config["fusion_kwargs"]:
            raise ConfigError(
                f"create_mil_model: pooling {pooling!r} is prediction-level (its output is the logits) and "
                f"uses no fusion head; got fusion={fusion!r}, fusion_kwargs={config['fusion_kwargs']}"
            )
        if not use_image:
            raise ConfigError(f"create_mil_model: pooling {pooling!r} needs images (use_image=True)")
    else:
        if fusion is None:
            raise ConfigError(
                f"create_mil_model: pooling {pooling!r} needs a fusion head (fusion=None given)"
            )
        fkw = dict(config["fusion_kwargs"])
        if not use_image:
            fkw.setdefault("use_image", False)
        head = create_fusion(fusion, pool.out_dim, used_clinical, num_classes, **fkw)
    model = MILModel(pool, head, encoder=encoder, num_classes=num_classes)
    model.config = config
    return model


def _check_class_weights(class_weights: Any, num_classes: int, device: torch.device) -> Tensor | None:
    if class_weights is None:
        return None
    weights = torch.as_tensor(class_weights, dtype=torch.float32, device=device)
    if weights.shape != (num_classes,):
        raise ConfigError(
            f"mil_loss: class_weights must have shape ({num_classes},), got {tuple(weights.shape)}"
        )
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ConfigError(
            f"mil_loss: class_weights must be finite, >= 0 and not all 0, got {weights.tolist()}"
        )
    return weights


def mil_loss(
    output: MILOutput,
    batch: BagBatch,
    class_weights: Tensor | Any | None = None,
    expert_weight: float = 1.0,
) -> Tensor:
    """Cross-entropy of a batch, with class weights, soft labels and expert terms.

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

    Returns
    -------
    Tensor
        Scalar loss.

    Raises
    ------
    DataError
        If no bag of the batch is labelled, or soft labels are malformed.
    ConfigError
        For malformed ``class_weights``.

    Examples
    --------
    >>> import torch
    >>> from milcell.data.bag import Bag, collate_bags
    >>> batch = collate_bags([Bag(torch.zeros(1, 2), 1), Bag(torch.zeros(1, 2), -1)])
    >>> out = MILOutput(logits=torch.tensor([[0.0, 0.0], [5.0, -5.0]]), embedding=torch.zeros(2, 2))
    >>> round(mil_loss(out, batch).item(), 4)   # only the labelled bag counts: log 2
    0.6931
    """
    logits = output.logits.float()
    if logits.ndim != 2 or logits.shape[0] != len(batch):
        raise ShapeError(
            f"mil_loss: output.logits must be (B, C) with B={len(batch)}, got {tuple(logits.shape)}"
        )
    num_classes = logits.shape[1]
    weights = _check_class_weights(class_weights, num_classes, logits.device)
    if batch.soft_labels is not None:
        target = batch.soft_labels.to(device=logits.device, dtype=torch.float32)
        if target.shape != logits.shape:
            raise DataError(
                f"mil_loss: batch.soft_labels has shape {tuple(target.shape)}, logits {tuple(logits.shape)}"
            )
        if not bool(torch.isfinite(target).all()) or bool((target < 0).any()):
            raise DataError("mil_loss: batch.soft_labels must be finite and non-negative")
        if not torch.allclose(target.sum(dim=1), torch.ones_like(target[:, 0]), atol=1e-4):
            raise DataError("mil_loss: each row of batch.soft_labels must sum to 1")
        rows = torch.ones(len(batch), dtype=torch.bool, device=logits.device)
    else:
        labels = batch.labels.to(logits.device)
        if bool((labels >= num_classes).any()):
            raise DataError(
                f"mil_loss: label {int(labels.max())} is out of range for {num_classes} classes "
                f"(bag indices {(labels >= num_classes).nonzero().flatten().tolist()[:5]})"
            )
        rows = labels >= 0
        target = labels
    if not bool(rows.any()):
        raise DataError(f"mil_loss: no labelled bag in the batch (all labels are -1): {batch.ids[:5]}")

    def ce(scores: Tensor) -> Tensor:
        return F.cross_entropy(scores.float()[rows], target[rows], weight=weights)

    total = ce(logits)
    if expert_weight:
        for scores in output.experts.values():
            total = total + float(expert_weight) * ce(scores)
    return total
