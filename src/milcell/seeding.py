"""Seeding helpers: one call to make a run repeatable.

Examples
--------
>>> import torch
>>> from milcell.seeding import seed_everything
>>> seed_everything(7)
>>> a = torch.rand(2)
>>> seed_everything(7)
>>> torch.equal(a, torch.rand(2))
True
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from milcell.exceptions import ConfigError

__all__ = ["seed_everything", "seed_worker"]

logger = logging.getLogger("milcell")

_MAX_SEED = 2**32 - 1


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's :mod:`random`, NumPy's global generator and torch (CPU and CUDA).

    Parameters
    ----------
    seed : int
        In ``[0, 2**32 - 1]``.
    deterministic : bool, default False
        Also call ``torch.use_deterministic_algorithms(True)``, disable the
        cuDNN autotuner and set ``CUBLAS_WORKSPACE_CONFIG`` (when unset), so
        CUDA kernels are reproducible too. Operations without a deterministic
        implementation then raise. ``False`` leaves those settings untouched.

    Raises
    ------
    ConfigError
        If ``seed`` is not an integer in range.

    Notes
    -----
    Code that needs its own stream of random numbers should still take an
    explicit :class:`torch.Generator` or :class:`numpy.random.Generator`;
    this function only fixes the global ones.

    Examples
    --------
    >>> import numpy as np
    >>> seed_everything(3)
    >>> x = np.random.rand()
    >>> seed_everything(3)
    >>> x == np.random.rand()
    True
    >>> seed_everything(-1)
    Traceback (most recent call last):
    ...
    milcell.exceptions.ConfigError: seed must be an integer in [0, 4294967295], got -1
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= _MAX_SEED:
        raise ConfigError(f"seed must be an integer in [0, {_MAX_SEED}], got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - the global generator is exactly what is being seeded
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        logger.debug("deterministic algorithms enabled (seed %d)", seed)


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: seed numpy and random in each worker.

    torch already gives each worker the seed ``base_seed + worker_id``; this
    derives the Python and NumPy seeds from it, so augmentations that use
    those libraries differ between workers and repeat between runs.

    Parameters
    ----------
    worker_id : int
        Index of the worker (unused; the worker's torch seed already encodes it).

    Examples
    --------
    >>> seed_worker(0)  # in the main process it seeds from torch's initial seed
    """
    del worker_id
    seed = torch.initial_seed() % (_MAX_SEED + 1)
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002
