"""milcell: multiple-instance learning building blocks for blood-cell images.

A patient is a *bag* of cell images with one label and, often, a few clinical
attributes. milcell provides the parts to learn from such bags: datasets and
a packing collate (:mod:`milcell.data`), pooling operators, backbones and
fusion heads (:mod:`milcell.nn`), and training utilities (:mod:`milcell.train`).

Examples
--------
>>> import milcell
>>> isinstance(milcell.__version__, str)
True
"""

from __future__ import annotations

import logging

from milcell.data import Bag, BagBatch, collate_bags
from milcell.exceptions import (
    CacheError,
    CheckpointError,
    ConfigError,
    DataError,
    MilcellError,
    ShapeError,
)

__version__ = "0.1.0"

logging.getLogger("milcell").addHandler(logging.NullHandler())

__all__ = [
    "Bag",
    "BagBatch",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "MilcellError",
    "ShapeError",
    "__version__",
    "collate_bags",
]
