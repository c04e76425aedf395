"""Benchmark 7: start-up cost: ``import milcell`` and ``milcell --help`` vs ``import torch``.

Each variant is a fresh Python process, so every round pays the full import
(the operating system's file cache is warm after the untimed first call). The
wall time of ``python -c "import milcell"`` and of the ``milcell --help``
command (the console script next to this interpreter, or ``python -m
milcell.cli --help`` without it) are divided by that of ``python -c "import
torch"``, round by round. The peak resident memory of each command is reported
too (one run each), and which of torchvision, scikit-learn, timm and
matplotlib each milcell command loads (the goal is none: they load when a
feature needs them).

Run ``python benchmarks/bench_import.py [--quick]``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _harness import (
    TIMING_HEADERS,
    compare,
    fmt_ratio,
    log,
    make_parser,
    median,
    new_report,
    paired_ratios,
    parse,
    timing_rows,
)

HEAVY = ("torchvision", "sklearn", "timm", "matplotlib")
GOALS = {"import milcell": 1.15, "milcell --help": 1.5}


def _help_command() -> list[str]:
    exe = shutil.which("milcell", path=str(Path(sys.executable).parent))
    return [exe, "--help"] if exe else [sys.executable, "-m", "milcell.cli", "--help"]


def _run(cmd: Sequence[str]) -> None:
    """Run ``cmd`` to completion (output discarded); exit with its error if it fails."""
    if subprocess.run(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        done = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
        raise SystemExit(f"bench_import: {' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")


# A small fresh interpreter starts the command and reports its peak RSS. (Started straight from this
# process, the child's high-water mark would include this process's memory: Linux carries the
# mark across fork and exec.)
_PEAK_RSS = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(usage.ru_maxrss)"
)


def _peak_rss_mib(cmd: Sequence[str]) -> float | None:
    """Peak resident memory of ``cmd`` in MiB (None where ``os.wait4`` is missing)."""
    if not hasattr(os, "wait4"):  # pragma: no cover - Windows
        return None
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_import: peak-memory probe failed: {done.stderr.strip()}")
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return int(done.stdout.split()[-1]) / (2**20 if sys.platform == "darwin" else 2**10)


def _heavy_modules(code: str) -> str:
    """Which of :data:`HEAVY` a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_import: probe failed: {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "none"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.splitlines()[0], default_repeats=7)
    args = parse(parser, argv)
    if args.device.type != "cpu":
        log("bench_import: start-up is measured in fresh processes; --device is ignored")
    repeats = args.repeats
    commands = {
        "import torch": [sys.executable, "-c", "import torch"],
        "import milcell": [sys.executable, "-c", "import milcell"],
        "milcell --help": _help_command(),
    }
    log(f"bench_import: {len(commands)} commands, {repeats} interleaved rounds ({args.mode})")
    times = compare(
        {name: (lambda c=cmd: _run(c)) for name, cmd in commands.items()},
        repeats,
        torch.device("cpu"),
        warmup=args.warmup,
    )
    peaks = {name: _peak_rss_mib(cmd) for name, cmd in commands.items()}
    ratios = {name: median(times[name]) / median(times["import torch"]) for name in GOALS}
    loaded = {
        "import milcell": _heavy_modules("import milcell"),
        "milcell --help": _heavy_modules(
            "import contextlib, io\nfrom milcell.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['--help'])"
        ),
        "milcell.create_mil_model('milcell_mini_resnet_k8')": _heavy_modules(
            "import milcell\nmilcell.create_mil_model('milcell_mini_resnet_k8')"
        ),
    }

    help_cmd = " ".join(Path(c).name for c in commands["milcell --help"])
    report = new_report(
        "import",
        "Start-up: import milcell and milcell --help vs import torch",
        "Wall time of a fresh Python process running each command (the import of torch is the "
        "floor for any PyTorch library), interleaved round by round; milcell's commands over "
        f"`import torch`. The help command is `{help_cmd}`.",
        args,
        __file__,
    )
    report.table("Process wall time", TIMING_HEADERS, timing_rows(times, "import torch"))
    if all(v is not None for v in peaks.values()):
        report.table(
            "Peak resident memory of the process (one run each)",
            ["variant", "peak RSS"],
            [[name, f"{v:.0f} MiB"] for name, v in peaks.items()],
        )
    report.table(
        "Heavy optional modules loaded (torchvision, sklearn, timm, matplotlib)",
        ["command", "loaded"],
        [[name, found] for name, found in loaded.items()],
    )
    for name, goal in GOALS.items():
        pairs = paired_ratios(times[name], times["import torch"])
        report.goal(
            f"`{name}` / `import torch` ≤ {goal:.2f}",
            f"{fmt_ratio(ratios[name])} (rounds {min(pairs):.2f}–{max(pairs):.2f})",
            ratios[name] <= goal,
        )
    report.goal(
        "`import milcell` and `milcell --help` load none of torchvision, sklearn, timm, matplotlib",
        f"{loaded['import milcell']} / {loaded['milcell --help']}",
        loaded["import milcell"] == "none" and loaded["milcell --help"] == "none",
    )
    report.results = {
        "ratios": ratios,
        "times": times,
        "peak_rss_mib": peaks,
        "loaded": loaded,
    }
    report.write()
    return report.results


if __name__ == "__main__":
    main()
