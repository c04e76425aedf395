"""Tests of the aggregators transmil, dsmil, clam_sb and clam_mb (milcell.nn.aggregators).

Invariances by hypothesis (padding, batch independence, permutation where the method has it),
exact semantics of each method, the auxiliary losses and their composition in MILModel.loss,
every fusion head, an image backbone, and a short training run on a toy problem.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import milcell
from milcell.data.bag import Bag, collate_bags
from milcell.exceptions import ConfigError, DataError
from milcell.nn.aggregators.clam import smooth_top1_svm
from milcell.nn.aggregators.transmil import grid_side
from milcell.nn.fusion import list_fusions
from milcell.nn.model import create_mil_model, mil_loss
from milcell.nn.pooling import MILPooling, create_pooling, list_poolings
from tests._factories import make_batch
from tests.nn.test_host_sync import no_host_reads

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["transmil", "dsmil", "clam_sb", "clam_mb"]
#: small configurations; "transmil_nystrom" is transmil with the Nyström first layer (fewer
#: landmarks than most bags, so the approximation itself is exercised)
CONFIGS: dict[str, tuple[str, dict]] = {
    "transmil": ("transmil", {"hidden": 16, "heads": 2}),
    "transmil_nystrom": ("transmil", {"hidden": 16, "heads": 2, "attention": "nystrom", "landmarks": 4}),
    "dsmil": ("dsmil", {"num_classes": 3, "query_dim": 8}),
    "clam_sb": ("clam_sb", {"num_classes": 3, "hidden": (16, 8), "k": 2, "subtyping": True}),
    "clam_mb": ("clam_mb", {"num_classes": 3, "hidden": (16, 8), "k": 2, "subtyping": True}),
}
INVARIANT = ["dsmil", "clam_sb", "clam_mb"]
GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30, -1e30)


@functools.cache
def _pool(config: str, dim: int) -> MILPooling:
    torch.manual_seed(7 + dim)
    name, kwargs = CONFIGS[config]
    return create_pooling(name, dim, **kwargs).eval()


def _run(pool: MILPooling, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = pool.forward_aux(x, mask)
    return out.embedding, out.attention


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


@st.composite
def bags(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A padded batch ``x (B, N, D)`` with garbage at masked positions (anywhere) and its mask."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 11))
    d = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rows = draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=b, max_size=b))
    first = draw(st.lists(st.integers(0, n - 1), min_size=b, max_size=b))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g) * draw(st.sampled_from([0.3, 1.0, 3.0]))
    mask = torch.tensor(rows, dtype=torch.bool).reshape(b, n)
    mask[torch.arange(b), torch.tensor(first)] = True
    garbage = torch.tensor(GARBAGE)[torch.randint(0, len(GARBAGE), (b, n, d), generator=g)]
    return torch.where(mask.unsqueeze(-1), x, garbage), mask, seed


# --------------------------------------------------------------------------- invariances


def test_registered() -> None:
    assert set(NAMES) <= set(list_poolings())
    assert create_pooling("dsmil", 4).prediction_level
    assert not any(create_pooling(n, 4).prediction_level for n in ("transmil", "clam_sb", "clam_mb"))


@pytest.mark.parametrize("config", list(CONFIGS))
@settings(max_examples=20)
@given(data=bags(), extra=st.integers(1, 5), value=st.sampled_from(GARBAGE))
def test_padding_invariance(config: str, data: tuple, extra: int, value: float) -> None:
    x, mask, _ = data
    pool = _pool(config, x.shape[-1])
    emb, w = _run(pool, x, mask)
    b, n, d = x.shape
    x_pad = torch.cat([x, torch.full((b, extra, d), value)], dim=1)
    m_pad = torch.cat([mask, torch.zeros(b, extra, dtype=torch.bool)], dim=1)
    emb2, w2 = _run(pool, x_pad, m_pad)
    _close(emb2, emb)
    _close(w2[:, :n], w)
    assert bool((w2[:, n:] == 0).all()) and bool((w[~mask] == 0).all())
    assert bool(torch.isfinite(emb).all()) and bool(torch.isfinite(w).all())
    _close(w.sum(dim=1), torch.ones(b))


@pytest.mark.parametrize("config", list(CONFIGS))
@settings(max_examples=20)
@given(data=bags())
def test_batch_independence(config: str, data: tuple) -> None:
    """Each bag alone, with only its real instances (N_max = n_i), gives its output in the batch."""
    x, mask, _ = data
    pool = _pool(config, x.shape[-1])
    emb, w = _run(pool, x, mask)
    for i in range(x.shape[0]):
        xi = x[i][mask[i]].unsqueeze(0)
        ei, wi = _run(pool, xi, torch.ones(xi.shape[:2], dtype=torch.bool))
        _close(ei, emb[i : i + 1])
        _close(wi[0], w[i][mask[i]])


@pytest.mark.parametrize("config", INVARIANT)
@settings(max_examples=20)
@given(data=bags())
def test_permutation_invariance(config: str, data: tuple) -> None:
    x, mask, seed = data
    pool = _pool(config, x.shape[-1])
    emb, w = _run(pool, x, mask)
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.stack([torch.randperm(x.shape[1], generator=g) for _ in range(x.shape[0])])
    emb_p, w_p = _run(pool, x.gather(1, perm.unsqueeze(-1).expand_as(x)), mask.gather(1, perm))
    _close(emb_p, emb)
    _close(w_p, w.gather(1, perm))


def test_transmil_depends_on_the_order_of_the_instances() -> None:
    """Documented: PPEG arranges the instances in their order, so TransMIL is not permutation-invariant."""
    pool = _pool("transmil", 6)
    x = torch.randn(1, 9, 6)
    mask = torch.ones(1, 9, dtype=torch.bool)
    assert not torch.allclose(pool(x, mask), pool(x[:, torch.randperm(9)], mask), atol=1e-4)
    # ...while interleaved padding does not change the order of the real instances
    spread = torch.full((1, 14, 6), float("nan"))
    where = torch.tensor([0, 2, 3, 5, 6, 8, 9, 11, 13])
    spread[0, where] = x[0]
    spread_mask = torch.zeros(1, 14, dtype=torch.bool)
    spread_mask[0, where] = True
    _close(pool(spread, spread_mask), pool(x, mask))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_masked_garbage_gives_no_gradient_and_the_same_gradient(config: str) -> None:
    pool = _pool(config, 5)
    x = torch.randn(2, 6, 5)
    mask = torch.tensor([[True, False, True, True, False, False], [True] * 6])
    dirty = x.clone()
    dirty[0, 1], dirty[0, 4], dirty[0, 5] = float("nan"), float("inf"), -1e30
    grads = []
    for inp in (x, dirty):
        leaf = inp.clone().requires_grad_(True)
        out = pool.forward_aux(leaf, mask)
        (out.embedding.float().pow(2).sum() + (out.attention * torch.arange(6.0)).sum()).backward()
        grads.append(leaf.grad)
    assert grads[1] is not None and bool(torch.isfinite(grads[1]).all())
    assert bool((grads[1][~mask] == 0).all())
    _close(grads[1], grads[0])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_all_masked_bag_is_a_data_error(config: str) -> None:
    pool = _pool(config, 4)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    with milcell.checks(True):
        with pytest.raises(DataError, match="bag 1 of the batch has no real instance"):
            pool(torch.randn(2, 3, 4), mask)
        with pytest.raises(DataError, match="bag 1 of the batch has no real instance"):
            pool.forward_aux(torch.randn(2, 3, 4), mask)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_bf16_autocast_close_to_float32(config: str) -> None:
    pool = _pool(config, 8)
    x = torch.randn(3, 7, 8)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    emb, w = _run(pool, x, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool.forward_aux(x, mask)
    assert out.attention.dtype == torch.float32
    _close(out.attention, w, atol=0.05)
    torch.testing.assert_close(out.embedding.float(), emb, atol=0.1, rtol=0.05)
    assert bool((out.attention[~mask] == 0).all())


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_bag_of_one_instance(config: str) -> None:
    pool = _pool(config, 4)
    out = pool.forward_aux(torch.randn(1, 1, 4), torch.ones(1, 1, dtype=torch.bool))
    assert out.attention.tolist() == [[1.0]]
    assert out.embedding.shape == (1, pool.out_dim) and bool(torch.isfinite(out.embedding).all())
    for value in pool.auxiliary_losses(out.aux, torch.tensor([1])).values():
        assert bool(torch.isfinite(value))


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="hidden must be a multiple of heads=3"):
        create_pooling("transmil", 4, hidden=16, heads=3)
    with pytest.raises(ConfigError, match="attention must be"):
        create_pooling("transmil", 4, attention="linformer")
    with pytest.raises(ConfigError, match="k must be an integer >= 1"):
        create_pooling("clam_sb", 4, k=0)
    with pytest.raises(ConfigError, match="instance_loss must be"):
        create_pooling("clam_mb", 4, instance_loss="focal")
    with pytest.raises(ConfigError, match="subtyping must be a bool"):
        create_pooling("clam_mb", 4, subtyping=1)
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 2"):
        create_pooling("dsmil", 4, num_classes=1)
    with pytest.raises(ConfigError, match="max_instance_loss_weight"):
        create_pooling("dsmil", 4, max_instance_loss_weight=-1.0)


# --------------------------------------------------------------------------- transmil


def test_grid_side_is_the_exact_ceiling_square_root() -> None:
    values = [*range(20000), 2**24 - 1, 2**24, 2**24 + 1, 10**9, 10**12 + 1]
    n = torch.tensor(values)
    expected = torch.tensor([math.isqrt(v - 1) + 1 if v else 0 for v in values])
    assert torch.equal(grid_side(n), expected)


def test_transmil_weights_are_the_class_tokens_attention() -> None:
    pool = _pool("transmil", 4)
    x = torch.randn(1, 5, 4)
    mask = torch.tensor([[True, True, False, True, True]])
    _, w = pool(x, mask, return_attention=True)
    layer = pool.layer2
    # recompute the last layer's class-token row by hand from the first two stages
    xc = torch.where(mask.unsqueeze(-1), x, 0.0)
    tokens = torch.where(mask.unsqueeze(-1), torch.relu(pool.project(xc)), 0.0)
    keys = torch.cat([torch.ones(1, 1, dtype=torch.bool), mask], dim=1)
    z = pool._first_layer(torch.cat([pool.cls_token, tokens], dim=1), keys)
    z = torch.cat([z[:, :1], pool._ppeg(torch.where(mask.unsqueeze(-1), z[:, 1:], 0.0), mask)], dim=1)
    q, k, _ = layer.qkv_heads(z)
    s = (q[:, :, :1] @ k.transpose(-1, -2)) / math.sqrt(layer.head_dim)
    a = torch.softmax(s.masked_fill(~keys.view(1, 1, 1, 6), float("-inf")), dim=-1)[0, :, 0, 1:].mean(0)
    _close(w[0], a / a.sum())


def test_transmil_ppeg_uses_each_bags_own_square() -> None:
    """5 instances: a 3 x 3 square filled row by row, the rest empty; checked against a direct conv."""
    pool = _pool("transmil", 4)
    tokens = torch.randn(1, 5, pool.hidden)
    out = pool._ppeg(tokens, torch.ones(1, 5, dtype=torch.bool))
    grid = torch.zeros(1, pool.hidden, 3, 3)
    for j in range(5):
        grid[0, :, j // 3, j % 3] = tokens[0, j]
    g = grid + sum(conv(grid) for conv in pool.ppeg)
    expected = torch.stack([g[0, :, j // 3, j % 3] for j in range(5)])
    _close(out[0], expected)
    # with a longer padded batch (N_max = 12, a 4 x 4 grid) the bag keeps its 3 x 3 square
    padded = torch.cat([tokens, torch.zeros(1, 7, pool.hidden)], dim=1)
    pmask = torch.cat([torch.ones(1, 5, dtype=torch.bool), torch.zeros(1, 7, dtype=torch.bool)], dim=1)
    _close(pool._ppeg(padded, pmask)[0, :5], expected)


def test_nystrom_is_exact_when_every_token_is_a_landmark() -> None:
    torch.manual_seed(3)
    exact = create_pooling("transmil", 4, hidden=8, heads=1, dropout=0.0).eval()
    nys = create_pooling(
        "transmil", 4, hidden=8, heads=1, attention="nystrom", landmarks=16, pinv_iterations=40, dropout=0.0
    ).eval()
    nys.load_state_dict(exact.state_dict())
    x = torch.randn(2, 6, 4) * 2
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    _close(nys(x, mask), exact(x, mask), atol=1e-3)


def test_nystrom_runs_on_a_long_bag() -> None:
    pool = create_pooling("transmil", 8, hidden=16, heads=2, attention="nystrom", landmarks=8).eval()
    x, mask = torch.randn(2, 300, 8), torch.ones(2, 300, dtype=torch.bool)
    mask[1, 123:] = False
    emb, w = pool(x, mask, return_attention=True)
    assert bool(torch.isfinite(emb).all()) and bool((w[1, 123:] == 0).all())
    _close(pool(x[1:, :123], mask[1:, :123]), emb[1:])


# --------------------------------------------------------------------------- dsmil


def test_dsmil_semantics() -> None:
    pool = _pool("dsmil", 4)
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    x[0, 3:] = 1e6  # would win every class if masked instances could be critical
    out = pool.forward_aux(x, mask)
    aux = out.aux
    xc = torch.where(mask.unsqueeze(-1), x, 0.0)
    inst = pool.instance_classifier(xc)
    real_max = inst.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
    _close(aux["max_scores"], real_max)
    assert bool((aux["critical_instances"][0] < 3).all())
    _close(out.embedding, (aux["max_scores"] + aux["bag_scores"]) / 2)
    # distance-based attention to each class's critical instance, scaled by sqrt(query_dim)
    q = pool.query(xc)
    crit = q[torch.arange(2).unsqueeze(1), aux["critical_instances"]]  # (B, C, d_q)
    s = torch.einsum("bnq,bcq->bcn", q, crit) / math.sqrt(pool.query_dim)
    att = torch.softmax(s.masked_fill(~mask.unsqueeze(1), float("-inf")), dim=-1)
    _close(aux["class_attention"], att)
    _close(out.attention, att.mean(dim=1))
    bag = att @ pool.value(xc)
    _close(aux["bag_scores"], pool.bag_classifier(bag.flatten(1)))


def test_dsmil_max_instance_loss() -> None:
    pool = _pool("dsmil", 4)
    out = pool.forward_aux(torch.randn(3, 4, 4), torch.ones(3, 4, dtype=torch.bool))
    labels = torch.tensor([2, -1, 0])
    loss = pool.auxiliary_losses(out.aux, labels)["max_instance"]
    _close(loss, F.cross_entropy(out.aux["max_scores"][[0, 2]], labels[[0, 2]]))
    none = pool.auxiliary_losses(out.aux, torch.full((3,), -1))["max_instance"]
    assert none.item() == 0.0 and none.requires_grad
    loss.backward()
    assert pool.instance_classifier.weight.grad is not None
    pool.zero_grad()


def test_dsmil_with_clinical_attributes() -> None:
    model = create_mil_model(None, pooling="dsmil", in_dim=6, clinical_dim=2, num_classes=3)
    assert model.pooling.use_clinical and model.pooling.num_classes == 3
    batch = make_batch((3, 1, 4), dim=6, clinical_dim=2, labels=(2, 0, 1))
    out = model(batch)
    assert out.logits.shape == (3, 3)
    batch2 = make_batch((3, 1, 4), dim=6, clinical_dim=2, labels=(2, 0, 1))
    batch2.clinical[0] += 5.0
    assert not torch.allclose(model(batch2).logits[0], out.logits[0])
    _close(model(batch2).logits[1:], out.logits[1:])


# --------------------------------------------------------------------------- clam


def _manual_instance_loss(pool, h, scores, mask, labels) -> torch.Tensor:
    """The CLAM rule written out bag by bag, class by class, on the real instances only."""
    bags = []
    for b in range(h.shape[0]):
        if labels[b] < 0:
            continue
        real = mask[b].nonzero().flatten()
        n = len(real)
        terms = []
        for c in range(pool.num_classes):
            s = scores[b, c if pool.multi_branch else 0, real]
            order = torch.argsort(s, descending=True, stable=True)
            logits = pool.instance_logits(h[b, real])[:, c]  # (n, 2)
            if c == labels[b]:
                k = min(pool.k, n // 2)
                if k == 0:
                    continue
                idx = torch.cat([order[:k], order.flip(0)[:k]])
                target = torch.tensor([1] * k + [0] * k)
            elif pool.subtyping:
                k = min(pool.k, n)
                idx, target = order[:k], torch.zeros(k, dtype=torch.long)
            else:
                continue
            terms.append(F.cross_entropy(logits[idx], target))
        if terms:
            bags.append(torch.stack(terms).mean())
    return torch.stack(bags).mean() if bags else torch.zeros(())


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
@pytest.mark.parametrize("subtyping", [False, True])
def test_clam_instance_loss_follows_the_rule(name: str, subtyping: bool) -> None:
    torch.manual_seed(5)
    pool = create_pooling(name, 5, num_classes=3, hidden=(12, 6), k=3, subtyping=subtyping).eval()
    x = torch.randn(4, 9, 5)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[0, 7:] = False  # n = 7 >= 2k
    mask[1, 4:] = False  # n = 4 < 2k: k_in = 2, k_out = 3
    mask[2, 1:] = False  # n = 1: no in-class term
    labels = torch.tensor([0, 2, 1, -1])
    out = pool.forward_aux(x, mask)
    got = pool.auxiliary_losses(out.aux, labels)["instance"]
    expected = _manual_instance_loss(pool, out.aux["features"], out.aux["attention_scores"], mask, labels)
    _close(got, expected)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
def test_clam_never_selects_masked_instances(name: str) -> None:
    pool = _pool(name, 5)
    x = torch.randn(2, 8, 5)
    mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 8])
    out = pool.forward_aux(x, mask)
    labels = torch.tensor([1, 0])
    base = pool.auxiliary_losses(out.aux, labels)["instance"]
    for extreme in (1e9, -1e9, float("inf"), float("-inf")):  # masked scores that would be picked first
        aux = dict(out.aux)
        aux["attention_scores"] = torch.where(mask.unsqueeze(1), aux["attention_scores"], extreme)
        aux["features"] = torch.where(mask.unsqueeze(-1), aux["features"], float("nan"))
        _close(pool.auxiliary_losses(aux, labels)["instance"], base)
    # and the loss of the batch is that of the bags alone, averaged
    alone = []
    for i in range(2):
        single = pool.forward_aux(x[i : i + 1, mask[i]], mask[i : i + 1, mask[i]])
        alone.append(pool.auxiliary_losses(single.aux, labels[i : i + 1])["instance"])
    _close(base, (alone[0] + alone[1]) / 2)


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
@pytest.mark.parametrize("instance_loss", ["ce", "svm"])
def test_clam_instance_loss_is_finite_and_trains_the_classifiers(name: str, instance_loss: str) -> None:
    pool = create_pooling(name, 5, hidden=(12, 6), k=2, instance_loss=instance_loss).train()
    x = torch.randn(3, 6, 5).requires_grad_(True)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 3:] = False
    out = pool.forward_aux(x, mask)
    loss = pool.auxiliary_losses(out.aux, torch.tensor([0, 1, -1]))["instance"]
    assert bool(torch.isfinite(loss)) and loss.item() > 0
    loss.backward()
    assert pool.instance_classifiers.weight.grad is not None
    assert bool(pool.instance_classifiers.weight.grad.abs().sum() > 0)
    assert x.grad is not None and bool((x.grad[1, 3:] == 0).all())
    unlabelled = pool.auxiliary_losses(out.aux, torch.full((3,), -1))["instance"]
    assert unlabelled.item() == 0.0 and unlabelled.requires_grad


def test_smooth_svm_tends_to_the_hinge_loss() -> None:
    logits = torch.tensor([[0.3, 1.0], [2.0, -1.0], [0.0, 0.0]])
    target = torch.tensor([0, 0, 1])
    hinge = (logits + 1.0 - F.one_hot(target, 2)).amax(dim=1) - logits.gather(1, target[:, None]).squeeze(1)
    _close(smooth_top1_svm(logits, target, tau=1e-3), hinge, atol=1e-2)
    assert bool((smooth_top1_svm(logits, target) >= hinge).all())  # a smooth upper bound


# --------------------------------------------------------------------------- in a model


def _prediction_level(name: str) -> bool:
    return create_pooling(name, 4).prediction_level


SMALL = {
    "transmil": {"hidden": 16, "heads": 2},
    "dsmil": {"query_dim": 8},
    "clam_sb": {"hidden": (16, 8), "k": 2},
    "clam_mb": {"hidden": (16, 8), "k": 2},
}
COMBOS = [(p, f) for p in NAMES for f in ([None] if _prediction_level(p) else list_fusions())]


@pytest.mark.parametrize(("pooling", "fusion"), COMBOS, ids=[f"{p}-{f}" for p, f in COMBOS])
def test_feature_bags_with_every_fusion_head(pooling: str, fusion: str | None) -> None:
    clinical_dim = 0 if fusion in ("linear", None) else 2
    model = create_mil_model(
        None,
        pooling=pooling,
        fusion=fusion,
        in_dim=6,
        clinical_dim=clinical_dim,
        num_classes=3,
        pooling_kwargs=SMALL[pooling],
    ).train()
    batch = make_batch((4, 1, 6), dim=6, clinical_dim=clinical_dim, labels=(2, 0, -1))
    out = model(batch)
    assert out.logits.shape == (3, 3) and bool(torch.isfinite(out.logits).all())
    assert out.attention is not None and out.attention.shape == (3, 6)
    assert torch.equal(out.attention[1, 1:], torch.zeros(5))
    loss = model.loss(out, batch)
    assert loss.ndim == 0 and bool(torch.isfinite(loss))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("pooling", NAMES)
def test_image_bags_on_a_tiny_backbone(pooling: str) -> None:
    fusion = None if _prediction_level(pooling) else "concat"
    model = create_mil_model(
        "milcell_mini_resnet",  # K = 4 (the registered presets start at k8)
        pooling=pooling,
        fusion=fusion,
        clinical_dim=2,
        chunk_size=4,
        backbone_kwargs={"width": 4},
        pooling_kwargs=SMALL[pooling],
    ).train()
    batch = make_batch((3, 1, 4), image_size=32, clinical_dim=2)
    out = model(batch)
    assert out.logits.shape == (3, 2) and out.attention is not None and out.attention.shape == (3, 4)
    loss = model.loss(out, batch)
    loss.backward()
    assert bool(torch.isfinite(loss))


@pytest.mark.parametrize("pooling", ["dsmil", "clam_sb", "clam_mb"])
def test_the_model_loss_adds_the_weighted_auxiliary_loss(pooling: str) -> None:
    model = create_mil_model(None, pooling=pooling, in_dim=6, num_classes=3, pooling_kwargs=SMALL[pooling])
    batch = make_batch((5, 2, 7), dim=6, labels=(2, 0, 1))
    out = model(batch)
    ((name, weight),) = model.pooling.aux_loss_weights.items()
    aux = model.pooling.auxiliary_losses(out.aux, batch.labels)[name]
    bag = mil_loss(out, batch)
    _close(model.loss(out, batch), bag + weight * aux)
    _close(model.loss(out, batch, aux_weights={name: 2.0}), bag + 2.0 * aux)
    _close(model.loss(out, batch, aux_weights={name: 0.0}), bag)


@pytest.mark.parametrize("pooling", ["dsmil", "clam_sb", "clam_mb"])
def test_the_auxiliary_losses_read_nothing_on_the_host(pooling: str) -> None:
    model = create_mil_model(None, pooling=pooling, in_dim=6, pooling_kwargs=SMALL[pooling]).train()
    batch = make_batch((3, 1, 5), dim=6, labels=(1, 0, -1))
    with milcell.checks(False), no_host_reads():
        out = model(batch)
        loss = model.pooling.auxiliary_losses(out.aux, batch.labels)
        total = sum(loss.values()) + out.logits.sum()
        total.backward()


def _toy_bags(n_bags: int, seed: int) -> list[Bag]:
    """Bags of 3..10 standard-normal instances; positive iff one instance has feature 0 shifted by +4."""
    g = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n_bags):
        n = int(torch.randint(3, 11, (1,), generator=g))
        x = torch.randn(n, 6, generator=g)
        label = i % 2
        if label:
            x[int(torch.randint(0, n, (1,), generator=g)), 0] += 4.0
        bags.append(Bag(x, label))
    return bags


@pytest.mark.slow
@pytest.mark.parametrize("pooling", NAMES)
def test_training_on_a_toy_problem_beats_chance(pooling: str) -> None:
    torch.manual_seed(0)
    model = create_mil_model(None, pooling=pooling, in_dim=6, pooling_kwargs=SMALL[pooling])
    train, test = _toy_bags(96, seed=1), collate_bags(_toy_bags(64, seed=2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(12):
        for start in range(0, len(train), 16):
            batch = collate_bags(train[start : start + 16])
            loss = model.loss(model(batch), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test).logits.argmax(dim=1) == test.labels).float().mean().item()
    assert accuracy >= 0.8, f"{pooling}: toy accuracy {accuracy:.2f}"


def test_dsmil_critical_instance_is_the_first_float64_argmax_of_the_real_instances() -> None:
    """Rescoring only the float32 front-runners in float64 picks what a float64 argmax over all picks."""
    torch.manual_seed(0)
    pool = create_pooling("dsmil", 6, num_classes=3, query_dim=4).eval()
    with torch.no_grad():  # integer scores: exact ties between different instances too
        pool.instance_classifier.weight.copy_(torch.randint(-1, 2, (3, 6)))
        pool.instance_classifier.bias.zero_()
    x = torch.randint(-2, 3, (4, 60, 6)).float()  # integer features: many exact ties
    x[:, 5:50:2] = x[:, 3:4]  # copies of one instance
    mask = torch.rand(4, 60) < 0.8
    mask[:, 0] = False
    out = pool.forward_aux(x, mask)
    w, b = pool.instance_classifier.weight.double(), pool.instance_classifier.bias.double()
    exact = torch.where(mask.unsqueeze(-1), x.double() @ w.T + b, float("-inf"))
    ties = (exact == exact.amax(dim=1, keepdim=True)).sum(dim=1)
    assert bool((ties > 1).any()) and int(ties.max()) < 16  # exact ties, fewer than the candidates
    ref = exact.argmax(dim=1)
    assert torch.equal(out.aux["critical_instances"], ref)
