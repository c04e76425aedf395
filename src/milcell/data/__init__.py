"""The data layer: bags and the packing collate, datasets, splits, samplers, transforms.

Examples
--------
>>> import torch
>>> from milcell.data import Bag, collate_bags
>>> collate_bags([Bag(torch.rand(3, 4), 1)]).bag_sizes.tolist()
[3]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from milcell import _lazy

# Imported on first access, so ``import milcell.data`` loads none of its submodules (nor torchvision,
# which the transforms import only when one is built, nor scikit-learn, which the splits import
# only when they split).
_LAZY_NAMES = {
    "Bag": "milcell.data.bag",
    "BagBatch": "milcell.data.bag",
    "collate_bags": "milcell.data.bag",
    "BagDataset": "milcell.data.datasets",
    "FeatureBagDataset": "milcell.data.datasets",
    "InstanceDataset": "milcell.data.datasets",
    "group_cells_by_patient": "milcell.data.datasets",
    "select_instances": "milcell.data.datasets",
    "BagCohort": "milcell.data.records",
    "BagRecord": "milcell.data.records",
    "CellRecord": "milcell.data.records",
    "CellSet": "milcell.data.records",
    "ClinicalScaler": "milcell.data.records",
    "ClassBalancedSampler": "milcell.data.samplers",
    "MinorityOversampler": "milcell.data.samplers",
    "Fold": "milcell.data.splits",
    "patient_holdout": "milcell.data.splits",
    "patient_kfold": "milcell.data.splits",
    "make_cohort": "milcell.data.synthetic",
    "IMAGENET_MEAN": "milcell.data.transforms",
    "IMAGENET_STD": "milcell.data.transforms",
    "CenterCropFraction": "milcell.data.transforms",
    "build_transforms": "milcell.data.transforms",
    "default_transform": "milcell.data.transforms",
    "resolve_data_config": "milcell.data.transforms",
}
_SUBMODULES = ("bag", "datasets", "formats", "records", "samplers", "splits", "synthetic", "transforms")
__getattr__, __dir__ = _lazy.attach(__name__, _LAZY_NAMES, _SUBMODULES)

if TYPE_CHECKING:
    from milcell.data import bag as bag
    from milcell.data import datasets as datasets
    from milcell.data import formats as formats
    from milcell.data import records as records
    from milcell.data import samplers as samplers
    from milcell.data import splits as splits
    from milcell.data import synthetic as synthetic
    from milcell.data import transforms as transforms
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
