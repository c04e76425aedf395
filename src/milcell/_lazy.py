"""Lazy attributes for milcell's packages, so ``import milcell`` stays cheap.

A package lists which submodule defines each public name; the name is imported
on first access (a PEP 562 module ``__getattr__``) and cached in the package's
namespace, so later accesses cost nothing. The submodules it lists are
reachable as attributes (``milcell.data.splits``) without an explicit import,
as they were when the packages imported everything eagerly. The heavy optional
parts (timm, torchvision, scikit-learn, matplotlib) are therefore only imported
when a feature that needs them is used.

Examples
--------
>>> import milcell.data
>>> "ClinicalScaler" in dir(milcell.data)
True
>>> milcell.data.ClinicalScaler.__module__
'milcell.data.records'
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Collection, Mapping
from typing import Any

__all__ = ["attach"]


def attach(
    package: str, names: Mapping[str, str], submodules: Collection[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Build a package's ``__getattr__`` and ``__dir__`` that import names on first use.

    Call it from the package's ``__init__`` (the package must be in
    :data:`sys.modules`, as it is while its ``__init__`` runs) and assign the
    result to ``__getattr__, __dir__``.

    A public name that is also the name of a submodule (``milcell.train.noisy_student``,
    the function, defined in the module of the same name) keeps meaning the
    name, not the module, whichever is imported first: the package's
    attribute is set to the name when the import system would bind the
    submodule there.

    Parameters
    ----------
    package : str
        The package's ``__name__``; resolved names are stored in its namespace.
    names : mapping of str to str
        Public name -> absolute name of the module that defines it.
    submodules : collection of str
        Submodule names (``"splits"``) importable as attributes of the package.

    Returns
    -------
    (callable, callable)
        ``__getattr__(name)`` (raises :class:`AttributeError` for an unknown
        name) and ``__dir__()`` (the package's current names, the lazy names
        and the submodules, sorted).

    Examples
    --------
    >>> import sys, types
    >>> sys.modules["demo_pkg"] = pkg = types.ModuleType("demo_pkg")
    >>> pkg.__getattr__, pkg.__dir__ = attach("demo_pkg", {"sqrt": "math"}, submodules=())
    >>> pkg.sqrt(9.0), "sqrt" in dir(pkg), "sqrt" in vars(pkg)
    (3.0, True, True)
    >>> pkg.cbrt
    Traceback (most recent call last):
    ...
    AttributeError: module 'demo_pkg' has no attribute 'cbrt'
    >>> del sys.modules["demo_pkg"]
    """
    module = sys.modules[package]
    namespace = vars(module)
    table = dict(names)
    subs = frozenset(submodules)
    shadowed = frozenset(name for name in table if name in subs and table[name] == f"{package}.{name}")

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
        elif name in subs:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table) | subs)

    if shadowed:

        class _Package(types.ModuleType):
            """The package's module type: a public name wins over its same-named submodule."""

            def __setattr__(self, name: str, value: Any) -> None:
                if (
                    name in shadowed
                    and isinstance(value, types.ModuleType)
                    and value.__name__ == f"{package}.{name}"
                ):
                    value = getattr(value, name)
                super().__setattr__(name, value)

        module.__class__ = _Package
    return __getattr__, __dir__
