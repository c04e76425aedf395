"""Benchmark 1: one MIL training step vs the bare backbone step on the same real instances.

The MIL step is ``MILModel(batch) -> mil_loss -> backward -> Adam step`` (packed
instances, backbone, pad + mask, gated-attention pooling, linear head). The
bare step runs the same backbone (same weights) on the same packed instances
with a per-instance linear classifier and cross-entropy, then backward and an
Adam step. Their ratio is what MIL costs on top of the backbone.

Run ``python benchmarks/bench_mil_step.py [--quick] [--device cuda]``.
"""

from __future__ import annotations

import copy
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

GOAL = 1.05


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.splitlines()[0], default_repeats=5)
    args = parse(parser, argv)
    gen = set_seed(args.seed)
    backbone = pick(args, "resnet18", "resnet18", "milcell_mini_resnet_k8")
    img = pick(args, 224, 64, 32)
    sizes = pick(args, lymphocytosis_sizes(2, gen), [24, 40], [3, 5])
    device = args.device

    batch = collate_bags(random_bags(sizes, img, gen)).to(device)
    model = create_mil_model(backbone, pooling="gated_attention", fusion="linear", num_classes=2).to(device)
    model.train()
    bare = copy.deepcopy(model.encoder.backbone).train()
    classifier = torch.nn.Linear(bare.num_features, 2).to(device)
    instance_labels = batch.labels[batch.bag_index]
    opt_mil = torch.optim.Adam(model.parameters(), lr=1e-4)
    opt_bare = torch.optim.Adam([*bare.parameters(), *classifier.parameters()], lr=1e-4)

    def mil_step() -> None:
        opt_mil.zero_grad(set_to_none=True)
        loss = mil_loss(model(batch), batch)
        loss.backward()
        opt_mil.step()

    def bare_step() -> None:
        opt_bare.zero_grad(set_to_none=True)
        loss = F.cross_entropy(classifier(bare(batch.instances)), instance_labels)
        loss.backward()
        opt_bare.step()

    log(f"bench_mil_step: {backbone} on {sum(sizes)} instances of {img}x{img} ({args.mode})")
    times = compare(
        {"bare backbone step": bare_step, "MIL step (milcell)": mil_step},
        args.repeats,
        device,
        warmup=args.warmup,
    )
    ratio = median(times["MIL step (milcell)"]) / median(times["bare backbone step"])

    report = new_report(
        "mil_step",
        "MIL training step vs bare backbone step",
        f"One training step (forward, loss, backward, Adam step) of a milcell MIL model "
        f"({backbone}, gated-attention pooling, linear head) on a batch of {len(sizes)} bags "
        f"(sizes {sizes}, T = {sum(sizes)} images of {img}×{img}), against the same backbone "
        "(same weights) with a per-instance linear classifier on the same packed instances.",
        args,
        __file__,
    )
    report.table("Step time", TIMING_HEADERS, timing_rows(times, "bare backbone step"))
    report.goal(f"MIL step ≤ {GOAL}× the bare backbone step", fmt_ratio(ratio), ratio <= GOAL)
    if args.mode != "full":
        report.notes.append(
            "Small images make the backbone cheap, so the fixed cost of pooling, padding and the input "
            "checks weighs more than at 224×224; run without --quick for the realistic ratio."
        )
    report.results = {"ratio": ratio, "times": times}
    report.write()
    return report.results


if __name__ == "__main__":
    main()
