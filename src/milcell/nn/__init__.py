"""Models: pooling operators, backbones, the instance encoder, fusion heads and the MIL model.

Importing :mod:`milcell.nn` registers the K-scaled mini-ResNet with timm
(``milcell_mini_resnet``, ``_k8``, ``_k32``, ``_k64``).

Examples
--------
>>> from milcell.nn import create_mil_model, list_poolings
>>> "gated_attention" in list_poolings()
True
>>> model = create_mil_model(backbone=None, feature_dim=16, pooling="attention")
>>> model.config["pooling"]
'attention'
"""

from milcell.nn.backbones import (
    BACKBONE_PRESETS,
    Backbone,
    backbone_stages,
    create_backbone,
    list_backbones,
    load_backbone_weights,
    set_trainable,
)
from milcell.nn.encoder import InstanceEncoder
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
    create_pooling,
    list_poolings,
    masked_softmax,
    register_pooling,
)

__all__ = [
    "BACKBONE_PRESETS",
    "AttentionPooling",
    "Backbone",
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
    "MaxPooling",
    "MeanPooling",
    "MiniResNet",
    "MoEFusion",
    "backbone_stages",
    "create_backbone",
    "create_fusion",
    "create_mil_model",
    "create_pooling",
    "list_backbones",
    "list_fusions",
    "list_poolings",
    "load_backbone_weights",
    "masked_softmax",
    "mil_loss",
    "register_fusion",
    "register_pooling",
    "set_trainable",
]
