"""milcell: multiple-instance learning building blocks for blood-cell images.

A patient is a *bag* of cell images with one label and, often, a few clinical
attributes. milcell provides the parts to learn from such bags: datasets and
a packing collate (:mod:`milcell.data`), pooling operators, backbones and
fusion heads (:mod:`milcell.nn`), training utilities (:mod:`milcell.train`),
clinical metrics (:mod:`milcell.metrics`) and plots (:mod:`milcell.viz`).

The most used names are available at the top level.

Examples
--------
>>> import torch
>>> import milcell
>>> model = milcell.create_mil_model(backbone=None, feature_dim=8, pooling="gated_attention")
>>> batch = milcell.collate_bags([milcell.Bag(torch.rand(5, 8), 1), milcell.Bag(torch.rand(2, 8), 0)])
>>> out = model(batch)
>>> out.logits.shape, out.attention.shape
(torch.Size([2, 2]), torch.Size([2, 5]))
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

from milcell.data import (
    Bag,
    BagBatch,
    BagDataset,
    FeatureBagDataset,
    InstanceDataset,
    collate_bags,
    patient_holdout,
    patient_kfold,
)
from milcell.exceptions import (
    CacheError,
    CheckpointError,
    ConfigError,
    DataError,
    MilcellError,
    ShapeError,
)
from milcell.nn import (
    MILModel,
    create_backbone,
    create_fusion,
    create_mil_model,
    create_pooling,
    list_backbones,
    list_fusions,
    list_poolings,
)
from milcell.seeding import seed_everything
from milcell.train import Trainer, cross_validate, extract_features

logging.getLogger("milcell").addHandler(logging.NullHandler())

__all__ = [
    "Bag",
    "BagBatch",
    "BagDataset",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FeatureBagDataset",
    "InstanceDataset",
    "MILModel",
    "MilcellError",
    "ShapeError",
    "Trainer",
    "__version__",
    "collate_bags",
    "create_backbone",
    "create_fusion",
    "create_mil_model",
    "create_pooling",
    "cross_validate",
    "extract_features",
    "list_backbones",
    "list_fusions",
    "list_poolings",
    "patient_holdout",
    "patient_kfold",
    "seed_everything",
]
