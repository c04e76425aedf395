"""Tests of milcell.train.features: the frozen-backbone feature cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from milcell.data import (
    Bag,
    BagDataset,
    CellRecord,
    CellSet,
    FeatureBagDataset,
    InstanceDataset,
    build_transforms,
)
from milcell.data.formats.dlmi import load_dlmi
from milcell.data.splits import Fold
from milcell.data.synthetic import make_cohort
from milcell.exceptions import ConfigError, DataError, ShapeError
from milcell.nn.backbones import create_backbone
from milcell.nn.model import create_mil_model
from milcell.train.crossval import cross_validate, feature_subset
from milcell.train.features import (
    FEATURES_NAME,
    MANIFEST_NAME,
    cache_key,
    extract_features,
    state_dict_hash,
)

CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


class Counting(nn.Module):
    """A backbone wrapper that counts forward calls and instances seen."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.inner = backbone
        self.name = getattr(backbone, "name", "counting")
        self.data_config = getattr(backbone, "data_config", None)
        self.calls = 0
        self.instances = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.instances += int(x.shape[0])
        return self.inner(x)


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cohort(
        tmp_path_factory.mktemp("cohort"), n_patients=10, seed=0, image_size=32, bag_size=(2, 4)
    )


@pytest.fixture
def dataset(cohort_root: Path) -> BagDataset:
    return BagDataset(load_dlmi(cohort_root, split="train"), transform=build_transforms(CFG, train=False))


@pytest.fixture
def backbone() -> Counting:
    torch.manual_seed(0)
    return Counting(create_backbone("milcell_mini_resnet_k8", trainable="head"))


def test_extracts_backbone_outputs_and_carries_bag_fields(
    dataset: BagDataset, backbone: Counting, tmp_path: Path
) -> None:
    feats = extract_features(backbone, dataset, tmp_path, batch_size=3, chunk_size=4, progress=False)
    assert isinstance(feats, FeatureBagDataset)
    assert feats.ids == dataset.ids and feats.labels.tolist() == dataset.labels.tolist()
    assert feats.dim == 64
    total = sum(dataset.bag_size(i) for i in range(len(dataset)))
    assert backbone.instances == total
    # Raw clinical attributes (no scaler) travel along, with their names.
    assert torch.allclose(feats.clinical, dataset.clinical, equal_nan=True)
    assert feats.clinical_names == ("age", "lymph_count", "sex")
    assert feats.metadata["backbone"] == "milcell_mini_resnet_k8"
    backbone.eval()
    with torch.no_grad():
        for i in (0, len(dataset) - 1):
            bag = dataset[i]
            assert torch.allclose(feats[i].instances, backbone.inner(bag.instances), atol=1e-5)
            assert feats[i].instance_names == bag.instance_names
    # (file layout)
    assert (tmp_path / FEATURES_NAME).is_file() and (tmp_path / MANIFEST_NAME).is_file()


def test_second_call_reuses_the_cache(dataset: BagDataset, backbone: Counting, tmp_path: Path) -> None:
    first = extract_features(backbone, dataset, tmp_path, progress=False)
    calls = backbone.calls
    assert calls > 0
    second = extract_features(backbone, dataset, tmp_path, progress=False)
    assert backbone.calls == calls
    for a, b in zip(first.features, second.features, strict=True):
        assert torch.equal(a, b)
    assert second.clinical is not None and second.labels.tolist() == first.labels.tolist()


def test_changed_weights_rebuild(
    dataset: BagDataset, backbone: Counting, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = extract_features(backbone, dataset, tmp_path, progress=False)
    calls = backbone.calls
    with torch.no_grad():
        backbone.inner.model.conv1.weight.mul_(2.0)
    with caplog.at_level(logging.WARNING, logger="milcell"):
        second = extract_features(backbone, dataset, tmp_path, progress=False)
    assert backbone.calls == 2 * calls
    assert "key mismatch in ['weights']" in caplog.text
    assert not torch.allclose(first[0].instances, second[0].instances)
    # The rebuilt cache is then reused.
    extract_features(backbone, dataset, tmp_path, progress=False)
    assert backbone.calls == 2 * calls


def test_changed_transform_rebuilds(
    dataset: BagDataset, backbone: Counting, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extract_features(backbone, dataset, tmp_path, progress=False)
    calls = backbone.calls
    other = BagDataset(
        dataset.cohort, transform=build_transforms({**CFG, "std": (0.5, 0.5, 0.5)}, train=False)
    )
    with caplog.at_level(logging.WARNING, logger="milcell"):
        extract_features(backbone, other, tmp_path, progress=False)
    assert backbone.calls == 2 * calls
    assert "key mismatch in ['preprocessing']" in caplog.text


def test_changed_bags_or_precision_rebuild(dataset: BagDataset, backbone: Counting, tmp_path: Path) -> None:
    extract_features(backbone, dataset, tmp_path, progress=False)
    n = backbone.calls
    capped = BagDataset(dataset.cohort, transform=dataset.transform, max_instances=2, train=False)
    extract_features(backbone, capped, tmp_path, progress=False)
    assert backbone.calls > n
    n = backbone.calls
    extract_features(backbone, capped, tmp_path, precision="bf16", progress=False)
    assert backbone.calls > n


def test_labels_are_not_part_of_the_key(dataset: BagDataset, backbone: Counting, tmp_path: Path) -> None:
    extract_features(backbone, dataset, tmp_path, progress=False)
    calls = backbone.calls
    cohort = dataset.cohort
    from milcell.data import BagCohort, BagRecord

    flipped = BagCohort(
        [BagRecord(r.id, 1 - r.label, r.paths, r.clinical) for r in cohort],
        clinical_names=cohort.clinical_names,
        root=cohort.root,
    )
    feats = extract_features(
        backbone, BagDataset(flipped, transform=dataset.transform), tmp_path, progress=False
    )
    assert backbone.calls == calls
    assert feats.labels.tolist() == (1 - dataset.labels).tolist()


def test_truncated_cache_is_detected_and_rebuilt(
    dataset: BagDataset, backbone: Counting, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = extract_features(backbone, dataset, tmp_path, progress=False)
    calls = backbone.calls
    path = tmp_path / FEATURES_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="milcell"):
        second = extract_features(backbone, dataset, tmp_path, progress=False)
    assert backbone.calls == 2 * calls
    assert "truncated" in caplog.text
    assert torch.equal(first[1].instances, second[1].instances)
    assert path.stat().st_size == len(data)


def test_missing_or_corrupt_manifest_rebuilds(
    dataset: BagDataset, backbone: Counting, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extract_features(backbone, dataset, tmp_path, progress=False)
    calls = backbone.calls
    (tmp_path / MANIFEST_NAME).unlink()  # as if interrupted before the manifest was written
    with caplog.at_level(logging.WARNING, logger="milcell"):
        extract_features(backbone, dataset, tmp_path, progress=False)
    assert backbone.calls == 2 * calls
    assert "no manifest" in caplog.text
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="milcell"):
        extract_features(backbone, dataset, tmp_path, progress=False)
    assert backbone.calls == 3 * calls
    assert "unreadable manifest" in caplog.text
    # A same-size but corrupt features file is caught by its digest before it is loaded.
    path = tmp_path / FEATURES_NAME
    path.write_bytes(b"\0" * path.stat().st_size)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="milcell"):
        extract_features(backbone, dataset, tmp_path, progress=False)
    assert backbone.calls == 4 * calls
    assert "features.safetensors is corrupt or was replaced: its SHA-256" in caplog.text


def test_chunking_and_batching_do_not_change_features(dataset: BagDataset, backbone: Counting) -> None:
    dataset = BagDataset(dataset.cohort.subset([0, 1, 2]), transform=dataset.transform)
    a = extract_features(backbone, dataset, None, batch_size=1, chunk_size=1, progress=False)
    b = extract_features(backbone, dataset, None, batch_size=4, chunk_size=64, progress=False)
    for x, y in zip(a.features, b.features, strict=True):
        assert torch.allclose(x, y, atol=1e-5)
    c = extract_features(backbone, dataset, None, precision="bf16", progress=False)
    assert c.features[0].dtype == torch.float32
    assert torch.allclose(a.features[0], c.features[0], atol=0.1, rtol=0.1)


def test_backbone_mode_and_device_restored(dataset: BagDataset, backbone: Counting) -> None:
    backbone.train()
    extract_features(backbone, dataset, None, device="cpu", progress=False)
    assert backbone.training


def test_instance_dataset(tmp_path: Path, backbone: Counting) -> None:
    records = []
    for i in range(5):
        path = tmp_path / f"cell{i}.png"
        Image.new("RGB", (40, 40), (40 * i, 100, 200 - 30 * i)).save(path)
        records.append(CellRecord(path, i % 2, f"p{i // 2}"))
    cells = InstanceDataset(
        CellSet(records, class_names=("hem", "all")), transform=build_transforms(CFG, False)
    )
    feats = extract_features(backbone, cells, tmp_path / "cache", progress=False)
    assert len(feats) == 5 and all(len(feats[i]) == 1 for i in range(5))
    assert feats.labels.tolist() == [0, 1, 0, 1, 0] and feats.clinical is None
    key = json.loads((tmp_path / "cache" / MANIFEST_NAME).read_text())["key"]
    assert key["items"][3] == ["cell3", ["p1/cell3.png"]]


def test_generic_dataset_of_bags(tmp_path: Path) -> None:
    bags = [Bag(torch.rand(2, 3, 8, 8), label=i % 2, id=f"B{i}") for i in range(3)]
    net = Counting(nn.Sequential(nn.Flatten(1), nn.Linear(192, 4)))
    feats = extract_features(net, bags, tmp_path, progress=False)
    assert feats.ids == ["B0", "B1", "B2"] and feats.labels.tolist() == [0, 1, 0]
    calls = net.calls
    extract_features(net, bags, tmp_path, progress=False)
    assert net.calls == calls


def test_key_and_hash() -> None:
    a = nn.Linear(3, 2)
    assert state_dict_hash(a) == state_dict_hash(a)
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert state_dict_hash(a) == state_dict_hash(b)
    b.bias.data[0] += 1e-6
    assert state_dict_hash(a) != state_dict_hash(b)
    half = nn.Linear(3, 2).to(torch.bfloat16)
    assert len(state_dict_hash(half)) == 64
    key = cache_key(a, [Bag(torch.rand(1, 3), id="x")], key_extra={"data_version": 2})
    assert key["extra"] == {"data_version": 2}
    json.dumps(key)  # serialisable
    with pytest.raises(ConfigError, match="JSON-serialisable"):
        cache_key(a, [Bag(torch.rand(1, 3), id="x")], key_extra={"obj": {1, 2}})


def test_bad_inputs(dataset: BagDataset, backbone: Counting, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="precision must be"):
        extract_features(backbone, dataset, tmp_path, precision="fp16")
    with pytest.raises(ConfigError, match="batch_size must be"):
        extract_features(backbone, dataset, tmp_path, batch_size=0)
    with pytest.raises(ConfigError, match="chunk_size must be"):
        extract_features(backbone, dataset, tmp_path, chunk_size=0)
    with pytest.raises(ConfigError, match="backbone must be an nn.Module"):
        extract_features(lambda x: x, dataset, tmp_path)  # type: ignore[arg-type]
    random_subsets = BagDataset(dataset.cohort, transform=dataset.transform, max_instances=2, train=True)
    with pytest.raises(ConfigError, match="random instance subsets"):
        extract_features(backbone, random_subsets, tmp_path)
    with pytest.raises(ShapeError, match=r"must be images \(T, C, H, W\)"):
        extract_features(backbone, [Bag(torch.rand(2, 8), id="f")], None, progress=False)
    with pytest.raises(ShapeError, match=r"must return \(T, D\)"):
        extract_features(nn.Identity(), [Bag(torch.rand(2, 3, 4, 4), id="f")], None, progress=False)
    with pytest.raises(DataError, match="dataset is empty"):
        extract_features(backbone, [], None)


def test_cross_validation_on_cached_features_never_calls_the_backbone(
    dataset: BagDataset, backbone: Counting, tmp_path: Path
) -> None:
    """The 2024 lymphocytosis best model: frozen backbone, trained head, one backbone pass in all."""
    feats = extract_features(backbone, dataset, tmp_path / "cache", progress=False)
    one_pass = backbone.instances
    assert one_pass == sum(len(f) for f in feats.features)

    def make(fold: Fold) -> tuple[FeatureBagDataset, FeatureBagDataset]:
        # Clinical attributes are cached raw; each fold is scaled with its training rows only.
        scaler = dataset.cohort.fit_scaler(fold.train)
        return feature_subset(feats, fold.train, scaler), feature_subset(feats, fold.val, scaler)

    def build() -> Any:
        return create_mil_model(
            backbone=None,
            in_dim=feats.dim,
            pooling="mean",
            fusion="linear",
            fusion_kwargs={"hidden": (16,)},
        )

    result = cross_validate(
        build,
        make,
        feats.labels,
        n_splits=2,
        batch_size=2,
        trainer_kwargs={"max_epochs": 3, "progress": False},
    )
    assert len(result.folds) == 2 and len(result.oof) == len(feats)
    # A rerun of the extraction reuses the cache: still exactly one backbone pass in all.
    extract_features(backbone, dataset, tmp_path / "cache", progress=False)
    assert backbone.instances == one_pass
    assert np.isfinite(result.oof.probabilities).all()
