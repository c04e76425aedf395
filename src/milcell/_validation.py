"""Argument validation shared by every public constructor and factory (internal).

One constraint helper, one message template: ``"<name> must be <constraint>, got <value>"``.
Integers are :class:`numbers.Integral` (Python ``int`` and numpy integer scalars, never
``bool``); reals are :class:`numbers.Real` (numpy floating scalars included, never ``bool``).
Values are returned as plain Python ``int`` / ``float``, so a numpy scalar never leaks into a
module's configuration or a saved run.

Examples
--------
>>> import numpy as np
>>> from milcell._validation import check_int, check_real
>>> check_int(np.int64(8), "in_dim", low=1)
8
>>> check_real(0.5, "dropout", low=0.0, high=1.0, high_open=True)
0.5
>>> check_int(0, "in_dim", low=1)
Traceback (most recent call last):
...
milcell.exceptions.ConfigError: in_dim must be an integer >= 1, got 0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any, TypeVar

from milcell.exceptions import ConfigError

__all__ = ["check_choice", "check_int", "check_real", "constraint_error"]

T = TypeVar("T")


def constraint_error(name: str, constraint: str, value: Any) -> ConfigError:
    """The one message template: ``"<name> must be <constraint>, got <value!r>"``."""
    return ConfigError(f"{name} must be {constraint}, got {value!r}")


def _range_text(kind: str, low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return f"{kind} {' and '.join(parts)}" if parts else kind


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer in ``[low, high]``; else raise.

    Parameters
    ----------
    value : Any
        The argument to check: ``int`` or a numpy integer scalar (``bool`` is refused).
    name : str
        The argument's name, used in the message.
    low, high : int or None
        Inclusive bounds; ``None`` means unbounded.

    Returns
    -------
    int

    Raises
    ------
    ConfigError
        ``"<name> must be an integer >= <low>, got <value>"``.
    """
    constraint = _range_text("an integer", low, high, False, False)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise constraint_error(name, constraint, value)
    result = int(value)
    if (low is not None and result < low) or (high is not None and result > high):
        raise constraint_error(name, constraint, value)
    return result


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite ``float`` within the bounds; else raise.

    Parameters
    ----------
    value : Any
        A real number (``int``, ``float`` or a numpy scalar; ``bool`` is refused).
    name : str
        The argument's name, used in the message.
    low, high : float or None
        Bounds; ``None`` means unbounded.
    low_open, high_open : bool
        Exclude the bound itself (``> low`` instead of ``>= low``).

    Returns
    -------
    float

    Raises
    ------
    ConfigError
        When ``value`` is not a finite real number within the bounds.
    """
    constraint = _range_text("a finite number", low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise constraint_error(name, constraint, value)
    result = float(value)
    if not math.isfinite(result):
        raise constraint_error(name, constraint, value)
    if low is not None and (result <= low if low_open else result < low):
        raise constraint_error(name, constraint, value)
    if high is not None and (result >= high if high_open else result > high):
        raise constraint_error(name, constraint, value)
    return result


def check_choice(value: T, name: str, choices: Collection[T]) -> T:
    """Return ``value`` if it is one of ``choices``; else raise naming them.

    Examples
    --------
    >>> check_choice("32", "precision", ("32", "bf16", "fp16"))
    '32'
    """
    try:
        ok = value in choices
    except TypeError:  # unhashable value tested against a set
        ok = False
    if not ok:
        options = ", ".join(repr(c) for c in choices)
        raise constraint_error(name, f"one of {options}", value)
    return value
