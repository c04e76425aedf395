"""Shared timing, machine description and report writing for milcell's benchmarks.

Every benchmark script measures two (or more) variants side by side in one
run: each variant is warmed up, then the variants are timed in interleaved
rounds (the order alternates from round to round, so a slow spell of a shared
machine hits every variant alike), and the medians and their ratio are
reported. Results are printed and written to ``<out_dir>/<name>.md`` (Markdown)
and ``<out_dir>/<name>.inc`` (a reStructuredText fragment included by
``docs/benchmarks.rst``), each atomically, with the machine they ran on.

Goals are reported as measured ratios next to the goal, with "met" or "not
met"; nothing here fails a run because a goal is missed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = ROOT / "docs" / "benchmarks"
TORCHMIL_DIR = Path(__file__).resolve().parent / ".torchmil"


# ------------------------------------------------------------------------------------------ arguments
def make_parser(description: str, default_repeats: int = 5) -> argparse.ArgumentParser:
    """The options every benchmark takes.

    ``--quick`` uses small sizes (under about a minute on two CPU cores);
    ``--smoke`` the smallest sizes, for the test suite only (figures
    meaningless). ``--out-dir`` defaults to ``docs/benchmarks``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (< ~60 s on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite")
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"timed rounds per variant (default {default_repeats})"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the tables go")
    parser.add_argument("--no-write", action="store_true", help="print only, write no file")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--note", default="", help="free text added to the report (e.g. machine load)")
    parser.set_defaults(default_repeats=default_repeats)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and resolve ``mode``, ``repeats`` and ``device`` (checked)."""
    args = parser.parse_args(argv)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.repeats is None:
        args.repeats = 1 if args.smoke else args.default_repeats
    if args.smoke:
        args.warmup = 0
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch.cuda.is_available() is False")
    if args.device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    return args


def pick(args: argparse.Namespace, full: Any, quick: Any, smoke: Any) -> Any:
    """The value for the run's size mode."""
    return {"full": full, "quick": quick, "smoke": smoke}[args.mode]


# ------------------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> str:
    """Which native bf16 instructions the CPU has (``amx_bf16``, ``avx512_bf16``) or ``none``."""
    found = sorted(_cpu_flags() & {"amx_bf16", "avx512_bf16"})
    return ", ".join(found) if found else "none"


def describe_machine(device: torch.device) -> dict[str, str]:
    """CPU model, cores, threads, versions, device and load average."""
    import timm

    info = {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    if hasattr(os, "getloadavg"):
        info["load average (1 min) at start"] = f"{os.getloadavg()[0]:.1f}"
    return info


# ------------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare(
    variants: Mapping[str, Callable[[], Any]],
    repeats: int,
    device: torch.device,
    warmup: int = 1,
    inner: int = 1,
) -> dict[str, list[float]]:
    """Time every variant in interleaved rounds; seconds per call, one entry per round.

    Parameters
    ----------
    variants : mapping of name -> callable
        Each called ``inner`` times per round.
    repeats : int
        Rounds. Round ``r`` runs the variants in order, reversed on odd rounds.
    device : torch.device
        Synchronised before and after every timed block.
    warmup : int
        Untimed calls of each variant first (also interleaved).
    inner : int
        Calls per timed block (for very short calls); the time is divided by it.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            fn = variants[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / inner)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Round-by-round ratios ``a[r] / b[r]``."""
    return [x / y for x, y in zip(a, b, strict=True) if y > 0]


def fmt_time(seconds: float) -> str:
    """Seconds as a short human string (ms under 10 s)."""
    return f"{seconds:.2f} s" if seconds >= 10 else f"{seconds * 1e3:.1f} ms"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}×"


def timing_rows(times: Mapping[str, Sequence[float]], baseline: str) -> list[list[str]]:
    """Table rows: variant, median, min, max, ratio to ``baseline`` (of medians, and paired range)."""
    rows = []
    base = times[baseline]
    for name, values in times.items():
        if name == baseline:
            ratio = "1.00× (baseline)"
        else:
            pairs = paired_ratios(values, base)
            ratio = f"{fmt_ratio(median(values) / median(base))} (rounds {min(pairs):.2f}–{max(pairs):.2f})"
        rows.append([name, fmt_time(median(values)), fmt_time(min(values)), fmt_time(max(values)), ratio])
    return rows


TIMING_HEADERS = ["variant", "median", "min", "max", "ratio to baseline"]


# ------------------------------------------------------------------------------------------ report
@dataclass
class Goal:
    """A goal, its measured value and whether it is met (None: could not be measured)."""

    text: str
    measured: str
    met: bool | None

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else "met" if self.met else "NOT met"


@dataclass
class Report:
    """What one benchmark run found; :meth:`write` prints it and saves the Markdown and rst files."""

    name: str
    title: str
    description: str
    args: argparse.Namespace
    command: str
    machine: dict[str, str] = field(default_factory=dict)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def table(self, caption: str, headers: list[str], rows: list[list[str]]) -> None:
        self.tables.append((caption, headers, [[str(c) for c in row] for row in rows]))

    def goal(self, text: str, measured: str, met: bool | None) -> None:
        self.goals.append(Goal(text, measured, met))

    # -- rendering ----------------------------------------------------------------------
    def _setup_lines(self, rst: bool = False) -> list[str]:
        when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        machine = "; ".join(f"{k}: {v}" for k, v in self.machine.items())
        lines = [
            f"Machine: {machine}.",
            f"Size mode: {self.args.mode}; {self.args.repeats} timed round(s) per variant after "
            f"{self.args.warmup} warm-up call(s), variants interleaved. Run {when}.",
            f"Command: {'``' + self.command + '``' if rst else '`' + self.command + '`'}",
        ]
        if hasattr(os, "getloadavg"):
            lines.append(f"Load average (1 min) at the end: {os.getloadavg()[0]:.1f}.")
        return lines

    def to_markdown(self) -> str:
        out = [f"# {self.title}", "", self.description, ""]
        out += [f"- {line}" for line in self._setup_lines()]
        out.append("")
        for caption, headers, rows in self.tables:
            out += [f"**{caption}**", "", "| " + " | ".join(headers) + " |"]
            out.append("|" + "|".join(" --- " for _ in headers) + "|")
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
            out.append("")
        if self.goals:
            out += ["**Goals**", ""]
            out += [f"- {g.text}: measured {g.measured} — **{g.verdict}**" for g in self.goals]
            out.append("")
        if self.notes:
            out += ["**Notes**", ""]
            out += [f"- {n}" for n in self.notes]
            out.append("")
        return "\n".join(out)

    def to_rst(self) -> str:
        out = [self.title, "-" * len(self.title), "", _rst_escape(self.description), ""]
        lines = self._setup_lines(rst=True)
        out += [f"- {line if line.startswith('Command:') else _rst_escape(line)}" for line in lines]
        out.append("")
        for caption, headers, rows in self.tables:
            out += [f".. list-table:: {_rst_escape(caption)}", "   :header-rows: 1", ""]
            for row in [headers, *rows]:
                out.append(f"   * - {_rst_escape(row[0])}")
                out += [f"     - {_rst_escape(c)}" for c in row[1:]]
            out.append("")
        if self.goals:
            out += ["Goals:", ""]
            out += [
                f"- {_rst_escape(g.text)}: measured {_rst_escape(g.measured)} — **{g.verdict}**"
                for g in self.goals
            ]
            out.append("")
        if self.notes:
            out += ["Notes:", ""]
            out += [f"- {_rst_escape(n)}" for n in self.notes]
            out.append("")
        return "\n".join(out)

    def write(self) -> None:
        """Print the report; unless ``--no-write``, save ``<name>.md`` and ``<name>.inc`` atomically."""
        text = self.to_markdown()
        print(text)
        if self.args.no_write:
            return
        out_dir = Path(self.args.out_dir)
        write_atomic(out_dir / f"{self.name}.md", text)
        write_atomic(out_dir / f"{self.name}.inc", self.to_rst())
        print(f"wrote {out_dir / (self.name + '.md')} and {self.name}.inc")


def _rst_escape(text: str) -> str:
    text = text.replace("\\", "\\\\")
    for ch in ("*", "`", "|", "_"):
        text = text.replace(ch, "\\" + ch)
    return text


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def new_report(name: str, title: str, description: str, args: argparse.Namespace, script: str) -> Report:
    """A report with the machine description and the command line filled in."""
    flags = [f"--{args.mode}"] if args.mode != "full" else []
    if args.device.type != "cpu":
        flags.append(f"--device {args.device}")
    if args.threads is not None:
        flags.append(f"--threads {args.threads}")
    command = " ".join(["python", f"benchmarks/{Path(script).name}", *flags])
    report = Report(name, title, description, args, command, describe_machine(args.device))
    if args.note:
        report.notes.append(args.note)
    return report


def set_seed(seed: int) -> torch.Generator:
    """Seed torch's global generator and return a fresh seeded generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def random_bags(sizes: Sequence[int], img: int, generator: torch.Generator) -> list[Any]:
    """Bags of random ``(n, 3, img, img)`` images, one per size, labels alternating 0 / 1."""
    from milcell.data.bag import Bag

    return [
        Bag(torch.rand(n, 3, img, img, generator=generator), label=i % 2, id=f"P{i:03d}")
        for i, n in enumerate(sizes)
    ]


def lymphocytosis_sizes(n: int, generator: torch.Generator, low: int = 16, high: int = 198) -> list[int]:
    """``n`` bag sizes drawn uniformly in ``[low, high]`` (the lymphocytosis cohort's range)."""
    return torch.randint(low, high + 1, (n,), generator=generator).tolist()


def log(*parts: Any) -> None:
    """Progress line on stderr (the report itself goes to stdout)."""
    print(*parts, file=sys.stderr, flush=True)
