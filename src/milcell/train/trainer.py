"""A minimal, explicit training loop for MIL models.

:class:`Trainer` runs epochs of ``forward -> model.loss -> backward -> step``
over :class:`~milcell.data.BagBatch` batches, evaluates with the clinical
metrics of :mod:`milcell.metrics`, keeps the best checkpoint of a monitored
metric, stops early, writes ``metrics.csv`` and resumes interrupted runs
exactly. It is launched unchanged under ``torchrun`` for data-parallel
training. It is a loop, not a framework: read :meth:`Trainer.fit` to see
everything it does.

Examples
--------
>>> import torch
>>> from milcell.data import Bag
>>> from milcell.train.distributed import make_loader
>>> class MeanMIL(torch.nn.Module):  # follows the MILModelLike protocol
...     def __init__(self):
...         super().__init__()
...         self.head = torch.nn.Linear(4, 2)
...     def forward(self, batch):
...         pooled = batch.pad(batch.instances).sum(1) / batch.bag_sizes[:, None]
...         return MILOutput(self.head(pooled))
...     def loss(self, output, batch, class_weights=None):
...         return torch.nn.functional.cross_entropy(output.logits, batch.labels, ignore_index=-1)
>>> from typing import NamedTuple
>>> class MILOutput(NamedTuple):
...     logits: torch.Tensor
...     attention: torch.Tensor | None = None
>>> bags = [Bag(torch.randn(3, 4) + i % 2, label=i % 2, id=f"P{i}") for i in range(8)]
>>> trainer = Trainer(MeanMIL(), max_epochs=2, lr=0.05, progress=False)
>>> history = trainer.fit(make_loader(bags, 4, shuffle=True), make_loader(bags, 4, shuffle=False))
>>> [row["epoch"] for row in history], "val_balanced_accuracy" in history[-1]
([1, 2], True)
>>> trainer.predict(make_loader(bags, 4, shuffle=False)).probabilities.shape
torch.Size([8, 2])
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from milcell._locks import folder_lock
from milcell._utils import write_dict_csv
from milcell._validation import check_choice, check_int, check_real
from milcell.data.bag import BagBatch
from milcell.exceptions import CheckpointError, ConfigError, DataError, TrainingError
from milcell.metrics import BinaryReport, MulticlassReport, binary_report, multiclass_report
from milcell.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)
from milcell.train.distributed import (
    all_gather_objects,
    all_reduce_sum,
    barrier,
    get_world_size,
    init_distributed,
    is_main_process,
    launched_distributed,
)
from milcell.train.inference import (
    Predictions,
    _check_precision,
    _length,
    _n_targets,
    _run_inference,
    _to_device,
    _worker_failures,
    autocast,
)

__all__ = [
    "MILModelLike",
    "MILOutputLike",
    "Trainer",
    "write_history_csv",
]

logger = logging.getLogger("milcell")

SchedulerFactory = Callable[[torch.optim.Optimizer], LRScheduler]


@runtime_checkable
class MILOutputLike(Protocol):
    """What a model returns: ``logits (B, C)`` and ``attention (B, N_max)`` or None."""

    logits: Tensor
    attention: Tensor | None


@runtime_checkable
class MILModelLike(Protocol):
    """The protocol the trainer drives (an :class:`torch.nn.Module` with a ``loss``).

    ``model(batch)`` maps a :class:`~milcell.data.BagBatch` to an output with
    ``logits (B, C)`` (``C >= 2`` class logits, or ``C = 1`` for a single
    sigmoid logit) and ``attention (B, N_max)`` or ``None``.
    ``model.loss(output, batch, class_weights=None)`` returns a scalar: the
    *mean* over the labelled bags of the batch (bags labelled ``-1`` are
    ignored). An optional ``config`` dict is saved beside the weights.
    :class:`milcell.nn.model.MILModel` follows it.
    """

    def __call__(self, batch: BagBatch) -> MILOutputLike: ...

    def loss(self, output: Any, batch: BagBatch, class_weights: Tensor | None = None) -> Tensor: ...


class _BatchLogs(Mapping[str, float]):
    """The ``on_batch_end`` logs; ``"loss"`` is read from the device only when a callback asks for it.

    Reading it is a host-device sync, so a training step stays sync-free unless a
    callback actually uses the batch loss.
    """

    def __init__(self, values: dict[str, float], loss: Tensor | None) -> None:
        self._values = values
        self._loss = loss

    def __getitem__(self, key: str) -> float:
        if key == "loss":
            return math.nan if self._loss is None else float(self._loss)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._values
        yield "loss"

    def __len__(self) -> int:
        return len(self._values) + 1


def _build_scheduler(
    scheduler: LRScheduler | SchedulerFactory | None, optimizer: torch.optim.Optimizer, interval: str
) -> LRScheduler | None:
    """The scheduler instance: ``scheduler`` itself, or ``scheduler(optimizer)`` for a factory."""
    if scheduler is None:
        return None
    if not isinstance(scheduler, LRScheduler) and callable(scheduler) and not hasattr(scheduler, "step"):
        built = scheduler(optimizer)
        if not callable(getattr(built, "step", None)):
            raise ConfigError(
                "scheduler: the factory must return a learning-rate scheduler (with step()), "
                f"got {type(built).__name__}"
            )
        scheduler = built
    instance = cast(LRScheduler, scheduler)  # LRScheduler or a duck-typed object with step()
    if isinstance(instance, ReduceLROnPlateau) and interval != "epoch":
        raise ConfigError("ReduceLROnPlateau needs scheduler_interval='epoch' (it steps on the monitor)")
    if getattr(instance, "optimizer", optimizer) is not optimizer:
        raise ConfigError(
            "scheduler steps another optimizer than the trainer's; pass a factory "
            "(optimizer -> scheduler) when the trainer builds its own optimizer"
        )
    return instance


def _loader_generators(loader: Iterable[Any] | None) -> list[torch.Generator]:
    """The distinct torch.Generators that drive a DataLoader's shuffling and worker seeds."""
    if not isinstance(loader, DataLoader):
        return []
    found: list[torch.Generator] = []
    candidates = [
        loader.generator,
        getattr(loader.sampler, "generator", None),
        getattr(getattr(loader.batch_sampler, "sampler", None), "generator", None),
    ]
    for gen in candidates:
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def _epoch_aware(loader: Iterable[Any]) -> list[Any]:
    """Everything behind a DataLoader with a ``set_epoch`` method: samplers and datasets.

    That covers ``DistributedSampler``, milcell's samplers, and datasets that
    draw a random instance subset per epoch (``BagDataset(max_instances=...)``),
    looking inside ``Subset`` and ``ConcatDataset``.
    """
    if not isinstance(loader, DataLoader):
        return []
    found: list[Any] = []
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        if callable(getattr(sampler, "set_epoch", None)) and sampler not in found:
            found.append(sampler)
    stack: list[Any] = [loader.dataset]
    while stack:
        dataset = stack.pop()
        if callable(getattr(dataset, "set_epoch", None)):
            found.append(dataset)
        stack.extend(getattr(dataset, "datasets", ()))  # ConcatDataset
        inner = getattr(dataset, "dataset", None)  # Subset and similar wrappers
        if inner is not None:
            stack.append(inner)
    return found


class Trainer:
    """Train, evaluate and predict with a MIL model.

    Parameters
    ----------
    model : torch.nn.Module
        Follows :class:`MILModelLike`.
    optimizer : torch.optim.Optimizer, optional
        Any optimizer (build parameter groups with their own learning rates
        yourself). Default: :class:`torch.optim.Adam` with ``lr`` over the
        parameters that require gradients.
    lr : float, default 1e-3
        Learning rate of the default optimizer.
    weight_decay : float, default 0.0
        L2 penalty of the default optimizer (Adam's ``weight_decay``); with
        an ``optimizer`` given, set it there instead.
    scheduler : LRScheduler or callable, optional
        A learning-rate scheduler over ``optimizer``, or a factory
        ``optimizer -> scheduler`` called with the trainer's optimizer (use a
        factory with the default optimizer). The built scheduler is
        :attr:`scheduler`. :class:`~torch.optim.lr_scheduler.ReduceLROnPlateau`
        is stepped with the monitored value at the end of each epoch.
    scheduler_interval : {"epoch", "step"}, default "epoch"
        Step the scheduler after every epoch or after every optimizer step.
    max_epochs : int, default 10
        Total number of epochs (a resumed run continues up to it).
    device : str or torch.device, optional
        Default: the model's device; under ``torchrun``, ``cuda:LOCAL_RANK``
        when CUDA is available, else the CPU.
    precision : {"32", "bf16", "fp16"}, default "32"
        ``bf16`` / ``fp16`` run the forward pass and the loss under
        :func:`milcell.train.inference.autocast` on the device type; ``fp16``
        also uses a :class:`torch.amp.GradScaler`.
    channels_last : bool, default False
        Convert the model and 4-D image instances ``(T, C, H, W)`` to the
        channels-last memory format.
    accumulate_grad_batches : int, default 1
        Sum the gradients of this many batches per optimizer step (each
        batch's loss is divided by the number of batches in its window).
    gradient_clip_norm : float, optional
        Clip the global gradient norm to this value before each step.
    monitor : str, optional
        Key of the epoch logs to select the best checkpoint and stop early
        (``"val_balanced_accuracy"``, ``"val_auc"``, ``"val_loss"``,
        ``"train_loss"``...). Default ``"val_loss"`` with a validation loader,
        else ``"train_loss"``.
    mode : {"max", "min"}, optional
        Default ``"min"`` for names ending in ``loss``, else ``"max"``.
    patience : int, optional
        Stop after this many epochs without improvement (``None``: never).
    min_delta : float, default 0.0
        Smallest change that counts as an improvement.
    output_dir : path-like, optional
        Where ``metrics.csv`` and ``checkpoints/{last,best}`` are written
        (by rank 0 only). ``None`` writes nothing and keeps the best weights
        in memory.
    callbacks : sequence, optional
        Objects with any of ``on_fit_start(trainer, logs)``,
        ``on_batch_end(trainer, logs)``, ``on_epoch_end(trainer, logs)``,
        ``on_fit_end(trainer, logs)`` and ``on_fit_error(trainer, error)``
        (called before an error leaves ``fit``; see :mod:`milcell.train.callbacks`;
        experiment loggers in :mod:`milcell.train.loggers`).
    progress : bool, default True
        Show a tqdm progress bar per epoch (rank 0 only).
    log_every_n_steps : int, default 50
        Every this many batches, and at the end of each epoch, the trainer
        reads from the device, in one copy, the running training loss (shown
        in the progress bar) and whether a step produced a non-finite loss or
        gradient norm; in between, a training step makes no host-device sync
        (with :func:`milcell.checks` off and outside ``torchrun``). A
        non-finite value stops training with a :class:`TrainingError` naming
        the epoch, the first bad batch and its bags, before anything of that
        epoch is saved: the checkpoints on disk stay those of the last good
        epoch. With ``precision="fp16"`` the gradient scaler handles
        non-finite gradients (it skips the step), so only the loss is checked.
    class_weights : Tensor, optional
        ``(C,)`` passed to ``model.loss``.
    pos_weight : float, optional
        Binary problems: weight ``> 0`` of the positive class's terms of the
        loss (binary cross-entropy, e.g. ``n_negative / n_positive``), passed
        to ``model.loss(..., pos_weight=)`` when set (see
        :meth:`milcell.nn.model.MILModel.loss`).
    seed : int or None, default 0
        At the start of epoch ``e`` the training loader's ``torch.Generator``
        is reseeded with ``seed + e``, so shuffling does not depend on how
        the run was interrupted. Whatever the seed, every sampler and dataset
        behind the training loader that has ``set_epoch`` (a
        ``DistributedSampler``, milcell's samplers, a ``BagDataset`` drawing
        ``max_instances`` per epoch) gets ``set_epoch(e)``. ``None`` leaves
        the generators alone (their state is still checkpointed).
    restore_best : bool, default False
        Load the best weights into the model at the end of :meth:`fit`.
    threshold : float, default 0.5
        Decision threshold of binary metrics.
    class_names : sequence of str, optional
        Names used in multiclass metric keys (``val_recall_<name>``).
    distributed : bool or None, default None
        Wrap the model in DistributedDataParallel; ``None`` decides from the
        environment (``WORLD_SIZE > 1``, as set by ``torchrun``).
    ddp_kwargs : mapping, optional
        Extra arguments of :class:`~torch.nn.parallel.DistributedDataParallel`
        (e.g. ``find_unused_parameters=True``).

    Attributes
    ----------
    history : list of dict
        One row of logs per epoch (what ``metrics.csv`` holds).
    best_value, best_epoch : float, int
        Best monitored value so far and its (1-based) epoch.
    should_stop : bool
        Set it from a callback to stop after the current epoch.

    Raises
    ------
    ConfigError
        For any invalid argument (integers and reals may be numpy scalars); the
        message names it. Also a scheduler over another optimizer than the
        trainer's, and ``ReduceLROnPlateau`` with ``scheduler_interval="step"``.

    Examples
    --------
    >>> Trainer(torch.nn.Linear(2, 2))
    Traceback (most recent call last):
    ...
    milcell.exceptions.ConfigError: model must be an nn.Module with a loss(output, batch) method, got Linear
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: LRScheduler | SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        max_epochs: int = 10,
        device: str | torch.device | None = None,
        precision: str = "32",
        channels_last: bool = False,
        accumulate_grad_batches: int = 1,
        gradient_clip_norm: float | None = None,
        monitor: str | None = None,
        mode: str | None = None,
        patience: int | None = None,
        min_delta: float = 0.0,
        output_dir: str | os.PathLike[str] | None = None,
        callbacks: Sequence[Any] = (),
        progress: bool = True,
        log_every_n_steps: int = 50,
        class_weights: Tensor | None = None,
        pos_weight: float | None = None,
        seed: int | None = 0,
        restore_best: bool = False,
        threshold: float = 0.5,
        class_names: Sequence[str] | None = None,
        distributed: bool | None = None,
        ddp_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module) or not callable(getattr(model, "loss", None)):
            raise ConfigError(
                f"model must be an nn.Module with a loss(output, batch) method, got {type(model).__name__}"
            )
        precision = _check_precision(precision)
        scheduler_interval = check_choice(scheduler_interval, "scheduler_interval", ("epoch", "step"))
        lr = check_real(lr, "lr", low=0.0)
        weight_decay = check_real(weight_decay, "weight_decay", low=0.0)
        if optimizer is not None and weight_decay:
            raise ConfigError(
                "weight_decay applies to the default optimizer only; set it on the optimizer you pass"
            )
        max_epochs = check_int(max_epochs, "max_epochs", low=1)
        accumulate_grad_batches = check_int(accumulate_grad_batches, "accumulate_grad_batches", low=1)
        patience = None if patience is None else check_int(patience, "patience", low=1)
        log_every_n_steps = check_int(log_every_n_steps, "log_every_n_steps", low=1)
        gradient_clip_norm = (
            None
            if gradient_clip_norm is None
            else check_real(gradient_clip_norm, "gradient_clip_norm", low=0.0, low_open=True)
        )
        mode = None if mode is None else check_choice(mode, "mode", ("max", "min"))
        min_delta = check_real(min_delta, "min_delta", low=0.0)
        threshold = check_real(threshold, "threshold", low=0.0, high=1.0, low_open=True, high_open=True)
        seed = None if seed is None else check_int(seed, "seed")
        if monitor is not None and not isinstance(monitor, str):
            raise ConfigError(f"monitor must be None or an epoch-log key (str), got {monitor!r}")
        if scheduler is not None and not (callable(scheduler) or callable(getattr(scheduler, "step", None))):
            raise ConfigError(
                "scheduler must be a learning-rate scheduler or a callable optimizer -> scheduler, "
                f"got {type(scheduler).__name__}"
            )

        self.distributed = launched_distributed() if distributed is None else bool(distributed)
        if self.distributed:
            dist_device = init_distributed()
            device = dist_device if device is None else device
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = bool(channels_last)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        if self.distributed:
            # Inputs are moved by the trainer, so DDP is not asked to scatter them.
            self._ddp = nn.parallel.DistributedDataParallel(model, **dict(ddp_kwargs or {}))

        if optimizer is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ConfigError("the model has no trainable parameters and no optimizer was given")
            optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        self.optimizer = optimizer
        self.scheduler: LRScheduler | None = _build_scheduler(scheduler, optimizer, scheduler_interval)
        self.scheduler_interval = scheduler_interval
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.max_epochs = max_epochs
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_norm = gradient_clip_norm
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.callbacks = list(callbacks)
        self.progress = progress
        self.log_every_n_steps = log_every_n_steps
        self.class_weights = None if class_weights is None else class_weights.to(self.device)
        self.pos_weight = (
            None if pos_weight is None else check_real(pos_weight, "pos_weight", low=0.0, low_open=True)
        )
        self.seed = seed
        self.restore_best = restore_best
        self.threshold = threshold
        self.class_names = None if class_names is None else list(class_names)

        self.history: list[dict[str, float]] = []
        self.best_value = math.nan
        self.best_epoch = 0
        self.epoch = 0
        self.global_step = 0
        self.should_stop = False
        self._wait = 0
        self._best_state: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ helpers

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return is_main_process()

    @property
    def checkpoint_dir(self) -> Path | None:
        """``output_dir / "checkpoints"`` or None."""
        return None if self.output_dir is None else self.output_dir / "checkpoints"

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.device, self.precision)

    def _loss(self, output: Any, batch: BagBatch) -> Tensor:
        # __init__ checked that the model has a loss method.
        model = cast(MILModelLike, self.model)
        if self.pos_weight is None:
            return model.loss(output, batch, class_weights=self.class_weights)
        loss: Tensor = model.loss(  # type: ignore[call-arg]
            output, batch, class_weights=self.class_weights, pos_weight=self.pos_weight
        )
        return loss

    def _to_device(self, batch: BagBatch) -> BagBatch:
        moved = _to_device(batch, self.device)
        if self.channels_last and moved.instances.ndim == 4:
            moved.instances = moved.instances.contiguous(memory_format=torch.channels_last)
        return moved

    def _resolve_monitor(self, has_val: bool) -> None:
        if self.monitor is None:
            self.monitor = "val_loss" if has_val else "train_loss"
        if self.monitor.startswith("val_") and not has_val:
            raise ConfigError(f"monitor={self.monitor!r} needs a validation loader (val_loader is None)")
        if self.mode is None:
            self.mode = "min" if self.monitor.endswith("loss") else "max"

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if math.isnan(self.best_value):
            return True
        if self.mode == "max":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def _lrs(self) -> dict[str, float]:
        out = {"lr": float(self.optimizer.param_groups[0]["lr"])}
        for i, group in enumerate(self.optimizer.param_groups[1:], start=1):
            out[f"lr_{i}"] = float(group["lr"])
        return out

    def _generators(
        self, train_loader: Iterable[Any], val_loader: Iterable[Any] | None
    ) -> list[torch.Generator]:
        gens = _loader_generators(train_loader)
        gens += [g for g in _loader_generators(val_loader) if all(g is not h for h in gens)]
        return gens

    def _call(self, hook: str, logs: Mapping[str, float]) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, logs)

    # ------------------------------------------------------------------ fit

    def fit(
        self,
        train_loader: Iterable[BagBatch],
        val_loader: Iterable[BagBatch] | None = None,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> list[dict[str, float]]:
        """Train for ``max_epochs`` epochs (or until early stopping).

        Each epoch: train over ``train_loader``, evaluate on ``val_loader``
        (keys prefixed ``val_``), step an epoch scheduler, track the monitored
        value, call ``on_epoch_end`` callbacks, then (rank 0, with
        ``output_dir``) rewrite ``metrics.csv`` and save the ``last``
        checkpoint, and ``best`` when the monitor improved.

        Parameters
        ----------
        train_loader : iterable of BagBatch
            Usually from :func:`~milcell.train.distributed.make_loader`.
        val_loader : iterable of BagBatch, optional
        resume_from : path-like, optional
            A checkpoint directory (e.g. ``out/checkpoints/last``): weights,
            optimizer, scheduler, scaler, history, early-stopping counters
            and random states are restored and training continues at the
            next epoch. On the CPU with a fixed seed the result is identical
            to an uninterrupted run.

        Returns
        -------
        list of dict
            :attr:`history`, one row per epoch.

        Raises
        ------
        ConfigError
            If the monitored key is missing from the logs.
        CheckpointError
            If ``resume_from`` cannot be read.
        LockError
            Another process is training into the same ``output_dir`` (rank 0
            holds :func:`milcell._locks.folder_lock` on it during ``fit``).
        TrainingError
            A non-finite training loss or gradient norm (the message names the
            epoch, the first bad batch and its bags; nothing of that epoch is
            saved, see ``log_every_n_steps``), or a data-loading worker that
            was killed (out of memory?).
        DataError
            Validation outputs that are NaN or inf (naming the bags), or a
            milcell error raised inside a DataLoader worker (its own one-line
            message, e.g. an unreadable image).
        """
        lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.output_dir is not None and self.is_main:
            lock = folder_lock(self.output_dir, what="checkpoint folder")
        with lock:
            try:
                return self._fit(train_loader, val_loader, resume_from)
            except BaseException as error:
                self._call_on_error(error)
                raise

    def _call_on_error(self, error: BaseException) -> None:
        """``on_fit_error`` of every callback; a callback failing there is logged, not raised."""
        for cb in self.callbacks:
            fn = getattr(cb, "on_fit_error", None)
            if fn is None:
                continue
            try:
                fn(self, error)
            except Exception as hook_error:  # the training error matters more
                logger.warning("%s.on_fit_error failed: %s", type(cb).__name__, hook_error)

    def _fit(
        self,
        train_loader: Iterable[BagBatch],
        val_loader: Iterable[BagBatch] | None,
        resume_from: str | os.PathLike[str] | None,
    ) -> list[dict[str, float]]:
        self._resolve_monitor(val_loader is not None)
        generators = self._generators(train_loader, val_loader)
        start_epoch = 0
        if resume_from is not None:
            start_epoch = self._resume(Path(resume_from), generators)
        self.should_stop = False
        self._call("on_fit_start", {"epoch": float(start_epoch)})
        for epoch in range(start_epoch, self.max_epochs):
            self.epoch = epoch + 1
            self._prepare_epoch(train_loader, epoch)
            lrs = self._lrs()
            train_loss = self._train_epoch(train_loader)
            logs: dict[str, float] = {"epoch": self.epoch, **lrs, "train_loss": train_loss}
            if val_loader is not None:
                logs.update({f"val_{k}": v for k, v in self.evaluate(val_loader).items()})
            if self.monitor not in logs:
                raise ConfigError(f"monitor {self.monitor!r} is not among the epoch logs: {sorted(logs)}")
            value = float(logs[self.monitor])
            if self.scheduler is not None and self.scheduler_interval == "epoch":
                if isinstance(self.scheduler, ReduceLROnPlateau):
                    self.scheduler.step(value)
                else:
                    self.scheduler.step()
            improved = self._improved(value)
            if improved:
                self.best_value, self.best_epoch, self._wait = value, self.epoch, 0
            else:
                self._wait += 1
            self.history.append(logs)
            logger.info(
                "epoch %d/%d: %s",
                self.epoch,
                self.max_epochs,
                ", ".join(f"{k}={v:.4g}" for k, v in logs.items() if k != "epoch"),
            )
            self._call("on_epoch_end", logs)
            self._save_epoch(improved, generators)
            if self.patience is not None and self._wait >= self.patience:
                logger.info(
                    "early stopping after epoch %d: %s did not improve for %d epochs (best %.4g at epoch %d)",
                    self.epoch,
                    self.monitor,
                    self._wait,
                    self.best_value,
                    self.best_epoch,
                )
                break
            if self.should_stop:
                logger.info("training stopped by a callback after epoch %d", self.epoch)
                break
        if self.restore_best and self.best_epoch > 0:
            self.load_best()
        self._call("on_fit_end", {"epoch": float(self.epoch), "best_epoch": float(self.best_epoch)})
        return self.history

    def _prepare_epoch(self, loader: Iterable[Any], epoch: int) -> None:
        for item in _epoch_aware(loader):
            item.set_epoch(epoch)
        if self.seed is not None:
            for gen in _loader_generators(loader):
                gen.manual_seed(self.seed + epoch)

    def _train_epoch(self, loader: Iterable[BagBatch]) -> float:
        """One epoch of training; returns the mean training loss over the labelled bags.

        The per-step path (:meth:`_train_step`) makes no host read (checks off, one
        process): the loss is summed on the device, and each batch appends a device
        flag (1: non-finite loss, 2: non-finite gradient norm); :meth:`_read_interval`
        reads both every ``log_every_n_steps`` batches and at the end of the epoch.
        """
        model = self._ddp if self._ddp is not None else self.model
        model.train()
        accum = self.accumulate_grad_batches
        n_batches = _length(loader)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        flags: list[Tensor] = []  # one 0-d int tensor per batch since the last read
        batch_ids: list[list[str]] = []  # the bag ids of those batches (host data)
        first = 0  # index of the first batch since the last read
        self.optimizer.zero_grad(set_to_none=True)
        pending = False
        batches = iter(loader)
        bar = tqdm(
            batches,
            total=n_batches,
            desc=f"epoch {self.epoch}/{self.max_epochs}",
            disable=not (self.progress and self.is_main),
            leave=False,
            dynamic_ncols=True,
        )
        try:
            with _worker_failures(loader, batches):
                for i, raw in enumerate(bar):
                    batch = self._to_device(raw)
                    n_local = _n_targets(raw)  # the collated labels are on the host: no sync
                    window_start = (i // accum) * accum
                    window = accum if n_batches is None else min(accum, n_batches - window_start)
                    is_step = i + 1 - window_start >= window
                    loss, flag = self._train_step(model, batch, n_local, window, is_step)
                    pending = not is_step
                    if loss is not None:
                        loss_sum += loss.double() * n_local
                        count += n_local
                    flags.append(flag)
                    batch_ids.append(list(batch.ids))
                    self._call("on_batch_end", _BatchLogs(self._batch_values(i), loss))
                    if len(flags) >= self.log_every_n_steps:
                        self._read_interval(flags, batch_ids, first, loss_sum, count, bar)
                        first += len(flags)
                        flags, batch_ids = [], []
                if pending:
                    grad_ok = self._optimizer_step()
                    if grad_ok is not None and flags:
                        flags[-1] = flags[-1] + 2 * (~grad_ok).long()
                mean = self._read_interval(flags, batch_ids, first, loss_sum, count, bar)
        finally:
            bar.close()
        if self.distributed:
            n = torch.tensor(float(count), dtype=torch.float64, device=self.device)
            totals = all_reduce_sum(torch.stack([loss_sum, n]))
            return float(totals[0] / totals[1]) if float(totals[1]) > 0 else math.nan
        return mean

    def _batch_values(self, i: int) -> dict[str, float]:
        return {
            "epoch": float(self.epoch),
            "batch": float(i),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }

    def _train_step(
        self, model: nn.Module, batch: BagBatch, n_local: int, window: int, is_step: bool
    ) -> tuple[Tensor | None, Tensor]:
        """Forward, backward and (``is_step``) optimizer step of one batch, without a host read.

        Returns the detached loss (None for a batch without a target) and the
        batch's 0-d int64 flag on the device: bit 1 a non-finite loss, bit 2 a
        non-finite gradient norm at this optimizer step.
        """
        sync = contextlib.nullcontext() if (self._ddp is None or is_step) else self._ddp.no_sync()
        with sync:
            with self._autocast():
                output = model(batch)
                # A batch of unlabelled bags only (possible with batch_size=1) has no loss.
                loss = self._loss(output, batch) if n_local > 0 else None
            factor = 1.0
            if self.distributed:
                # DDP averages gradients over ranks; rescale each rank's mean loss so the
                # result is the mean over the *global* batch even when ranks hold
                # different numbers of labelled bags.
                n_global = float(all_reduce_sum(torch.tensor(float(n_local), device=self.device)).item())
                factor = n_local * get_world_size() / n_global if n_global > 0 else 0.0
            # A batch without targets still joins the graph (DDP needs every rank to
            # reduce), with a zero gradient.
            objective = loss if loss is not None else output.logits.sum() * 0.0
            self.scaler.scale(objective.float() * (factor / window)).backward()
        flag = torch.zeros((), dtype=torch.int64, device=self.device)
        detached = None if loss is None else loss.detach()
        if detached is not None:
            flag = flag + (~torch.isfinite(detached)).long()
        if is_step:
            grad_ok = self._optimizer_step()
            if grad_ok is not None:
                flag = flag + 2 * (~grad_ok).long()
        return detached, flag

    def _read_interval(
        self,
        flags: list[Tensor],
        batch_ids: list[list[str]],
        first: int,
        loss_sum: Tensor,
        count: int,
        bar: Any,
    ) -> float:
        """Read the step flags and the running loss in one device-to-host copy; raise on a bad step.

        Returns the running mean training loss of the epoch (NaN without a labelled bag).
        """
        n = len(flags)
        parts = [loss_sum.reshape(1)]
        if flags:
            local = torch.stack(flags).double()
            parts.insert(0, local)
            if self.distributed:
                # Every rank reads at the same batch, so all stop together if any rank saw a bad step.
                parts.append(all_reduce_sum((local != 0).double()))
        host = torch.cat(parts).cpu().tolist()
        codes, mean_sum = [int(v) for v in host[:n]], host[n]
        anywhere = host[n + 1 :] if len(host) > n + 1 else codes
        mean = mean_sum / count if count > 0 else math.nan
        bad = [j for j, value in enumerate(anywhere) if value != 0]
        if bad:
            j = bad[0]
            if codes[j] == 0:
                kind, where = "loss or gradient norm", "bags on another rank"
            else:
                kind = "loss" if codes[j] & 1 else "gradient norm"
                where = f"bags {batch_ids[j]}"
            saved = ""
            last = None if self.checkpoint_dir is None else self.checkpoint_dir / "last"
            if last is not None and last.is_dir() and self.epoch > 1:
                saved = f"; the last good checkpoint, {last}, holds epoch {self.epoch - 1}"
            raise TrainingError(
                f"non-finite training {kind} at epoch {self.epoch}, batch {first + j + 1} ({where}): "
                f"training stopped before saving this epoch{saved}; lower the learning rate "
                f"(lr={self.optimizer.param_groups[0]['lr']:.3g}), set gradient_clip_norm, or look for "
                "inputs that overflow in the network"
            )
        if self.progress and self.is_main and math.isfinite(mean):
            bar.set_postfix(loss=f"{mean:.4f}")
        return mean

    def _optimizer_step(self) -> Tensor | None:
        """Clip, step, zero the gradients; return a 0-d device bool "gradient norm finite" (None in fp16)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_ok: Tensor | None = None
        if self.gradient_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, self.gradient_clip_norm)
            grad_ok = None if self.scaler.is_enabled() else torch.isfinite(norm)
        elif not self.scaler.is_enabled():
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                grad_ok = torch.isfinite(torch.nn.utils.get_total_norm(grads))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()
        return grad_ok

    # ------------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "best_value": float(self.best_value),
            "best_epoch": int(self.best_epoch),
            "wait": int(self._wait),
            "global_step": int(self.global_step),
            "monitor": self.monitor,
            "mode": self.mode,
            "history": [dict(row) for row in self.history],
        }

    def _save_epoch(self, improved: bool, generators: list[torch.Generator]) -> None:
        if self.output_dir is None:
            if improved:
                self._best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            return
        if not self.is_main:
            return
        self.write_csv(self.output_dir / "metrics.csv")
        ckpt_dir = self.checkpoint_dir
        assert ckpt_dir is not None and self.monitor is not None
        monitor_value = float(self.history[-1][self.monitor])
        trainer_state = self._trainer_state()
        rng_state = capture_rng_state(generators)

        def save(name: str) -> None:
            save_checkpoint(
                ckpt_dir / name,
                self.model,
                epoch=self.epoch,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler if self.scaler.is_enabled() else None,
                monitor=self.monitor,
                monitor_value=monitor_value,
                trainer_state=trainer_state,
                rng_state=rng_state,
            )

        # ``best`` before ``last``: a crash between the two leaves ``last`` one epoch behind
        # (that epoch is trained again on resume), never a ``last`` whose records name a
        # best epoch that ``best`` does not hold.
        if improved:
            save("best")
        save("last")

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """Write :attr:`history` to ``path`` with :func:`write_history_csv`."""
        write_history_csv(self.history, path)

    def _resume(self, path: Path, generators: list[torch.Generator]) -> int:
        ckpt = load_checkpoint(
            path,
            self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler if self.scaler.is_enabled() else None,
            map_location="cpu",
        )
        state = ckpt.state.get("trainer") or {}
        self.best_value = float(state.get("best_value", math.nan))
        self.best_epoch = int(state.get("best_epoch", 0))
        self._wait = int(state.get("wait", 0))
        self.global_step = int(state.get("global_step", 0))
        self.history = [dict(row) for row in state.get("history", [])]
        saved_monitor = state.get("monitor")
        if saved_monitor is not None and saved_monitor != self.monitor:
            logger.warning(
                "resuming from %s which monitored %r; this run monitors %r", path, saved_monitor, self.monitor
            )
        if self.output_dir is None and self.best_epoch > 0:
            best = path.parent / "best"
            if best.is_dir():
                fresh = copy.deepcopy(self.model)
                load_weights(best, fresh)
                self._best_state = {k: v.detach().cpu().clone() for k, v in fresh.state_dict().items()}
        try:
            restore_rng_state(ckpt.state["rng"], generators)
        except CheckpointError as exc:
            logger.warning("%s; DataLoader generators keep their current state", exc)
            restore_rng_state(ckpt.state["rng"], [])
        logger.info("resumed from %s after epoch %d", path, ckpt.epoch)
        if ckpt.epoch >= self.max_epochs:
            logger.info(
                "checkpoint %s already reached max_epochs=%d; nothing to train", path, self.max_epochs
            )
        return ckpt.epoch

    def load_best(self) -> nn.Module:
        """Load the best weights seen so far into the model and return it.

        Raises
        ------
        CheckpointError
            If no epoch has improved the monitor yet.
        """
        if self.output_dir is not None:
            best = self.output_dir / "checkpoints" / "best"
            if self.distributed:
                barrier()  # rank 0 writes the checkpoint; the other ranks must not read a stale one
            if not best.is_dir():
                raise CheckpointError(f"no best checkpoint at {best} yet")
            return load_weights(best, self.model)
        if self._best_state is None:
            raise CheckpointError("no best weights yet: the monitored value never improved")
        self.model.load_state_dict(self._best_state)
        return self.model

    # ------------------------------------------------------------------ inference

    def _inference(self, loader: Iterable[BagBatch], with_loss: bool) -> tuple[Predictions, float]:
        local, loss_sum, count = _run_inference(
            self.model,
            loader,
            device=self.device,
            precision=self.precision,
            prepare=self._to_device,
            loss_fn=self._loss if with_loss else None,
        )
        if self.distributed:
            totals = all_reduce_sum(torch.tensor([loss_sum, count], dtype=torch.float64, device=self.device))
            loss_sum, count = float(totals[0].item()), float(totals[1].item())
            # Gathered with the dataset positions the rank's sampler yielded (DistributedBagSampler),
            # so the merged predictions follow the dataset's order whatever the sharding.
            positions = getattr(getattr(loader, "sampler", None), "last_indices", None)
            if not isinstance(positions, list) or len(positions) != len(local.ids):
                positions = None
            gathered = all_gather_objects((local, positions))
            ranks_positions = [p for _, p in gathered]
            local = _merge_predictions(
                [part for part, _ in gathered],
                None if any(p is None for p in ranks_positions) else ranks_positions,
            )
        return local, (loss_sum / count if count > 0 else math.nan)

    def predict(self, loader: Iterable[BagBatch]) -> Predictions:
        """Predict every bag of ``loader`` (in eval mode, under ``torch.inference_mode``).

        The loop is :func:`milcell.train.inference.predict`'s, on the trainer's
        device and precision (and memory format). Under ``torchrun`` the
        predictions of all ranks are gathered (on every rank), put in the
        dataset's order when the sampler records its indices
        (:class:`~milcell.data.samplers.DistributedBagSampler`), and bags
        repeated by the sampler's padding are dropped by id.

        Returns
        -------
        Predictions
            ``(ids, probabilities (n, C), labels (n,), attention)``.
        """
        return self._inference(loader, with_loss=False)[0]

    def evaluate(self, loader: Iterable[BagBatch]) -> dict[str, float]:
        """Loss and metrics over ``loader``.

        Binary problems get :func:`~milcell.metrics.binary_report` (positive
        class 1, ``threshold``), others
        :func:`~milcell.metrics.multiclass_report`.

        Returns
        -------
        dict of str to float
            ``loss`` (mean over labelled bags) plus the report's
            :meth:`as_dict` (``balanced_accuracy``, ``auc``, ``kappa``,
            ``n_unlabelled``...). Without any labelled bag only ``loss``
            (nan), ``n_samples`` and ``n_unlabelled`` are returned.
        """
        preds, loss = self._inference(loader, with_loss=True)
        labels = preds.labels.numpy()
        out: dict[str, float] = {"loss": loss}
        if (labels >= 0).sum() == 0:
            logger.warning("evaluate: no labelled bag among %d; only the loss is reported", len(labels))
            out.update(n_samples=0.0, n_unlabelled=float(len(labels)))
            return out
        prob = preds.probabilities.numpy()
        report: BinaryReport | MulticlassReport
        if prob.shape[1] == 2:
            report = binary_report(labels, prob[:, 1], threshold=self.threshold)
        else:
            report = multiclass_report(labels, prob, class_names=self.class_names)
        out.update(report.as_dict())
        return out


def _merge_predictions(
    parts: Sequence[Predictions], positions: Sequence[Sequence[int]] | None = None
) -> Predictions:
    """Concatenate per-rank predictions, keeping the first occurrence of each bag id.

    With ``positions`` (per part, the dataset index of each row), rows come sorted by it.
    """
    if any(bag_id == "" for part in parts for bag_id in part.ids):
        raise DataError("bags need non-empty ids to gather predictions across ranks (Bag(id=...))")
    seen: set[str] = set()
    ids: list[str] = []
    rows: list[Tensor] = []
    labels: list[Tensor] = []
    attention: list[Tensor] | None = [] if all(p.attention is not None for p in parts) else None
    entries = [(k, j) for k, part in enumerate(parts) for j in range(len(part.ids))]
    if positions is not None:
        entries.sort(key=lambda e: positions[e[0]][e[1]])  # stable: ties keep rank order
    for k, j in entries:
        part = parts[k]
        bag_id = part.ids[j]
        if bag_id in seen:
            continue
        seen.add(bag_id)
        ids.append(bag_id)
        rows.append(part.probabilities[j])
        labels.append(part.labels[j])
        if attention is not None and part.attention is not None:
            attention.append(part.attention[j])
    dropped = sum(len(p.ids) for p in parts) - len(ids)
    if dropped:
        logger.debug("dropped %d duplicate bags padded in by the DistributedSampler", dropped)
    return Predictions(
        ids,
        torch.stack(rows) if rows else torch.zeros(0, 0),
        torch.stack(labels) if labels else torch.zeros(0, dtype=torch.long),
        attention,
    )


def write_history_csv(history: Sequence[Mapping[str, float]], path: str | os.PathLike[str]) -> None:
    """Write epoch logs as CSV, atomically; columns in first-seen order.

    Parameters
    ----------
    history : sequence of mapping
        One row per epoch (``epoch, lr, train_loss, val_*``...); a key missing
        from a row is written as an empty cell.
    path : path-like
        Destination (parent folders are created).

    Examples
    --------
    >>> import tempfile
    >>> rows = [{"epoch": 1, "lr": 0.1, "train_loss": 0.5}, {"epoch": 2, "lr": 0.1, "val_auc": 0.75}]
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     write_history_csv(rows, f"{tmp}/metrics.csv")
    ...     print(open(f"{tmp}/metrics.csv").read().strip())
    epoch,lr,train_loss,val_auc
    1,0.1,0.5,
    2,0.1,,0.75
    """
    write_dict_csv(history, path)
