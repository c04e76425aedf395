"""The README's Python code runs, and its Quickstart matches what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_python_blocks_run() -> None:
    blocks = _blocks("python")
    assert blocks, "the README has no Python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def test_quickstart_has_two_commands_and_ci_runs_both() -> None:
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [b.strip() for b in re.findall(r"```bash\n(.*?)```", quickstart, flags=re.S)]
    assert len(commands) == 2
    assert commands[0].endswith("milcell demo")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1] in ci.splitlines()
    # the first command, exactly as written, with the demo at smoke size (in its own clone and venv)
    assert any(f"{commands[0]} --smoke" in line for line in ci.splitlines())
    install = commands[0].split(" && milcell demo")[0]
    assert "[" not in install, "the first command must work with the base install"
