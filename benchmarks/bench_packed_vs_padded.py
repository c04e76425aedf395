"""Benchmark 2: packed instances (milcell) vs a padded-images pipeline, one training step each.

Peers batch bags of images as a padded tensor ``(B, N_max, C, H, W)`` and run
the backbone over all ``B * N_max`` images, padding included; milcell packs
the real instances ``(T, C, H, W)`` and pads only the features. Both variants
use the same backbone, gated-attention pooling and head (the same modules),
on lymphocytosis-like bags (sizes drawn in 16-198). The expected speedup is
close to the ratio of padded to real instances, ``B * N_max / T``.

Run ``python benchmarks/bench_packed_vs_padded.py [--quick] [--device cuda]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from _harness import (
    TIMING_HEADERS,
    compare,
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
    img = pick(args, 224, 32, 16)
    sizes = pick(args, lymphocytosis_sizes(4, gen), lymphocytosis_sizes(4, gen), [2, 5, 3])
    device = args.device

    batch = collate_bags(random_bags(sizes, img, gen)).to(device)
    # The peers' layout: images padded with zeros to (B, N_max, C, H, W) by the collate.
    padded_images = batch.pad(batch.instances)
    mask = batch.mask.to(device)
    model = create_mil_model(backbone, pooling="gated_attention", fusion="linear", num_classes=2).to(device)
    model.train()
    net, pooling, head = model.encoder.backbone, model.pooling, model.head
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def packed_step() -> None:
        opt.zero_grad(set_to_none=True)
        mil_loss(model(batch), batch).backward()
        opt.step()

    def padded_step() -> None:
        opt.zero_grad(set_to_none=True)
        b, n = padded_images.shape[:2]
        features = net(padded_images.flatten(0, 1)).view(b, n, -1)
        logits = head(pooling(features, mask), None).logits
        F.cross_entropy(logits, batch.labels).backward()
        opt.step()

    total, padded_total = sum(sizes), len(sizes) * max(sizes)
    expected = padded_total / total
    log(f"bench_packed_vs_padded: {backbone}, bags {sizes} of {img}x{img} ({args.mode})")
    times = compare(
        {"padded images (B, N_max, C, H, W)": padded_step, "packed instances (milcell)": packed_step},
        args.repeats,
        device,
        warmup=args.warmup,
    )
    speedup = median(times["padded images (B, N_max, C, H, W)"]) / median(times["packed instances (milcell)"])

    report = new_report(
        "packed_vs_padded",
        "Packed instances vs padded images",
        f"One training step (forward, loss, backward, Adam step) with {backbone}, gated-attention "
        f"pooling and a linear head on {len(sizes)} lymphocytosis-like bags (sizes {sizes}, "
        f"{img}×{img} images): milcell's packed instances ({total} images through the backbone) "
        f"against the padded-images layout of peers ({len(sizes)} × {max(sizes)} = {padded_total} images "
        "through the backbone). Same modules, same weights.",
        args,
        __file__,
    )
    report.table("Step time", TIMING_HEADERS, timing_rows(times, "padded images (B, N_max, C, H, W)"))
    report.table(
        "Speedup",
        ["padded / real instances", "measured speedup (padded / packed)", "speedup / instance ratio"],
        [[fmt_ratio(expected), fmt_ratio(speedup), f"{speedup / expected:.2f}"]],
    )
    close = speedup >= 0.85 * expected
    report.goal(
        f"speedup close to the padded/real instance ratio {expected:.2f} (≥ 85 % of it)",
        fmt_ratio(speedup),
        close,
    )
    report.notes.append(
        "The padded variant normalises its BatchNorm layers over the padding images too (as peers do); "
        "that changes its numbers, not its cost."
    )
    report.results = {"speedup": speedup, "expected": expected, "times": times}
    report.write()
    return report.results


if __name__ == "__main__":
    main()
