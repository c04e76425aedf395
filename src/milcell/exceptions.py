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
    "ExportError",
    "LockError",
    "MilcellError",
    "ShapeError",
    "TrainingError",
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


class ExportError(MilcellError, ValueError):
    """A model cannot be exported (:mod:`milcell.export`), or its exported file does not match it.

    Raised for a pooling whose forward pass cannot be written as a graph with a
    dynamic bag size (the message names the pooling and the reason), a missing
    optional package (``onnx``, ``onnxruntime``: ``pip install "milcell[export]"``),
    and an exported file whose outputs differ from the model's.
    """


class LockError(MilcellError):
    """Another process holds the lock on a folder milcell writes (run, checkpoint or feature cache).

    The message names the folder and the holder's process id, host and start time.
    """


class TrainingError(MilcellError, RuntimeError):
    """Training or inference cannot go on, through no fault of one file or argument.

    Raised for a non-finite loss or gradient (the message names the epoch, the
    step and the bags of the batch) and for a data-loading worker that died
    (killed by the out-of-memory killer, for instance).
    """
