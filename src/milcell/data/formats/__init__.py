"""Loaders for the real on-disk layouts of the reports' datasets.

One module per layout; each reads the folder tree into records
(:class:`~milcell.data.BagCohort` of patients or :class:`~milcell.data.CellSet`
of single cells) that the datasets then load lazily. See the *Data formats*
page of the documentation for each exact layout.

- :func:`load_dlmi`: lymphocytosis challenge (bags of cells + clinical CSV).
- :func:`load_cnmc`: C-NMC 2019 leukaemia single cells (ALL vs HEM).
- :func:`load_imagefolder`: one folder per class (white-cell types), optional masks.
- :func:`load_mil_table`: the classic MIL table (one row per instance: label, bag id,
  features), e.g. MUSK1/MUSK2, as feature bags.
- :func:`load_feature_files`: per-bag feature files of other tools (CLAM / TRIDENT ``.h5``,
  ``.pt``, slideflow, torchmil ``.npy``) as feature bags; :func:`write_feature_h5` writes
  milcell's features in the CLAM / TRIDENT layout.

Examples
--------
>>> from milcell.data.formats import load_dlmi, load_cnmc, load_imagefolder
>>> callable(load_dlmi) and callable(load_cnmc) and callable(load_imagefolder)
True
"""

from milcell.data.formats.cnmc import load_cnmc, parse_cnmc_name
from milcell.data.formats.dlmi import DEFAULT_REFERENCE_DATE, load_dlmi, parse_dob
from milcell.data.formats.feature_files import load_feature_files, read_feature_file, write_feature_h5
from milcell.data.formats.imagefolder import load_imagefolder
from milcell.data.formats.mil_table import load_mil_table

__all__ = [
    "DEFAULT_REFERENCE_DATE",
    "load_cnmc",
    "load_dlmi",
    "load_feature_files",
    "load_imagefolder",
    "load_mil_table",
    "parse_cnmc_name",
    "parse_dob",
    "read_feature_file",
    "write_feature_h5",
]
