"""The data layer: bags and the packing collate, datasets, splits, samplers, transforms.

Examples
--------
>>> import torch
>>> from milcell.data import Bag, collate_bags
>>> collate_bags([Bag(torch.rand(3, 4), 1)]).bag_sizes.tolist()
[3]
"""

from milcell.data.bag import Bag, BagBatch, collate_bags
from milcell.data.datasets import (
    BagDataset,
    FeatureBagDataset,
    InstanceDataset,
    group_cells_by_patient,
    select_instances,
)
from milcell.data.records import BagCohort, BagRecord, CellRecord, CellSet, ClinicalScaler
from milcell.data.samplers import ClassBalancedSampler, MinorityOversampler
from milcell.data.splits import Fold, patient_holdout, patient_kfold
from milcell.data.synthetic import make_cohort
from milcell.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCropFraction,
    build_transforms,
    default_transform,
    resolve_data_config,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Bag",
    "BagBatch",
    "BagCohort",
    "BagDataset",
    "BagRecord",
    "CellRecord",
    "CellSet",
    "CenterCropFraction",
    "ClassBalancedSampler",
    "ClinicalScaler",
    "FeatureBagDataset",
    "Fold",
    "InstanceDataset",
    "MinorityOversampler",
    "build_transforms",
    "collate_bags",
    "default_transform",
    "group_cells_by_patient",
    "make_cohort",
    "patient_holdout",
    "patient_kfold",
    "resolve_data_config",
    "select_instances",
]
