"""Chunked / checkpointed instance encoding gives the same features and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from milcell.exceptions import ConfigError, ShapeError
from milcell.nn.backbones import create_backbone
from milcell.nn.encoder import InstanceEncoder, MLPEncoder, create_encoder


def _forward_backward(
    enc: InstanceEncoder, x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    enc.zero_grad()
    x = x.clone().requires_grad_(True)
    weights = torch.linspace(-1.0, 1.0, enc.num_features, dtype=x.dtype)
    out = enc(x)
    (out * weights).sum().backward()
    return out.detach(), [p.grad.clone() for p in enc.parameters()], x.grad.clone()


def _assert_same(a: tuple, b: tuple) -> None:
    # float64, so "equal to float tolerance" can be tight
    torch.testing.assert_close(a[0], b[0], rtol=1e-9, atol=1e-10)
    for ga, gb in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(a[2], b[2], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    ("backbone_kwargs", "freeze"),
    [({"norm_layer": "groupnorm"}, False), ({}, True)],
    ids=["groupnorm", "batchnorm-frozen-stats"],
)
def test_chunked_and_checkpointed_equal_unchunked(backbone_kwargs: dict, freeze: bool) -> None:
    backbone = create_backbone("milcell_mini_resnet_k8", **backbone_kwargs).double()
    x = torch.rand(5, 3, 32, 32, dtype=torch.float64)
    results = []
    for chunk, ckpt in [(None, False), (2, False), (2, True), (100, True)]:
        enc = InstanceEncoder(backbone, chunk_size=chunk, checkpointing=ckpt, freeze_bn_stats=freeze).train()
        results.append(_forward_backward(enc, x))
    for other in results[1:]:
        _assert_same(results[0], other)


@settings(max_examples=6)
@given(total=st.integers(1, 9), chunk=st.integers(1, 10))
def test_chunking_invariance_property(total: int, chunk: int) -> None:
    torch.manual_seed(0)
    enc = InstanceEncoder(create_backbone("milcell_mini_resnet_k8", norm_layer="groupnorm")).eval()
    x = torch.rand(total, 3, 32, 32)
    with torch.no_grad():
        full = enc(x)
        enc.chunk_size = chunk
        chunked = enc(x)
    assert chunked.shape == (total, 64)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-5)


def test_train_mode_batchnorm_depends_on_chunks() -> None:
    backbone = create_backbone("milcell_mini_resnet_k8")
    x = torch.rand(8, 3, 32, 32) * torch.linspace(0.1, 3.0, 8).view(8, 1, 1, 1)
    whole = InstanceEncoder(backbone).train()(x)
    chunked = InstanceEncoder(backbone, chunk_size=2).train()(x)
    assert not torch.allclose(whole, chunked, atol=1e-4)


def test_freeze_bn_stats_keeps_batchnorm_in_eval_and_stats_fixed() -> None:
    backbone = create_backbone("milcell_mini_resnet_k8")
    enc = InstanceEncoder(backbone, chunk_size=2, freeze_bn_stats=True)
    enc.train()
    assert enc.training and backbone.model.layer1[0].conv1.training
    bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    before = bns[0].running_mean.clone()
    enc(torch.rand(4, 3, 32, 32) + 5.0).sum().backward()
    assert torch.equal(bns[0].running_mean, before)
    assert bns[0].weight.grad is not None  # affine parameters still train
    enc.eval()
    enc.train(True)
    assert all(not m.training for m in bns)


def test_checkpointing_is_skipped_without_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("checkpoint called although no gradient is needed")

    monkeypatch.setattr("milcell.nn.encoder.checkpoint", fail)
    enc = InstanceEncoder(
        create_backbone("milcell_mini_resnet_k8", trainable="head"), chunk_size=2, checkpointing=True
    ).eval()
    out = enc(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 64) and not out.requires_grad
    with torch.no_grad():
        assert enc(torch.rand(3, 3, 32, 32)).shape == (3, 64)


def test_dtype_follows_backbone() -> None:
    enc = InstanceEncoder(create_backbone("milcell_mini_resnet_k8")).double().eval()
    assert enc(torch.rand(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.rand(3, 32, 32), r"instances must have shape \(T, C, H, W\)"),
        (torch.rand(2, 1, 32, 32), "instances has 1 channels.*in_chans=3"),
        (torch.rand(0, 3, 32, 32), "instances is empty"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "floating point"),
        ([1.0, 2.0], "instances must be a Tensor"),
    ],
)
def test_bad_instances(x: object, match: str) -> None:
    enc = InstanceEncoder(create_backbone("milcell_mini_resnet_k8"))
    with pytest.raises(ShapeError, match=match):
        enc(x)


@pytest.mark.parametrize("chunk", [0, -2, 1.5, True])
def test_bad_chunk_size(chunk: object) -> None:
    with pytest.raises(ConfigError, match="chunk_size"):
        InstanceEncoder(create_backbone("milcell_mini_resnet_k8"), chunk_size=chunk)


def test_backbone_must_be_module() -> None:
    with pytest.raises(ConfigError, match="backbone"):
        InstanceEncoder("resnet18")  # type: ignore[arg-type]


def test_backbone_with_wrong_output_rank() -> None:
    enc = InstanceEncoder(nn.Identity())
    with pytest.raises(ShapeError, match=r"must return \(T, D\)"):
        enc(torch.rand(2, 3, 4, 4))


# --------------------------------------------------------------------------- any encoder (issue 15)


def test_mlp_encoder_chunked_and_checkpointed_equal_unchunked() -> None:
    mlp = MLPEncoder(12, hidden=(16, 8)).double()
    x = torch.randn(23, 12, dtype=torch.float64)
    results = [
        _forward_backward(InstanceEncoder(mlp, chunk_size=chunk, checkpointing=ckpt).train(), x)
        for chunk, ckpt in [(None, False), (5, False), (5, True), (100, True)]
    ]
    assert results[0][0].shape == (23, 8)
    for other in results[1:]:
        _assert_same(results[0], other)


def test_any_module_with_num_features_is_an_encoder() -> None:
    class Tokens(nn.Module):  # (T, L, E) token sequences -> (T, E): not an image, not a vector
        num_features = 6

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x).mean(dim=1)

    enc = InstanceEncoder(Tokens(), chunk_size=3, checkpointing=True)
    x = torch.randn(7, 5, 6, requires_grad=True)
    out = enc(x)
    assert out.shape == (7, 6) and enc.num_features == 6 and enc.in_chans is None and enc.in_dim is None
    out.sum().backward()
    assert x.grad is not None and enc.backbone.proj.weight.grad is not None


def test_mlp_encoder_layers_and_checks() -> None:
    enc = MLPEncoder(10, hidden=(256, 128, 64), dropout=0.1)
    kinds = [type(m).__name__ for m in enc.net]
    assert kinds == ["Linear", "ReLU", "Dropout"] * 3
    assert enc.num_features == 64 and enc.in_dim == 10
    assert [type(m).__name__ for m in MLPEncoder(10, hidden=4).net] == ["Linear", "ReLU"]
    with pytest.raises(ConfigError, match="hidden"):
        MLPEncoder(10, hidden=())
    with pytest.raises(ConfigError, match="dropout"):
        MLPEncoder(10, dropout=1.0)
    wrapped = InstanceEncoder(enc)
    with pytest.raises(ShapeError, match=r"features \(T, 10\)"):
        wrapped(torch.randn(3, 11))
    with pytest.raises(ShapeError, match=r"features \(T, 10\)"):
        wrapped(torch.randn(3, 3, 32, 32))


def test_create_encoder() -> None:
    enc = create_encoder("mlp", 8, hidden=(4,), dropout=0.0, chunk_size=2, checkpointing=True)
    assert isinstance(enc, InstanceEncoder) and isinstance(enc.backbone, MLPEncoder)
    assert (enc.chunk_size, enc.checkpointing, enc.num_features, enc.in_dim) == (2, True, 4, 8)
    with pytest.raises(ConfigError, match="encoder must be one of"):
        create_encoder("transformer", 8)
    with pytest.raises(ConfigError, match="does not take"):
        create_encoder("mlp", 8, width=3)
