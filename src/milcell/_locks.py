"""Exclusive, inter-process locks on folders milcell writes into.

Two processes writing one run folder, checkpoint folder or feature cache would
otherwise interleave their files and both exit 0. :func:`folder_lock` takes an
advisory ``flock`` on a lock file inside the folder, without waiting: a second
process gets a :class:`~milcell.exceptions.LockError` naming the folder and the
holder (process id, host and start time, which the holder writes into the lock
file).

The operating system releases a ``flock`` when its process dies, so a lock file
left behind by a killed process does not block anyone: the next
:func:`folder_lock` takes it over. Within one process the lock is re-entrant
(the trainer locks its checkpoint folder inside a run folder that
``cross_validate`` or the command line already holds).

Examples
--------
>>> import tempfile
>>> from milcell._locks import folder_lock, lock_holder
>>> with tempfile.TemporaryDirectory() as folder:
...     with folder_lock(folder, what="run folder"):
...         with folder_lock(folder):  # re-entrant in one process
...             held = lock_holder(folder) is not None
...     held, lock_holder(folder)
(True, None)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from milcell.exceptions import LockError

__all__ = ["LOCK_NAME", "folder_lock", "lock_holder"]

logger = logging.getLogger("milcell")

LOCK_NAME = ".milcell.lock"
"""Name of the lock file :func:`folder_lock` keeps inside a locked folder."""

try:  # pragma: no cover - platform dependent
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]

_registry_guard = threading.RLock()
# realpath of the folder -> [file descriptor of the lock file, nesting depth, owning pid]
_held: dict[str, list[int]] = {}


def _key(folder: Path) -> str:
    return os.path.realpath(folder)


def _holder_text(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process (its details are not written yet)"
    return (
        f"process {info.get('pid', '?')} on host {info.get('host', '?')} "
        f"(started {info.get('started', '?')}, holding it as the {info.get('what', 'folder')})"
    )


def _read_info(lock_file: Path) -> dict[str, Any] | None:
    try:
        text = lock_file.read_text(encoding="utf-8")
        info = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def lock_holder(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Who holds the lock on folder ``path``, or ``None`` when nobody does.

    Parameters
    ----------
    path : str or os.PathLike
        The folder.

    Returns
    -------
    dict or None
        ``{"pid", "host", "started", "what"}`` as the holder wrote them (an
        empty dict when the holder has not written them yet), or ``None`` when
        the folder is not locked (a lock file left by a dead process counts as
        not locked).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     with folder_lock(folder, what="feature cache"):
    ...         lock_holder(folder)["what"]
    'feature cache'
    """
    folder = Path(path)
    lock_file = folder / LOCK_NAME
    with _registry_guard:
        entry = _held.get(_key(folder))
        if entry is not None and entry[2] == os.getpid():
            return _read_info(lock_file) or {}
    if _fcntl is None or not lock_file.exists():  # pragma: no cover - Windows
        return None
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            _fcntl.flock(fd, _fcntl.LOCK_SH | _fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(lock_file) or {}
        _fcntl.flock(fd, _fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _acquire(folder: Path, what: str) -> int:
    """Open and lock ``folder/LOCK_NAME``; return its descriptor or raise LockError."""
    assert _fcntl is not None
    lock_file = folder / LOCK_NAME
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = _read_info(lock_file)
            raise LockError(
                f"the {what} {folder} is in use by {_holder_text(info)}; wait for it to finish "
                f"or use another folder (lock file {lock_file})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder unlinks the lock file on release; if it did so between our open()
        # and flock(), we locked an orphaned inode: start again on the current file.
        try:
            same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "what": what,
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
    return fd


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike[str], *, what: str = "folder") -> Iterator[None]:
    """Hold an exclusive inter-process lock on folder ``path`` for the ``with`` block.

    The folder is created if needed. The lock does not wait: when another
    process holds it, :class:`~milcell.exceptions.LockError` is raised at once.
    Nested use on the same folder within one process is allowed (re-entrant).
    A lock file left by a process that died does not block (the operating
    system released its lock); the lock file is removed on release.

    Parameters
    ----------
    path : str or os.PathLike
        The folder to lock.
    what : str, default "folder"
        What the folder is ("run folder", "checkpoint folder", "feature
        cache"), for the error message and the lock file.

    Yields
    ------
    None

    Raises
    ------
    milcell.exceptions.LockError
        Another process holds the lock; the one-line message names the folder
        and the holder's process id, host and start time.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     with folder_lock(folder, what="run folder"):
    ...         pass
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    key = _key(folder)
    pid = os.getpid()
    with _registry_guard:
        entry = _held.get(key)
        if entry is not None and entry[2] != pid:
            # Inherited through fork: the lock belongs to the parent, not to us.
            del _held[key]
            entry = None
        if entry is not None:
            entry[1] += 1
        elif _fcntl is None:  # pragma: no cover - Windows
            logger.warning("no inter-process lock on %s: fcntl is not available on this platform", folder)
            _held[key] = [-1, 1, pid]
        else:
            _held[key] = [_acquire(folder, what), 1, pid]
            logger.debug("locked the %s %s", what, folder)
    try:
        yield
    finally:
        with _registry_guard:
            entry = _held.get(key)
            if entry is not None and entry[2] == pid:
                entry[1] -= 1
                if entry[1] == 0:
                    del _held[key]
                    fd = entry[0]
                    if fd >= 0:
                        # Unlink while still holding the lock, then release it by closing.
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(folder / LOCK_NAME)
                        os.close(fd)
                    logger.debug("unlocked the %s %s", what, folder)
