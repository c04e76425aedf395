"""Strict CSV reading for the format loaders (internal; the ``csv`` module, no pandas).

:func:`read_table` decodes the file as UTF-8 (a byte-order mark is allowed),
matches the required columns by name (surrounding spaces and case ignored,
extra columns kept), skips blank lines, and raises :class:`DataError` naming
the file (and line) for anything else: an empty file, a missing or duplicated
column, a row with too few or too many fields, NUL bytes, another encoding.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> f = Path(tempfile.mkdtemp()) / "t.csv"
>>> _ = f.write_text("ID, label ,extra\\nP1,1,x\\n\\nP2,0,y\\n")
>>> rows = read_table(f, ["ID", "LABEL"])
>>> [(r.line, r["ID"], r["LABEL"]) for r in rows]
[(2, 'P1', '1'), (4, 'P2', '0')]
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from milcell.exceptions import DataError

__all__ = ["Row", "find_table", "read_table"]


@dataclass(frozen=True)
class Row:
    """One data row: its 1-based line number in the file and its fields by column name."""

    line: int
    fields: dict[str, str]

    def __getitem__(self, column: str) -> str:
        return self.fields[column]


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read CSV file '{path}': {err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"CSV file '{path}' is not valid UTF-8 (byte {err.start}); re-save it as UTF-8"
        ) from None


def _header(path: Path, text: str) -> list[str]:
    try:
        first = next(csv.reader(io.StringIO(text)), None)
    except csv.Error as err:
        raise DataError(f"CSV file '{path}': malformed header: {err}") from None
    return [] if first is None else [h.strip() for h in first]


def read_table(path: Path, required: Sequence[str]) -> list[Row]:
    """Read ``path`` and return its data rows with the ``required`` columns.

    Parameters
    ----------
    path : Path
        The CSV file (comma-separated, UTF-8, one header line).
    required : sequence of str
        Column names that must be present; rows are keyed by these exact names.
        Matching ignores case and surrounding spaces; other columns are ignored.

    Returns
    -------
    list of Row
        Non-blank data rows, each with its line number; values are stripped.

    Raises
    ------
    DataError
        Empty file, undecodable bytes, missing/duplicated column, ragged row,
        NUL byte or other CSV syntax error; the message names the file and line.
    """
    text = _decode(path)
    header = _header(path, text)
    if not any(header):
        raise DataError(f"CSV file '{path}' is empty: expected a header with columns {list(required)}")
    lowered = [h.lower() for h in header]
    position: dict[str, int] = {}
    for name in required:
        hits = [i for i, h in enumerate(lowered) if h == name.lower()]
        if not hits:
            raise DataError(f"CSV file '{path}' has no column {name!r} (columns: {header})")
        if len(hits) > 1:
            raise DataError(f"CSV file '{path}' has column {name!r} {len(hits)} times")
        position[name] = hits[0]
    reader = csv.reader(io.StringIO(text))
    rows: list[Row] = []
    try:
        next(reader)
        for values in reader:
            # A byte-order mark inside the file (files concatenated after saving with one) is not data.
            values = [v.replace("\ufeff", "") for v in values]
            if not values or all(v.strip() == "" for v in values):
                continue
            if len(values) != len(header):
                raise DataError(
                    f"CSV file '{path}', line {reader.line_num}: {len(values)} fields, "
                    f"the header has {len(header)}"
                )
            rows.append(Row(reader.line_num, {n: values[i].strip() for n, i in position.items()}))
    except csv.Error as err:
        raise DataError(f"CSV file '{path}', line {reader.line_num}: {err}") from None
    return rows


def has_columns(path: Path, columns: Sequence[str]) -> bool:
    """Whether the header of ``path`` names all ``columns`` (case/space-insensitive); never raises."""
    try:
        header = {h.lower() for h in _header(path, _decode(path))}
    except DataError:
        return False
    return all(c.lower() in header for c in columns)


def find_table(folder: Path, columns: Sequence[str], candidates: Sequence[Path]) -> Path:
    """The single CSV among ``candidates`` whose header has ``columns``; raises :class:`DataError`."""
    hits = [p for p in candidates if has_columns(p, columns)]
    if not hits:
        raise DataError(
            f"no CSV file with columns {list(columns)} in '{folder}' "
            f"(looked at: {[p.name for p in candidates] or 'no CSV files'})"
        )
    if len(hits) > 1:
        raise DataError(
            f"several CSV files with columns {list(columns)} in '{folder}': {[p.name for p in hits]}"
        )
    return hits[0]
