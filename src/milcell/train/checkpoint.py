"""Safe, atomic training checkpoints.

A checkpoint is a directory of three files:

``model.safetensors``
    The model weights (``state_dict``, buffers included), loadable without
    torch's pickle at all.
``checkpoint.json``
    A small human-readable record: the model's ``config`` (when the model has
    a ``config`` attribute), the epoch, the monitored metric and its value.
``training_state.pt``
    Everything needed to resume: optimizer, scheduler and gradient-scaler
    states, the epoch, the trainer's bookkeeping and the random states
    (torch, CUDA, NumPy, Python, DataLoader generators). It only holds
    tensors and plain containers and is read with
    ``torch.load(..., weights_only=True)``, so a malicious file cannot run code.

Every file is written to a temporary name, and all three are renamed into
place only once all are written, so a crash while writing leaves the previous
checkpoint whole. Files of one checkpoint carry the same
epoch, checked on load.

Examples
--------
>>> import tempfile, torch
>>> from milcell.train.checkpoint import load_checkpoint, save_checkpoint
>>> model = torch.nn.Linear(3, 2)
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = save_checkpoint(f"{tmp}/last", model, epoch=4, monitor="val_auc", monitor_value=0.9)
...     ckpt = load_checkpoint(path, torch.nn.Linear(3, 2))
>>> ckpt.epoch, ckpt.meta["monitor_value"]
(4, 0.9)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from milcell._utils import atomic_path, json_safe
from milcell.exceptions import CheckpointError

__all__ = [
    "Checkpoint",
    "capture_rng_state",
    "load_checkpoint",
    "load_weights",
    "restore_rng_state",
    "save_checkpoint",
]

logger = logging.getLogger("milcell")

WEIGHTS_NAME = "model.safetensors"
META_NAME = "checkpoint.json"
STATE_NAME = "training_state.pt"
FORMAT_VERSION = 1


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel / compiled wrapper."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------- RNG


def capture_rng_state(generators: Iterable[torch.Generator] = ()) -> dict[str, Any]:
    """Snapshot every global random state, plus the given ``torch.Generator`` s.

    The result holds only tensors, ints and plain containers, so it can be
    saved with :func:`torch.save` and read back with ``weights_only=True``.

    Examples
    --------
    >>> state = capture_rng_state()
    >>> a = torch.rand(1)
    >>> restore_rng_state(state)
    >>> torch.equal(a, torch.rand(1))
    True
    """
    np_state = np.random.get_state(legacy=True)  # noqa: NPY002 - the global generator is what is captured
    assert isinstance(np_state, tuple)  # legacy=True: (name, keys, pos, has_gauss, cached_gaussian)
    return {
        "python": random.getstate(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def _to_tuple(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_to_tuple(x) for x in obj)
    return obj


def restore_rng_state(state: Mapping[str, Any], generators: Iterable[torch.Generator] = ()) -> None:
    """Restore a snapshot taken by :func:`capture_rng_state`.

    Parameters
    ----------
    state : mapping
        The snapshot.
    generators : iterable of torch.Generator
        The generators to restore, in the order they were captured.

    Raises
    ------
    CheckpointError
        If the snapshot does not hold as many generator states as given.
    """
    random.setstate(_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    generators = list(generators)
    saved = state.get("generators") or []
    if len(saved) != len(generators):
        raise CheckpointError(
            f"the checkpoint holds {len(saved)} DataLoader generator states but {len(generators)} "
            "generators were given"
        )
    for gen, gen_state in zip(generators, saved, strict=True):
        gen.set_state(gen_state)


# --------------------------------------------------------------------------- save


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    monitor: str | None = None,
    monitor_value: float | None = None,
    trainer_state: Mapping[str, Any] | None = None,
    rng_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory (weights, JSON record, training state), atomically per file.

    Parameters
    ----------
    path : path-like
        Checkpoint directory, created if needed (e.g. ``out/checkpoints/last``).
    model : torch.nn.Module
        Its ``state_dict`` goes to ``model.safetensors`` (a DDP wrapper is
        unwrapped); its ``config`` attribute, when present, to the JSON.
    epoch : int
        Number of completed epochs.
    optimizer, scheduler, scaler : optional
        Objects with ``state_dict()``; their states go to ``training_state.pt``.
    monitor : str, optional
        Name of the monitored metric, recorded in the JSON.
    monitor_value : float, optional
        Its value at this epoch.
    trainer_state : mapping, optional
        Extra bookkeeping made of tensors, numbers, strings and containers.
    rng_state : mapping, optional
        A :func:`capture_rng_state` snapshot (default: taken now, without
        DataLoader generators).

    Returns
    -------
    pathlib.Path
        The checkpoint directory.

    Raises
    ------
    CheckpointError
        If a file cannot be written.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = save_checkpoint(f"{tmp}/ckpt", torch.nn.Linear(2, 1), epoch=1)
    ...     sorted(f.name for f in p.iterdir())
    ['checkpoint.json', 'model.safetensors', 'training_state.pt']
    """
    directory = Path(path)
    module = _unwrap(model)
    config = getattr(module, "config", None)
    meta = {
        "format_version": FORMAT_VERSION,
        "epoch": int(epoch),
        "monitor": monitor,
        "monitor_value": None if monitor_value is None else json_safe(float(monitor_value)),
        "model_class": type(module).__qualname__,
        "model_config": json_safe(dict(config)) if isinstance(config, Mapping) else None,
    }
    state = {
        "format_version": FORMAT_VERSION,
        "epoch": int(epoch),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": dict(rng_state) if rng_state is not None else capture_rng_state(),
        "trainer": dict(trainer_state or {}),
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name in (STATE_NAME, WEIGHTS_NAME, META_NAME):  # temporary files left by a killed writer
            for stale in directory.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
        # All three files are written and synced under temporary names before any is renamed
        # into place, so a crash while writing leaves the previous checkpoint whole. The
        # renames run in reverse order of entry: state, weights, then the JSON, whose epoch
        # is what a reader checks the others against.
        with contextlib.ExitStack() as stack:
            tmp_meta = stack.enter_context(atomic_path(directory / META_NAME))
            tmp_weights = stack.enter_context(atomic_path(directory / WEIGHTS_NAME))
            tmp_state = stack.enter_context(atomic_path(directory / STATE_NAME))
            torch.save(state, tmp_state)
            safetensors.torch.save_model(
                module, str(tmp_weights), metadata={"epoch": str(int(epoch))}, force_contiguous=True
            )
            tmp_meta.write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n", encoding="utf-8")
            for tmp in (tmp_state, tmp_weights, tmp_meta):
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
    except (OSError, RuntimeError, pickle.PicklingError) as exc:
        raise CheckpointError(f"could not write checkpoint {directory}: {exc}") from exc
    logger.debug("saved checkpoint %s (epoch %d)", directory, epoch)
    return directory


# --------------------------------------------------------------------------- load


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read.

    Attributes
    ----------
    path : pathlib.Path
        The checkpoint directory.
    meta : dict
        The JSON record (``epoch``, ``monitor``, ``monitor_value``,
        ``model_config``, ...).
    state : dict
        The training state (``optimizer``, ``scheduler``, ``scaler``,
        ``rng``, ``trainer``), empty when it was not loaded.
    """

    path: Path
    meta: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        """Number of completed epochs when the checkpoint was written."""
        return int(self.meta["epoch"])


def _read_meta(directory: Path) -> dict[str, Any]:
    meta_path = directory / META_NAME
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {META_NAME} (not a milcell checkpoint?)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint record {meta_path} is unreadable or corrupt: {exc}") from exc
    if not isinstance(meta, dict) or "epoch" not in meta:
        raise CheckpointError(f"checkpoint record {meta_path} lacks the 'epoch' field")
    return meta


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    return path


def load_weights(path: str | os.PathLike[str], model: nn.Module, strict: bool = True) -> nn.Module:
    """Load safetensors weights into ``model`` (no pickle involved).

    Parameters
    ----------
    path : path-like
        A checkpoint directory or a ``.safetensors`` file.
    model : torch.nn.Module
        Receives the weights in place (a DDP wrapper is unwrapped).
    strict : bool, default True
        Require the keys to match exactly.

    Returns
    -------
    torch.nn.Module
        ``model``.

    Raises
    ------
    CheckpointError
        If the file is missing, truncated or corrupt, or the keys or shapes
        do not match the model; the message names the file.

    Examples
    --------
    >>> import tempfile
    >>> src, dst = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = load_weights(save_checkpoint(tmp, src, epoch=0), dst)
    >>> torch.equal(src.weight, dst.weight)
    True
    """
    file = _weights_file(Path(path))
    module = _unwrap(model)
    try:
        missing, unexpected = safetensors.torch.load_model(module, str(file), strict=strict)
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"weights file {file} is truncated or corrupt: {exc}") from exc
    except RuntimeError as exc:
        raise CheckpointError(f"weights file {file} does not fit {type(module).__name__}: {exc}") from exc
    if missing or unexpected:
        logger.warning("loaded %s with missing keys %s and unexpected keys %s", file, missing, unexpected)
    return model


def _read_state(file: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"training state {file} does not exist")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message advises weights_only=False: never pass that on; keep the one useful line.
        reason = next((ln.strip() for ln in str(exc).splitlines() if "global" in ln.lower()), None)
        if reason is None:
            raise CheckpointError(
                f"training state {file} is truncated or corrupt (unreadable pickle)"
            ) from exc
        raise CheckpointError(
            f"training state {file} was refused: it contains objects that are not plain tensors or "
            f"containers (possibly malicious); nothing was executed ({reason[:200]})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(f"training state {file} is truncated or corrupt: {exc}") from exc
    if not isinstance(state, dict) or "epoch" not in state:
        raise CheckpointError(f"training state {file} is not a milcell training state")
    return state


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: torch.amp.GradScaler | None = None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    load_state: bool = True,
) -> Checkpoint:
    """Read a checkpoint directory and load what it holds into the given objects.

    Random states are *not* restored here (see :func:`restore_rng_state`
    with ``checkpoint.state["rng"]``): the trainer does it when resuming.

    Parameters
    ----------
    path : path-like
        The directory written by :func:`save_checkpoint`.
    model : torch.nn.Module, optional
        Receives the weights.
    optimizer, scheduler, scaler : optional
        Receive their saved states (when both sides have one).
    map_location : str or torch.device, default "cpu"
        Where tensors of the training state are loaded.
    strict : bool, default True
        Require weight keys to match exactly.
    load_state : bool, default True
        Read ``training_state.pt``; ``False`` reads only the weights and the JSON.

    Returns
    -------
    Checkpoint

    Raises
    ------
    CheckpointError
        If the directory or a file is missing, truncated, corrupt, unsafe
        (a pickle that would run code) or inconsistent; the message names it.

    Examples
    --------
    >>> import tempfile
    >>> model = torch.nn.Linear(2, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = save_checkpoint(tmp, model, epoch=3, optimizer=opt)
    ...     ckpt = load_checkpoint(tmp, model, optimizer=opt)
    >>> ckpt.epoch, sorted(ckpt.state)
    (3, ['epoch', 'format_version', 'optimizer', 'rng', 'scaler', 'scheduler', 'trainer'])
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    meta = _read_meta(directory)
    if model is not None:
        load_weights(directory, model, strict=strict)
    state: dict[str, Any] = {}
    if load_state:
        state = _read_state(directory / STATE_NAME, map_location)
        if int(state["epoch"]) != int(meta["epoch"]):
            raise CheckpointError(
                f"checkpoint {directory} is inconsistent: {META_NAME} says epoch {meta['epoch']} but "
                f"{STATE_NAME} says epoch {state['epoch']} (interrupted while writing?)"
            )
        for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if obj is None:
                continue
            saved = state.get(name)
            if saved is None:
                logger.warning("checkpoint %s holds no %s state; keeping the fresh one", directory, name)
                continue
            try:
                obj.load_state_dict(saved)
            except (ValueError, KeyError, RuntimeError, TypeError) as exc:
                raise CheckpointError(
                    f"checkpoint {directory}: the saved {name} state does not fit the given {name}: {exc}"
                ) from exc
    return Checkpoint(path=directory, meta=meta, state=state)
