"""Safe, atomic, verified training checkpoints.

A checkpoint is a directory holding one *record*, ``checkpoint.json``, and the
files of the version it names::

    last/
      checkpoint.json            the record, and the commit point
      v000004-k2j8x1ab/          the version it names
        model.safetensors
        training_state.pt
        checkpoint.json          a copy of the record

``model.safetensors``
    The model weights (``state_dict``, buffers included), loadable without
    torch's pickle at all.
``checkpoint.json``
    A small human-readable record: the model's ``config`` (when the model has
    a ``config`` attribute), the epoch, the monitored metric and its value,
    the version folder and the SHA-256 digest and size of each file.
``training_state.pt``
    Everything needed to resume: optimizer, scheduler and gradient-scaler
    states, the epoch, the trainer's bookkeeping and the random states
    (torch, CUDA, NumPy, Python, DataLoader generators). It only holds
    tensors and plain containers and is read with
    ``torch.load(..., weights_only=True)``, so a malicious file cannot run code.

Saving writes and syncs a new version folder, then replaces the record in one
atomic rename (the single commit point), then removes the previous version. A
crash at any point leaves a record naming a complete version: the previous
one until the rename, the new one after it. Loading verifies each file against
the digest in the record before reading it (torch's zip reader does not check
its CRCs), so a flipped byte is a :class:`~milcell.exceptions.CheckpointError`
naming the file. Checkpoints written by milcell before versions and digests
(the three files side by side) still load, logged as unverified.

While saving, the directory is locked (:func:`milcell._locks.folder_lock`):
a second process saving into it gets a :class:`~milcell.exceptions.LockError`
instead of removing the first one's files.

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

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
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

from milcell._locks import folder_lock
from milcell._utils import atomic_path, json_safe
from milcell.exceptions import CheckpointError

__all__ = [
    "Checkpoint",
    "capture_rng_state",
    "checkpoint_file",
    "file_sha256",
    "load_checkpoint",
    "load_weights",
    "restore_rng_state",
    "save_checkpoint",
]

logger = logging.getLogger("milcell")

WEIGHTS_NAME = "model.safetensors"
META_NAME = "checkpoint.json"
STATE_NAME = "training_state.pt"
FORMAT_VERSION = 2
_VERSION_RE = re.compile(r"^v\d{6,}-[A-Za-z0-9_]+$")
_CHUNK = 1 << 20


def _reached(step: str, directory: Path) -> None:
    """Called after each step of a checkpoint publish; a no-op (the fault tests replace it)."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a file, read in 1 MiB blocks.

    Parameters
    ----------
    path : path-like
        The file.

    Returns
    -------
    str
        64 hexadecimal characters.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as fh:
    ...     _ = fh.write(b"abc"); fh.flush()
    ...     file_sha256(fh.name)[:16]
    'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


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
    """Write a checkpoint directory (weights, JSON record, training state) with one commit point.

    The files go to a new version folder inside ``path``; the record
    ``checkpoint.json``, with each file's SHA-256 digest, is then replaced in
    one atomic rename, and the previous version is removed. A crash at any
    point leaves the previous checkpoint or the new one, whole.

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
    milcell.exceptions.LockError
        If another process is saving into ``path``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = save_checkpoint(f"{tmp}/ckpt", torch.nn.Linear(2, 1), epoch=1)
    ...     [f.name for f in sorted(p.iterdir())], checkpoint_file(p).parent.name[:8]
    (['checkpoint.json', 'v000001-...'], 'v000001-')
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
        with folder_lock(directory, what="checkpoint folder"):
            _publish(directory, module, int(epoch), meta, state)
    except (OSError, RuntimeError, pickle.PicklingError) as exc:
        raise CheckpointError(f"could not write checkpoint {directory}: {exc}") from exc
    logger.debug("saved checkpoint %s (epoch %d)", directory, epoch)
    return directory


def _publish(
    directory: Path, module: nn.Module, epoch: int, meta: dict[str, Any], state: dict[str, Any]
) -> None:
    """Write a new version folder, commit it by replacing the record, remove older versions.

    Runs under the directory's lock, so every other version folder or temporary file is
    garbage of a dead writer (or the previous version, once the new one is committed).
    """
    version = Path(tempfile.mkdtemp(prefix=f"v{epoch:06d}-", dir=directory))
    try:
        _reached("version folder created", directory)
        torch.save(state, version / STATE_NAME)
        _fsync_file(version / STATE_NAME)
        _reached("state written", directory)
        safetensors.torch.save_model(
            module, str(version / WEIGHTS_NAME), metadata={"epoch": str(epoch)}, force_contiguous=True
        )
        _fsync_file(version / WEIGHTS_NAME)
        _reached("weights written", directory)
        record = {
            **meta,
            "version": version.name,
            "files": {
                name: {"sha256": file_sha256(version / name), "size": (version / name).stat().st_size}
                for name in (WEIGHTS_NAME, STATE_NAME)
            },
        }
        text = json.dumps(record, indent=2, allow_nan=False) + "\n"
        (version / META_NAME).write_text(text, encoding="utf-8")
        _fsync_file(version / META_NAME)
        os.chmod(version, 0o777 & ~_umask())
        _fsync_dir(version)
        _reached("version written", directory)
        with atomic_path(directory / META_NAME) as tmp:  # the commit point: one os.replace
            tmp.write_text(text, encoding="utf-8")
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)  # not committed: the previous version stays
        raise
    _fsync_dir(directory)
    _reached("committed", directory)
    for entry in directory.iterdir():
        stale_version = _VERSION_RE.match(entry.name) and entry.is_dir() and entry.name != version.name
        stale_tmp = entry.name.startswith(f".{META_NAME}.") and entry.name.endswith(".tmp")
        # Files of a checkpoint written before versions (the three files side by side).
        legacy = entry.name in (WEIGHTS_NAME, STATE_NAME) and entry.is_file()
        if stale_version:
            shutil.rmtree(entry, ignore_errors=True)
        elif stale_tmp or legacy:
            entry.unlink(missing_ok=True)
    _reached("cleaned", directory)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    epoch = meta["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise CheckpointError(
            f"checkpoint record {meta_path}: key 'epoch' must be a non-negative integer, got {epoch!r}"
        )
    return meta


def _recorded(meta: Mapping[str, Any], name: str) -> str | None:
    """The SHA-256 the record holds for file ``name``, or None (a checkpoint without digests)."""
    files = meta.get("files")
    entry = files.get(name) if isinstance(files, Mapping) else None
    digest = entry.get("sha256") if isinstance(entry, Mapping) else None
    return digest if isinstance(digest, str) else None


def _files_folder(directory: Path, meta: Mapping[str, Any]) -> Path:
    """Where the files of the checkpoint recorded by ``meta`` lie: its version folder, or ``directory``."""
    version = meta.get("version")
    if version is None:
        return directory
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise CheckpointError(
            f"checkpoint record {directory / META_NAME} names an invalid version {version!r}"
        )
    return directory / version


def _verify(file: Path, meta: Mapping[str, Any], record: Path) -> None:
    """Check ``file`` against its digest in ``meta`` (read from ``record``); log when there is none."""
    if not file.is_file():
        raise CheckpointError(f"checkpoint file {file} does not exist (named by {record})")
    expected = _recorded(meta, file.name)
    if expected is None:
        logger.info(
            "checkpoint file %s has no recorded digest (written by an older milcell); unverified", file
        )
        return
    try:
        actual = file_sha256(file)
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {file} is unreadable: {exc}") from exc
    if actual != expected:
        raise CheckpointError(
            f"checkpoint file {file} is truncated or corrupt: its SHA-256 {actual[:12]}... differs from the "
            f"{expected[:12]}... recorded in {record} (modified or damaged on disk)"
        )


def checkpoint_file(path: str | os.PathLike[str], name: str = WEIGHTS_NAME) -> Path:
    """The path of file ``name`` of the checkpoint in directory ``path`` (not verified).

    Parameters
    ----------
    path : path-like
        A checkpoint directory written by :func:`save_checkpoint`.
    name : {"model.safetensors", "training_state.pt", "checkpoint.json"}
        Which file. ``checkpoint.json`` is the record at the top of the directory.

    Returns
    -------
    pathlib.Path
        Inside the version folder the record names (``path`` itself for a
        checkpoint written before versions).

    Raises
    ------
    CheckpointError
        If ``path`` holds no readable record.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     f = checkpoint_file(save_checkpoint(tmp, torch.nn.Linear(2, 1), epoch=3), "training_state.pt")
    ...     f.parent.name[:8], f.name, f.is_file()
    ('v000003-', 'training_state.pt', True)
    """
    directory = Path(path)
    if name == META_NAME:
        return directory / META_NAME
    return _files_folder(directory, _read_meta(directory)) / name


def _weights_file(path: Path) -> tuple[Path, Mapping[str, Any] | None, Path | None]:
    """The weights file for ``path`` (a checkpoint directory or a file) and its record, if any."""
    if path.is_dir():
        meta = _read_meta(path)
        return _files_folder(path, meta) / WEIGHTS_NAME, meta, path / META_NAME
    record = path.parent / META_NAME
    if not path.exists() and path.name == WEIGHTS_NAME and record.is_file():
        # ``last/model.safetensors`` of a versioned checkpoint: follow the record.
        meta = _read_meta(path.parent)
        return _files_folder(path.parent, meta) / WEIGHTS_NAME, meta, record
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if record.is_file():  # a file inside a checkpoint (or version) folder: check it against the record
        try:
            found: Any = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            found = None
        if isinstance(found, dict) and _recorded(found, path.name) is not None:
            return path, found, record
    return path, None, None


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
        If the file is missing, truncated or corrupt (including a digest that
        differs from the one recorded in the checkpoint), or the keys or
        shapes do not match the model; the message names the file.

    Examples
    --------
    >>> import tempfile
    >>> src, dst = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = load_weights(save_checkpoint(tmp, src, epoch=0), dst)
    >>> torch.equal(src.weight, dst.weight)
    True
    """
    file, meta, record = _weights_file(Path(path))
    if meta is not None and record is not None:
        _verify(file, meta, record)
    elif not file.is_file():
        raise CheckpointError(f"weights file {file} does not exist")
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
    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise CheckpointError(
            f"training state {file}: key 'epoch' must be a non-negative integer, got {epoch!r}"
        )
    if not isinstance(state.get("rng"), dict):
        raise CheckpointError(
            f"training state {file}: key 'rng' (the random states a resume restores) is missing or not a "
            "mapping; the run cannot be resumed exactly"
        )
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
        If the directory or a file is missing, truncated, corrupt (its
        SHA-256 differs from the recorded one), unsafe (a pickle that would
        run code) or inconsistent; the message names it.

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
    folder = _files_folder(directory, meta)
    if model is not None:
        load_weights(directory, model, strict=strict)
    state: dict[str, Any] = {}
    if load_state:
        _verify(folder / STATE_NAME, meta, directory / META_NAME)
        state = _read_state(folder / STATE_NAME, map_location)
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
