"""DTFD's packed CPU path: the per-instance layers see the real instances only.

On the CPU in eager mode :class:`~milcell.nn.aggregators.dtfd.DTFDPooling` gathers the real rows
into ``(R, D)`` instead of zeroing the padded batch (its ``_prepare`` only validates). These tests
pin that down: the packed and the padded path agree (outputs, auxiliary tensors, gradients, in
training under one seed and in eval), NaN/inf padding is never read (bit-identical to zero
padding), the layers really run on ``R`` rows, and tracing or ``pack_on_cpu = False`` fall back to
the padded path.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from milcell.nn.aggregators.dtfd import DTFDPooling
from milcell.nn.pooling import PoolingOutput, create_pooling

pytestmark = pytest.mark.usefixtures("one_thread")

GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30)
DISTILLS = ["afs", "maxs", "maxmins"]


def _pool(distill: str, d: int, dim: int | None = 5) -> DTFDPooling:
    torch.manual_seed(7)
    pool = create_pooling("dtfd", d, num_pseudo_bags=3, distill=distill, dim=dim, hidden=6)
    assert isinstance(pool, DTFDPooling)
    return pool


@st.composite
def batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    """x (B, N, D) with garbage at masked positions, a mask with >= 1 True per row, a seed."""
    b, n, d = draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rows = draw(st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=b, max_size=b))
    first = draw(st.lists(st.integers(0, n - 1), min_size=b, max_size=b))
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor(rows, dtype=torch.bool).reshape(b, n)
    mask[torch.arange(b), torch.tensor(first)] = True
    x = torch.randn(b, n, d, generator=g)
    garbage = torch.tensor(GARBAGE)[torch.randint(0, len(GARBAGE), (b, n, d), generator=g)]
    return torch.where(mask.unsqueeze(-1), x, garbage), mask, seed


def _step(pool: DTFDPooling, x: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[PoolingOutput, list]:
    """Forward under ``seed``, a loss touching every output, backward; the output and all gradients."""
    pool.zero_grad()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = pool.forward_aux(x, mask)
    loss = out.embedding.square().sum() + out.attention.square().sum()
    loss = loss + pool.auxiliary_losses(out.aux, torch.zeros(mask.shape[0], dtype=torch.long))["tier1"]
    loss.backward()
    assert x.grad is not None
    return out, [x.grad.clone()] + [p.grad.clone() for p in pool.parameters() if p.grad is not None]


@pytest.mark.parametrize("distill", DISTILLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@settings(max_examples=25)
@given(data=batches())
def test_packed_and_padded_paths_agree(distill: str, training: bool, data: tuple) -> None:
    x, mask, seed = data
    pool = _pool(distill, x.shape[-1]).train(training)
    packed, grads_packed = _step(pool, x, mask, seed)
    pool.pack_on_cpu = False
    padded, grads_padded = _step(pool, x, mask, seed)
    torch.testing.assert_close(packed.embedding, padded.embedding, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed.attention, padded.attention, atol=1e-5, rtol=1e-4)
    assert packed.aux.keys() == padded.aux.keys()
    assert torch.equal(packed.aux["pseudo_bags"], padded.aux["pseudo_bags"])  # same split, same draw
    for key in ("tier1_logits", "instance_probs"):
        torch.testing.assert_close(packed.aux[key], padded.aux[key], atol=1e-5, rtol=1e-4)
    assert len(grads_packed) == len(grads_padded)
    for a, b in zip(grads_packed, grads_padded, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert bool((grads_packed[0][~mask] == 0).all()) and bool(torch.isfinite(grads_packed[0]).all())


@pytest.mark.parametrize("distill", DISTILLS)
@pytest.mark.parametrize("dim", [4, None], ids=["reduced", "identity"])
@settings(max_examples=25)
@given(data=batches())
def test_packed_path_never_reads_the_padding(distill: str, dim: int | None, data: tuple) -> None:
    """NaN/inf padding gives bit for bit what zero padding gives, outputs and gradients alike."""
    x, mask, seed = data
    pool = _pool(distill, x.shape[-1], dim=dim).train()
    assert pool._packs(x)
    dirty, grads_dirty = _step(pool, x, mask, seed)
    clean, grads_clean = _step(pool, torch.where(mask.unsqueeze(-1), x, 0.0), mask, seed)
    assert torch.equal(dirty.embedding, clean.embedding) and torch.equal(dirty.attention, clean.attention)
    for key, value in clean.aux.items():
        assert torch.equal(dirty.aux[key], value), key
    for a, b in zip(grads_dirty, grads_clean, strict=True):
        assert torch.equal(a, b)


def test_the_layers_run_on_the_real_instances_only() -> None:
    pool = _pool("maxmins", 4).train()
    seen: list[tuple[int, ...]] = []
    pool.reduce.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    x = torch.randn(3, 7, 4)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, :7], mask[1, :2], mask[2, 3] = True, True, True
    out = pool.forward_aux(x, mask)
    assert seen == [(10, 4)]  # R = 7 + 2 + 1 real instances, no padding
    assert out.embedding.shape == (3, 5) and out.aux["instance_probs"].shape == (3, 7, 2)
    pool.pack_on_cpu = False
    pool.forward_aux(x, mask)
    assert seen[1] == (3, 7, 4)  # the padded batch


def test_tracing_and_compiling_fall_back_to_the_padded_path() -> None:
    pool = _pool("afs", 4)
    x = torch.randn(2, 3, 4)
    assert pool._packs(x)
    names = ["torch.jit.is_tracing", "torch.jit.is_scripting", "torch.onnx.is_in_onnx_export"]
    names += [f"torch.compiler.{n}" for n in ("is_compiling", "is_exporting") if hasattr(torch.compiler, n)]
    for name in names:
        with mock.patch(name, return_value=True):
            assert not pool._packs(x), name
    assert not pool._packs(x.to("meta"))  # not the CPU
    pool.pack_on_cpu = False
    assert not pool._packs(x) and DTFDPooling.pack_on_cpu
