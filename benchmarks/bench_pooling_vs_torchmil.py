"""Benchmark 5: milcell's aggregators vs torchmil's, one training step (forward + backward) each.

For every aggregator both libraries have -- ABMIL (milcell ``attention``), gated ABMIL
(``gated_attention``), CLAM (``clam_sb``), DSMIL (``dsmil``), DTFD-MIL (``dtfd``) and TransMIL
(``transmil``) -- the two implementations are timed side by side, interleaved round by round, on
the same padded feature batch ``(32, 198, 512)`` holding ragged bags (sizes drawn uniformly in
16-198, a mask marking the real instances; ``True``/1 = real in both libraries).

One step is what training does: the forward pass, the loss (bag loss plus the method's
auxiliary losses; for the two attention poolings the mean of the squared bag embeddings) and the
backward pass to the parameters and the features. Where the two definitions coincide the
torchmil module gets milcell's weights and the outputs are compared; where they differ the
table says how instead. A torchmil model whose ``forward`` takes no mask (TransMIL) cannot run
a padded batch: it is timed bag by bag in a loop, as its users have to run it; DTFD-MIL is timed
both ways, because its batched forward lets padding into the pseudo-bags.

torchmil is not a milcell dependency: install it only for this benchmark, into a private
folder the script puts on ``sys.path``::

    pip install --no-deps --target benchmarks/.torchmil torchmil einops tensordict pyvers orjson cloudpickle

(``torchmil.models`` imports tensordict, which needs the last three.)
Without it the script says so and times milcell alone.

Run ``python benchmarks/bench_pooling_vs_torchmil.py [--quick] [--device cuda] [--aggregators a,b]``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from _harness import (
    TIMING_HEADERS,
    TORCHMIL_DIR,
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
    set_seed,
    timing_rows,
)
from torch import Tensor, nn

from milcell.nn.pooling import create_pooling

AGGREGATORS = ("attention", "gated_attention", "clam_sb", "dsmil", "dtfd", "transmil")


def import_torchmil() -> tuple[Any, str]:
    """The ``torchmil`` module (or None) and a line saying where it came from."""
    if TORCHMIL_DIR.is_dir() and str(TORCHMIL_DIR) not in sys.path:
        sys.path.append(str(TORCHMIL_DIR))
    try:
        import torchmil
        import torchmil.models
        import torchmil.nn
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
    return torchmil, f"torchmil {version}"


@dataclass
class Case:
    """One aggregator: its variants (milcell first), how the outputs compare, and the goal's peer."""

    name: str
    milcell: str
    variants: dict[str, Callable[[], None]] = field(default_factory=dict)
    peer: str | None = None  # the torchmil variant the goal compares with
    outputs: str = "torchmil unavailable"
    masking: str = ""
    difference: float | None = None


def _inner(m: nn.Module) -> nn.Module:
    """torchmil wraps some layers in a ``LazyLinear`` holding the ``nn.Linear`` as ``.module``."""
    return getattr(m, "module", m)


def _copy_linear(dst: nn.Module, src: nn.Linear, bias: bool = True) -> None:
    dst = _inner(dst)
    dst.weight.copy_(src.weight)  # type: ignore[operator]
    if bias:
        dst.bias.copy_(src.bias)  # type: ignore[operator]


def _milcell_step(
    pool: nn.Module, head: nn.Module | None, x: Tensor, mask: Tensor, y: Tensor, squared: bool
) -> Callable[[], None]:
    """A step of a milcell pooling: bag loss (+ weighted auxiliary losses), backward."""

    def step() -> None:
        x.grad = None
        out = pool.forward_aux(x, mask)
        if squared:
            loss = out.embedding.square().mean()
        else:
            logits = out.embedding if head is None else head(out.embedding)
            loss = F.cross_entropy(logits.float(), y)
            weights = pool.aux_loss_weights
            if weights:
                for name, value in pool.auxiliary_losses(out.aux, y).items():
                    loss = loss + weights[name] * value
        loss.backward()

    return step


def _torchmil_step(
    model: nn.Module, x: Tensor, mask: Tensor | None, y: Tensor, weights: dict[str, float]
) -> Callable[[], None]:
    """A step of a torchmil model on the padded batch: ``compute_loss``, weighted sum, backward."""

    def step() -> None:
        x.grad = None
        args = (y.float(), x) if mask is None else (y.float(), x, mask)
        _, losses = model.compute_loss(*args)
        sum(weights.get(k, 1.0) * v for k, v in losses.items()).backward()

    return step


def _torchmil_per_bag(
    model: nn.Module, x: Tensor, sizes: Sequence[int], y: Tensor, takes_mask: bool
) -> Callable[[], None]:
    """A step of a torchmil model run bag by bag (batch size 1, no padding), losses averaged."""

    def step() -> None:
        x.grad = None
        total: Any = 0.0
        for i, n in enumerate(sizes):
            xi = x[i : i + 1, :n]
            args = (y[i : i + 1].float(), xi)
            if takes_mask:
                args = (*args, torch.ones(1, n, dtype=torch.bool, device=x.device))
            _, losses = model.compute_loss(*args)
            total = total + sum(losses.values())
        (total / len(sizes)).backward()

    return step


def build_cases(
    names: Sequence[str],
    tm: Any,
    x: Tensor,
    mask: Tensor,
    y: Tensor,
    sizes: Sequence[int],
    dims: dict[str, int],
) -> list[Case]:
    """milcell's and (if importable) torchmil's module per aggregator, weights shared where possible."""
    d, hidden, big, heads, groups = dims["d"], dims["hidden"], dims["big"], dims["heads"], dims["groups"]
    device = x.device
    cases = []
    for name in names:
        case = Case(name, f"milcell {name}")
        if name in ("attention", "gated_attention"):
            ours = create_pooling(name, d, hidden=hidden).to(device)
            case.variants[case.milcell] = _milcell_step(ours, None, x, mask, y, squared=True)
            if tm is not None:
                gated = name == "gated_attention"
                theirs = tm.nn.AttentionPool(in_dim=d, att_dim=hidden, gated=gated).to(device)
                with torch.no_grad():  # milcell's output bias shifts every score equally: no effect
                    _copy_linear(theirs.fc1, ours.attention_v)
                    if gated:
                        _copy_linear(theirs.fc_gated, ours.attention_u)
                    theirs.fc2.weight.copy_(ours.attention_w.weight)
                    case.difference = float((ours(x, mask) - theirs(x, mask)).abs().max())
                case.peer = f"torchmil AttentionPool(gated={gated})"

                def peer_step(theirs: nn.Module = theirs) -> None:
                    x.grad = None
                    theirs(x, mask).square().mean().backward()

                case.variants[case.peer] = peer_step
                case.outputs = "same definition, same weights: bag embeddings compared"
                case.masking = "both exact (the mask enters the softmax)"
        elif name == "clam_sb":
            ours = create_pooling(name, d, hidden=(big, hidden), dropout=0.0, k=8, instance_loss="svm").to(
                device
            )
            head = nn.Linear(big, 2).to(device)
            case.variants[case.milcell] = _milcell_step(ours, head, x, mask, y, squared=False)
            if tm is not None:
                embed = nn.Sequential(nn.Linear(d, big), nn.ReLU()).to(device)
                theirs = tm.models.CLAM_SB(
                    in_shape=(d,),
                    att_dim=hidden,
                    gated=True,
                    k_sample=8,
                    inst_loss_name="SmoothTop1SVM",
                    feat_ext=embed,
                ).to(device)
                with torch.no_grad():
                    _copy_linear(embed[0], ours.embed[0])
                    _copy_linear(theirs.pool.fc1, ours.attention_v)
                    _copy_linear(theirs.pool.fc_gated, ours.attention_u)
                    theirs.pool.fc2.weight.copy_(ours.attention_w.weight)
                    mine = ours.eval()(x, mask)
                    ours.train()
                    case.difference = float((mine - theirs.pool(embed(x), mask)).abs().max())
                case.peer = "torchmil CLAM_SB (batched)"
                case.variants[case.peer] = _torchmil_step(
                    theirs, x, mask, y, {"BCEWithLogitsLoss": 1.0, "InstLoss": 0.3}
                )
                case.outputs = (
                    "bag embeddings compared (same weights; torchmil's embedding layer given as feat_ext); "
                    "both use the smooth top-1 SVM instance loss (torchmil's BCE option fails on its "
                    "2-logit classifiers)"
                )
                case.masking = (
                    "milcell exact; torchmil's compute_loss calls the instance loss without the mask, "
                    "so padded positions can be picked as top-/bottom-k instances, and loops over the "
                    "bags with a host sync each"
                )
        elif name == "dsmil":
            ours = create_pooling(name, d, query_dim=hidden).to(device)
            case.variants[case.milcell] = _milcell_step(ours, None, x, mask, y, squared=False)
            if tm is not None:
                theirs = tm.models.DSMIL(in_shape=(d,), att_dim=hidden).to(device)
                case.peer = "torchmil DSMIL (batched)"
                weights = {"BCEWithLogitsLoss": 1.0, "BCEWithLogitsLoss_max": 0.5}
                case.variants[case.peer] = _torchmil_step(theirs, x, mask, y, weights)
                case.outputs = (
                    "not compared: milcell has C class scores (softmax) and a value projection, "
                    "torchmil one logit (sigmoid) and the identity"
                )
                case.masking = (
                    "milcell exact; torchmil picks the critical instance and the max-instance score "
                    "over every position, padding included"
                )
        elif name == "dtfd":
            ours = create_pooling(name, d, num_pseudo_bags=groups, dim=hidden, hidden=hidden).to(device)
            head = nn.Linear(hidden, 2).to(device)
            case.variants[case.milcell] = _milcell_step(ours, head, x, mask, y, squared=False)
            if tm is not None:
                reduce = nn.Sequential(nn.Linear(d, hidden), nn.ReLU()).to(device)
                theirs = tm.models.DTFDMIL(
                    in_shape=(d,), att_dim=hidden, n_groups=groups, distill_mode="afs", feat_ext=reduce
                ).to(device)
                case.peer = "torchmil DTFDMIL (batched)"
                case.variants[case.peer] = _torchmil_step(theirs, x, mask, y, {})
                case.variants["torchmil DTFDMIL (per bag)"] = _torchmil_per_bag(
                    theirs, x, sizes, y, takes_mask=True
                )
                case.outputs = (
                    "not compared: random pseudo-bags; milcell's tier-1 attention is gated, torchmil's is not"
                )
                case.masking = (
                    "milcell exact (eager on the CPU its per-instance layers run on the real instances "
                    "only, gathered, so the padding is neither read nor computed; on an accelerator on "
                    "the zeroed padded batch); torchmil batched splits the padded positions into the "
                    "pseudo-bags (a bag's pseudo-bags depend on N_max, some hold padding only), exact only "
                    "per bag"
                )
        elif name == "transmil":
            ours = create_pooling(name, d, hidden=big, heads=heads, dropout=0.0).to(device)
            head = nn.Linear(big, 2).to(device)
            case.variants[case.milcell] = _milcell_step(ours, head, x, mask, y, squared=False)
            if tm is not None:
                theirs = tm.models.TransMIL(in_shape=(d,), att_dim=big, n_heads=heads, dropout=0.0).to(device)
                case.peer = "torchmil TransMIL (per bag)"
                case.variants[case.peer] = _torchmil_per_bag(theirs, x, sizes, y, takes_mask=False)
                case.outputs = (
                    "not compared: milcell exact attention, torchmil Nyström attention; torchmil fills "
                    "the square with copies of the first instances, milcell with masked zeros"
                )
                case.masking = (
                    "milcell exact on the padded batch; torchmil's forward takes no mask, so ragged "
                    "bags must run one at a time (batch size 1)"
                )
        else:
            raise ValueError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}")
        cases.append(case)
    return cases


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = make_parser(__doc__.splitlines()[0], default_repeats=15)
    parser.add_argument(
        "--aggregators",
        default=",".join(AGGREGATORS),
        help=f"comma-separated subset of {','.join(AGGREGATORS)}",
    )
    args = parse(parser, argv)
    names = [n.strip() for n in args.aggregators.split(",") if n.strip()]
    unknown = sorted(set(names) - set(AGGREGATORS))
    if unknown or not names:
        parser.error(f"--aggregators: unknown {unknown}; choose from {','.join(AGGREGATORS)}")
    gen = set_seed(args.seed)
    b, n, d = pick(args, (32, 198, 512), (32, 198, 512), (4, 20, 16))
    dims = {
        "d": d,
        "hidden": pick(args, 128, 128, 8),
        "big": pick(args, 512, 512, 8),
        "heads": pick(args, 8, 8, 2),
        "groups": pick(args, 8, 8, 2),
    }
    inner = pick(args, 3, 1, 1)
    device = args.device

    sizes = lymphocytosis_sizes(b, gen, min(16, n), n)
    sizes[0] = n  # the largest bag fills the padded length
    mask = (torch.arange(n).unsqueeze(0) < torch.tensor(sizes).unsqueeze(1)).to(device)
    x = torch.randn(b, n, d, generator=gen).to(device).requires_grad_(True)
    y = torch.randint(0, 2, (b,), generator=gen).to(device)

    tm, origin = import_torchmil()
    cases = build_cases(names, tm, x, mask, y, sizes, dims)
    log(f"bench_pooling_vs_torchmil: ({b}, {n}, {d}) features, {origin} ({args.mode})")
    times: dict[str, dict[str, list[float]]] = {}
    for case in cases:
        log(f"  {case.name}: {', '.join(case.variants)}")
        times[case.name] = compare(
            case.variants, args.repeats, device, warmup=max(args.warmup, 1), inner=inner
        )

    report = new_report(
        "pooling_vs_torchmil",
        "MIL aggregators: milcell vs torchmil",
        f"One training step (forward, loss, backward to the parameters and the features) of each "
        f"aggregator both libraries have, on padded features ({b}, {n}, {d}) holding ragged bags of "
        f"{min(sizes)}-{max(sizes)} instances (mean {sum(sizes) / len(sizes):.0f}) and their mask. "
        f"Loss: the mean of the squared bag embeddings for the two attention poolings; otherwise the bag "
        f"loss on a linear head (milcell cross-entropy, torchmil's BCE) plus the method's auxiliary "
        f"losses (CLAM instance loss × 0.3, DSMIL max-instance loss × 0.5, DTFD tier-1 loss × 1). "
        f"Sizes: attention {dims['hidden']}, CLAM ({dims['big']}, {dims['hidden']}), TransMIL width "
        f"{dims['big']} with {dims['heads']} heads, DTFD {dims['groups']} pseudo-bags of width "
        f"{dims['hidden']}. Each timed block runs {inner} step(s). Peer: {origin}.",
        args,
        __file__,
    )
    results: dict[str, Any] = {"times": times, "torchmil": tm is not None, "ratios": {}, "differences": {}}
    summary = []
    for case in cases:
        t = times[case.name]
        mine = median(t[case.milcell])
        if case.peer is None:
            report.table(f"{case.name}: time per step", TIMING_HEADERS, timing_rows(t, case.milcell))
            summary.append([case.name, fmt_time(mine), "—", "—", "torchmil unavailable", "—"])
            report.goal(f"{case.name}: milcell at least as fast as torchmil", "torchmil unavailable", None)
            continue
        ratio = median(t[case.peer]) / mine
        results["ratios"][case.name] = ratio
        results["differences"][case.name] = case.difference
        report.table(f"{case.name}: time per step", TIMING_HEADERS, timing_rows(t, case.peer))
        diff = "not compared" if case.difference is None else f"max |Δ| {case.difference:.1e}"
        summary.append(
            [case.name, fmt_time(mine), case.peer, fmt_time(median(t[case.peer])), fmt_ratio(ratio), diff]
        )
        report.goal(
            f"{case.name}: milcell, masking exactly, at least as fast as {case.peer} "
            f"(torchmil time / milcell time ≥ 1)",
            fmt_ratio(ratio),
            ratio >= 1.0,
        )
        report.notes.append(f"{case.name} — outputs: {case.outputs}. Masking: {case.masking}.")
    report.tables.insert(
        0,
        (
            "Summary (medians; ratio = torchmil time / milcell time)",
            ["aggregator", "milcell", "torchmil variant", "torchmil", "speed-up", "outputs"],
            summary,
        ),
    )
    if tm is None:
        report.notes.append(f"{origin}; install it as the module docstring says to compare.")
    report.notes.append(
        "milcell's poolings also validate their inputs (shapes, dtype, no empty bag: one host sync) and "
        "zero the padded positions (DTFD on the CPU gathers the real instances instead), so NaN/inf "
        "padding cannot leak into outputs or gradients."
    )
    report.results = results
    report.write()
    return results


if __name__ == "__main__":
    main()
