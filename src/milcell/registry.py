"""Name-to-factory registries, the way timm's ``create_model`` works.

Poolings, fusion heads and backbone presets are each held in a
:class:`Registry`; ``create_pooling("gated_attention", ...)`` looks the name
up and calls the factory, and ``list_poolings()`` lists the names. An unknown
name raises :class:`~milcell.exceptions.ConfigError` that lists the known
names and suggests the closest one.

Examples
--------
>>> reg = Registry("widget")
>>> @reg.register("square")
... def make_square(side: int) -> int:
...     return side * side
>>> reg.create("square", 3), reg.names()
(9, ['square'])
>>> reg.create("sqare", 3)
Traceback (most recent call last):
...
milcell.exceptions.ConfigError: unknown widget 'sqare' (did you mean 'square'?); known: square
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from milcell.exceptions import ConfigError

__all__ = ["Registry"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[T]):
    """A mapping from names to factories that build ``T``.

    Parameters
    ----------
    kind : str
        What the registry holds, used in error messages ("pooling", "fusion").

    Examples
    --------
    >>> reg = Registry("colour")
    >>> _ = reg.register("red")(lambda: (255, 0, 0))
    >>> "red" in reg, reg.create("red")
    (True, (255, 0, 0))
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator that registers a factory (a class or a function) under ``name``."""

        def decorator(factory: F) -> F:
            if name in self._factories:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``; raises :class:`ConfigError` if unknown."""
        try:
            return self._factories[name]
        except KeyError:
            known = sorted(self._factories)
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{hint}; known: {', '.join(known)}") from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        """Build the object registered under ``name`` with the given arguments."""
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __len__(self) -> int:
        return len(self._factories)
