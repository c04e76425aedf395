"""The data layer: bags, the packing collate, records of patients and cells.

Examples
--------
>>> from milcell.data import Bag, collate_bags
>>> import torch
>>> collate_bags([Bag(torch.rand(3, 4), 1)]).bag_sizes.tolist()
[3]
"""

from milcell.data.bag import Bag, BagBatch, collate_bags
from milcell.data.records import BagCohort, BagRecord, CellRecord, CellSet, ClinicalScaler

__all__ = [
    "Bag",
    "BagBatch",
    "BagCohort",
    "BagRecord",
    "CellRecord",
    "CellSet",
    "ClinicalScaler",
    "collate_bags",
]
