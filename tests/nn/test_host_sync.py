"""A MIL training step reads no tensor value on the host while the value checks are off.

Every ``Tensor.item``, ``tolist``, ``__bool__``, ``__index__``, ``__int__`` and ``__float__`` is a
host-device synchronisation on an accelerator. Inside the guarded region (forward, loss, backward)
these methods raise; the region is exercised with every registered pooling and fusion head on
feature bags, and with a tiny image backbone. With the checks on, the same step does read values
(the guard fires), and the NaN / empty-bag errors are still raised.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import milcell
from milcell.data.bag import Bag, BagBatch, collate_bags
from milcell.exceptions import DataError
from milcell.nn.fusion import list_fusions
from milcell.nn.model import MILModel, create_mil_model, mil_loss
from milcell.nn.pooling import create_pooling, list_poolings
from tests._factories import make_batch

SYNCING = ("item", "tolist", "__bool__", "__index__", "__int__", "__float__")
F_DIM, CLIN = 6, 2


class HostSync(AssertionError):
    """A tensor value was read on the host inside the guarded region."""


@contextmanager
def no_host_reads() -> Iterator[None]:
    """Make every tensor-to-Python conversion raise :class:`HostSync` inside the block."""
    saved = {name: torch.Tensor.__dict__.get(name) for name in SYNCING}

    def refuse(name: str):
        def method(self: torch.Tensor, *args: object, **kwargs: object) -> None:
            raise HostSync(f"Tensor.{name} was called: a host-device sync")

        return method

    for name in SYNCING:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def _prediction_level(name: str) -> bool:
    kwargs = {"clinical_dim": CLIN} if name == "instance_mean" else {}
    return create_pooling(name, F_DIM, **kwargs).prediction_level


COMBOS = [(p, f) for p in list_poolings() for f in ([None] if _prediction_level(p) else list_fusions())]


def _feature_model(pooling: str, fusion: str | None) -> MILModel:
    clinical_dim = 0 if fusion == "linear" else CLIN
    return create_mil_model(
        None, pooling=pooling, fusion=fusion, in_dim=F_DIM, clinical_dim=clinical_dim
    ).train()


def _step(model: MILModel, batch: BagBatch, **loss_kwargs: object) -> torch.Tensor:
    out = model(batch)
    loss = model.loss(out, batch, **loss_kwargs)  # type: ignore[arg-type]  (bag loss + auxiliary losses)
    loss.backward()
    return loss


def test_the_guard_catches_every_kind_of_host_read() -> None:
    t = torch.ones(2)
    reads = [
        lambda: t.sum().item(),
        lambda: t.tolist(),
        lambda: bool(t.any()),
        lambda: [0, 1][t.long()[0]],
        lambda: int(t[0]),
        lambda: float(t[0]),
    ]
    with no_host_reads():
        for read in reads:
            with pytest.raises(HostSync):
                read()
    assert t.sum().item() == 2.0 and bool(t.any())  # restored afterwards


@pytest.mark.parametrize(("pooling", "fusion"), COMBOS, ids=[f"{p}-{f}" for p, f in COMBOS])
def test_feature_bag_step_without_host_reads(pooling: str, fusion: str | None) -> None:
    model = _feature_model(pooling, fusion)
    batch = make_batch((3, 1, 5), dim=F_DIM, clinical_dim=CLIN, labels=(1, 0, -1))
    with milcell.checks(False), no_host_reads():
        loss = _step(model, batch, class_weights=[1.0, 2.0])
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("fusion", ["concat", "moe", "gated"])
def test_clinical_only_step_and_soft_labels_without_host_reads(fusion: str) -> None:
    model = create_mil_model(
        None, pooling="mean", fusion=fusion, in_dim=F_DIM, clinical_dim=CLIN, use_image=False
    )
    bags = [
        Bag(torch.randn(2, F_DIM), -1, clinical=torch.randn(CLIN), soft_label=torch.tensor([0.3, 0.7])),
        Bag(torch.randn(1, F_DIM), 0, clinical=torch.randn(CLIN), soft_label=torch.tensor([1.0, 0.0])),
    ]
    batch = collate_bags(bags)
    with milcell.checks(False), no_host_reads():
        loss = _step(model, batch)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "chunking",
    [{}, {"chunk_size": 2, "checkpointing": True, "freeze_bn_stats": True}],
    ids=["whole", "chunks"],
)
def test_image_backbone_step_without_host_reads(chunking: dict) -> None:
    model = create_mil_model(
        "milcell_mini_resnet",
        pooling="gated_attention",
        fusion="gated",
        clinical_dim=CLIN,
        backbone_kwargs={"width": 4},
        **chunking,
    ).train()
    batch = make_batch((2, 3), image_size=32, clinical_dim=CLIN, seed=1, prefix="I")
    with milcell.checks(False), no_host_reads():
        loss = _step(model, batch)
    assert torch.isfinite(loss)
    assert model.encoder is not None
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)


def test_the_decomposition_runs_without_host_reads() -> None:
    model = _feature_model("attention", "concat")
    batch = make_batch((3, 1, 5), dim=F_DIM, clinical_dim=CLIN, labels=(1, 0, -1))
    with milcell.checks(False), no_host_reads():
        embedding, attention = model.pool(model.encode(batch), batch, return_attention=True)
        logits = model.forward_head(embedding, batch.clinical).logits
    assert logits.shape == (3, 2) and attention.shape == (3, 5)


def test_with_checks_on_the_step_reads_values() -> None:
    """The guard is not vacuous: the value checks are exactly what reads tensors on the host."""
    model = _feature_model("mean", "concat")
    with milcell.checks(True), no_host_reads(), pytest.raises(HostSync):
        _step(model, make_batch((3, 1, 5), dim=F_DIM, clinical_dim=CLIN, labels=(1, 0, -1)))


@pytest.mark.parametrize("name", list_poolings())
def test_masked_garbage_has_no_influence_with_checks_off(name: str) -> None:
    """The masked-NaN guarantee does not depend on the checks (torch.where, not multiplication)."""
    kwargs = {"clinical_dim": CLIN} if name == "instance_mean" else {}
    pool = create_pooling(name, F_DIM, **kwargs).eval()
    x = torch.randn(2, 4, F_DIM)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    clinical = torch.randn(2, CLIN)
    dirty = x.clone()
    dirty[0, 2] = float("nan")
    dirty[0, 3] = float("inf")
    dirty = dirty.requires_grad_(True)
    with milcell.checks(False), no_host_reads():
        clean_emb, clean_w = pool(x, mask, return_attention=True, clinical=clinical)
        emb, w = pool(dirty, mask, return_attention=True, clinical=clinical)
        (emb.float().sum() + w.sum()).backward()
    torch.testing.assert_close(emb, clean_emb)
    torch.testing.assert_close(w, clean_w)
    assert dirty.grad is not None and bool(torch.isfinite(dirty.grad).all())
    assert bool((dirty.grad[0, 2:] == 0).all())


def test_value_errors_fire_with_checks_on_and_not_with_checks_off() -> None:
    model = _feature_model("gated_attention", "concat").eval()
    nan_instances = make_batch((3, 1, 5), dim=F_DIM, clinical_dim=CLIN, labels=(1, 0, -1))
    nan_instances.instances[3, 0] = float("nan")  # the only instance of P1
    nan_clinical = make_batch((3, 1, 5), dim=F_DIM, clinical_dim=CLIN, labels=(1, 0, -1))
    nan_clinical.clinical[2, 1] = float("inf")
    with milcell.checks(True):
        with pytest.raises(DataError, match=r"batch.instances holds NaN or inf in bags \['P1'\]"):
            model(nan_instances)
        with pytest.raises(DataError, match=r"batch.clinical holds NaN or inf for bags \['P2'\]"):
            model(nan_clinical)
        with pytest.raises(DataError, match="no labelled bag"):
            mil_loss(
                model(make_batch((3, 1, 5), dim=F_DIM, clinical_dim=CLIN, labels=(-1, -1, -1))),
                make_batch((3, 1, 5), dim=F_DIM, clinical_dim=CLIN, labels=(-1, -1, -1)),
            )
        with pytest.raises(DataError, match="bag 0 of the batch has no real instance"):
            model.pooling(torch.randn(1, 2, F_DIM), torch.zeros(1, 2, dtype=torch.bool))
    with milcell.checks(False):
        assert bool(torch.isnan(model(nan_instances).logits[1]).all())
        assert bool(torch.isfinite(model(nan_instances).logits[[0, 2]]).all())
        unlabelled = make_batch((3, 1, 5), dim=F_DIM, clinical_dim=CLIN, labels=(-1, -1, -1))
        assert mil_loss(model(unlabelled), unlabelled).item() == 0.0  # no labelled bag: no loss, no NaN


def test_bags_without_instances_are_refused_in_both_modes() -> None:
    """The sizes are on the host, so this check costs nothing and always runs."""
    model = _feature_model("mean", "linear")
    good = make_batch((3, 1, 5), dim=F_DIM, clinical_dim=CLIN, labels=(1, 0, -1))
    bad = BagBatch(good.instances[:4], torch.tensor([4, 0, 0]), good.labels, good.clinical, good.ids)
    for on in (True, False):
        with milcell.checks(on), pytest.raises(DataError, match=r"bags \['P1', 'P2'\] have no instance"):
            model(bad)
