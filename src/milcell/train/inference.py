"""Inference: run a model over bags, the autocast precisions, logits to probabilities.

Every place milcell runs a model over a loader of bags (:meth:`Trainer.predict
<milcell.train.trainer.Trainer.predict>` and :meth:`~milcell.train.trainer.Trainer.evaluate`,
:func:`~milcell.train.ensemble.predict_ensemble`, the ``milcell evaluate`` /
``predict`` commands) goes through :func:`predict`; every mixed-precision
context comes from :func:`autocast`, and every logits-to-probabilities
conversion from :func:`probabilities`.

Precisions
----------
``"32"``
    float32, no autocast.
``"bf16"``
    :func:`torch.autocast` with ``torch.bfloat16`` on the device type. A CUDA
    device without bfloat16 support (before Ampere) falls back to float32
    with a warning on the ``"milcell"`` logger.
``"fp16"``
    :func:`torch.autocast` with ``torch.float16`` (on the CPU too, which
    recent torch supports). Training in fp16 also needs a gradient scaler,
    which the :class:`~milcell.train.trainer.Trainer` adds.

Examples
--------
>>> import torch
>>> from milcell.data import Bag
>>> from milcell.nn.model import create_mil_model
>>> from milcell.train.distributed import make_loader
>>> model = create_mil_model(None, pooling="attention", in_dim=4)
>>> bags = [Bag(torch.randn(2 + i, 4), label=i % 2, id=f"P{i}") for i in range(3)]
>>> preds = predict(model, make_loader(bags, 2, shuffle=False), precision="bf16")
>>> preds.ids, preds.probabilities.shape, [len(a) for a in preds.attention]
(['P0', 'P1', 'P2'], torch.Size([3, 2]), [2, 3, 4])
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from milcell._validation import check_choice
from milcell.data.bag import BagBatch
from milcell.exceptions import ConfigError, DataError, MilcellError, ShapeError, TrainingError

__all__ = ["PRECISIONS", "Predictions", "autocast", "predict", "probabilities"]

logger = logging.getLogger("milcell")

PRECISIONS: tuple[str, ...] = ("32", "bf16", "fp16")
"""The precision names accepted by :func:`autocast`, the trainer, ensembles and the CLI."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Predictions(NamedTuple):
    """Per-bag predictions returned by :func:`predict` and :meth:`Trainer.predict` (a named tuple).

    - ``ids``: list of ``n`` bag identifiers;
    - ``probabilities``: ``(n, C)`` float32 class probabilities on the CPU;
    - ``labels``: ``(n,)`` long labels (``-1`` = unlabelled);
    - ``attention``: one ``(N_i,)`` tensor per bag holding the weights of its
      real instances, or None when the model returns no attention.

    Examples
    --------
    >>> import torch
    >>> p = Predictions(["P1"], torch.tensor([[0.3, 0.7]]), torch.tensor([1]), None)
    >>> ids, probs, labels, attention = p
    >>> ids, probs.argmax(1).tolist(), attention
    (['P1'], [1], None)
    """

    ids: list[str]
    probabilities: Tensor
    labels: Tensor
    attention: list[Tensor] | None


def _check_precision(precision: Any, name: str = "precision", choices: tuple[str, ...] = PRECISIONS) -> str:
    """Return ``str(precision)`` if it is one of ``choices``; else raise :class:`ConfigError`.

    ``precision=32`` (an int, as YAML writes it) is accepted as ``"32"``.

    Examples
    --------
    >>> _check_precision(32)
    '32'
    >>> _check_precision("16")
    Traceback (most recent call last):
    ...
    milcell.exceptions.ConfigError: precision must be one of '32', 'bf16', 'fp16', got '16'
    """
    return check_choice(str(precision), name, choices)


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The mixed-precision context of ``precision`` on ``device``.

    Parameters
    ----------
    device : torch.device or str
        Where the computation runs; autocast is set up for its type (``"cpu"``, ``"cuda"``...).
    precision : {"32", "bf16", "fp16"}
        ``"32"`` gives a :func:`contextlib.nullcontext`; the others a
        :func:`torch.autocast` with ``torch.bfloat16`` / ``torch.float16``.
        ``"bf16"`` on a CUDA device without bfloat16 support falls back to
        float32 (a null context) with a logged warning.

    Returns
    -------
    contextlib.AbstractContextManager

    Raises
    ------
    ConfigError
        An unknown ``precision``, or a device type without autocast support.

    Examples
    --------
    >>> import torch
    >>> with autocast("cpu", "bf16"):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.bfloat16
    >>> with autocast(torch.device("cpu"), "32"):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
    >>> autocast("cpu", "fp8")
    Traceback (most recent call last):
    ...
    milcell.exceptions.ConfigError: precision must be one of '32', 'bf16', 'fp16', got 'fp8'
    """
    precision = _check_precision(precision)
    dev = torch.device(device)
    if precision == "32":
        return contextlib.nullcontext()
    if not torch.amp.is_autocast_available(dev.type):
        raise ConfigError(f"precision={precision!r} needs autocast, which device {dev} does not support")
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning("bf16 is not supported on %s; running in float32", dev)
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=_DTYPES[precision])


def probabilities(logits: Tensor) -> Tensor:
    """Class probabilities ``(B, C)`` float32 from model logits.

    Parameters
    ----------
    logits : Tensor
        ``(B, C)`` class logits with ``C >= 2`` (softmax), or ``(B, 1)``: one
        sigmoid logit of class 1, expanded to the two columns ``(1 - p, p)``.

    Returns
    -------
    Tensor
        ``(B, C)`` (``(B, 2)`` for one logit) float32, rows summing to 1, on the logits' device.

    Raises
    ------
    ShapeError
        Logits that are not ``(B, C)`` with ``C >= 1``.

    Examples
    --------
    >>> import math, torch
    >>> probabilities(torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]]))
    tensor([[0.5000, 0.5000],
            [0.2500, 0.7500]])
    >>> probabilities(torch.tensor([[0.0]]))
    tensor([[0.5000, 0.5000]])
    >>> probabilities(torch.zeros(3))
    Traceback (most recent call last):
    ...
    milcell.exceptions.ShapeError: model logits must have shape (B, C), got (3,)
    """
    if not isinstance(logits, Tensor):
        raise ShapeError(f"model logits must be a Tensor (B, C), got {type(logits).__name__}")
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ShapeError(f"model logits must have shape (B, C), got {tuple(logits.shape)}")
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1.0 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def _model_device(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> BagBatch:
    """Check that ``batch`` is a BagBatch and move it to ``device``."""
    if not isinstance(batch, BagBatch):
        raise DataError(
            f"the loader must yield BagBatch (use collate_fn=collate_bags), got {type(batch).__name__}"
        )
    return batch.to(device, non_blocking=device.type == "cuda")


def _n_targets(batch: BagBatch) -> int:
    """Bags that contribute to the loss: labelled ones, or all with soft labels.

    Counted on the host when the labels are there (the collated batch, before
    it moves to the device), so it costs no host-device sync.
    """
    if batch.soft_labels is not None:
        return len(batch)
    if batch.labels.device.type == "cpu":
        return int(np.count_nonzero(batch.labels.numpy() >= 0))
    return int((batch.labels >= 0).sum().item())


_WORKER_TAG = "in DataLoader worker process"
_KILLED = ("exited unexpectedly", "killed by signal", "is killed", "Connection reset by peer")


def _uses_workers(loader: Any) -> bool:
    return isinstance(loader, DataLoader) and loader.num_workers > 0


def _worker_failure(exc: BaseException) -> MilcellError | None:
    r"""The one-line milcell error for a DataLoader worker failure, or None for any other exception.

    A milcell error raised inside a worker reaches the main process re-raised by
    PyTorch with the worker's traceback in its message: it is raised again with
    the original message only. A worker killed by a signal (the out-of-memory
    killer's SIGKILL) surfaces as a ``RuntimeError`` ("exited unexpectedly",
    "killed by signal") or a ``ConnectionResetError`` from the queue it fed.

    Examples
    --------
    >>> wrapped = DataError(
    ...     "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    ...     '  File "x.py", line 1, in f\nmilcell.exceptions.DataError: cannot read P1/a.png: truncated'
    ... )
    >>> _worker_failure(wrapped)
    DataError('cannot read P1/a.png: truncated')
    >>> print(_worker_failure(RuntimeError("DataLoader worker (pid(s) 12) exited unexpectedly")))
    a data-loading worker was killed (out of memory?): DataLoader worker (pid(s) 12) exited ...
    >>> _worker_failure(KeyError("a bug")) is None
    True
    """
    text = str(exc)
    if isinstance(exc, MilcellError):
        if _WORKER_TAG not in text or "Original Traceback" not in text:
            return None
        cls = type(exc)
        prefix = f"{cls.__module__}.{cls.__qualname__}: "
        at = text.rfind(prefix)
        lines = text.strip().splitlines()
        original = text[at + len(prefix) :].strip() if at >= 0 else (lines[-1] if lines else text)
        try:
            return cls(original)
        except Exception:  # an exception class with another constructor: keep PyTorch's
            return None
    if isinstance(exc, ConnectionError | EOFError) or (
        isinstance(exc, RuntimeError) and "DataLoader worker" in text and any(k in text for k in _KILLED)
    ):
        detail = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return TrainingError(
            f"a data-loading worker was killed (out of memory?): {detail}; lower num_workers, "
            "batch_size or the bag size (max_instances), or set num_workers=0 to see the error "
            "in the main process"
        )
    return None


@contextlib.contextmanager
def _worker_failures(loader: Any, batches: Iterator[Any]) -> Iterator[None]:
    """Turn DataLoader worker failures raised in the block into one-line milcell errors.

    Wrap the whole loop over ``batches`` (the iterator of ``loader``), body
    included: PyTorch reports a killed worker from its SIGCHLD handler, which
    raises wherever the main process happens to be. Only a DataLoader with
    worker processes is concerned (see :func:`_worker_failure`); its workers
    are shut down before the translated error is raised, and the original
    exception is logged at debug level.
    """
    try:
        yield
    except Exception as exc:
        failure = _worker_failure(exc) if _uses_workers(loader) else None
        if failure is None:
            raise
        logger.debug("data-loading worker failure", exc_info=exc)
        shutdown = getattr(batches, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        raise failure from None


def _length(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _nonfinite_bags(ids: list[str], probs: Tensor, what: str) -> None:
    """Raise :class:`DataError` naming the bags whose probabilities are NaN or inf (one check)."""
    if probs.numel() == 0:
        return
    bad = (~torch.isfinite(probs).all(dim=1)).nonzero().flatten().tolist()
    if not bad:
        return
    names = [ids[i] if i < len(ids) else str(i) for i in bad]
    shown = ", ".join(repr(n) for n in names[:10]) + (", ..." if len(names) > 10 else "")
    raise DataError(
        f"{what}: the model's outputs are NaN or inf for {len(bad)} of {len(ids)} bags [{shown}] "
        "(non-finite weights, e.g. after a diverged training, or inputs that overflow in the network)"
    )


def _run_inference(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device,
    precision: str,
    prepare: Callable[[Any], BagBatch] | None = None,
    loss_fn: Callable[[Any, BagBatch], Tensor] | None = None,
    progress: bool = False,
    desc: str = "predicting",
) -> tuple[Predictions, float, float]:
    """The one inference loop (internal; :func:`predict` and the trainer call it).

    The model must already be on ``device``. It runs in eval mode (its mode is
    restored afterwards) under :func:`torch.inference_mode` and :func:`autocast`.

    Returns
    -------
    predictions, loss_sum, count
        With ``loss_fn``, the sum of ``loss * n`` over batches and the number
        ``n`` of bags with a target (labelled, or soft-labelled); else ``0, 0``.
    """
    if prepare is None:
        prepare = functools.partial(_to_device, device=device)
    was_training = model.training
    model.eval()
    ids: list[str] = []
    probs: list[Tensor] = []
    labels: list[Tensor] = []
    attention: list[Tensor] | None = []
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0.0
    batches = iter(loader)
    bar = tqdm(
        batches, total=_length(loader), desc=desc, disable=not progress, leave=False, dynamic_ncols=True
    )
    try:
        with torch.inference_mode(), _worker_failures(loader, batches):
            for raw in bar:
                batch = prepare(raw)
                n = _n_targets(raw if isinstance(raw, BagBatch) else batch)  # host labels: no sync
                with autocast(device, precision):
                    output = model(batch)
                    loss = None if loss_fn is None or n == 0 else loss_fn(output, batch)
                if loss is not None:
                    loss_total += loss.detach().double() * n
                    count += n
                logits = output if isinstance(output, Tensor) else getattr(output, "logits", None)
                if logits is None:
                    raise DataError(
                        f"the model must return logits (B, C) or an output with .logits, got "
                        f"{type(output).__name__}"
                    )
                batch_probs = probabilities(logits)
                if batch_probs.shape[0] != len(batch):
                    raise ShapeError(
                        f"model logits have {batch_probs.shape[0]} rows for a batch of {len(batch)} bags "
                        f"({batch.ids[:3]}...)"
                    )
                ids.extend(batch.ids)
                probs.append(batch_probs.cpu())
                labels.append(batch.labels.cpu())
                att = getattr(output, "attention", None)
                if att is None or attention is None:
                    attention = None
                else:
                    att = att.float().cpu()
                    sizes = batch.sizes  # kept on the host by collate_bags: no device read
                    attention.extend(att[j, : sizes[j]].clone() for j in range(len(sizes)))
    finally:
        bar.close()
        model.train(was_training)
    preds = Predictions(
        ids,
        torch.cat(probs) if probs else torch.zeros(0, 0),
        torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
        attention if probs else None,
    )
    _nonfinite_bags(preds.ids, preds.probabilities, desc)
    return preds, float(loss_total) if count > 0 else 0.0, count


def predict(
    model: nn.Module,
    loader: Iterable[BagBatch],
    *,
    device: torch.device | str | None = None,
    precision: str = "32",
    progress: bool = False,
    desc: str = "predicting",
) -> Predictions:
    """Predict every bag of ``loader`` with ``model``.

    The model runs in eval mode (dropout off; its train/eval mode is restored
    afterwards) under :func:`torch.inference_mode` and :func:`autocast`; each
    batch is moved to ``device``.

    Parameters
    ----------
    model : nn.Module
        Maps a :class:`~milcell.data.BagBatch` to an output with ``logits (B,
        C)`` (``C = 1``: one sigmoid logit) and optionally ``attention (B,
        N_max)``, or to the logits tensor itself; e.g. a
        :class:`~milcell.nn.model.MILModel`.
    loader : iterable of BagBatch
        E.g. ``make_loader(dataset, batch_size, shuffle=False)``.
    device : torch.device or str, optional
        Where the model runs: it is moved there for the call and back
        afterwards. Default: the model's device.
    precision : {"32", "bf16", "fp16"}, default "32"
        See :func:`autocast`.
    progress : bool, default False
        Show a tqdm bar over the batches.
    desc : str, default "predicting"
        The bar's label.

    Returns
    -------
    Predictions
        ``ids``, ``probabilities (n, C)`` float32 on the CPU (see
        :func:`probabilities`), ``labels (n,)``, and ``attention``: one
        ``(N_i,)`` tensor per bag (its real instances only), or None when the
        model returns no attention. An empty loader gives ``n = 0`` and
        probabilities of shape ``(0, 0)``.

    Raises
    ------
    ConfigError
        An unknown ``precision`` or a model that is not an ``nn.Module``.
    DataError
        A loader that does not yield :class:`~milcell.data.BagBatch` (use
        ``collate_fn=collate_bags``), a model output without logits, or
        outputs that are NaN or inf (checked once, at the end; the message
        names the bags). A milcell error raised inside a DataLoader worker
        (e.g. an unreadable image) is raised again with its own one-line
        message, without PyTorch's wrapping.
    ShapeError
        Logits that are not ``(B, C)``.
    TrainingError
        A data-loading worker was killed (by the out-of-memory killer, for instance).

    Examples
    --------
    >>> import torch
    >>> from milcell.data import Bag
    >>> from milcell.nn.model import create_mil_model
    >>> from milcell.train.distributed import make_loader
    >>> model = create_mil_model(None, pooling="mean", in_dim=4).train()
    >>> bags = [Bag(torch.randn(3, 4), label=i % 2, id=f"P{i}") for i in range(5)]
    >>> ids, probs, labels, attention = predict(model, make_loader(bags, 2, shuffle=False))
    >>> ids, probs.shape, labels.tolist(), model.training
    (['P0', 'P1', 'P2', 'P3', 'P4'], torch.Size([5, 2]), [0, 1, 0, 1, 0], True)
    >>> attention[0]  # mean pooling: uniform weights over the bag's 3 instances
    tensor([0.3333, 0.3333, 0.3333])
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"predict: model must be an nn.Module, got {type(model).__name__}")
    precision = _check_precision(precision)
    original = _model_device(model)
    target = original if device is None else torch.device(device)
    moved = target != original
    if moved:
        model.to(target)
    try:
        preds, _, _ = _run_inference(
            model, loader, device=target, precision=precision, progress=progress, desc=desc
        )
    finally:
        if moved:
            model.to(original)
    logger.debug("predict: %d bags on %s (precision %s)", len(preds.ids), target, precision)
    return preds
