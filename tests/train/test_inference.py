"""Tests of milcell.train.inference (the one inference loop, autocast, probabilities) and its users."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from milcell.data import Bag, BagBatch
from milcell.exceptions import ConfigError, DataError, ShapeError
from milcell.nn.encoder import InstanceEncoder, encode_in_chunks
from milcell.nn.model import create_mil_model
from milcell.train import trainer as trainer_module
from milcell.train.distributed import make_loader
from milcell.train.ensemble import predict_ensemble
from milcell.train.inference import PRECISIONS, Predictions, autocast, predict, probabilities
from milcell.train.trainer import Trainer
from tests.train.test_trainer import MeanMIL, Out, make_bags


def test_precisions_and_autocast_contexts() -> None:
    assert PRECISIONS == ("32", "bf16", "fp16")
    with autocast("cpu", "32"):
        assert not torch.is_autocast_enabled("cpu")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast(torch.device("cpu"), precision):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
    with pytest.raises(ConfigError, match="precision must be one of '32', 'bf16', 'fp16', got 'fp8'"):
        autocast("cpu", "fp8")
    assert not torch.is_autocast_enabled("cpu")


def test_bf16_on_a_cuda_device_without_support_falls_back_to_float32(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with caplog.at_level(logging.WARNING, logger="milcell"):
        context = autocast("cuda:0", "bf16")
    assert not isinstance(context, torch.autocast)
    assert "bf16 is not supported on cuda:0" in caplog.text


def test_device_without_autocast_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(ConfigError, match="does not support"):
        autocast("cpu", "bf16")


def test_probabilities() -> None:
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0]], dtype=torch.bfloat16)
    p = probabilities(logits)
    assert p.dtype == torch.float32
    assert torch.allclose(p, torch.softmax(logits.float(), dim=1))
    one = probabilities(torch.tensor([[0.0], [3.0]]))
    assert one.shape == (2, 2) and torch.allclose(one[:, 1], torch.sigmoid(torch.tensor([0.0, 3.0])))
    assert torch.allclose(one.sum(1), torch.ones(2))
    for bad in (torch.zeros(3), torch.zeros(2, 0), torch.zeros(2, 2, 2)):
        with pytest.raises(ShapeError, match=r"must have shape \(B, C\)"):
            probabilities(bad)
    with pytest.raises(ShapeError, match="must be a Tensor"):
        probabilities([[0.0, 1.0]])  # type: ignore[arg-type]


class FlatLogits(MeanMIL):
    def forward(self, batch: BagBatch) -> Out:
        out = super().forward(batch)
        return Out(out.logits[:, 0], None)  # (B,) instead of (B, C)


def test_trainer_and_ensemble_raise_the_same_shape_error() -> None:
    # Regression: the trainer raised DataError, ensembles ShapeError, for the same bad logits.
    loader = make_loader(make_bags(4), 2, shuffle=False)
    with pytest.raises(ShapeError, match=r"must have shape \(B, C\)"):
        Trainer(FlatLogits(), progress=False).predict(loader)
    with pytest.raises(ShapeError, match=r"must have shape \(B, C\)"):
        predict_ensemble([FlatLogits()], loader)


def test_predict_restores_mode_uses_inference_mode_and_keeps_real_attention() -> None:
    bags = make_bags(7)
    model = MeanMIL(dropout=0.5).train()
    preds = predict(model, make_loader(bags, 3, shuffle=False), precision="bf16")
    assert isinstance(preds, Predictions)
    assert model.training
    assert all(c["inference"] and not c["training"] for c in model.calls)
    assert all(c["autocast"] and c["autocast_dtype"] == torch.bfloat16 for c in model.calls)
    assert preds.ids == [b.id for b in bags]
    assert preds.probabilities.dtype == torch.float32 and preds.probabilities.shape == (7, 2)
    assert preds.labels.tolist() == [b.label for b in bags]
    assert preds.attention is not None
    assert [a.shape[0] for a in preds.attention] == [len(b) for b in bags]
    assert all(torch.allclose(a, torch.full_like(a, 1 / len(a))) for a in preds.attention)


def test_predict_matches_the_trainer_and_a_single_model_ensemble() -> None:
    bags = make_bags(6)
    model = create_mil_model(None, pooling="gated_attention", in_dim=8)
    loader = make_loader(bags, 4, shuffle=False)
    trainer = Trainer(model, max_epochs=1, progress=False)
    ours = predict(model, loader)
    theirs = trainer.predict(loader)
    ensemble = predict_ensemble([model], loader)
    assert ours.ids == theirs.ids == ensemble.ids
    assert torch.allclose(ours.probabilities, theirs.probabilities)
    assert torch.allclose(ours.probabilities, ensemble.probabilities)
    assert ours.attention is not None and theirs.attention is not None
    assert all(torch.equal(a, b) for a, b in zip(ours.attention, theirs.attention, strict=True))
    assert trainer_module.Predictions is Predictions  # re-exported for compatibility


def test_predict_on_the_models_own_device_does_not_move_it(monkeypatch: pytest.MonkeyPatch) -> None:
    model = MeanMIL()
    moves: list[Any] = []
    monkeypatch.setattr(model, "to", lambda *args, **kwargs: moves.append(args))
    predict(model, make_loader(make_bags(2), 2, shuffle=False), device="cpu")
    predict(model, make_loader(make_bags(2), 2, shuffle=False))
    assert moves == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predict_on_cuda_moves_the_model_there_and_back() -> None:
    model = create_mil_model(None, pooling="gated_attention", in_dim=8)
    loader = make_loader(make_bags(6), 4, shuffle=False)
    expected = predict(model, loader)
    for precision in PRECISIONS:
        preds = predict(model, loader, device="cuda", precision=precision)
        assert next(model.parameters()).device.type == "cpu"
        assert preds.probabilities.device.type == "cpu" and preds.probabilities.dtype == torch.float32
        tol = 1e-5 if precision == "32" else 3e-2
        assert torch.allclose(preds.probabilities, expected.probabilities, atol=tol)
        assert preds.attention is not None and all(a.device.type == "cpu" for a in preds.attention)
    with autocast("cuda", "bf16"):
        assert torch.is_autocast_enabled("cuda") == torch.cuda.is_bf16_supported()


def test_predict_accepts_plain_logits_and_reports_bad_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 3)

        def forward(self, batch: BagBatch) -> Tensor:
            return self.head(batch.pad(batch.instances).sum(1))

    preds = predict(Plain(), make_loader(make_bags(5), 2, shuffle=False), progress=True, desc="scoring")
    assert preds.probabilities.shape == (5, 3) and preds.attention is None
    assert "scoring" in capsys.readouterr().err
    empty = predict(Plain(), [])
    assert empty.ids == [] and empty.probabilities.shape == (0, 0) and empty.attention is None
    with pytest.raises(DataError, match="collate_fn=collate_bags"):
        predict(Plain(), DataLoader(make_bags(2), batch_size=2, collate_fn=list))
    with pytest.raises(ConfigError, match="precision must be"):
        predict(Plain(), [], precision="16")
    with pytest.raises(ConfigError, match="model must be an nn.Module"):
        predict(lambda batch: batch, [])  # type: ignore[arg-type]


def test_encode_in_chunks_matches_one_pass_and_moves_chunks() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    x = torch.rand(10, 3, 8, 8, requires_grad=True)
    full = net(x)
    for size in (None, 1, 3, 10, 64):
        assert torch.allclose(encode_in_chunks(net, x, size), full, atol=1e-6)
    # Checkpointing gives the same gradients.
    (g_plain,) = torch.autograd.grad(encode_in_chunks(net, x, 4).sum(), x)
    (g_ckpt,) = torch.autograd.grad(encode_in_chunks(net, x, 4, checkpointing=True).sum(), x)
    assert torch.allclose(g_plain, g_ckpt, atol=1e-6)
    seen: list[int] = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    out = encode_in_chunks(net, x.detach(), np.int64(4), device="cpu")
    assert seen == [4, 4, 2] and out.shape == (10, 4)
    with pytest.raises(ConfigError, match="chunk_size must be an integer >= 1"):
        encode_in_chunks(net, x, 0)
    with pytest.raises(ShapeError, match=r"must return \(T, D\)"):
        encode_in_chunks(nn.Identity(), x, 4)
    # The encoder module uses the same call (and names itself in the error).
    with pytest.raises(ShapeError, match=r"InstanceEncoder: the backbone must return \(T, D\)"):
        InstanceEncoder(nn.Identity(), chunk_size=4)(x)


def test_extract_features_goes_through_the_chunked_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    from milcell.train import features

    calls: list[int | None] = []

    def spy(backbone: nn.Module, instances: Tensor, chunk_size: int | None = None, **kw: Any) -> Tensor:
        calls.append(chunk_size)
        return encode_in_chunks(backbone, instances, chunk_size, **kw)

    monkeypatch.setattr(features, "encode_in_chunks", spy)
    bags = [Bag(torch.rand(3, 3, 4, 4), label=0, id=f"P{i}") for i in range(3)]
    net = nn.Sequential(nn.Flatten(1), nn.Linear(48, 5))
    ds = features.extract_features(net, bags, None, batch_size=2, chunk_size=2, progress=False)
    assert calls == [2, 2] and ds[0].instances.shape == (3, 5)
