"""Benchmark 3: frozen-feature 5-fold x 30-epoch cross-validation vs one embedding pass.

With a frozen backbone, milcell embeds every cell once
(:func:`milcell.train.features.extract_features`) and trains the MIL heads on
the cached features (:func:`milcell.train.crossval.cross_validate` over
:func:`~milcell.train.crossval.feature_subset`). The whole cross-validation
should cost about one backbone pass over the images, however many folds and
epochs follow.

Run ``python benchmarks/bench_feature_cv.py [--quick] [--device cuda]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from _harness import (
    compare,
    fmt_ratio,
    fmt_time,
    log,
    lymphocytosis_sizes,
    make_parser,
    median,
    new_report,
    parse,
    pick,
    random_bags,
    set_seed,
)

from milcell.nn.backbones import create_backbone
from milcell.nn.model import create_mil_model
from milcell.train.crossval import cross_validate, feature_subset
from milcell.train.features import extract_features

GOAL = 1.3


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.splitlines()[0], default_repeats=1)
    args = parse(parser, argv)
    gen = set_seed(args.seed)
    name = pick(args, "resnet18", "resnet18", "milcell_mini_resnet_k8")
    img = pick(args, 224, 64, 16)
    n_bags = pick(args, 40, 20, 10)
    sizes = pick(args, lymphocytosis_sizes(n_bags, gen), lymphocytosis_sizes(n_bags, gen, 16, 64), [2, 3] * 5)
    folds, epochs = 5, pick(args, 30, 30, 2)
    batch_size = 4
    device = args.device

    bags = random_bags(sizes, img, gen)
    labels = [bag.label for bag in bags]
    backbone = create_backbone(name, trainable="head").to(device).eval()
    dim = backbone.num_features
    holder: dict[str, Any] = {}

    def embed() -> None:
        holder["features"] = extract_features(
            backbone, bags, None, batch_size=batch_size, chunk_size=256, device=device, progress=False
        )

    def crossval() -> None:
        ds = holder["features"]
        holder["cv"] = cross_validate(
            lambda: create_mil_model(None, pooling="gated_attention", in_dim=dim, num_classes=2),
            lambda fold: (feature_subset(ds, fold.train), feature_subset(ds, fold.val)),
            labels,
            n_splits=folds,
            batch_size=batch_size,
            trainer_kwargs={"max_epochs": epochs, "progress": False, "device": device},
            keep_models=False,
        )

    log(f"bench_feature_cv: {name}, {n_bags} bags, {sum(sizes)} images of {img}x{img} ({args.mode})")
    embed()  # the cross-validation needs features before its first (warm-up) call
    times = compare(
        {"one embedding pass": embed, f"{folds}-fold × {epochs}-epoch CV on features": crossval},
        args.repeats,
        device,
        warmup=args.warmup,
    )
    t_embed = median(times["one embedding pass"])
    t_cv = median(times[f"{folds}-fold × {epochs}-epoch CV on features"])
    cv_ratio, total_ratio = t_cv / t_embed, (t_embed + t_cv) / t_embed

    report = new_report(
        "feature_cv",
        "Frozen-feature cross-validation vs one embedding pass",
        f"A frozen {name} embeds {n_bags} bags ({sum(sizes)} images of {img}×{img}, bag sizes "
        f"{min(sizes)}-{max(sizes)}) once with extract_features (no disk cache, so every call embeds); "
        f"then {folds}-fold × {epochs}-epoch cross_validate trains a gated-attention head "
        f"(batch size {batch_size}, Adam) on the features through feature_subset, with a validation "
        "pass per epoch and out-of-fold predictions.",
        args,
        __file__,
    )
    report.table(
        "Time",
        ["part", "median", "ratio to the embedding pass"],
        [
            ["one embedding pass", fmt_time(t_embed), "1.00×"],
            [f"{folds}-fold × {epochs}-epoch CV", fmt_time(t_cv), fmt_ratio(cv_ratio)],
            ["embedding + CV", fmt_time(t_embed + t_cv), fmt_ratio(total_ratio)],
        ],
    )
    report.goal(f"CV on cached features ≤ {GOAL}× one embedding pass", fmt_ratio(cv_ratio), cv_ratio <= GOAL)
    report.notes.append(
        "The CV cost grows with the number of bags × folds × epochs, the embedding cost with the number "
        "of images × the backbone's cost per image; small images or small bags (--quick) favour the "
        "embedding pass, so the ratio there overstates the realistic one (224×224 images, ~100 cells "
        "per bag)."
    )
    report.results = {"cv_ratio": cv_ratio, "total_ratio": total_ratio, "times": times}
    report.write()
    return report.results


if __name__ == "__main__":
    main()
