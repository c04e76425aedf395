"""Exceptions raised by milcell.

Every error milcell raises on purpose derives from :class:`MilcellError`, so a
caller (and the ``milcell`` command) can tell a problem with the user's data,
arguments or files from a bug. Each message names the file, patient or
argument at fault.

Examples
--------
>>> from milcell.exceptions import DataError, MilcellError
>>> issubclass(DataError, MilcellError) and issubclass(DataError, ValueError)
True
"""

from __future__ import annotations

__all__ = [
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "MilcellError",
    "ShapeError",
]


class MilcellError(Exception):
    """Base class of every exception milcell raises on purpose."""


class DataError(MilcellError, ValueError):
    """Data on disk or in memory does not match what milcell expects.

    Raised for a missing CSV column, an unknown label, a duplicate patient ID,
    an undecodable image, an empty bag, an unsafe path and the like. The
    message names the file, patient or bag at fault.
    """


class ConfigError(MilcellError, ValueError):
    """An argument or configuration value is invalid; the message names it."""


class ShapeError(MilcellError, ValueError):
    """A tensor has the wrong rank, size or dtype for the operation."""


class CheckpointError(MilcellError):
    """A checkpoint or weights file is missing, truncated, corrupt or unsafe."""


class CacheError(MilcellError):
    """A feature cache is incomplete or does not match its key."""
