"""Nothing in the repository points users at files outside it (regression: example docstrings did)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"\.\./shared|/work/shared|shared/(REPORTS|DESIGN)\.md")
SUFFIXES = {".py", ".rst", ".md", ".toml", ".txt", ".yaml", ".yml", ".cfg"}
SKIP = {".git", ".venv", "docs/_build", "build", "dist", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def _files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel == s or rel.startswith(f"{s}/") for s in SKIP) or "__pycache__" in rel:
            continue
        if path.is_file() and (path.suffix in SUFFIXES or path.name == "run"):
            found.append(path)
    return found


def test_no_file_cites_a_path_outside_the_repository() -> None:
    files = _files()
    assert any(p.name == "README.md" for p in files)
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in files
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if OUTSIDE.search(line) and p != Path(__file__).resolve()
    ]
    assert not offenders, offenders
