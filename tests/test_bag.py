"""Tests of Bag, BagBatch and collate_bags, with hypothesis properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from milcell.data import Bag, BagBatch, collate_bags
from milcell.exceptions import DataError, ShapeError
from tests._factories import make_bags

sizes_st = st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=12)


@given(sizes=sizes_st)
def test_mask_counts_match_bag_sizes(sizes: list[int]) -> None:
    batch = collate_bags(make_bags(sizes, dim=3, ordered=True))
    assert batch.mask.dtype == torch.bool
    assert batch.mask.shape == (len(sizes), max(sizes))
    assert batch.mask.sum(1).tolist() == sizes
    assert torch.equal(batch.bag_sizes, torch.tensor(sizes))


@given(sizes=sizes_st, fill=st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_pad_unpad_round_trip(sizes: list[int], fill: float) -> None:
    batch = collate_bags(make_bags(sizes, dim=3, ordered=True))
    padded = batch.pad(batch.instances, fill=fill)
    assert padded.shape == (len(sizes), max(sizes), 3)
    assert torch.equal(batch.unpad(padded), batch.instances)
    assert bool((padded[~batch.mask] == fill).all())


@given(sizes=sizes_st)
def test_order_of_bags_and_instances_preserved(sizes: list[int]) -> None:
    bags = make_bags(sizes, dim=3, ordered=True)
    batch = collate_bags(bags)
    assert batch.ids == [b.id for b in bags]
    padded = batch.pad(batch.instances)
    for i, bag in enumerate(bags):
        assert torch.equal(padded[i, : len(bag)], bag.instances)
    for piece, bag in zip(batch.split(batch.instances), bags, strict=True):
        assert torch.equal(piece, bag.instances)
    assert batch.bag_index.tolist() == [i for i, n in enumerate(sizes) for _ in range(n)]


def test_images_are_packed_not_padded() -> None:
    bags = [Bag(torch.rand(n, 3, 8, 8), 0, id=str(n)) for n in (1, 7, 3)]
    batch = collate_bags(bags)
    assert batch.instances.shape == (11, 3, 8, 8)
    assert batch.max_bag_size == 7


def test_pad_is_differentiable() -> None:
    batch = collate_bags(make_bags([2, 3], dim=3, ordered=True))
    values = torch.rand(5, 4, requires_grad=True)
    batch.pad(values).sum().backward()
    assert torch.equal(values.grad, torch.ones(5, 4))


def test_clinical_stacked_and_labels() -> None:
    batch = collate_bags(make_bags([2, 1, 4], dim=3, clinical_dim=3, ordered=True))
    assert batch.clinical.shape == (3, 3)
    assert batch.labels.tolist() == [0, 1, 0]
    assert batch.labels.dtype == torch.long


def test_to_and_pin_memory_keep_fields() -> None:
    batch = collate_bags(make_bags([2, 3], dim=3, clinical_dim=2, ordered=True))
    moved = batch.to("cpu", non_blocking=True, dtype=torch.float64)
    assert moved.instances.dtype == torch.float64
    assert moved.bag_sizes.dtype == torch.long
    assert moved.ids == batch.ids
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        assert batch.pin_memory().instances.is_pinned()


def test_dataloader_with_workers() -> None:
    bags = make_bags([3, 1, 2, 5, 4], dim=3, clinical_dim=2, ordered=True)
    loader = DataLoader(bags, batch_size=2, collate_fn=collate_bags, num_workers=2)
    batches = list(loader)
    assert [b.ids for b in batches] == [["P0", "P1"], ["P2", "P3"], ["P4"]]
    assert all(isinstance(b, BagBatch) for b in batches)


def test_instance_names_and_soft_labels_carried() -> None:
    bags = [
        Bag(torch.rand(2, 3), 1, id="a", instance_names=("x.jpg", "y.jpg"), soft_label=[0.2, 0.8]),
        Bag(torch.rand(1, 3), 0, id="b", instance_names=("z.jpg",), soft_label=[0.9, 0.1]),
    ]
    batch = collate_bags(bags)
    assert batch.instance_names == [("x.jpg", "y.jpg"), ("z.jpg",)]
    assert batch.soft_labels.shape == (2, 2)


def test_large_bag() -> None:
    batch = collate_bags([Bag(torch.rand(10_000, 2), 1, id="big"), Bag(torch.rand(1, 2), 0)])
    assert batch.mask.shape == (2, 10_000)
    assert int(batch.mask.sum()) == 10_001


# --- bad input ---------------------------------------------------------------


def test_empty_bag_rejected_with_its_name() -> None:
    with pytest.raises(DataError, match="P9"):
        Bag(torch.zeros(0, 3), 1, id="P9")


def test_empty_list_rejected() -> None:
    with pytest.raises(DataError, match="empty list"):
        collate_bags([])


def test_mismatched_clinical_dims_named() -> None:
    bags = [Bag(torch.rand(2, 3), 0, torch.rand(3), id="A"), Bag(torch.rand(2, 3), 0, torch.rand(2), id="B")]
    with pytest.raises(DataError, match=r"clinical.*A.*B"):
        collate_bags(bags)


def test_clinical_present_for_some_bags_only() -> None:
    bags = [Bag(torch.rand(2, 3), 0, torch.rand(3), id="A"), Bag(torch.rand(2, 3), 0, id="B")]
    with pytest.raises(DataError, match="'B'|B"):
        collate_bags(bags)


def test_mismatched_instance_shapes() -> None:
    with pytest.raises(DataError, match="different shapes"):
        collate_bags([Bag(torch.rand(2, 3), 0, id="A"), Bag(torch.rand(2, 4), 0, id="B")])


def test_bad_fields() -> None:
    with pytest.raises(DataError, match="label"):
        Bag(torch.rand(2, 3), -2, id="A")
    with pytest.raises(DataError, match="clinical"):
        Bag(torch.rand(2, 3), 0, torch.rand(2, 2), id="A")
    with pytest.raises(DataError, match="instance names"):
        Bag(torch.rand(2, 3), 0, id="A", instance_names=("only-one",))
    with pytest.raises(DataError, match="torch.Tensor"):
        Bag([[1.0]], 0, id="A")  # type: ignore[arg-type]


def test_pad_wrong_rows() -> None:
    batch = collate_bags(make_bags([2, 3], dim=3, ordered=True))
    with pytest.raises(ShapeError, match="5 instances"):
        batch.pad(torch.rand(4, 3))
    with pytest.raises(ShapeError, match="unpad"):
        batch.unpad(torch.rand(2, 4, 3))


# --- host-side sizes: padding without reading a device tensor ----------------------


def test_sizes_are_kept_on_the_host_and_travel_with_the_batch() -> None:
    from dataclasses import replace

    batch = collate_bags(make_bags([2, 5, 1], dim=3, ordered=True))
    assert batch.sizes == (2, 5, 1) and all(type(n) is int for n in batch.sizes)
    moved = batch.to("cpu", dtype=torch.float64)
    assert "sizes" in moved.__dict__ and moved.sizes == (2, 5, 1)  # carried, not re-read
    # a batch made by hand, or with replace(), reads its sizes from bag_sizes once
    assert replace(batch, bag_sizes=torch.tensor([3, 4, 1])).sizes == (3, 4, 1)
    manual = BagBatch(batch.instances, torch.tensor([2, 5, 1]), batch.labels)
    assert manual.sizes == (2, 5, 1) and manual.max_bag_size == 5


def test_layout_reads_no_tensor_value_on_the_host() -> None:
    from tests.nn.test_host_sync import no_host_reads

    batch = collate_bags(make_bags([2, 5, 1], dim=3, ordered=True))
    values = torch.arange(8.0, requires_grad=True)
    with no_host_reads():
        padded = batch.pad(values, fill=-1.0)
        back = batch.unpad(padded)
        pieces = batch.split(values)
        index = batch.bag_index
        padded.sum().backward()
    assert padded.tolist() == [[0, 1, -1, -1, -1], [2, 3, 4, 5, 6], [7, -1, -1, -1, -1]]
    assert torch.equal(back, values.detach()) and [len(p) for p in pieces] == [2, 5, 1]
    assert index.tolist() == [0, 0, 1, 1, 1, 1, 1, 2]


def test_label_accepts_integer_scalars_and_refuses_the_rest() -> None:
    import numpy as np

    assert type(Bag(torch.rand(1, 2), np.int64(1)).label) is int
    assert Bag(torch.rand(1, 2), torch.tensor(1)).label == 1
    for bad in (1.5, "1", True, torch.tensor(1.0)):
        with pytest.raises(DataError, match=r"bag 'A': label must be an integer >= -1, got"):
            Bag(torch.rand(1, 2), bad, id="A")  # type: ignore[arg-type]
