"""Tests of milcell.train.ensemble: hard and soft votes, ensemble prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from milcell.data import Bag
from milcell.exceptions import ConfigError, DataError, ShapeError
from milcell.nn.model import create_mil_model
from milcell.train.distributed import make_loader
from milcell.train.ensemble import predict_ensemble, vote
from tests._factories import make_bags


def _probs(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_soft_vote_is_mean() -> None:
    a = _probs([[0.9, 0.1], [0.2, 0.8]])
    b = _probs([[0.5, 0.5], [0.6, 0.4]])
    assert torch.allclose(vote([a, b], "soft"), (a + b) / 2)


def test_hard_vote_majority_wins_over_confidence() -> None:
    # Two models mildly for class 0, one very confident for class 1: the majority decides.
    p = [_probs([[0.55, 0.45]]), _probs([[0.55, 0.45]]), _probs([[0.0, 1.0]])]
    assert vote(p, "soft").argmax(1).item() == 1
    assert vote(p, "hard").argmax(1).item() == 0


def test_hard_vote_tie_broken_by_mean_probability() -> None:
    # One vote each; model 2 is more confident for class 1 than model 1 for class 0.
    p = [_probs([[0.6, 0.4]]), _probs([[0.1, 0.9]])]
    scores = vote(p, "hard")
    assert scores.argmax(1).item() == 1
    assert scores[0, 1].item() > 0.5  # threshold 0.5 gives the same decision
    # Three classes, a 1-1-1 tie: the class with the highest mean probability wins.
    q = [_probs([[0.5, 0.3, 0.2]]), _probs([[0.1, 0.5, 0.4]]), _probs([[0.1, 0.2, 0.7]])]
    means = torch.stack(q).mean(0)
    assert vote(q, "hard").argmax(1).item() == int(means.argmax(1).item())


def test_hard_vote_exact_tie_goes_to_lowest_class() -> None:
    p = [_probs([[0.7, 0.3]]), _probs([[0.3, 0.7]])]
    assert vote(p, "hard").argmax(1).item() == 0


@given(
    st.integers(1, 5),
    st.integers(1, 6),
    st.integers(2, 4),
    st.integers(0, 2**31 - 1),
)
def test_vote_invariants(n_models: int, n: int, c: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    probs = [torch.softmax(torch.randn(n, c, generator=g) * 3, dim=1) for _ in range(n_models)]
    for method in ("soft", "hard"):
        out = vote(probs, method)
        assert out.shape == (n, c)
        assert torch.allclose(out.sum(1), torch.ones(n), atol=1e-5)
        # Order of the models does not matter.
        assert torch.allclose(out, vote(probs[::-1], method), atol=1e-6)
    # The hard decision always has the maximal vote count.
    votes = torch.stack([p.argmax(1) for p in probs])  # (M, n)
    counts = torch.nn.functional.one_hot(votes, c).sum(0)  # (n, C)
    decision = vote(probs, "hard").argmax(1)
    assert torch.equal(counts.gather(1, decision[:, None]).squeeze(1), counts.max(1).values)
    # A single model: hard vote keeps its decision.
    assert torch.equal(vote(probs[:1], "hard").argmax(1), probs[0].argmax(1))


def test_vote_accepts_numpy() -> None:
    out = vote([np.array([[0.2, 0.8]]), np.array([[0.4, 0.6]])], "soft")
    assert torch.allclose(out, _probs([[0.3, 0.7]]))


def test_vote_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="method must be 'soft' or 'hard'"):
        vote([_probs([[0.5, 0.5]])], "mean")
    with pytest.raises(ConfigError, match="no model probabilities"):
        vote([], "soft")
    with pytest.raises(ConfigError, match="must be a sequence"):
        vote(_probs([[0.5, 0.5]]), "soft")  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="model 1 probabilities have shape"):
        vote([_probs([[0.5, 0.5]]), _probs([[0.5, 0.5], [0.5, 0.5]])])
    with pytest.raises(ShapeError, match=r"shape \(n, C >= 2\)"):
        vote([torch.ones(3)])
    with pytest.raises(DataError, match="do not sum to 1"):
        vote([_probs([[2.0, 3.0]])])
    with pytest.raises(DataError, match="negative, NaN or inf"):
        vote([_probs([[float("nan"), 1.0]])])


def _bags(n: int, d: int = 4, n_instances: int = 3, seed: int = 0) -> list[Bag]:
    return make_bags([n_instances] * n, dim=d, seed=seed, signal=1.0)


@pytest.mark.parametrize("n_instances", [1, 5])  # single cells (bags of one) and bags
def test_predict_ensemble_matches_manual_vote(n_instances: int) -> None:
    models = [create_mil_model(None, pooling="mean", in_dim=4) for _ in range(3)]
    bags = _bags(7, n_instances=n_instances)
    loader = make_loader(bags, 3, shuffle=False)
    per_model = []
    for m in models:
        m.eval()
        with torch.no_grad():
            per_model.append(torch.cat([torch.softmax(m(b).logits, 1) for b in loader]))
    for method in ("soft", "hard"):
        preds = predict_ensemble(models, loader, method=method)
        assert preds.ids == [b.id for b in bags]
        assert preds.labels.tolist() == [b.label for b in bags]
        assert preds.attention is None
        assert torch.allclose(preds.probabilities, vote(per_model, method), atol=1e-6)


def test_predict_ensemble_restores_model_state() -> None:
    model = create_mil_model(None, pooling="mean", in_dim=4).train()
    predict_ensemble([model], make_loader(_bags(3), 2, shuffle=False), device="cpu", precision="bf16")
    assert model.training


def test_predict_ensemble_sigmoid_single_logit() -> None:
    class OneLogit(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, batch):  # type: ignore[no-untyped-def]
            return self.lin(batch.pad(batch.instances).mean(1))

    preds = predict_ensemble([OneLogit(), OneLogit()], make_loader(_bags(4), 2, shuffle=False))
    assert preds.probabilities.shape == (4, 2)
    assert torch.allclose(preds.probabilities.sum(1), torch.ones(4))


def test_predict_ensemble_bad_inputs() -> None:
    model = create_mil_model(None, pooling="mean", in_dim=4)
    loader = make_loader(_bags(4), 2, shuffle=False)
    with pytest.raises(ConfigError, match="got no model"):
        predict_ensemble([], loader)
    with pytest.raises(ConfigError, match="method must be"):
        predict_ensemble([model], loader, method="max")
    with pytest.raises(ConfigError, match="precision must be"):
        predict_ensemble([model], loader, precision="16")
    shuffled = make_loader(_bags(8), 2, shuffle=True, seed=3)
    # Two passes over a shuffling loader give other orders: refused.
    shuffled.generator.manual_seed(1)  # type: ignore[union-attr]

    class Reseed:
        def __init__(self) -> None:
            self.calls = 0

        def __iter__(self):  # type: ignore[no-untyped-def]
            self.calls += 1
            shuffled.generator.manual_seed(self.calls)  # type: ignore[union-attr]
            return iter(shuffled)

    with pytest.raises(DataError, match="same order every pass"):
        predict_ensemble([model, model], Reseed())
    with pytest.raises(DataError, match="must yield BagBatch"):
        predict_ensemble([model], [torch.zeros(2, 4)])
