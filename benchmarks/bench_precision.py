"""Benchmark 6: a bf16 (autocast) vs fp32 MIL training step, on the CPU or on CUDA.

The step is the one :class:`milcell.train.Trainer` runs for ``precision="bf16"``:
forward and loss under ``torch.autocast(device_type, dtype=torch.bfloat16)``,
backward of the float32 loss, Adam step (weights stay float32). Whether bf16
pays off on a CPU depends on native bf16 instructions (AMX, AVX-512 BF16),
which the report lists.

Run ``python benchmarks/bench_precision.py [--quick] [--device cuda]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from _harness import (
    TIMING_HEADERS,
    compare,
    cpu_has_bf16,
    fmt_ratio,
    log,
    lymphocytosis_sizes,
    make_parser,
    median,
    new_report,
    parse,
    pick,
    random_bags,
    set_seed,
    timing_rows,
)

from milcell.data.bag import collate_bags
from milcell.nn.model import create_mil_model, mil_loss


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.splitlines()[0], default_repeats=5)
    args = parse(parser, argv)
    gen = set_seed(args.seed)
    backbone = pick(args, "resnet18", "resnet18", "milcell_mini_resnet_k8")
    img = pick(args, 224, 64, 32)
    sizes = pick(args, lymphocytosis_sizes(2, gen), [24, 40], [3, 5])
    device = args.device

    batch = collate_bags(random_bags(sizes, img, gen)).to(device)
    model = create_mil_model(backbone, pooling="gated_attention", num_classes=2).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses: dict[str, float] = {}

    def step(precision: str) -> None:
        ctx = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        opt.zero_grad(set_to_none=True)
        with ctx:
            loss = mil_loss(model(batch), batch)
        loss.float().backward()
        opt.step()
        losses[precision] = float(loss.detach())

    log(f"bench_precision: {backbone} on {sum(sizes)} images of {img}x{img}, {device} ({args.mode})")
    times = compare(
        {"fp32": lambda: step("32"), "bf16 autocast": lambda: step("bf16")},
        args.repeats,
        device,
        warmup=args.warmup,
    )
    speedup = median(times["fp32"]) / median(times["bf16 autocast"])

    report = new_report(
        "precision",
        f"bf16 vs fp32 training step ({device.type})",
        f"One training step (forward + loss under autocast, backward, Adam step) of a {backbone} "
        f"gated-attention MIL model on {len(sizes)} bags (sizes {sizes}, {img}×{img} images) on "
        f"{device}; fp32 against bf16 autocast, interleaved on the same model.",
        args,
        __file__,
    )
    if device.type == "cpu":
        report.machine["native bf16 on this CPU"] = cpu_has_bf16()
    report.table("Step time", TIMING_HEADERS, timing_rows(times, "fp32"))
    report.table(
        "Speedup (no target: the issue asks for the comparison)",
        ["fp32 / bf16 (medians)"],
        [[fmt_ratio(speedup)]],
    )
    report.results = {"speedup": speedup, "times": times, "losses": losses}
    report.write()
    return report.results


if __name__ == "__main__":
    main()
