"""The value-checks switch: data checks that would cost a host-device sync (public via :mod:`milcell`).

milcell always checks what needs no data: types, ranks, sizes, dtypes, devices, and the bag sizes
a :class:`~milcell.data.BagBatch` keeps on the host. Checks that must *read* tensor values (NaN or
inf in instances and clinical attributes, bags whose mask row is all False, labels out of range,
malformed soft labels) each turn a tensor into a Python value, which on a GPU stalls the host
until the device has caught up. They run only while checks are on:

* **off by default**, so a training loop pays for no sync;
* on when the environment variable ``MILCELL_CHECKS`` is ``1`` (or ``true``, ``yes``, ``on``;
  ``0``, ``false``, ``no``, ``off`` or unset mean off), read at every call, so it can be set
  after import; the test suite sets it;
* :func:`set_checks` overrides the variable for the whole process (``None`` hands control back
  to it), and :func:`checks` does the same for a ``with`` block (or a decorated function) and
  then restores the previous setting.

With checks off, such a value problem is not reported: a NaN in a real instance gives NaN
outputs, a bag without instances gives NaN for that bag, a label out of range fails inside
:func:`torch.nn.functional.cross_entropy`. Masked (padded) positions never matter, in either
mode: poolings replace them with :func:`torch.where` before any arithmetic.

The switch is process-wide (not per thread). Under ``torchrun`` or in ``DataLoader`` worker
processes, set ``MILCELL_CHECKS`` rather than calling :func:`set_checks`.

Examples
--------
>>> import torch
>>> import milcell
>>> from milcell.nn.pooling import create_pooling
>>> pool = create_pooling("mean", 2)
>>> x, empty_bag = torch.ones(1, 3, 2), torch.zeros(1, 3, dtype=torch.bool)
>>> with milcell.checks(False):
...     pool(x, empty_bag)          # no sync, no check: the empty bag gives NaN
tensor([[nan, nan]])
>>> with milcell.checks(True):
...     pool(x, empty_bag)
Traceback (most recent call last):
...
milcell.exceptions.DataError: mask: bag 0 of the batch has no real instance ...
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

from milcell._validation import constraint_error
from milcell.exceptions import ConfigError

__all__ = ["CHECKS_ENV", "checks", "checks_enabled", "set_checks"]

CHECKS_ENV = "MILCELL_CHECKS"
"""Name of the environment variable that turns the value checks on (``1``) or off (``0``)."""

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")

_override: bool | None = None


@functools.lru_cache(maxsize=16)
def _parse_env(value: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(
        f"environment variable {CHECKS_ENV} must be one of {', '.join(_TRUE + _FALSE[1:])} "
        f"(or unset), got {value!r}"
    )


def checks_enabled() -> bool:
    """Whether the value checks run now.

    Returns
    -------
    bool
        The setting of :func:`set_checks` / :func:`checks` if one is active, else what the
        ``MILCELL_CHECKS`` environment variable says (off when unset).

    Raises
    ------
    ConfigError
        If ``MILCELL_CHECKS`` holds something other than a yes/no word.

    Examples
    --------
    >>> import milcell
    >>> with milcell.checks(False):
    ...     milcell.checks_enabled()
    False
    """
    if _override is not None:
        return _override
    return _parse_env(os.environ.get(CHECKS_ENV, ""))


def set_checks(enabled: bool | None) -> None:
    """Turn the value checks on or off for the whole process.

    Parameters
    ----------
    enabled : bool or None
        ``True``/``False`` override ``MILCELL_CHECKS``; ``None`` hands control back to it.

    Raises
    ------
    ConfigError
        If ``enabled`` is neither a bool nor None.

    Examples
    --------
    >>> import milcell
    >>> milcell.set_checks(True); milcell.checks_enabled()
    True
    >>> milcell.set_checks(None)    # back to the environment variable
    """
    global _override
    if enabled is not None and not isinstance(enabled, bool):
        raise constraint_error("enabled", "True, False or None", enabled)
    _override = enabled


@contextmanager
def checks(enabled: bool = True) -> Iterator[None]:
    """Turn the value checks on (or off) inside a ``with`` block, then restore the previous setting.

    Also usable as a decorator: ``@milcell.checks()``.

    Parameters
    ----------
    enabled : bool, default True
        Whether the checks run inside the block.

    Raises
    ------
    ConfigError
        If ``enabled`` is not a bool.

    Examples
    --------
    >>> import milcell
    >>> with milcell.checks(True):
    ...     with milcell.checks(False):
    ...         inner = milcell.checks_enabled()
    ...     outer = milcell.checks_enabled()
    >>> inner, outer
    (False, True)
    """
    global _override
    if not isinstance(enabled, bool):
        raise constraint_error("enabled", "True or False", enabled)
    previous = _override
    _override = enabled
    try:
        yield
    finally:
        _override = previous
