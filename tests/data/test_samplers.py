"""Tests for milcell.data.samplers: class-balanced sampling and minority oversampling."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Subset

from milcell.data import Bag, collate_bags
from milcell.data.datasets import FeatureBagDataset
from milcell.data.samplers import (
    ClassBalancedSampler,
    DistributedBagSampler,
    MinorityOversampler,
    bag_sizes,
)
from milcell.exceptions import ConfigError, DataError


def test_class_balanced_equalises_classes_and_skips_unlabelled() -> None:
    labels = np.array([0] * 80 + [1] * 15 + [2] * 5 + [-1] * 10)
    sampler = ClassBalancedSampler(labels, num_samples=6000, seed=0)
    drawn = np.array(list(sampler))
    assert len(drawn) == 6000 == len(sampler)
    assert (labels[drawn] >= 0).all()
    shares = np.bincount(labels[drawn], minlength=3) / drawn.size
    np.testing.assert_allclose(shares, [1 / 3] * 3, atol=0.04)
    assert len(ClassBalancedSampler(labels)) == 100  # labelled samples by default


def test_class_balanced_epochs_seeded() -> None:
    labels = [0] * 20 + [1] * 5
    a = ClassBalancedSampler(labels, seed=4)
    first, second = list(a), list(a)  # epoch advances on each pass
    assert first != second and a.epoch == 2
    b = ClassBalancedSampler(labels, seed=4)
    b.set_epoch(1)
    assert list(b) == second
    assert list(ClassBalancedSampler(labels, seed=5)) != first


def test_class_balanced_without_replacement_is_a_permutation_subset() -> None:
    labels = [0] * 6 + [1] * 4
    drawn = list(ClassBalancedSampler(labels, num_samples=10, replacement=False))
    assert sorted(drawn) == list(range(10))


def test_oversampler_to_majority() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7 + [-1] * 2)
    sampler = MinorityOversampler(labels, seed=1)
    assert sampler.class_counts == {0: (10, 10), 1: (3, 10), 2: (7, 10)}
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 30
    counts = Counter(labels[drawn].tolist())
    assert counts == {0: 10, 1: 10, 2: 10}
    per_index = Counter(drawn)
    assert all(per_index[i] in (3, 4) for i in range(10, 13))  # whole copies then a remainder
    assert all(per_index[i] == 1 for i in range(10))
    assert 20 not in per_index and 21 not in per_index


def test_oversampler_factor_like_hem_doubling() -> None:
    labels = [1] * 20 + [0] * 9  # ALL = 1 majority, HEM = 0 minority
    sampler = MinorityOversampler(labels, factor=2.0)
    assert sampler.class_counts == {0: (9, 18), 1: (20, 20)}
    drawn = list(sampler)
    assert Counter(drawn)[25] == 2 and Counter(drawn)[3] == 1
    big = MinorityOversampler([1] * 10 + [0] * 9, factor=2.0)  # not capped at the majority
    assert big.class_counts[0] == (9, 18)
    assert MinorityOversampler([0, 0, 1], factor=1.5).class_counts[1] == (1, 2)


def test_oversampler_shuffle_and_epochs() -> None:
    labels = [0] * 7 + [1] * 3
    ordered = list(MinorityOversampler(labels, shuffle=False, seed=0))
    assert ordered[:7] == list(range(7))
    s = MinorityOversampler(labels, seed=2)
    e0, e1 = list(s), list(s)
    assert e0 != e1 and sorted(e0) != list(range(14))
    s.set_epoch(0)
    assert list(s) == e0


@given(
    counts=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    factor=st.one_of(st.none(), st.floats(1.0, 4.0)),
    seed=st.integers(0, 10_000),
)
def test_oversampler_counts_property(counts: list[int], factor: float | None, seed: int) -> None:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    sampler = MinorityOversampler(labels, factor=factor, seed=seed)
    drawn = np.array(list(sampler))
    got = np.bincount(labels[drawn], minlength=len(counts))
    majority = max(counts)
    for c, n in enumerate(counts):
        if n == majority:
            assert got[c] == n
        elif factor is None:
            assert got[c] == majority
        else:
            assert got[c] == round(factor * n)
        per_index = np.bincount(drawn[labels[drawn] == c], minlength=labels.size)[labels == c]
        assert per_index.max() - per_index.min() <= 1  # repeats spread evenly


def test_samplers_in_dataloader_with_dataset_labels() -> None:
    ds = FeatureBagDataset(
        [torch.full((i % 3 + 1, 2), float(i)) for i in range(12)], labels=[0] * 9 + [1] * 3
    )
    for sampler in (ClassBalancedSampler(ds, seed=0), MinorityOversampler(ds, seed=0)):
        loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate_bags)
        ids = [i for batch in loader for i in batch.ids]
        assert len(ids) == len(sampler)


def test_sampler_errors() -> None:
    with pytest.raises(DataError, match="every sample is unlabelled"):
        ClassBalancedSampler([-1, -1])
    with pytest.raises(DataError, match="non-empty 1-D"):
        MinorityOversampler([])
    with pytest.raises(DataError, match="must be integers"):
        MinorityOversampler([0.5, 1.0])
    with pytest.raises(DataError, match=r"must be >= -1, got -4 at position 2"):
        ClassBalancedSampler(torch.tensor([0, 1, -4]))
    with pytest.raises(ConfigError, match="num_samples must be an integer >= 1"):
        ClassBalancedSampler([0, 1], num_samples=0)
    with pytest.raises(ConfigError, match="num_samples=5 exceeds the 2 labelled samples"):
        ClassBalancedSampler([0, 1, -1], num_samples=5, replacement=False)
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        ClassBalancedSampler([0, 1], seed=-1)
    with pytest.raises(ConfigError, match="factor must be a finite number >= 1.0"):
        MinorityOversampler([0, 1], factor=0.5)
    with pytest.raises(ConfigError, match="factor must be a finite number >= 1.0"):
        MinorityOversampler([0, 1], factor=float("nan"))
    with pytest.raises(ConfigError, match="epoch must be an integer >= 0"):
        MinorityOversampler([0, 1]).set_epoch(-1)


# ------------------------------------------------------------------------------ sharding


@settings(max_examples=20)
@given(
    sizes=st.lists(st.integers(1, 200), min_size=1, max_size=40),
    replicas=st.integers(1, 4),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 5),
)
def test_distributed_bag_sampler_covers_each_bag_once_and_is_deterministic(
    sizes: list[int], replicas: int, seed: int, epoch: int
) -> None:
    def shards() -> list[list[int]]:
        out = []
        for r in range(replicas):
            s = DistributedBagSampler(len(sizes), sizes=sizes, num_replicas=replicas, rank=r, seed=seed)
            s.set_epoch(epoch)
            out.append(list(s))
        return out

    parts = shards()
    per_rank = -(-len(sizes) // replicas)
    assert all(len(p) == per_rank for p in parts)
    flat = [i for p in parts for i in p]
    assert set(flat) == set(range(len(sizes)))  # every bag, the excess being padding repeats
    assert len(flat) - len(sizes) == per_rank * replicas - len(sizes) < replicas
    assert parts == shards()
    loads = [sum(sizes[i] for i in p) for p in parts]
    if replicas == 2:
        assert max(loads) - min(loads) <= max(sizes)


def test_distributed_bag_sampler_global_batches_and_balance() -> None:
    sizes = [int(v) for v in np.random.default_rng(0).integers(16, 199, 64)]
    ranks = [DistributedBagSampler(64, sizes=sizes, num_replicas=2, rank=r, seed=3) for r in range(2)]
    plain = [DistributedBagSampler(64, sizes=None, num_replicas=2, rank=r, seed=3) for r in range(2)]
    single = list(DistributedBagSampler(64, num_replicas=1, rank=0, seed=3))
    a, b = (list(s) for s in ranks)
    # the k-th batch of 4 per rank holds the single process's k-th batch of 8
    for k in range(0, 32, 4):
        assert sorted(a[k : k + 4] + b[k : k + 4]) == sorted(single[2 * k : 2 * k + 8])
    balanced = abs(sum(sizes[i] for i in a) - sum(sizes[i] for i in b))
    p, q = (list(s) for s in plain)
    assert balanced <= max(sizes) and balanced <= abs(sum(sizes[i] for i in p) - sum(sizes[i] for i in q))
    assert p == single[0::2]  # without sizes: DistributedSampler's assignment
    assert list(ranks[0]) != a  # the epoch advanced: a new permutation


def test_epoch_samplers_shard_the_same_draw() -> None:
    labels = [0] * 9 + [1] * 3
    full = list(MinorityOversampler(labels, seed=5))
    parts = [list(MinorityOversampler(labels, seed=5, num_replicas=2, rank=r)) for r in range(2)]
    assert parts == [full[0::2], full[1::2]] and len(MinorityOversampler(labels, num_replicas=2)) == 9
    sized = [
        list(ClassBalancedSampler(labels, seed=1, num_replicas=3, rank=r, sizes=range(1, 13)))
        for r in range(3)
    ]
    assert sorted(i for p in sized for i in p) == sorted(ClassBalancedSampler(labels, seed=1))
    with pytest.raises(ConfigError, match="rank must be < num_replicas=2"):
        ClassBalancedSampler(labels, num_replicas=2, rank=2)
    with pytest.raises(ConfigError, match="sizes has 3 entries"):
        DistributedBagSampler(4, sizes=[1, 2, 3])


def test_bag_sizes_reads_features_subsets_and_bags() -> None:
    bags = [Bag(torch.rand(n, 2), 0, id=f"B{n}") for n in (3, 1, 4)]
    assert bag_sizes(bags).tolist() == [3, 1, 4]
    assert bag_sizes(Subset(bags, [2, 0])).tolist() == [4, 3]
    assert bag_sizes([1, 2]) is None
