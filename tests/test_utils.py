"""Tests of milcell's internal helpers."""

from __future__ import annotations

import os
import stat

import pytest

from milcell._utils import atomic_path


def test_atomic_path_writes_and_renames(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("hello")
        assert not target.exists()
    assert target.read_text() == "hello"
    assert list(target.parent.iterdir()) == [target]


def test_atomic_path_keeps_previous_file_on_error(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_uses_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        target = tmp_path / "file.txt"
        with atomic_path(target) as tmp:
            tmp.write_text("x")
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
    finally:
        os.umask(umask)


def test_atomic_path_permissions_survive_writers_that_recreate_the_file(tmp_path):
    # Regression: safetensors.save_file recreates its target with mode 0600.
    import torch
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    try:
        target = tmp_path / "w.safetensors"
        with atomic_path(target) as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
    finally:
        os.umask(umask)
