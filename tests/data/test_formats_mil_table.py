"""Tests of milcell.data.formats.mil_table.load_mil_table (the classic MIL table format)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from milcell.data.formats import load_mil_table
from milcell.exceptions import ConfigError, DataError


def write_table(path: Path, n_bags: int = 6, dim: int = 5, seed: int = 0, header: bool = False) -> Path:
    """A MUSK-like table: ``label,bag,features``; positive bags hold one shifted instance."""
    rng = np.random.default_rng(seed)
    lines = ["label,bag," + ",".join(f"f{j}" for j in range(dim))] if header else []
    for b in range(n_bags):
        label = b % 2
        for i in range(2 + b % 3):
            x = rng.normal(size=dim) + (3.0 if label and i == 0 else 0.0)
            lines.append(f"{label},bag{b}," + ",".join(f"{v:.6f}" for v in x))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_bags_in_order_with_their_instances(tmp_path: Path) -> None:
    bags = load_mil_table(write_table(tmp_path / "t.csv"))
    assert bags.ids == [f"bag{b}" for b in range(6)]
    assert bags.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert [len(f) for f in bags.features] == [2 + b % 3 for b in range(6)]
    assert bags.dim == 5 and bags.features[0].dtype == torch.float32


def test_header_is_detected_and_gives_the_same_bags(tmp_path: Path) -> None:
    plain = load_mil_table(write_table(tmp_path / "a.csv"))
    with_header = load_mil_table(write_table(tmp_path / "b.csv", header=True))
    assert with_header.ids == plain.ids
    assert all(torch.equal(a, b) for a, b in zip(plain.features, with_header.features, strict=True))
    with pytest.raises(DataError, match="line 1: feature value 'f0' is not a number"):
        load_mil_table(tmp_path / "b.csv", header=False)


def test_other_delimiters_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("0.5 A -1\n0.25 A 1\n1.0 B -1\n")
    bags = load_mil_table(path, label_column=2, bag_column=1)
    assert bags.ids == ["A", "B"] and bags.labels.tolist() == [1, 0] and bags.dim == 1
    assert bags.features[0][:, 0].tolist() == [0.5, 0.25]


def test_bag_label_rules(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("1,A,0.0\n0,A,1.0\n0,B,2.0\n")
    assert load_mil_table(path).labels.tolist() == [1, 0]
    assert load_mil_table(path, bag_label="first").labels.tolist() == [1, 0]
    with pytest.raises(DataError, match="bag 'A' has instance labels \\[0, 1\\]"):
        load_mil_table(path, bag_label="consistent")
    with pytest.raises(ConfigError, match="bag_label"):
        load_mil_table(path, bag_label="mean")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ("0,A,1.0\n0,A\n", "line 2: 2 columns"),
        ("0,A,nan\n", "line 1: NaN or infinite"),
        ("0,A,1.0\n0,B,x\n", "line 2: feature value 'x'"),
        ("0.5,A,1.0\n", "line 1: label '0.5' is not an integer"),
        ("0,A\n", "needs a label, a bag id and at least one feature"),
        ("-1,A,1.0\n2,B,1.0\n", "mix -1 with classes"),
        ("0,,1.0\n", "line 1: empty bag id"),
    ],
)
def test_bad_tables_name_the_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_mil_table(path)
    assert "bad.csv" in str(info.value)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_mil_table(tmp_path / "missing.csv")
    path = write_table(tmp_path / "t.csv")
    with pytest.raises(ConfigError, match="must differ"):
        load_mil_table(path, label_column=1, bag_column=1)
    with pytest.raises(ConfigError, match="header"):
        load_mil_table(path, header="yes")  # type: ignore[arg-type]
