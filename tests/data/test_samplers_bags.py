"""Sharding image bags (BagDataset) across ranks: dealt by bag size, as feature bags are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, Subset

from milcell.data.datasets import BagDataset
from milcell.data.formats.dlmi import load_dlmi
from milcell.data.samplers import DistributedBagSampler, bag_sizes
from milcell.data.synthetic import make_cohort
from milcell.runs import fold_datasets
from milcell.train.crossval import _train_loader
from milcell.train.distributed import make_loader

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sharding") / "dlmi"
    return make_cohort(root, n_patients=24, seed=3, image_size=32, bag_size=(2, 14))


def _ranks(monkeypatch: pytest.MonkeyPatch, build, world: int = 2):  # type: ignore[no-untyped-def]
    """``build()`` in every rank of a ``torchrun`` job of ``world`` processes (its environment)."""
    out = []
    for rank in range(world):
        with monkeypatch.context() as env:
            env.setenv("WORLD_SIZE", str(world))
            env.setenv("RANK", str(rank))
            out.append(build())
    return out


def _instances(loader) -> tuple[list[int], int]:  # type: ignore[no-untyped-def]
    """The indices a rank's loader draws in one pass, and the instances of the bags it yields."""
    indices = list(loader.sampler)
    loader.sampler.set_epoch(0)
    return indices, sum(int(batch.bag_sizes.sum()) for batch in loader)


@pytest.mark.parametrize("cache_images", [False, True])
def test_two_ranks_of_image_bags_get_near_equal_instances_and_disjoint_covering_indices(
    cohort_root: Path, monkeypatch: pytest.MonkeyPatch, cache_images: bool
) -> None:
    cohort = load_dlmi(cohort_root, "train")
    n = len(cohort) - len(cohort) % 2  # even: no padding, so the two shards are disjoint
    sizes = np.array([r.num_instances for r in cohort])[:n]
    assert sizes.max() > 3 * sizes.min()  # bags of very different sizes
    # The training dataset cross_validate's make_datasets builds in train_run (optionally cached).
    train_ds, _, _ = fold_datasets(
        cohort, range(n), range(n, len(cohort)), image_size=32, cache_images=cache_images, augment=False
    )
    assert isinstance(train_ds, BagDataset)
    assert bag_sizes(train_ds).tolist() == sizes.tolist()  # type: ignore[union-attr]

    loaders = _ranks(monkeypatch, lambda: make_loader(train_ds, 2, shuffle=True, seed=7))
    assert all(isinstance(lo.sampler, DistributedBagSampler) for lo in loaders)
    assert all(lo.sampler.sizes is not None for lo in loaders)  # dealt by size, no fallback
    (a, load_a), (b, load_b) = (_instances(lo) for lo in loaders)
    assert len(a) == len(b) == n // 2
    assert not set(a) & set(b) and sorted(a + b) == list(range(n))
    assert load_a == sizes[a].sum() and load_b == sizes[b].sum()  # what the images hold
    assert abs(load_a - load_b) <= sizes.max()
    # DistributedSampler's assignment of the same permutation: the bag-size deal is no worse.
    plain = [list(DistributedBagSampler(n, sizes=None, num_replicas=2, rank=r, seed=7)) for r in range(2)]
    assert abs(load_a - load_b) <= abs(sizes[plain[0]].sum() - sizes[plain[1]].sum())

    # The class samplers of cross_validate(sampler=...) deal the same way under torchrun.
    labels = np.asarray(train_ds.labels)
    for name in ("balanced", "oversample"):
        pair = _ranks(monkeypatch, lambda name=name: _train_loader(train_ds, labels, name, 2, 0, seed=1))
        assert all(lo.sampler.sizes is not None and lo.sampler.num_replicas == 2 for lo in pair)
        drawn = [list(lo.sampler) for lo in pair]
        loads = [int(sizes[d].sum()) for d in drawn]
        assert abs(loads[0] - loads[1]) <= sizes.max()


def test_explicit_ranks_shard_capped_subsets_and_concatenations_of_image_bags(cohort_root: Path) -> None:
    cohort = load_dlmi(cohort_root, "train")
    capped = BagDataset(cohort, max_instances=6)
    raw = np.array([r.num_instances for r in cohort])
    assert bag_sizes(capped).tolist() == np.minimum(raw, 6).tolist()  # type: ignore[union-attr]
    subset = Subset(Subset(capped, list(range(1, len(cohort)))), [5, 0, 3, 2])
    assert bag_sizes(subset).tolist() == np.minimum(raw[[6, 1, 4, 3]], 6).tolist()  # type: ignore[union-attr]
    both = ConcatDataset([subset, BagDataset(cohort)])
    sizes = bag_sizes(both)
    assert sizes is not None and sizes.tolist() == [*np.minimum(raw[[6, 1, 4, 3]], 6), *raw]
    samplers = [DistributedBagSampler(both, num_replicas=2, rank=r, seed=2) for r in range(2)]
    assert all(s.sizes is not None for s in samplers)
    parts = [list(s) for s in samplers]
    flat = sorted(parts[0] + parts[1])
    assert set(flat) == set(range(len(both))) and len(flat) - len(both) == len(both) % 2
    assert abs(int(sizes[parts[0]].sum()) - int(sizes[parts[1]].sum())) <= sizes.max()
    # A part of unknown sizes: the whole concatenation falls back (None), never guesses.
    assert bag_sizes(ConcatDataset([subset, [torch.zeros(1)]])) is None


def test_noisy_student_training_sets_keep_their_bag_sizes(cohort_root: Path) -> None:
    # Regression: the labelled set wrapped for soft pseudo-labels, and its concatenation with the
    # pseudo-labelled bags, lost their sizes, so torchrun sharded them without balancing.
    from milcell.train.noisy_student import PseudoLabelledDataset, _OneHot

    labelled = BagDataset(load_dlmi(cohort_root, "train"))
    pseudo = PseudoLabelledDataset(labelled, [4, 1], labels=[1, 0])
    own = bag_sizes(labelled)
    assert own is not None
    for train in (
        ConcatDataset([labelled, pseudo]),
        ConcatDataset([_OneHot(labelled, 2), pseudo]),
    ):
        assert bag_sizes(train).tolist() == [*own, own[4], own[1]]  # type: ignore[union-attr]
