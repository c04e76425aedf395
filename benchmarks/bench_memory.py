"""Benchmark 4: peak memory of one training step on a 198-image bag, chunked + checkpointed vs at once.

Each variant runs in a fresh subprocess (so one variant's allocations cannot
hide the other's peak): it builds the same seeded MIL model (every BatchNorm
with frozen statistics, ``freeze_bn_stats=True``, so chunking does not change
the numbers), one bag of 198 images, and measures the memory increase of one
step (forward, ``mil_loss``, backward, SGD step), after one untimed warm-up
forward + backward, over what was allocated before it. On the CPU that is
the peak resident set size (``VmHWM``, reset
through ``/proc/self/clear_refs`` where allowed, else ``ru_maxrss``) minus
the resident size before the step; on CUDA ``torch.cuda.max_memory_allocated``
minus ``torch.cuda.memory_allocated`` before the step. The gradients of both
variants are saved and compared.

Run ``python benchmarks/bench_memory.py [--quick] [--device cuda]``.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _harness import fmt_ratio, fmt_time, log, make_parser, new_report, parse, pick

from milcell.data.bag import Bag, collate_bags
from milcell.nn.model import create_mil_model, mil_loss

GOAL = 0.3
VARIANTS = {
    "all at once": {"chunk_size": None, "checkpointing": False},
    "chunked + checkpointed": {"chunk_size": 16, "checkpointing": True},
}


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_variant(
    variant: str, name: str, n: int, img: int, device: torch.device, seed: int, grads_path: Path
) -> dict[str, Any]:
    """One step of one variant in this process; returns its memory increase and time."""
    torch.manual_seed(seed)
    model = create_mil_model(
        name, pooling="gated_attention", num_classes=2, freeze_bn_stats=True, **VARIANTS[variant]
    ).to(device)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    batch = collate_bags([Bag(torch.rand(n, 3, img, img, generator=gen), label=1, id="P0")]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    # A warm-up forward + backward first, so one-time allocations (kernel caches, lazy
    # initialisation) are not counted; then the measured step starts without gradients.
    mil_loss(model(batch), batch).backward()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        method = "torch.cuda.max_memory_allocated"
    else:
        reset_ok = _reset_peak()
        before = _rss_bytes() if reset_ok else _peak_bytes(False)
        method = "VmHWM after reset" if reset_ok else "ru_maxrss"
    start = time.perf_counter()
    mil_loss(model(batch), batch).backward()
    grads = {k: p.grad.detach().cpu().clone() for k, p in model.named_parameters() if p.grad is not None}
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _peak_bytes(reset_ok)
    elapsed = time.perf_counter() - start
    torch.save(grads, grads_path)
    return {"increase": peak - before, "seconds": elapsed, "method": method}


def _child(argv: Sequence[str]) -> None:
    spec = json.loads(argv[0])
    result = run_variant(
        spec["variant"],
        spec["name"],
        spec["n"],
        spec["img"],
        torch.device(spec["device"]),
        spec["seed"],
        Path(spec["grads"]),
    )
    print("RESULT " + json.dumps(result))


def _spawn(spec: dict[str, Any]) -> dict[str, Any]:
    # A fixed mmap threshold makes glibc return large freed blocks to the system at once, so the
    # warm-up step's memory is not kept in the heap and silently reused by the measured step.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench_memory child {spec['variant']!r} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _grad_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Largest ``max|a - b| / max|a|`` over the parameters, and the number of parameters compared."""
    if a.keys() != b.keys():
        return float("inf"), 0
    worst = 0.0
    for key in a:
        scale = float(a[key].abs().max()) or 1.0
        worst = max(worst, float((a[key] - b[key]).abs().max()) / scale)
    return worst, len(a)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.splitlines()[0], default_repeats=1)
    args = parse(parser, argv)
    name = pick(args, "resnet18", "resnet18", "milcell_mini_resnet_k8")
    img = pick(args, 224, 64, 32)
    n = pick(args, 198, 198, 40)
    log(f"bench_memory: {name}, one bag of {n} images of {img}x{img} ({args.mode})")
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
            for variant in order:
                spec = {
                    "variant": variant,
                    "name": name,
                    "n": n,
                    "img": img,
                    "device": str(args.device),
                    "seed": args.seed,
                    "grads": str(Path(tmp) / f"{variant.replace(' ', '_')}.pt"),
                }
                results[variant].append(_spawn(spec))
        grads = {v: torch.load(Path(tmp) / f"{v.replace(' ', '_')}.pt", weights_only=True) for v in VARIANTS}
    diff, n_params = _grad_difference(grads["all at once"], grads["chunked + checkpointed"])

    def best(variant: str, key: str) -> float:
        return min(res[key] for res in results[variant])

    full_mib = best("all at once", "increase") / 2**20
    chunk_mib = best("chunked + checkpointed", "increase") / 2**20
    ratio = chunk_mib / full_mib if full_mib > 0 else float("nan")
    method = results["all at once"][0]["method"]

    report = new_report(
        "memory",
        "Peak memory of a training step: chunked + checkpointed vs all at once",
        f"One training step (forward, mil_loss, backward, SGD step) of a {name} gated-attention MIL "
        f"model on one bag of {n} images of {img}×{img}, BatchNorm statistics frozen. The chunked "
        f"variant runs the backbone over chunks of {VARIANTS['chunked + checkpointed']['chunk_size']} "
        "instances with activation checkpointing. Each variant runs in a fresh process; memory "
        f"increase measured with {method} (smallest of {args.repeats} run(s)).",
        args,
        __file__,
    )
    report.table(
        "Memory increase of one step",
        ["variant", "memory increase", "step time", "ratio to all at once"],
        [
            ["all at once", f"{full_mib:.0f} MiB", fmt_time(best("all at once", "seconds")), "1.00×"],
            [
                "chunked + checkpointed",
                f"{chunk_mib:.0f} MiB",
                fmt_time(best("chunked + checkpointed", "seconds")),
                fmt_ratio(ratio),
            ],
        ],
    )
    equal = diff <= 1e-4
    report.table(
        "Gradients",
        ["parameters compared", "largest max|Δgrad| / max|grad|", "equal (≤ 1e-4)"],
        [[str(n_params), f"{diff:.1e}", "yes" if equal else "no"]],
    )
    report.goal(f"memory increase ≤ {GOAL}× the unchunked one", fmt_ratio(ratio), ratio <= GOAL)
    report.goal("gradients equal with BatchNorm statistics frozen", f"{diff:.1e}", equal)
    if args.device.type == "cpu":
        report.notes.append(
            "On the CPU the resident set size counts everything the process touches (allocator caches "
            "included), so the figures are upper bounds of what the tensors need."
        )
    report.results = {"ratio": ratio, "grad_difference": diff, "raw": results}
    report.write()
    return report.results


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
    else:
        main()
