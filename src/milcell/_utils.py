"""Small internal helpers shared across milcell (not public API)."""

from __future__ import annotations

import csv
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("milcell")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    A crash while writing leaves any previous file at ``path`` untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp (and some writers, e.g. safetensors, that recreate the file) leave it 0600;
        # give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def json_safe(obj: Any) -> Any:
    """A JSON-serialisable copy of ``obj``, for records read back by milcell or by people.

    Mappings get ``str`` keys (order kept), tuples become lists, numpy scalars
    plain numbers, non-finite floats the strings ``"nan"``, ``"inf"``,
    ``"-inf"`` (``float()`` reads them back; strict JSON has no NaN), and any
    other object its ``repr``.

    Examples
    --------
    >>> import math, numpy as np
    >>> json_safe({"auc": math.nan, 1: (np.int64(2), np.float32(0.5)), "f": print})
    {'auc': 'nan', '1': [2, 0.5], 'f': '<built-in function print>'}
    """
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (str, int)) or obj is None:  # bool is an int
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return json_safe(obj.item())
    return repr(obj)


def write_dict_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write dict rows as CSV, atomically; columns in first-seen order, missing keys as empty cells.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     write_dict_csv([{"a": 1}, {"b": 2.5, "a": 3}], f"{tmp}/rows.csv")
    ...     print(open(f"{tmp}/rows.csv").read().strip())
    a,b
    1,
    3,2.5
    """
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
