"""Benchmark 5: masked gated-attention pooling, milcell vs torchmil, forward + backward.

milcell's ``create_pooling("gated_attention", 512, hidden=128)`` against
torchmil's ``AttentionPool(in_dim=512, att_dim=128, gated=True)`` on padded
features ``(32, 198, 512)`` with a mask of lymphocytosis-like bag sizes
(16-198; both libraries use ``True``/1 = real instance). The torchmil weights
are copied from milcell's, and the bag embeddings are checked to agree.

torchmil is not a milcell dependency: install it only for this benchmark, into
a private folder the script puts on ``sys.path``::

    pip install --no-deps --target benchmarks/.torchmil torchmil einops

Without it the script says so and times milcell alone.

Run ``python benchmarks/bench_pooling_vs_torchmil.py [--quick] [--device cuda]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from _harness import (
    TIMING_HEADERS,
    TORCHMIL_DIR,
    compare,
    fmt_ratio,
    log,
    lymphocytosis_sizes,
    make_parser,
    median,
    new_report,
    parse,
    pick,
    set_seed,
    timing_rows,
)

from milcell.nn.pooling import create_pooling


def import_torchmil() -> tuple[Any, str]:
    """torchmil's ``AttentionPool`` class (or None) and a line saying where it came from."""
    if TORCHMIL_DIR.is_dir() and str(TORCHMIL_DIR) not in sys.path:
        sys.path.append(str(TORCHMIL_DIR))
    try:
        import torchmil
        from torchmil.nn import AttentionPool
    except Exception as exc:
        return None, f"torchmil could not be imported ({type(exc).__name__}: {exc})"
    version = getattr(torchmil, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version("torchmil")
        except PackageNotFoundError:
            version = "unknown version"
    return AttentionPool, f"torchmil {version}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.splitlines()[0], default_repeats=15)
    args = parse(parser, argv)
    gen = set_seed(args.seed)
    b, n, d = pick(args, (32, 198, 512), (32, 198, 512), (4, 20, 16))
    hidden = pick(args, 128, 128, 8)
    inner = pick(args, 10, 5, 1)
    device = args.device

    sizes = lymphocytosis_sizes(b, gen, min(16, n), n)
    sizes[0] = n  # the largest bag fills the padded length
    mask = (torch.arange(n).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)).to(device)
    x = torch.randn(b, n, d, generator=gen).to(device).requires_grad_(True)
    ours = create_pooling("gated_attention", d, hidden=hidden).to(device)

    AttentionPool, origin = import_torchmil()
    variants = {}

    def milcell_step() -> None:
        x.grad = None
        ours(x, mask).square().mean().backward()

    variants["milcell gated_attention"] = milcell_step
    agree = None
    if AttentionPool is not None:
        theirs = AttentionPool(in_dim=d, att_dim=hidden, gated=True).to(device)
        # torchmil wraps its first layers in a LazyLinear holding an nn.Linear as `.module`.
        fc1 = getattr(theirs.fc1, "module", theirs.fc1)
        fc_gated = getattr(theirs.fc_gated, "module", theirs.fc_gated)
        with torch.no_grad():  # same weights; milcell's output bias shifts every score equally
            fc1.weight.copy_(ours.attention_v.weight)
            fc1.bias.copy_(ours.attention_v.bias)
            fc_gated.weight.copy_(ours.attention_u.weight)
            fc_gated.bias.copy_(ours.attention_u.bias)
            theirs.fc2.weight.copy_(ours.attention_w.weight)
            agree = float((ours(x, mask) - theirs(x, mask)).abs().max())

        def torchmil_step() -> None:
            x.grad = None
            theirs(x, mask).square().mean().backward()

        variants["torchmil AttentionPool(gated=True)"] = torchmil_step

    log(f"bench_pooling_vs_torchmil: ({b}, {n}, {d}) features, {origin} ({args.mode})")
    times = compare(variants, args.repeats, device, warmup=max(args.warmup, 1), inner=inner)

    report = new_report(
        "pooling_vs_torchmil",
        "Gated-attention pooling: milcell vs torchmil",
        f"Forward + backward (loss = mean of the squared bag embeddings, gradient to the features) of "
        f"masked gated-attention pooling on padded features ({b}, {n}, {d}), attention size {hidden}, "
        f"bag sizes {min(sizes)}-{max(sizes)} (mean {sum(sizes) / len(sizes):.0f}); each timed block "
        f"runs {inner} step(s). Peer: {origin}.",
        args,
        __file__,
    )
    results: dict[str, Any] = {"times": times, "torchmil": AttentionPool is not None}
    if AttentionPool is not None:
        ratio = median(times["torchmil AttentionPool(gated=True)"]) / median(times["milcell gated_attention"])
        report.table(
            "Time per step", TIMING_HEADERS, timing_rows(times, "torchmil AttentionPool(gated=True)")
        )
        report.goal(
            "milcell at least as fast as torchmil (torchmil time / milcell time ≥ 1)",
            fmt_ratio(ratio),
            ratio >= 1.0,
        )
        report.notes.append(f"With the same weights the bag embeddings differ by at most {agree:.1e}.")
        report.notes.append(
            "milcell's pooling also validates its inputs (shapes, dtype, no empty bag: one host sync) and "
            "zeroes the padded positions so NaN/inf padding cannot leak into outputs or gradients."
        )
        results.update(ratio=ratio, max_difference=agree)
    else:
        report.table("Time per step", TIMING_HEADERS, timing_rows(times, "milcell gated_attention"))
        report.goal("milcell at least as fast as torchmil", "torchmil unavailable", None)
        report.notes.append(f"{origin}; install it as the module docstring says to compare.")
    report.results = results
    report.write()
    return results


if __name__ == "__main__":
    main()
