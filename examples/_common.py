"""Shared plumbing of the example scripts: flags, run-size profiles, tables, config.

Every script in ``examples/`` does the same four things around its own model code::

    from _common import Profile, make_parser, print_table, setup, write_config

    parser = make_parser(__doc__)                 # --smoke --quick --data-dir --output-dir --seed ...
    args = parser.parse_args()
    profile = setup(args, script=__file__)        # seeds, resolves device/output dir, picks the mode
    cfg = profile.settings(epochs=(1, 5, 50), img_size=(32, 64, 224))   # (smoke, quick, full)
    write_config(args, cfg)                       # <output-dir>/config.json
    ...
    print_table(rows, ["model", "balanced accuracy"], args.output_dir, "table1")

The scripts run as ``python examples/X.py``, so Python puts ``examples/`` first on ``sys.path`` and
``import _common`` works without installing anything. The leading underscore keeps CI from running
this file as an example.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from milcell.seeding import seed_everything

__all__ = ["MODES", "Profile", "make_parser", "print_header", "print_table", "setup", "write_config"]

MODES = ("smoke", "quick", "full")
T = TypeVar("T")


def make_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Return the argument parser every example shares; scripts may add their own flags to it.

    Flags: ``--smoke`` (seconds; CI), ``--quick`` (<= 5 min on 2 CPU cores), neither = the report's
    full protocol; ``--data-dir`` (real data in the report's layout; default: synthetic cohort),
    ``--output-dir`` (default ``milcell-out/<script name>``), ``--seed``, ``--device`` (default cuda
    when available, else cpu), ``--pretrained`` (ImageNet weights where the report used them; needs
    network access or a filled hub cache, hence off by default), ``--threads`` (torch CPU threads).
    """
    parser = argparse.ArgumentParser(
        description=(description or "").strip().split("\n\n")[0] or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny run (under a minute) to check it works")
    size.add_argument("--quick", action="store_true", help="short run (<= 5 min on CPU) showing the effect")
    parser.add_argument("--data-dir", type=Path, default=None, help="real data in the report's layout")
    parser.add_argument("--output-dir", type=Path, default=None, help="tables, figures and config go here")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--pretrained", action="store_true", help="load ImageNet weights where the report used them"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of torch (default: torch's choice, or 1 when the CPU is already busy)",
    )
    return parser


@dataclass(frozen=True)
class Profile:
    """The run size chosen by the flags: ``mode`` is one of ``"smoke"``, ``"quick"``, ``"full"``.

    Use :meth:`pick` for one value and :meth:`settings` for a whole dict of them, each given as
    ``(smoke, quick, full)``.
    """

    mode: str

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Profile mode must be one of {MODES}, got {self.mode!r}")

    @property
    def smoke(self) -> bool:
        """True in ``--smoke`` mode."""
        return self.mode == "smoke"

    @property
    def quick(self) -> bool:
        """True in ``--quick`` mode."""
        return self.mode == "quick"

    @property
    def full(self) -> bool:
        """True when neither ``--smoke`` nor ``--quick`` was given."""
        return self.mode == "full"

    def pick(self, smoke: T, quick: T, full: T) -> T:
        """Return the value for the current mode."""
        return {"smoke": smoke, "quick": quick, "full": full}[self.mode]

    def settings(self, **choices: tuple[Any, Any, Any]) -> dict[str, Any]:
        """Resolve ``name=(smoke, quick, full)`` triples into ``{name: value}`` plus ``"mode"``."""
        out: dict[str, Any] = {"mode": self.mode}
        for name, triple in choices.items():
            if not isinstance(triple, tuple) or len(triple) != 3:
                raise ValueError(f"setting {name!r} must be a (smoke, quick, full) tuple, got {triple!r}")
            out[name] = self.pick(*triple)
        return out


def setup(args: argparse.Namespace, script: str) -> Profile:
    """Finish parsing: seed everything, fill ``args.device`` and ``args.output_dir``, quiet logs.

    Parameters
    ----------
    args : argparse.Namespace
        From :func:`make_parser`; modified in place.
    script : str
        The script's ``__file__``; its stem names the default output folder.
    """
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.output_dir is None:
        args.output_dir = Path("milcell-out") / Path(script).stem
    args.output_dir = Path(args.output_dir)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        sys.exit(f"error: --data-dir {args.data_dir} is not a directory")
    if args.threads is None and _cpu_busy():
        # torch's OpenMP threads spin-wait; on an oversubscribed CPU two threads can be 10-40x slower
        # than one for the small models of --smoke/--quick
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(max(1, int(args.threads)))
    seed_everything(args.seed)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return Profile(mode)


def _cpu_busy() -> bool:
    """True when the 1-minute load average already fills every core (Unix only)."""
    try:
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return False


def print_header(title: str, args: argparse.Namespace, profile: Profile, notes: Sequence[str] = ()) -> None:
    """Print the run header: report title, mode, data source, device, weights, and any notes."""
    data = f"real data from {args.data_dir}" if args.data_dir else "synthetic cohort (milcell.data.synthetic)"
    weights = (
        "ImageNet (--pretrained)"
        if args.pretrained
        else "random init (no --pretrained: no network here; frozen-feature results will be weaker)"
    )
    lines = [
        f"# {title}",
        f"mode: {profile.mode}   data: {data}   device: {args.device} ({torch.get_num_threads()} CPU threads)"
        f"   seed: {args.seed}",
        f"weights: {weights}",
        *(f"note: {n}" for n in notes),
        f"outputs: {args.output_dir}",
    ]
    print("\n".join(lines), flush=True)


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def print_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    output_dir: str | os.PathLike[str] | None = None,
    name: str = "table",
    title: str | None = None,
    digits: int = 3,
) -> str:
    """Print ``rows`` as an aligned markdown table and save ``<name>.csv`` / ``<name>.md``.

    Parameters
    ----------
    rows : sequence of mappings
        One dict per row; missing keys print empty. Floats print with ``digits`` decimals;
        strings (e.g. ``"0.91 ± 0.05"``) print as they are.
    columns : sequence of str
        Column order (also the header).
    output_dir : path, optional
        Where to write the CSV and markdown files (nothing written when None).
    name : str
        File stem.
    title : str, optional
        Printed (and written) above the table.
    digits : int
        Decimals of float cells.

    Returns
    -------
    str
        The markdown text that was printed.
    """
    cells = [[_cell(row.get(c), digits) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    body = [line(list(columns)), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    body += [line(r) for r in cells]
    text = "\n".join(([f"\n## {title}\n"] if title else []) + body)
    print(text, flush=True)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.md").write_text(text.lstrip("\n") + "\n", encoding="utf-8")
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            writer.writerows(cells)
    return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def write_config(args: argparse.Namespace, settings: Mapping[str, Any] | None = None) -> Path:
    """Write the resolved flags and settings to ``<output-dir>/config.json``; return its path."""
    payload = {"argv": sys.argv, "args": _jsonable(vars(args)), "settings": _jsonable(dict(settings or {}))}
    path = Path(args.output_dir) / "config.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path
