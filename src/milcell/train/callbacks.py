"""Trainer callbacks: plain objects with ``on_fit_start/on_batch_end/on_epoch_end/on_fit_end`` hooks.

A callback receives the :class:`~milcell.train.Trainer` and a ``logs`` dict of
floats. It may set ``trainer.should_stop = True`` to end training after the
current epoch. Any object with some of these methods works; subclassing
:class:`Callback` only saves writing the others. The experiment loggers of
:mod:`milcell.train.loggers` are callbacks.

Examples
--------
>>> class PrintAUC(Callback):
...     def on_epoch_end(self, trainer, logs):
...         trainer.notes.append(logs.get("val_auc"))
>>> cb = PrintAUC()
>>> cb.on_batch_end(None, {"loss": 0.3})  # the inherited hook does nothing
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Callback", "LambdaCallback"]


class Callback:
    """Base class of trainer callbacks; both hooks do nothing by default.

    Examples
    --------
    >>> Callback().on_epoch_end(None, {"epoch": 1.0}) is None
    True
    """

    def on_fit_start(self, trainer: Any, logs: Mapping[str, float]) -> None:
        """Called when ``fit`` starts, with ``epoch`` (the epoch resumed after; 0 for a new run)."""

    def on_batch_end(self, trainer: Any, logs: Mapping[str, float]) -> None:
        """Called after every training batch with ``epoch``, ``batch``, ``loss``, ``lr``."""

    def on_epoch_end(self, trainer: Any, logs: Mapping[str, float]) -> None:
        """Called after every epoch with the row written to ``metrics.csv``."""

    def on_fit_end(self, trainer: Any, logs: Mapping[str, float]) -> None:
        """Called when ``fit`` ends (also after early stopping), with ``epoch`` and ``best_epoch``."""

    def on_fit_error(self, trainer: Any, error: BaseException) -> None:
        """Called when ``fit`` is left by ``error`` (which then propagates), e.g. to close a run."""


class LambdaCallback(Callback):
    """A callback built from functions ``f(trainer, logs)``.

    Parameters
    ----------
    on_batch_end, on_epoch_end : callable, optional
        Functions taking ``(trainer, logs)``.

    Examples
    --------
    >>> seen = []
    >>> cb = LambdaCallback(on_epoch_end=lambda trainer, logs: seen.append(logs["epoch"]))
    >>> cb.on_epoch_end(None, {"epoch": 1.0}); seen
    [1.0]
    """

    def __init__(
        self,
        on_batch_end: Callable[[Any, Mapping[str, float]], None] | None = None,
        on_epoch_end: Callable[[Any, Mapping[str, float]], None] | None = None,
    ) -> None:
        self._on_batch_end = on_batch_end
        self._on_epoch_end = on_epoch_end

    def on_batch_end(self, trainer: Any, logs: Mapping[str, float]) -> None:
        """Call the batch function, if any."""
        if self._on_batch_end is not None:
            self._on_batch_end(trainer, logs)

    def on_epoch_end(self, trainer: Any, logs: Mapping[str, float]) -> None:
        """Call the epoch function, if any."""
        if self._on_epoch_end is not None:
            self._on_epoch_end(trainer, logs)
