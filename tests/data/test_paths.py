"""Path safety shared by the format loaders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from milcell.data.formats._paths import (
    check_inside,
    check_name,
    list_dir,
    resolve_root,
    safe_join,
    verify_image,
)
from milcell.exceptions import DataError


@pytest.mark.parametrize("name", ["P26", "UID_H49", "1.bmp", "a..b", "patient 7", "é"])
def test_check_name_accepts_plain_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "  ", ".", "..", "a/b", "../x", "a\\b", "/etc", "C:", "C:x", "a\x00b"])
def test_check_name_rejects_unsafe(name: str) -> None:
    with pytest.raises(DataError, match="is not a plain name"):
        check_name(name, "patient ID", "train.csv")


def test_check_name_message_names_value_and_source() -> None:
    with pytest.raises(DataError, match=r"patient ID '\.\./P1' \(in train\.csv\)"):
        check_name("../P1", source="train.csv")


@given(st.text(max_size=12))
def test_check_name_either_plain_or_dataerror(name: str) -> None:
    root = Path("/data/root")
    try:
        ok = check_name(name)
    except DataError:
        return
    assert (root / ok).parent == root
    assert len((root / ok).relative_to(root).parts) == 1


def test_safe_join_and_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "P1").mkdir(parents=True)
    outside.mkdir()
    assert safe_join(root, "P1") == root / "P1"
    (root / "P2").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match="outside the dataset root"):
        safe_join(root, "P2")
    with pytest.raises(DataError, match="not a plain name"):
        safe_join(root, "P1", "../../x")


def test_symlink_inside_root_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    assert check_inside(tmp_path, tmp_path / "link") == tmp_path / "link"


def test_symlink_loop_is_dataerror(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(DataError, match="'.*a'"):
        check_inside(tmp_path, tmp_path / "a")


def test_list_dir_filters_and_checks(tmp_path: Path) -> None:
    for name in ("b.jpg", "a.PNG", ".DS_Store", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "__MACOSX").mkdir()
    assert [p.name for p in list_dir(tmp_path, tmp_path)] == ["a.PNG", "b.jpg", "notes.txt", "sub"]
    assert [p.name for p in list_dir(tmp_path, tmp_path, dirs=True)] == ["sub"]
    assert [p.name for p in list_dir(tmp_path, tmp_path, dirs=False, suffixes={".png", ".jpg"})] == [
        "a.PNG",
        "b.jpg",
    ]
    outside = tmp_path.parent / f"{tmp_path.name}_outside.jpg"
    outside.write_bytes(b"")
    (tmp_path / "c.jpg").symlink_to(outside)
    with pytest.raises(DataError, match="c.jpg.*outside the dataset root"):
        list_dir(tmp_path, tmp_path)
    with pytest.raises(DataError, match="cannot list folder"):
        list_dir(tmp_path / "missing", tmp_path)


def test_resolve_root(tmp_path: Path) -> None:
    assert resolve_root(tmp_path) == tmp_path.absolute()
    with pytest.raises(DataError, match="does not exist"):
        resolve_root(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        resolve_root(tmp_path / "f")


def test_verify_image(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (4, 4)).save(good)
    verify_image(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match=r"patient 'P9': image '.*bad\.jpg' cannot be decoded"):
        verify_image(bad, "patient 'P9'")


@pytest.mark.skipif(os.name == "nt", reason="POSIX symlinks")
def test_check_inside_rejects_relative_escape(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with pytest.raises(DataError, match="outside the dataset root"):
        check_inside(tmp_path / "root", tmp_path / "root" / ".." / "x")
