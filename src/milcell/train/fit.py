"""Fit one model: the recipe shared by cross-validation folds and Noisy Student models.

:func:`fit_model` builds a :class:`~milcell.train.trainer.Trainer` from
settings (keyword arguments, an optimizer factory, a scheduler factory),
trains, restores the best weights and returns the model, its trainer and the
history. :func:`~milcell.train.crossval.cross_validate` calls it once per
fold and :func:`~milcell.train.noisy_student.noisy_student` once per teacher
and student.

Examples
--------
>>> import torch
>>> from milcell.data import Bag
>>> from milcell.nn.model import create_mil_model
>>> from milcell.train.distributed import make_loader
>>> bags = [Bag(torch.randn(3, 4) + i % 2, label=i % 2, id=f"P{i}") for i in range(8)]
>>> fitted = fit_model(
...     create_mil_model(None, pooling="mean", in_dim=4),
...     make_loader(bags, 4, shuffle=True),
...     make_loader(bags, 4, shuffle=False),
...     trainer_kwargs={"max_epochs": 2, "lr": 0.05, "progress": False},
...     build_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
... )
>>> len(fitted.history), fitted.trainer.best_epoch in (1, 2), fitted.model is fitted.trainer.model
(2, True, True)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from milcell.data.bag import BagBatch
from milcell.exceptions import ConfigError
from milcell.train.trainer import SchedulerFactory, Trainer

__all__ = ["FitResult", "fit_model"]

logger = logging.getLogger("milcell")

_SET_HERE = ("optimizer", "scheduler", "output_dir", "callbacks")


class FitResult(NamedTuple):
    """What :func:`fit_model` returns (a named tuple).

    - ``model``: the trained model (best weights restored when asked and available);
    - ``trainer``: its :class:`~milcell.train.trainer.Trainer` (``best_epoch``,
      ``evaluate``, ``predict``...);
    - ``history``: the epoch logs, one dict per epoch.
    """

    model: nn.Module
    trainer: Trainer
    history: list[dict[str, float]]


def fit_model(
    model: nn.Module,
    train_loader: Iterable[BagBatch],
    val_loader: Iterable[BagBatch] | None = None,
    *,
    trainer_kwargs: Mapping[str, Any] | None = None,
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    build_scheduler: SchedulerFactory | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
    restore_best: bool = True,
) -> FitResult:
    """Build a trainer from settings, fit, restore the best weights.

    Parameters
    ----------
    model : nn.Module
        Follows :class:`~milcell.train.trainer.MILModelLike`.
    train_loader, val_loader : iterable of BagBatch
        Training and (optional) validation batches.
    trainer_kwargs : mapping, optional
        Forwarded to :class:`~milcell.train.trainer.Trainer` (``max_epochs``,
        ``lr``, ``precision``, ``monitor``, ``patience``, ``seed``...);
        ``optimizer``, ``scheduler``, ``output_dir`` and ``callbacks`` are
        the arguments below and may not appear.
    build_optimizer : callable, optional
        ``model -> optimizer``; default the trainer's Adam with ``lr``.
    build_scheduler : callable, optional
        ``optimizer -> scheduler``, given to the trainer at construction
        (``ReduceLROnPlateau`` included: it is stepped with the monitored value).
    output_dir : path-like, optional
        The trainer's ``metrics.csv`` and checkpoints.
    callbacks : sequence, optional
        The trainer's callbacks.
    resume : bool, default False
        With ``output_dir``, continue from ``output_dir/checkpoints/last``
        when an earlier, interrupted call left it.
    restore_best : bool, default True
        Load the weights of the best epoch of the trainer's monitor at the
        end; when the monitor never improved the last weights are kept (with
        a warning).

    Returns
    -------
    FitResult
        ``(model, trainer, history)``.

    Raises
    ------
    ConfigError
        ``trainer_kwargs`` setting one of the arguments above, a factory
        returning the wrong type, or any invalid trainer setting.
    """
    kwargs = dict(trainer_kwargs or {})
    clash = [k for k in _SET_HERE if k in kwargs]
    if clash:
        raise ConfigError(
            f"fit_model: trainer_kwargs may not set {clash}; use build_optimizer, build_scheduler, "
            "output_dir and callbacks"
        )
    optimizer = None if build_optimizer is None else build_optimizer(model)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"fit_model: build_optimizer must return a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    trainer = Trainer(
        model,
        optimizer=optimizer,
        scheduler=build_scheduler,
        output_dir=output_dir,
        callbacks=list(callbacks),
        **kwargs,
    )
    resume_from = None
    if resume and output_dir is not None:
        last = Path(output_dir) / "checkpoints" / "last"
        if (last / "checkpoint.json").is_file():
            resume_from = last
            logger.info("fit_model: resuming from %s", last)
    history = trainer.fit(train_loader, val_loader, resume_from=resume_from)
    if restore_best:
        if trainer.best_epoch > 0:
            trainer.load_best()
        else:
            logger.warning("fit_model: %s never improved; keeping the last weights", trainer.monitor)
    return FitResult(model, trainer, history)
