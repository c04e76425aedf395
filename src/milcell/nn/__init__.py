"""Models: pooling operators, backbones, the instance encoder, fusion heads and the MIL model.

The names are imported on first use, so ``import milcell.nn`` loads neither
timm nor torchvision. Importing :mod:`milcell.nn.mini_resnet` registers the
K-scaled mini-ResNet with timm (``milcell_mini_resnet``, ``_k8``, ``_k32``,
``_k64``); every milcell entry point that resolves a backbone name
(:func:`create_backbone`, :func:`create_mil_model`, :data:`BACKBONE_PRESETS`,
``milcell.nn.MiniResNet``) imports it first, so ``timm.create_model`` finds
those names once any of them has been used.

Examples
--------
>>> from milcell.nn import create_mil_model, list_poolings
>>> "gated_attention" in list_poolings()
True
>>> model = create_mil_model(backbone=None, in_dim=16, pooling="attention")
>>> model.config["pooling"]
'attention'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from milcell import _lazy

# Imported on first access: timm (and the mini-ResNet's registration in it) loads when a backbone
# name is resolved, not on ``import milcell.nn``.
_LAZY_NAMES = {
    "BACKBONE_PRESETS": "milcell.nn.backbones",
    "Backbone": "milcell.nn.backbones",
    "BackbonePreset": "milcell.nn.backbones",
    "backbone_stages": "milcell.nn.backbones",
    "create_backbone": "milcell.nn.backbones",
    "get_backbone_preset": "milcell.nn.backbones",
    "list_backbones": "milcell.nn.backbones",
    "load_backbone_weights": "milcell.nn.backbones",
    "register_backbone_preset": "milcell.nn.backbones",
    "set_trainable": "milcell.nn.backbones",
    "InstanceEncoder": "milcell.nn.encoder",
    "MLPEncoder": "milcell.nn.encoder",
    "ClinicalMLP": "milcell.nn.fusion",
    "ConcatFusion": "milcell.nn.fusion",
    "FusionHead": "milcell.nn.fusion",
    "FusionOutput": "milcell.nn.fusion",
    "GatedFusion": "milcell.nn.fusion",
    "LinearHead": "milcell.nn.fusion",
    "MoEFusion": "milcell.nn.fusion",
    "create_fusion": "milcell.nn.fusion",
    "list_fusions": "milcell.nn.fusion",
    "register_fusion": "milcell.nn.fusion",
    "MiniResNet": "milcell.nn.mini_resnet",
    "MILModel": "milcell.nn.model",
    "MILOutput": "milcell.nn.model",
    "create_mil_model": "milcell.nn.model",
    "mil_loss": "milcell.nn.model",
    "AttentionPooling": "milcell.nn.pooling",
    "ConvPooling": "milcell.nn.pooling",
    "GatedAttentionPooling": "milcell.nn.pooling",
    "InstanceMeanPooling": "milcell.nn.pooling",
    "LSEPooling": "milcell.nn.pooling",
    "MaxPooling": "milcell.nn.pooling",
    "MeanPooling": "milcell.nn.pooling",
    "MILPooling": "milcell.nn.pooling",
    "PoolingOutput": "milcell.nn.pooling",
    "create_pooling": "milcell.nn.pooling",
    "list_poolings": "milcell.nn.pooling",
    "masked_softmax": "milcell.nn.pooling",
    "register_pooling": "milcell.nn.pooling",
}
_SUBMODULES = ("backbones", "dinobloom", "encoder", "fusion", "mini_resnet", "model", "pooling")
__getattr__, __dir__ = _lazy.attach(__name__, _LAZY_NAMES, _SUBMODULES)

if TYPE_CHECKING:
    from milcell.nn import backbones as backbones
    from milcell.nn import dinobloom as dinobloom
    from milcell.nn import encoder as encoder
    from milcell.nn import fusion as fusion
    from milcell.nn import mini_resnet as mini_resnet
    from milcell.nn import model as model
    from milcell.nn import pooling as pooling
    from milcell.nn.backbones import (
        BACKBONE_PRESETS,
        Backbone,
        BackbonePreset,
        backbone_stages,
        create_backbone,
        get_backbone_preset,
        list_backbones,
        load_backbone_weights,
        register_backbone_preset,
        set_trainable,
    )
    from milcell.nn.encoder import InstanceEncoder, MLPEncoder
    from milcell.nn.fusion import (
        ClinicalMLP,
        ConcatFusion,
        FusionHead,
        FusionOutput,
        GatedFusion,
        LinearHead,
        MoEFusion,
        create_fusion,
        list_fusions,
        register_fusion,
    )
    from milcell.nn.mini_resnet import MiniResNet
    from milcell.nn.model import MILModel, MILOutput, create_mil_model, mil_loss
    from milcell.nn.pooling import (
        AttentionPooling,
        ConvPooling,
        GatedAttentionPooling,
        InstanceMeanPooling,
        LSEPooling,
        MaxPooling,
        MeanPooling,
        MILPooling,
        PoolingOutput,
        create_pooling,
        list_poolings,
        masked_softmax,
        register_pooling,
    )

__all__ = [
    "BACKBONE_PRESETS",
    "AttentionPooling",
    "Backbone",
    "BackbonePreset",
    "ClinicalMLP",
    "ConcatFusion",
    "ConvPooling",
    "FusionHead",
    "FusionOutput",
    "GatedAttentionPooling",
    "GatedFusion",
    "InstanceEncoder",
    "InstanceMeanPooling",
    "LSEPooling",
    "LinearHead",
    "MILModel",
    "MILOutput",
    "MILPooling",
    "MLPEncoder",
    "MaxPooling",
    "MeanPooling",
    "MiniResNet",
    "MoEFusion",
    "PoolingOutput",
    "backbone_stages",
    "create_backbone",
    "create_fusion",
    "create_mil_model",
    "create_pooling",
    "get_backbone_preset",
    "list_backbones",
    "list_fusions",
    "list_poolings",
    "load_backbone_weights",
    "masked_softmax",
    "mil_loss",
    "register_backbone_preset",
    "register_fusion",
    "register_pooling",
    "set_trainable",
]
