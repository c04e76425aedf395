"""The one mechanism for auxiliary losses: PoolingOutput, forward_aux, MILModel.loss composition."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import Tensor

from milcell.data.bag import Bag, collate_bags
from milcell.exceptions import ConfigError
from milcell.nn.fusion import create_fusion
from milcell.nn.model import MILModel, mil_loss
from milcell.nn.pooling import MILPooling, PoolingOutput, create_pooling, masked_softmax


class ScoredMean(MILPooling):
    """Mean pooling that also scores each instance, with a max-instance auxiliary loss."""

    def __init__(self, in_dim: int, weight: float = 0.5) -> None:
        super().__init__(in_dim)
        self.score = torch.nn.Linear(in_dim, 2)
        self.aux_loss_weights = {"max_instance": weight}
        self.calls = 0

    def _pool_aux(self, x: Tensor, mask: Tensor, clinical: Tensor | None) -> tuple[Tensor, Tensor, dict]:
        weights = masked_softmax(torch.zeros(mask.shape, device=x.device), mask)
        scores = self.score(x).masked_fill(~mask.unsqueeze(-1), float("-inf"))
        return (weights.unsqueeze(-1) * x).sum(1), weights, {"bag_scores": scores.max(dim=1).values}

    def auxiliary_losses(self, aux: Mapping[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        self.calls += 1
        per_bag = torch.nn.functional.cross_entropy(
            aux["bag_scores"].float(), labels, ignore_index=-1, reduction="sum"
        )
        return {"max_instance": per_bag / (labels >= 0).sum().clamp_min(1)}


def _model(weight: float = 0.5) -> MILModel:
    torch.manual_seed(0)
    return MILModel(ScoredMean(4, weight), create_fusion("linear", 4, 0, 2))


def _batch(soft: bool = False):
    torch.manual_seed(1)
    bags = [Bag(torch.randn(3, 4), 1), Bag(torch.randn(5, 4), 0), Bag(torch.randn(2, 4), -1)]
    batch = collate_bags(bags)
    if soft:
        batch.soft_labels = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]])
    return batch


def test_base_pooling_has_no_aux_and_forward_aux_matches_forward():
    pool = create_pooling("gated_attention", 4)
    x, mask = torch.randn(2, 3, 4), torch.tensor([[True, True, False], [True, True, True]])
    out = pool.forward_aux(x, mask)
    emb, att = pool(x, mask, return_attention=True)
    assert isinstance(out, PoolingOutput) and out.aux == {} and pool.aux_loss_weights == {}
    assert torch.equal(out.embedding, emb) and torch.equal(out.attention, att)


def test_forward_drops_aux_and_model_output_carries_it():
    model = _model()
    batch = _batch()
    out = model(batch)
    assert set(out.aux) == {"bag_scores"} and out.aux["bag_scores"].shape == (3, 2)
    emb = model.pooling(model.pooling._prepare(batch.pad(batch.instances), batch.mask), batch.mask)
    assert emb.shape == (3, 4)


def test_loss_adds_weighted_aux_term_and_gradient_reaches_it():
    model = _model(0.5)
    batch = _batch()
    out = model(batch)
    bag = mil_loss(out, batch)
    aux = model.pooling.auxiliary_losses(out.aux, batch.labels)["max_instance"]
    total = model.loss(out, batch)
    torch.testing.assert_close(total, bag + 0.5 * aux)
    total.backward()
    assert model.pooling.score.weight.grad is not None and model.pooling.score.weight.grad.abs().sum() > 0


def test_zero_weight_skips_the_aux_computation():
    model = _model(0.0)
    batch = _batch()
    out = model(batch)
    torch.testing.assert_close(model.loss(out, batch), mil_loss(out, batch))
    assert model.pooling.calls == 0
    model = _model(0.5)
    out = model(batch)
    torch.testing.assert_close(model.loss(out, batch, aux_weights={"max_instance": 0}), mil_loss(out, batch))
    assert model.pooling.calls == 0


def test_aux_weights_override_and_validation():
    model = _model(0.5)
    batch = _batch()
    out = model(batch)
    aux = model.pooling.auxiliary_losses(out.aux, batch.labels)["max_instance"]
    torch.testing.assert_close(
        model.loss(out, batch, aux_weights={"max_instance": 2.0}), mil_loss(out, batch) + 2.0 * aux
    )
    with pytest.raises(ConfigError, match="'instance'.*max_instance"):
        model.loss(out, batch, aux_weights={"instance": 1.0})
    with pytest.raises(ConfigError, match="aux_weights"):
        model.loss(out, batch, aux_weights={"max_instance": -1.0})
    plain = MILModel(create_pooling("mean", 4), create_fusion("linear", 4, 0, 2))
    with pytest.raises(ConfigError, match="none"):
        plain.loss(plain(batch), batch, aux_weights={"x": 1.0})


def test_soft_labels_give_the_aux_losses_their_argmax():
    model = _model(1.0)
    batch = _batch(soft=True)
    out = model(batch)
    aux = model.pooling.auxiliary_losses(out.aux, torch.tensor([1, 0, 1]))["max_instance"]
    torch.testing.assert_close(model.loss(out, batch), mil_loss(out, batch) + aux)


def test_a_pooling_without_either_method_says_so():
    class Nothing(MILPooling):
        pass

    with pytest.raises(NotImplementedError, match="Nothing implements neither"):
        Nothing(2)(torch.randn(1, 2, 2), torch.ones(1, 2, dtype=torch.bool))
