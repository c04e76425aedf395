"""Tests of milcell.nn.pooling: hypothesis invariances, exact semantics and input validation."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from milcell.exceptions import ConfigError, DataError, ShapeError
from milcell.nn.pooling import (
    ConvPooling,
    InstanceMeanPooling,
    MILPooling,
    create_pooling,
    list_poolings,
    masked_softmax,
)

NAMES = ["mean", "max", "lse", "attention", "gated_attention", "conv", "instance_mean"]
GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30, -1e30)
CLINICAL_DIM = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def _pool(name: str, dim: int) -> MILPooling:
    """One deterministic pooling per (name, D); instance_mean with clinical attributes, to cover them."""
    torch.manual_seed(1000 + dim)
    kwargs: dict = {}
    if name in ("attention", "gated_attention"):
        kwargs = {"hidden": 16}
    elif name == "conv":
        kwargs = {"out_dim": 5, "kernel_size": 3}
    elif name == "instance_mean":
        kwargs = {"num_classes": 3, "hidden": (8,), "clinical_dim": CLINICAL_DIM}
    elif name == "lse":
        kwargs = {"r": 2.0}
    return create_pooling(name, dim, **kwargs).eval()


def _run(pool: MILPooling, x: torch.Tensor, mask: torch.Tensor, clinical: torch.Tensor) -> tuple:
    return pool(x, mask, return_attention=True, clinical=clinical)


@st.composite
def bags(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A padded batch: x (B, N, D) with garbage at masked positions, mask with >= 1 True per row, clinical."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, 12))
    d = draw(st.integers(1, 16))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "ties", "constant_bag"]))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    rows = draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=b, max_size=b))
    first = draw(st.lists(st.integers(0, n - 1), min_size=b, max_size=b))
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(b, n, d, generator=g) * scale
    elif kind == "ties":  # few distinct values: many ties and duplicated instances
        x = torch.randint(-2, 3, (b, n, d), generator=g).float() * scale
    else:  # every instance of a bag identical
        x = (torch.randn(b, 1, d, generator=g) * scale).expand(b, n, d).clone()
    mask = torch.tensor(rows, dtype=torch.bool).reshape(b, n)
    mask[torch.arange(b), torch.tensor(first)] = True
    garbage = torch.tensor(GARBAGE)[torch.randint(0, len(GARBAGE), (b, n, d), generator=g)]
    x = torch.where(mask.unsqueeze(-1), x, garbage)
    clinical = torch.randn(b, CLINICAL_DIM, generator=g)
    return x, mask, clinical, seed


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


def test_registry_names() -> None:
    assert set(NAMES) <= set(list_poolings())
    with pytest.raises(ConfigError, match="unknown pooling 'gated_atention'.*did you mean 'gated_attention'"):
        create_pooling("gated_atention", 4)
    with pytest.raises(ConfigError, match="pooling 'max' does not take"):
        create_pooling("max", 4, r=3.0)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=200)
@given(data=bags())
def test_permutation_invariance(name: str, data: tuple) -> None:
    x, mask, clinical, seed = data
    pool = _pool(name, x.shape[-1])
    emb, w = _run(pool, x, mask, clinical)
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.stack([torch.randperm(x.shape[1], generator=g) for _ in range(x.shape[0])])
    xp = x.gather(1, perm.unsqueeze(-1).expand_as(x))
    mp = mask.gather(1, perm)
    emb_p, w_p = _run(pool, xp, mp, clinical)
    _close(emb_p, emb)
    _close(w_p, w.gather(1, perm))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=200)
@given(data=bags(), extra=st.integers(1, 4), value=st.sampled_from(GARBAGE))
def test_padding_invariance(name: str, data: tuple, extra: int, value: float) -> None:
    x, mask, clinical, _ = data
    pool = _pool(name, x.shape[-1])
    emb, w = _run(pool, x, mask, clinical)
    b, _, d = x.shape
    x_pad = torch.cat([x, torch.full((b, extra, d), value)], dim=1)
    m_pad = torch.cat([mask, torch.zeros(b, extra, dtype=torch.bool)], dim=1)
    emb2, w2 = _run(pool, x_pad, m_pad, clinical)
    _close(emb2, emb)
    _close(w2[:, : x.shape[1]], w)
    assert (w2[:, x.shape[1] :] == 0).all()
    assert (w[~mask] == 0).all()
    assert torch.isfinite(emb).all() and torch.isfinite(w).all()
    _close(w.sum(dim=1), torch.ones(b))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=100)
@given(data=bags())
def test_batch_independence(name: str, data: tuple) -> None:
    """Each bag alone, with only its real instances (N_max = n_i), gives the same output as in the batch."""
    x, mask, clinical, _ = data
    pool = _pool(name, x.shape[-1])
    emb, w = _run(pool, x, mask, clinical)
    for i in range(x.shape[0]):
        xi = x[i][mask[i]].unsqueeze(0)
        ei, wi = _run(pool, xi, torch.ones(xi.shape[:2], dtype=torch.bool), clinical[i : i + 1])
        _close(ei, emb[i : i + 1])
        _close(wi[0], w[i][mask[i]])


@pytest.mark.parametrize("name", ["mean", "max", "lse", "attention", "gated_attention"])
@settings(max_examples=200)
@given(data=bags())
def test_identical_instances_give_the_instance(name: str, data: tuple) -> None:
    x, mask, _clinical, _ = data
    pool = _pool(name, x.shape[-1])
    first = mask.float().argmax(dim=1)
    inst = x[torch.arange(x.shape[0]), first]  # (B, D), a real instance of each bag
    same = torch.where(mask.unsqueeze(-1), inst.unsqueeze(1).expand_as(x), x)
    _close(pool(same, mask), inst, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=30)
@given(data=bags())
def test_bf16_autocast_close_to_float32(name: str, data: tuple) -> None:
    x, mask, clinical, _ = data
    pool = _pool(name, x.shape[-1])
    emb, w = _run(pool, x, mask, clinical)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb16, w16 = _run(pool, x, mask, clinical)
    assert w16.dtype == torch.float32
    scale = 1.0 + float(x[mask].abs().max())
    torch.testing.assert_close(emb16.float(), emb, atol=0.05 * scale, rtol=0.05)
    torch.testing.assert_close(w16, w, atol=0.05, rtol=0.05)
    assert (w16[~mask] == 0).all()


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=20)
@given(data=bags())
def test_gradients_finite_with_nan_padding(name: str, data: tuple) -> None:
    x, mask, clinical, _ = data
    pool = _pool(name, x.shape[-1])
    pool.zero_grad()
    x = x.clone().requires_grad_(True)
    emb, w = _run(pool, x, mask, clinical)
    (emb.float().square().sum() + w.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad[~mask] == 0).all()
    for p in pool.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_parameters_receive_gradients() -> None:
    x, mask = torch.randn(2, 6, 4), torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    for name in NAMES:
        torch.manual_seed(0)
        kwargs = {"clinical_dim": 2} if name == "instance_mean" else {}
        pool = create_pooling(name, 4, **kwargs)
        params = dict(pool.named_parameters())
        if not params:
            assert name in ("mean", "max", "lse")
            continue
        pool(x, mask, clinical=torch.randn(2, 2)).square().sum().backward()
        for pname, p in params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, (name, pname)


@pytest.mark.parametrize("name", NAMES)
def test_all_false_bag_raises_naming_it(name: str) -> None:
    pool = _pool(name, 3)
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    with pytest.raises(DataError, match="bag 1 of the batch has no real instance"):
        pool(torch.randn(3, 2, 3), mask, clinical=torch.randn(3, CLINICAL_DIM))


@pytest.mark.parametrize("name", NAMES)
def test_input_validation(name: str) -> None:
    pool = _pool(name, 3)
    mask = torch.ones(2, 4, dtype=torch.bool)
    c = torch.randn(2, CLINICAL_DIM)
    with pytest.raises(ShapeError, match=r"x must have shape \(B, N, D\)"):
        pool(torch.randn(2, 3), mask, clinical=c)
    with pytest.raises(ShapeError, match="x has feature size D=5 .* in_dim=3"):
        pool(torch.randn(2, 4, 5), mask, clinical=c)
    with pytest.raises(ShapeError, match="x must be a torch.Tensor"):
        pool([[1.0]], mask, clinical=c)
    with pytest.raises(ShapeError, match="x must be a floating-point"):
        pool(torch.ones(2, 4, 3, dtype=torch.long), mask, clinical=c)
    with pytest.raises(ShapeError, match="x is an empty batch"):
        pool(torch.randn(0, 4, 3), mask[:0], clinical=c[:0])
    with pytest.raises(ShapeError, match="mask must have dtype torch.bool"):
        pool(torch.randn(2, 4, 3), mask.float(), clinical=c)
    with pytest.raises(ShapeError, match=r"mask must have shape \(B, N\) = \(2, 4\)"):
        pool(torch.randn(2, 4, 3), mask[:, :3], clinical=c)
    with pytest.raises(ShapeError, match="mask must be a bool torch.Tensor"):
        pool(torch.randn(2, 4, 3), None, clinical=c)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="in_dim must be an integer >= 1"):
        create_pooling("mean", 0)
    with pytest.raises(ConfigError, match="r must be a finite number > 0.0, got 0.0"):
        create_pooling("lse", 3, r=0.0)
    with pytest.raises(ConfigError, match="hidden must be an integer >= 1"):
        create_pooling("attention", 3, hidden=0)
    with pytest.raises(ConfigError, match=r"dropout must be a finite number >= 0.0 and < 1.0, got 1.0"):
        create_pooling("gated_attention", 3, dropout=1.0)
    with pytest.raises(ConfigError, match="kernel_size must be an odd integer"):
        create_pooling("conv", 3, kernel_size=2)
    with pytest.raises(ConfigError, match="reduce must be one of 'mean', 'max', got 'sum'"):
        create_pooling("conv", 3, reduce="sum")
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 2, got 1"):
        create_pooling("instance_mean", 3, num_classes=1)
    with pytest.raises(ConfigError, match=r"hidden\[1\] must be an integer"):
        create_pooling("instance_mean", 3, hidden=(4, -1))


# ----------------------------------------------------------------------------- exact semantics


def test_mean_max_lse_values() -> None:
    x = torch.tensor([[[1.0, 4.0], [3.0, 4.0], [float("nan"), 9.0]]])
    mask = torch.tensor([[True, True, False]])
    emb, w = create_pooling("mean", 2)(x, mask, return_attention=True)
    _close(emb, torch.tensor([[2.0, 4.0]]))
    _close(w, torch.tensor([[0.5, 0.5, 0.0]]))
    emb, w = create_pooling("max", 2)(x, mask, return_attention=True)
    _close(emb, torch.tensor([[3.0, 4.0]]))
    # feature 0: instance 1 holds the max; feature 1: a tie shared by both -> (0 + 1/2, 1 + 1/2) / 2
    _close(w, torch.tensor([[0.25, 0.75, 0.0]]))
    emb, w = create_pooling("lse", 2, r=0.5)(x, mask, return_attention=True)
    expected0 = 2.0 * math.log((math.exp(0.5) + math.exp(1.5)) / 2)
    _close(emb, torch.tensor([[expected0, 4.0]]))
    s = torch.softmax(torch.tensor([0.5, 1.5]), 0)
    _close(w, torch.tensor([[(s[0].item() + 0.5) / 2, (s[1].item() + 0.5) / 2, 0.0]]))


def test_lse_limits_and_learnable_r() -> None:
    x, mask = torch.randn(2, 5, 3), torch.ones(2, 5, dtype=torch.bool)
    _close(create_pooling("lse", 3, r=1e-4)(x, mask), x.mean(1), atol=1e-3)
    _close(create_pooling("lse", 3, r=1e3)(x, mask), x.amax(1), atol=1e-2)
    pool = create_pooling("lse", 3, r=2.0, learnable_r=True)
    pool(x, mask).sum().backward()
    assert pool.log_r.grad is not None and abs(pool.r - 2.0) < 1e-6


def test_attention_matches_ilse_formula() -> None:
    pool = create_pooling("gated_attention", 4, hidden=6)
    x, mask = torch.randn(1, 5, 4), torch.tensor([[True, True, True, False, True]])
    emb, w = pool(x, mask, return_attention=True)
    xs = x[0][mask[0]]
    a = pool.attention_w(torch.tanh(pool.attention_v(xs)) * torch.sigmoid(pool.attention_u(xs))).squeeze(-1)
    ref_w = torch.softmax(a, 0)
    _close(w[0][mask[0]], ref_w)
    _close(emb[0], ref_w @ xs)


def test_attention_dropout_only_in_training() -> None:
    pool = create_pooling("attention", 4, hidden=32, dropout=0.5)
    x, mask = torch.randn(2, 6, 4), torch.ones(2, 6, dtype=torch.bool)
    pool.eval()
    _close(pool(x, mask), pool(x, mask))
    pool.train()
    torch.manual_seed(1)
    a = pool(x, mask)
    torch.manual_seed(2)
    assert not torch.allclose(a, pool(x, mask))


def test_masked_softmax_float32_under_autocast() -> None:
    scores = torch.tensor([[1.0, 2.0, float("inf")]], dtype=torch.bfloat16)
    mask = torch.tensor([[True, True, False]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = masked_softmax(scores, mask)
    assert w.dtype == torch.float32 and w[0, 2] == 0
    _close(w[0, :2], torch.softmax(torch.tensor([1.0, 2.0]), 0), atol=1e-2)


def test_conv_exact_semantics() -> None:
    """Rank by score (descending), conv over [x, s] with zeros past the bag, ReLU, mean of real positions."""
    torch.manual_seed(3)
    pool = ConvPooling(3, out_dim=4, kernel_size=3)
    x = torch.randn(1, 6, 3)
    mask = torch.tensor([[True, False, True, True, False, True]])
    emb, w = pool(x, mask, return_attention=True)
    xs = x[0][mask[0]].double()
    s = xs @ pool.score.weight.double()[0] + pool.score.bias.double()
    order = torch.argsort(s, descending=True)
    inp = torch.cat([xs[order], s[order, None]], dim=1).float().T.unsqueeze(0)  # (1, D + 1, n)
    h = torch.relu(F.conv1d(inp, pool.conv.weight, pool.conv.bias, padding=1))
    _close(emb, h.mean(dim=2))
    _close(w[0][mask[0]], torch.softmax(s.float(), 0))
    pool_max = ConvPooling(3, out_dim=4, kernel_size=3, reduce="max")
    pool_max.load_state_dict(pool.state_dict())
    _close(pool_max(x, mask), h.amax(dim=2))


def test_conv_kernel_one_is_per_instance() -> None:
    torch.manual_seed(4)
    pool = ConvPooling(2, out_dim=3, kernel_size=1)
    x, mask = torch.randn(2, 4, 2), torch.tensor([[True] * 4, [True, True, False, False]])
    emb = pool(x, mask)
    s = pool.score(x)
    h = torch.relu(torch.cat([x, s], -1) @ pool.conv.weight[:, :, 0].T + pool.conv.bias)
    _close(emb[1], h[1, :2].mean(0))


@settings(max_examples=100)
@given(data=bags())
def test_conv_ties_broken_by_content(data: tuple) -> None:
    """With a constant score every instance ties: the order must come from the features alone."""
    x, mask, _clinical, seed = data
    torch.manual_seed(5)
    pool = ConvPooling(x.shape[-1], out_dim=3)
    with torch.no_grad():
        pool.score.weight.zero_()
    emb = pool(x, mask)
    g = torch.Generator().manual_seed(seed + 2)
    perm = torch.stack([torch.randperm(x.shape[1], generator=g) for _ in range(x.shape[0])])
    emb_p = pool(x.gather(1, perm.unsqueeze(-1).expand_as(x)), mask.gather(1, perm))
    _close(emb_p, emb)
    for i in range(x.shape[0]):
        xi = x[i][mask[i]].unsqueeze(0)
        _close(pool(xi, torch.ones(xi.shape[:2], dtype=torch.bool)), emb[i : i + 1])


def test_instance_mean_semantics() -> None:
    torch.manual_seed(6)
    pool = InstanceMeanPooling(4, num_classes=3, hidden=(5,), clinical_dim=2)
    x = torch.randn(2, 4, 4)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    clinical = torch.randn(2, 2)
    out, w = pool(x, mask, return_attention=True, clinical=clinical)
    logits = pool.instance_logits(x, mask, clinical=clinical)
    assert logits.shape == (2, 4, 3) and (logits[0, 2:] == 0).all()
    inp = torch.cat([x, clinical[:, None, :].expand(2, 4, 2)], -1)
    ref = pool.classifier(inp).softmax(-1)
    _close(out[0].exp(), ref[0, :2].mean(0))
    _close(out[1].exp(), ref[1].mean(0))
    _close(w, torch.tensor([[0.5, 0.5, 0, 0], [0.25] * 4]))
    # usable as logits: softmax(log p) = p
    _close(out.softmax(-1), out.exp())
    assert out.dtype == torch.float32
    # clinical attributes matter
    assert not torch.allclose(pool(x, mask, clinical=clinical + 1.0), out)


def test_instance_mean_2021_architecture_and_flags() -> None:
    pool = create_pooling("instance_mean", 512, hidden=(1000, 500, 100), dropout=0.2, clinical_dim=2)
    linears = [(m.in_features, m.out_features) for m in pool.classifier if isinstance(m, torch.nn.Linear)]
    assert linears == [(514, 1000), (1000, 500), (500, 100), (100, 2)]
    assert sum(isinstance(m, torch.nn.Dropout) for m in pool.classifier) == 3
    assert pool.prediction_level and pool.use_clinical and pool.out_dim == 2
    plain = create_pooling("instance_mean", 8)
    assert not plain.use_clinical and [type(m) for m in plain.classifier] == [torch.nn.Linear]
    assert plain(
        torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool), clinical=torch.randn(1, 5)
    ).shape == (1, 2)
    for name in NAMES[:-1]:
        p = create_pooling(name, 4)
        assert not p.prediction_level and not p.use_clinical


def test_instance_mean_clinical_validation() -> None:
    pool = InstanceMeanPooling(3, clinical_dim=2)
    x, mask = torch.randn(2, 4, 3), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ShapeError, match="clinical is required"):
        pool(x, mask)
    with pytest.raises(ShapeError, match=r"clinical must have shape \(B, 2\)"):
        pool(x, mask, clinical=torch.randn(2, 3))
    with pytest.raises(ShapeError, match="clinical has 1 rows but the batch has 2 bags"):
        pool(x, mask, clinical=torch.randn(1, 2))
    with pytest.raises(DataError, match="clinical holds NaN or inf in bag 1"):
        pool(x, mask, clinical=torch.tensor([[0.0, 1.0], [float("nan"), 1.0]]))
    with pytest.raises(ShapeError, match="clinical is required"):
        pool.instance_logits(x, mask)


def test_follows_input_dtype_float64() -> None:
    x, mask = torch.randn(2, 3, 4, dtype=torch.float64), torch.ones(2, 3, dtype=torch.bool)
    for name in NAMES[:-1]:
        pool = create_pooling(name, 4).double()
        emb, w = pool(x, mask, return_attention=True)
        assert emb.dtype == torch.float64 and w.dtype == torch.float32


def test_uses_clinical_is_a_deprecated_spelling_of_use_clinical() -> None:
    pool = create_pooling("instance_mean", 4, clinical_dim=2)
    with pytest.warns(
        DeprecationWarning, match=r"InstanceMeanPooling\.uses_clinical is deprecated, use \.use_clinical"
    ):
        assert pool.uses_clinical is True
    with pytest.warns(DeprecationWarning, match=r"use \.use_clinical"):
        pool.uses_clinical = False
    assert pool.use_clinical is False
    with pytest.warns(DeprecationWarning, match="define use_clinical instead"):

        class OldStyle(MILPooling):  # a pooling written for the old attribute name
            uses_clinical = True

    assert OldStyle.use_clinical is True and OldStyle(3).use_clinical is True
    assert MILPooling.use_clinical is False


def test_hidden_is_an_int_or_a_tuple_everywhere() -> None:
    for name in ("attention", "gated_attention"):
        assert create_pooling(name, 8, hidden=(16,)).hidden == create_pooling(name, 8, hidden=16).hidden == 16
        with pytest.raises(
            ConfigError, match=r"hidden must be an integer >= 1 \(or a tuple of one\), got \(16, 8\)"
        ):
            create_pooling(name, 8, hidden=(16, 8))
        with pytest.raises(ConfigError, match="hidden must be an integer >= 1"):
            create_pooling(name, 8, hidden=(0,))
    assert create_pooling("instance_mean", 8, hidden=16).hidden == (16,)
    assert create_pooling("instance_mean", 8, hidden=[16, 4]).hidden == (16, 4)
    with pytest.raises(
        ConfigError, match=r"hidden must be an integer >= 1 or a tuple of integers >= 1, got 'x'"
    ):
        create_pooling("instance_mean", 8, hidden="x")
