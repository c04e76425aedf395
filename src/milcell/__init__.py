"""milcell: multiple-instance learning building blocks for blood-cell images.

A patient is a *bag* of cell images with one label and, often, a few clinical
attributes. milcell provides the parts to learn from such bags: datasets and
a packing collate (:mod:`milcell.data`), pooling operators, backbones and
fusion heads (:mod:`milcell.nn`), training utilities (:mod:`milcell.train`),
clinical metrics (:mod:`milcell.metrics`) and plots (:mod:`milcell.viz`).

The most used names are available at the top level. They, and the
subpackages, are imported on first use, so ``import milcell`` is quick and
loads neither torch nor timm, torchvision, scikit-learn or matplotlib; those
come in when a feature needs them (a backbone needs timm, a transform
torchvision, a metric scikit-learn, a figure matplotlib).

Examples
--------
>>> import torch
>>> import milcell
>>> model = milcell.create_mil_model(backbone=None, in_dim=8, pooling="gated_attention")
>>> batch = milcell.collate_bags([milcell.Bag(torch.rand(5, 8), 1), milcell.Bag(torch.rand(2, 8), 0)])
>>> out = model(batch)
>>> out.logits.shape, out.attention.shape
(torch.Size([2, 2]), torch.Size([2, 5]))
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from milcell import _lazy
from milcell._checks import checks, checks_enabled, set_checks
from milcell.exceptions import (
    CacheError,
    CheckpointError,
    ConfigError,
    DataError,
    ExportError,
    LockError,
    MilcellError,
    ShapeError,
    TrainingError,
)

__version__ = "0.1.0"

logging.getLogger("milcell").addHandler(logging.NullHandler())

# The other public names are imported on first access (``milcell.create_mil_model``), so that
# ``import milcell`` and ``milcell --help`` do not load torch, timm, torchvision or scikit-learn.
_LAZY_NAMES = {
    "Bag": "milcell.data.bag",
    "BagBatch": "milcell.data.bag",
    "collate_bags": "milcell.data.bag",
    "BagDataset": "milcell.data.datasets",
    "FeatureBagDataset": "milcell.data.datasets",
    "InstanceDataset": "milcell.data.datasets",
    "patient_holdout": "milcell.data.splits",
    "patient_kfold": "milcell.data.splits",
    "MILModel": "milcell.nn.model",
    "create_mil_model": "milcell.nn.model",
    "create_backbone": "milcell.nn.backbones",
    "list_backbones": "milcell.nn.backbones",
    "create_fusion": "milcell.nn.fusion",
    "list_fusions": "milcell.nn.fusion",
    "create_pooling": "milcell.nn.pooling",
    "list_poolings": "milcell.nn.pooling",
    "seed_everything": "milcell.seeding",
    "Trainer": "milcell.train.trainer",
    "cross_validate": "milcell.train.crossval",
    "extract_features": "milcell.train.features",
}
_SUBMODULES = ("calibration", "conformal", "data", "metrics", "nn", "registry", "seeding", "train", "viz")
__getattr__, __dir__ = _lazy.attach(__name__, _LAZY_NAMES, _SUBMODULES)

if TYPE_CHECKING:
    from milcell import calibration as calibration
    from milcell import conformal as conformal
    from milcell import data as data
    from milcell import metrics as metrics
    from milcell import nn as nn
    from milcell import registry as registry
    from milcell import seeding as seeding
    from milcell import train as train
    from milcell import viz as viz
    from milcell.data.bag import Bag, BagBatch, collate_bags
    from milcell.data.datasets import BagDataset, FeatureBagDataset, InstanceDataset
    from milcell.data.splits import patient_holdout, patient_kfold
    from milcell.nn.backbones import create_backbone, list_backbones
    from milcell.nn.fusion import create_fusion, list_fusions
    from milcell.nn.model import MILModel, create_mil_model
    from milcell.nn.pooling import create_pooling, list_poolings
    from milcell.seeding import seed_everything
    from milcell.train.crossval import cross_validate
    from milcell.train.features import extract_features
    from milcell.train.trainer import Trainer

__all__ = [
    "Bag",
    "BagBatch",
    "BagDataset",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExportError",
    "FeatureBagDataset",
    "InstanceDataset",
    "LockError",
    "MILModel",
    "MilcellError",
    "ShapeError",
    "Trainer",
    "TrainingError",
    "__version__",
    "checks",
    "checks_enabled",
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
    "set_checks",
]
