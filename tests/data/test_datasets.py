"""Tests for milcell.data.datasets: image bags, feature bags, single cells."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from milcell.data import BagCohort, BagRecord, CellRecord, CellSet, collate_bags
from milcell.data.datasets import (
    BagDataset,
    FeatureBagDataset,
    ImageCache,
    InstanceDataset,
    group_cells_by_patient,
    select_instances,
)
from milcell.data.transforms import build_transforms
from milcell.exceptions import ConfigError, DataError

SIZE = 32


def _write_images(folder: Path, n: int, size: tuple[int, int] = (SIZE, SIZE), ext: str = "png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.{ext}"
        Image.new("RGB", size, (10 * i % 256, 50, 200)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def cohort(tmp_path: Path) -> BagCohort:
    records = [
        BagRecord("P1", 0, tuple(_write_images(tmp_path / "P1", 3)), (40.0, 5.0)),
        BagRecord("P2", 1, tuple(_write_images(tmp_path / "P2", 7, ext="jpg")), (70.0, float("nan"))),
        BagRecord("P3", -1, tuple(_write_images(tmp_path / "P3", 1)), (55.0, 12.0)),
        BagRecord("P4", 1, tuple(_write_images(tmp_path / "P4", 12)), (30.0, 20.0)),
    ]
    return BagCohort(records, clinical_names=("age", "lymph"), root=tmp_path)


# --------------------------------------------------------------------------- select_instances


@given(
    n=st.integers(1, 300),
    cap=st.integers(1, 300),
    train=st.booleans(),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 1000),
)
def test_select_instances_is_sorted_unique_and_capped(
    n: int, cap: int, train: bool, seed: int, epoch: int
) -> None:
    keep = select_instances(n, cap, train=train, seed=seed, epoch=epoch, index=5)
    assert len(keep) == min(n, cap)
    assert (np.diff(keep) > 0).all()
    assert keep.min() >= 0 and keep.max() < n
    again = select_instances(n, cap, train=train, seed=seed, epoch=epoch, index=5)
    np.testing.assert_array_equal(keep, again)


def test_select_instances_eval_is_spread_and_train_varies() -> None:
    np.testing.assert_array_equal(select_instances(100, 4, train=False), [12, 37, 62, 87])
    np.testing.assert_array_equal(select_instances(5, None, train=True), np.arange(5))
    draws = {tuple(select_instances(100, 5, train=True, seed=0, epoch=e)) for e in range(10)}
    assert len(draws) == 10
    assert tuple(select_instances(100, 5, train=True, seed=1)) != tuple(select_instances(100, 5, train=True))


# --------------------------------------------------------------------------- BagDataset


def test_bag_dataset_items(cohort: BagCohort) -> None:
    ds = BagDataset(cohort)
    assert len(ds) == 4 and ds.ids == ["P1", "P2", "P3", "P4"]
    bag = ds[1]
    assert bag.id == "P2" and bag.label == 1
    assert bag.instances.shape == (7, 3, SIZE, SIZE)
    assert bag.instances.dtype == torch.float32
    assert float(bag.instances.min()) >= 0.0 and float(bag.instances.max()) <= 1.0
    assert bag.instance_names == tuple(f"{i:03d}.jpg" for i in range(7))
    # No scaler: raw values, nan kept.
    assert bag.clinical is not None
    assert bag.clinical[0].item() == 70.0 and torch.isnan(bag.clinical[1])
    assert ds[2].label == -1 and len(ds[2]) == 1
    assert [ds.bag_size(i) for i in range(4)] == [3, 7, 1, 12]
    np.testing.assert_array_equal(ds.labels, [0, 1, -1, 1])


def test_bag_dataset_logs_missing_clinical_without_scaler(
    cohort: BagCohort, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="milcell"):
        BagDataset(cohort)
    assert "1 missing clinical values" in caplog.text


def test_bag_dataset_clinical_scaler(cohort: BagCohort) -> None:
    scaler = cohort.fit_scaler([0, 1, 3])
    ds = BagDataset(cohort, clinical_scaler=scaler)
    assert ds.clinical is not None and ds.clinical.shape == (4, 2)
    assert not torch.isnan(ds.clinical).any()
    assert ds[0].clinical is not None and ds[0].clinical[0].item() == pytest.approx(0.25)
    # A plain callable is accepted too and may change the width.
    ds2 = BagDataset(cohort, clinical_scaler=lambda x: np.nan_to_num(x)[:, :1] / 100.0)
    assert ds2[3].clinical is not None and ds2[3].clinical.tolist() == pytest.approx([0.3])


def test_bag_dataset_without_clinical_names(tmp_path: Path) -> None:
    cohort = BagCohort([BagRecord("A", 0, tuple(_write_images(tmp_path / "A", 2)))])
    assert BagDataset(cohort)[0].clinical is None


def test_bag_dataset_transform_and_relative_paths(tmp_path: Path) -> None:
    _write_images(tmp_path / "A", 2, size=(40, 30))
    _write_images(tmp_path / "A", 1, size=(50, 20), ext="jpg")
    paths = (Path("A/000.jpg"), Path("A/000.png"), Path("A/001.png"))
    cohort = BagCohort([BagRecord("A", 1, paths)], root=tmp_path)
    tf = build_transforms({"input_size": (3, 16, 16)}, train=True)
    bag = BagDataset(cohort, transform=tf)[0]
    assert bag.instances.shape == (3, 3, 16, 16)
    with pytest.raises(DataError, match=r"patient 'A': images end with different sizes"):
        BagDataset(cohort)[0]


def test_bag_dataset_cap_train_random_reproducible_and_eval_deterministic(cohort: BagCohort) -> None:
    train = BagDataset(cohort, max_instances=4, train=True, seed=7)
    first = train[3].instance_names
    assert first is not None and len(first) == 4
    assert train[3].instance_names == first  # same epoch: same subset
    per_epoch = []
    for epoch in range(6):
        train.set_epoch(epoch)
        per_epoch.append(train[3].instance_names)
    assert len(set(per_epoch)) > 1  # changes across epochs
    again = BagDataset(cohort, max_instances=4, train=True, seed=7)
    again.set_epoch(5)
    assert again[3].instance_names == per_epoch[5]  # reproducible by seed
    assert len(train[0]) == 3 and len(train[2]) == 1  # small bags untouched
    evaluation = BagDataset(cohort, max_instances=4, train=False, seed=7)
    names = evaluation[3].instance_names
    evaluation.set_epoch(3)
    assert evaluation[3].instance_names == names == ("001.png", "004.png", "007.png", "010.png")


def test_bag_dataset_dataloader_two_workers_matches_single_process(cohort: BagCohort) -> None:
    def run(workers: int) -> list[tuple[str, ...]]:
        ds = BagDataset(cohort, max_instances=5, train=True, seed=3)
        ds.set_epoch(2)
        loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate_bags)
        out: list[tuple[str, ...]] = []
        for batch in loader:
            assert batch.instances.shape[1:] == (3, SIZE, SIZE)
            assert batch.instances.shape[0] == int(batch.bag_sizes.sum())
            assert batch.instance_names is not None
            out.extend(batch.instance_names)
        return out

    assert run(2) == run(0)


def test_bag_dataset_set_epoch_reaches_persistent_workers(cohort: BagCohort) -> None:
    ds = BagDataset(cohort.subset([3]), max_instances=3, train=True, seed=0)
    loader = DataLoader(ds, batch_size=1, num_workers=1, persistent_workers=True, collate_fn=collate_bags)
    seen = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        (batch,) = list(loader)
        seen.append(batch.instance_names)
        ref = BagDataset(cohort.subset([3]), max_instances=3, train=True, seed=0)
        ref.set_epoch(epoch)
        assert batch.instance_names == [ref[0].instance_names]
    assert len({tuple(s[0]) for s in seen}) > 1


def test_bag_dataset_bad_inputs(cohort: BagCohort, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cohort must be a BagCohort"):
        BagDataset(list(cohort))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_instances must be None or a positive int"):
        BagDataset(cohort, max_instances=0)
    with pytest.raises(ConfigError, match="max_instances"):
        BagDataset(cohort, max_instances=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed must be a non-negative int"):
        BagDataset(cohort, seed=-1)
    with pytest.raises(ConfigError, match="epoch must be a non-negative int"):
        BagDataset(cohort).set_epoch(-2)
    with pytest.raises(DataError, match="patient 'E' has no image files"):
        BagDataset(BagCohort([BagRecord("E", 0, ())]))
    with pytest.raises(ConfigError, match="clinical_scaler must be a fitted ClinicalScaler or a callable"):
        BagDataset(cohort, clinical_scaler=3)
    with pytest.raises(DataError, match=r"clinical_scaler returned shape \(2, 2\), expected \(4, F\)"):
        BagDataset(cohort, clinical_scaler=lambda x: x[:2])
    with pytest.raises(DataError, match="the transform returned ndarray"):
        BagDataset(cohort, transform=lambda im: np.asarray(im))[0]


def test_bag_dataset_unreadable_and_missing_images(tmp_path: Path) -> None:
    good = _write_images(tmp_path / "B", 1)
    broken = tmp_path / "B" / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    cohort = BagCohort([BagRecord("B", 0, (good[0], broken)), BagRecord("C", 0, (tmp_path / "nope.png",))])
    ds = BagDataset(cohort)
    with pytest.raises(DataError, match=r"patient 'B': cannot read image .*broken\.jpg"):
        ds[0]
    with pytest.raises(DataError, match=r"patient 'C': cannot read image .*nope\.png"):
        ds[1]


# --------------------------------------------------------------------------- FeatureBagDataset


def test_feature_bag_dataset_sequence_and_mapping() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = [
        torch.rand(3, 6, generator=gen),
        np.ones((1, 6), dtype=np.float16),
        torch.rand(5, 6, generator=gen),
    ]
    ds = FeatureBagDataset(feats, labels=[0, 1, -1], clinical=np.arange(6.0).reshape(3, 2))
    assert ds.ids == ["0", "1", "2"] and ds.dim == 6
    bag = ds[1]
    assert bag.instances.dtype == torch.float32 and bag.instances.shape == (1, 6)
    assert bag.clinical is not None and bag.clinical.tolist() == [2.0, 3.0]
    assert ds.features[1].dtype == torch.float16  # stored compactly
    batch = collate_bags([ds[i] for i in range(3)])
    assert batch.instances.shape == (9, 6) and batch.labels.tolist() == [0, 1, -1]
    mapped = FeatureBagDataset({"a": feats[0], "b": feats[2]}, ids=["b", "a"], labels=[1, 0])
    assert mapped.ids == ["b", "a"] and torch.equal(mapped[1].instances, feats[0])
    unlabelled = FeatureBagDataset([feats[0]])
    assert unlabelled.labels.tolist() == [-1] and unlabelled[0].clinical is None


def test_feature_bag_dataset_large_bag_and_cap() -> None:
    big = torch.arange(10_000 * 4, dtype=torch.float32).reshape(10_000, 4)
    ds = FeatureBagDataset(
        [big, big[:1]], labels=[1, 0], instance_names=[[str(i) for i in range(10_000)], ["x"]]
    )
    assert len(ds[0]) == 10_000 and torch.equal(ds[0].instances, big)
    assert len(ds[1]) == 1
    batch = collate_bags([ds[0], ds[1]])
    assert batch.mask.shape == (2, 10_000) and int(batch.mask.sum()) == 10_001
    capped = FeatureBagDataset(
        [big], max_instances=200, train=True, seed=1, instance_names=[[str(i) for i in range(10_000)]]
    )
    a = capped[0]
    capped.set_epoch(1)
    b = capped[0]
    assert len(a) == len(b) == 200 and not torch.equal(a.instances, b.instances)
    rows = a.instances[:, 0].long() // 4
    assert a.instance_names == tuple(str(int(r)) for r in rows)  # names follow the rows
    capped.set_epoch(0)
    assert torch.equal(capped[0].instances, a.instances)
    ev = FeatureBagDataset([big], max_instances=3)
    assert (ev[0].instances[:, 0] // 4).tolist() == [1666.0, 5000.0, 8333.0]


def test_feature_bag_dataset_safetensors_round_trip(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    feats = {"P1": torch.rand(4, 3, generator=gen), "P2": torch.rand(1, 3, generator=gen).half()}
    ds = FeatureBagDataset(
        feats,
        labels=[1, -1],
        clinical=[[0.5, 1.0], [0.25, float("nan")]],
        clinical_names=("age", "lymph"),
        instance_names=[["a", "b", "c", "d"], ["z"]],
        metadata={"backbone": "resnet18"},
    )
    path = ds.save_safetensors(tmp_path / "sub" / "feats.safetensors")
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    back = FeatureBagDataset.from_safetensors(path, max_instances=2)
    assert back.ids == ["P1", "P2"] and back.labels.tolist() == [1, -1]
    assert back.clinical_names == ("age", "lymph") and back.metadata == {"backbone": "resnet18"}
    assert back.features[1].dtype == torch.float16
    assert torch.equal(back.features[0], feats["P1"])
    assert back.clinical is not None and torch.equal(back.clinical.isnan(), ds.clinical.isnan())  # type: ignore[union-attr]
    assert back.instance_names == [("a", "b", "c", "d"), ("z",)]
    assert back.max_instances == 2 and len(back[0]) == 2


def test_feature_bag_dataset_numpy_dir(tmp_path: Path) -> None:
    np.save(tmp_path / "B.npy", np.zeros((2, 3), dtype=np.float32))
    np.save(tmp_path / "A.npy", np.ones((5, 3), dtype=np.float32))
    ds = FeatureBagDataset.from_numpy_dir(tmp_path, labels={"B": 1}, clinical={"A": [1.0], "B": [2.0]})
    assert ds.ids == ["A", "B"] and ds.labels.tolist() == [-1, 1]
    assert ds[1].clinical is not None and ds[1].clinical.tolist() == [2.0]
    with pytest.raises(DataError, match=r"no clinical values for bags \['B'\]"):
        FeatureBagDataset.from_numpy_dir(tmp_path, clinical={"A": [1.0]})
    with pytest.raises(DataError, match=r"labels given for bags with no \.npy file .*\['C'\]"):
        FeatureBagDataset.from_numpy_dir(tmp_path, labels={"C": 0})
    (tmp_path / "C.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read feature file .*C\.npy"):
        FeatureBagDataset.from_numpy_dir(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        FeatureBagDataset.from_numpy_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \.npy file"):
        FeatureBagDataset.from_numpy_dir(tmp_path / "empty")


def test_feature_bag_dataset_bad_inputs(tmp_path: Path) -> None:
    x = torch.rand(2, 3)
    with pytest.raises(DataError, match="no bags given"):
        FeatureBagDataset([])
    with pytest.raises(DataError, match="features must be a sequence or a mapping"):
        FeatureBagDataset(x)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"bag '1': features must have shape \(N, D\) with N >= 1"):
        FeatureBagDataset([x, torch.rand(0, 3)])
    with pytest.raises(DataError, match=r"bag '0': features must have shape \(N, D\)"):
        FeatureBagDataset([torch.rand(3)])
    with pytest.raises(DataError, match="bag '0': features must be a Tensor or ndarray, got list"):
        FeatureBagDataset([[[1.0]]])  # type: ignore[list-item]
    with pytest.raises(DataError, match="bag '0': features have unsupported dtype object"):
        FeatureBagDataset([np.array([["a"]], dtype=object)])
    with pytest.raises(DataError, match="bag 'b': feature width differs from bag 'a'"):
        FeatureBagDataset([x, torch.rand(2, 4)], ids=["a", "b"])
    with pytest.raises(DataError, match="duplicate bag ID 'a'"):
        FeatureBagDataset([x, x], ids=["a", "a"])
    with pytest.raises(DataError, match="1 ids for 2 bags"):
        FeatureBagDataset([x, x], ids=["a"])
    with pytest.raises(DataError, match=r"no features for bag IDs \['c'\]"):
        FeatureBagDataset({"a": x}, ids=["c"])
    with pytest.raises(DataError, match="labels must be 2 integers"):
        FeatureBagDataset([x, x], labels=[0])
    with pytest.raises(DataError, match="labels must be 2 integers"):
        FeatureBagDataset([x, x], labels=[0.5, 1.0])  # type: ignore[list-item]
    with pytest.raises(DataError, match="bag '1': label -3 < -1"):
        FeatureBagDataset([x, x], labels=[0, -3])
    with pytest.raises(DataError, match=r"clinical must have shape \(2, F\)"):
        FeatureBagDataset([x, x], clinical=[1.0, 2.0])
    with pytest.raises(DataError, match="1 clinical_names for 2 columns"):
        FeatureBagDataset([x], clinical=[[1.0, 2.0]], clinical_names=["age"])
    with pytest.raises(DataError, match="instance_names for 1 bags, expected 2"):
        FeatureBagDataset([x, x], instance_names=[["a", "b"]])
    with pytest.raises(DataError, match="bag '0': 1 instance names for 2 rows"):
        FeatureBagDataset([x], instance_names=[["a"]])
    with pytest.raises(ConfigError, match="max_instances"):
        FeatureBagDataset([x], max_instances=-1)
    with pytest.raises(DataError, match="bag ID '__labels__' is reserved"):
        FeatureBagDataset([x], ids=["__labels__"]).save_safetensors(tmp_path / "r.safetensors")


def test_from_safetensors_bad_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(DataError, match=r"feature file .*absent\.safetensors.* does not exist"):
        FeatureBagDataset.from_safetensors(tmp_path / "absent.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DataError, match=r"cannot read feature file .*corrupt\.safetensors"):
        FeatureBagDataset.from_safetensors(corrupt)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(DataError, match=r"other\.safetensors.* is not a milcell feature-bag file"):
        FeatureBagDataset.from_safetensors(other)
    good = tmp_path / "good.safetensors"
    FeatureBagDataset([torch.rand(2, 2)], labels=[0], ids=["P1"]).save_safetensors(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(DataError, match=r"truncated\.safetensors"):
        FeatureBagDataset.from_safetensors(truncated)
    meta = {"format": "milcell.feature_bags", "ids": '["P1", "P9"]'}
    lacking = tmp_path / "lacking.safetensors"
    save_file({"P1": torch.zeros(1, 2), "__labels__": torch.zeros(2, dtype=torch.int64)}, str(lacking), meta)
    with pytest.raises(DataError, match=r"lacking\.safetensors.*missing tensors \['P9'\]"):
        FeatureBagDataset.from_safetensors(lacking)


# --------------------------------------------------------------------------- InstanceDataset


@pytest.fixture
def cells(tmp_path: Path) -> CellSet:
    img_dir = tmp_path / "img"
    _write_images(img_dir, 4, ext="bmp")
    mask_dir = tmp_path / "mask"
    mask_dir.mkdir()
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))  # left half kept
    mask.save(mask_dir / "000.png")
    records = [
        CellRecord(img_dir / "000.bmp", 1, "p1", mask_path=mask_dir / "000.png"),
        CellRecord(img_dir / "001.bmp", 1, "p1"),
        CellRecord(img_dir / "002.bmp", 0, "p2"),
        CellRecord(img_dir / "003.bmp", 0, "p3"),
    ]
    return CellSet(records, class_names=("hem", "all"), root=tmp_path)


def test_instance_dataset_is_bag_of_one(cells: CellSet) -> None:
    ds = InstanceDataset(cells)
    assert (
        len(ds) == 4 and ds.labels.tolist() == [1, 1, 0, 0] and ds.groups.tolist() == ["p1", "p1", "p2", "p3"]
    )
    bag = ds[2]
    assert bag.instances.shape == (1, 3, SIZE, SIZE) and bag.label == 0 and bag.id == "002"
    assert bag.instance_names == ("002.bmp",)
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_bags)
    batch = next(iter(loader))
    assert batch.instances.shape == (3, 3, SIZE, SIZE) and batch.bag_sizes.tolist() == [1, 1, 1]


def test_instance_dataset_apply_mask(cells: CellSet) -> None:
    plain = InstanceDataset(cells)[0].instances
    masked = InstanceDataset(cells, apply_mask=True)[0].instances
    assert torch.equal(masked[..., : SIZE // 2], plain[..., : SIZE // 2])
    assert masked[..., SIZE // 2 :].abs().sum() == 0 and plain[..., SIZE // 2 :].abs().sum() > 0
    # No mask on disk: image unchanged.
    assert torch.equal(
        InstanceDataset(cells, apply_mask=True)[1].instances, InstanceDataset(cells)[1].instances
    )


def test_instance_dataset_accepts_zero_one_masks(cells: CellSet, tmp_path: Path) -> None:
    # Regression: a {0, 1} mask was divided by 255, blacking out the whole cell.
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(1, (0, 0, SIZE // 2, SIZE))
    mask.save(tmp_path / "01.png")
    record = cells[0]
    ones = CellSet([CellRecord(record.path, 1, "p1", mask_path=tmp_path / "01.png")], root=tmp_path)
    expected = InstanceDataset(cells, apply_mask=True)[0].instances
    assert torch.equal(InstanceDataset(ones, apply_mask=True)[0].instances, expected)


def test_instance_dataset_bad_inputs(cells: CellSet, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cells must be a CellSet"):
        InstanceDataset(list(cells))  # type: ignore[arg-type]
    Image.new("L", (8, 8), 255).save(tmp_path / "small_mask.png")
    bad_mask = CellSet([CellRecord(cells[1].path, 1, "p1", mask_path=tmp_path / "small_mask.png")])
    with pytest.raises(DataError, match=r"cell '001' \(patient 'p1'\): mask .*small_mask\.png.* is 8x8"):
        InstanceDataset(bad_mask, apply_mask=True)[0]
    missing = CellSet([CellRecord(tmp_path / "gone.bmp", 0, "p9")])
    with pytest.raises(DataError, match=r"cell 'gone' \(patient 'p9'\): cannot read image .*gone\.bmp"):
        InstanceDataset(missing)[0]


def test_group_cells_by_patient(cells: CellSet) -> None:
    cohort = group_cells_by_patient(cells)
    assert cohort.ids == ["p1", "p2", "p3"] and cohort.labels.tolist() == [1, 0, 0]
    assert cohort.class_names == ("hem", "all") and cohort[0].num_instances == 2
    bags = BagDataset(cohort)
    assert bags[0].instances.shape == (2, 3, SIZE, SIZE)
    mixed = CellSet([CellRecord(Path("a.bmp"), 0, "p"), CellRecord(Path("b.bmp"), 2, "p")])
    with pytest.raises(DataError, match=r"patient 'p': cells carry different labels \[0, 2\]"):
        group_cells_by_patient(mixed)
    assert group_cells_by_patient(mixed, on_conflict="max").labels.tolist() == [2]
    assert group_cells_by_patient(mixed, on_conflict="max").class_names == ("0", "1", "2")
    with pytest.raises(ConfigError, match="on_conflict must be"):
        group_cells_by_patient(mixed, on_conflict="min")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="the cell set is empty"):
        group_cells_by_patient(CellSet([]))


# --------------------------------------------------------------------------- in-memory image cache


def _noisy_cohort(tmp_path: Path) -> BagCohort:
    """Images with structure, so that flips and rotations change them."""
    rng = np.random.default_rng(0)
    records = []
    for p, n in enumerate([3, 6, 9, 5]):
        folder = tmp_path / f"Q{p}"
        folder.mkdir(parents=True)
        paths = []
        for i in range(n):
            path = folder / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE + 4, 3), dtype=np.uint8)).save(path)
            paths.append(path)
        records.append(BagRecord(f"Q{p}", p % 2, tuple(paths), (float(p),)))
    return BagCohort(records, clinical_names=("age",), root=tmp_path)


def test_cached_bag_dataset_serves_the_same_augmented_bags_without_reading_files(tmp_path: Path) -> None:
    cohort = _noisy_cohort(tmp_path)
    transform = build_transforms({"input_size": (3, SIZE, SIZE)}, train=True)  # flips + rotation to 180
    plain = BagDataset(cohort, transform, max_instances=4, train=True, seed=1)
    cached = BagDataset(cohort, transform, max_instances=4, train=True, seed=1, cache_images=True)
    expected = []
    for index in range(len(cohort)):
        torch.manual_seed(index)
        expected.append(plain[index])
    cached.preload()
    assert cached.image_cache is not None and len(cached.image_cache) == 23
    assert cached.image_cache.nbytes == 23 * SIZE * (SIZE + 4) * 3  # decoded uint8, before any resize
    for path in tmp_path.glob("Q*/*.png"):
        path.unlink()  # everything comes from memory now
    for index in range(len(cohort)):
        for _ in range(2):
            torch.manual_seed(index)  # same seed: the same random flips and rotations, cached or not
            bag = cached[index]
            assert bag.instance_names == expected[index].instance_names
            torch.testing.assert_close(bag.instances, expected[index].instances, rtol=0, atol=0)
    torch.manual_seed(0)
    first = cached[1].instances
    torch.manual_seed(1)
    assert not torch.equal(first, cached[1].instances)  # augmentation is still drawn at every access


def test_cached_subsets_do_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    cohort = _noisy_cohort(tmp_path)

    def run(workers: int) -> tuple[list[tuple[str, ...]], Tensor]:
        ds = BagDataset(
            cohort,
            build_transforms({"input_size": (3, SIZE, SIZE)}, train=False),
            max_instances=4,
            train=True,
            seed=3,
            cache_images=True,
        )
        ds.preload()
        ds.set_epoch(2)
        loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate_bags)
        names: list[tuple[str, ...]] = []
        stacks = []
        for batch in loader:
            assert batch.instance_names is not None
            names.extend(batch.instance_names)
            stacks.append(batch.instances)
        return names, torch.cat(stacks)

    names0, x0 = run(0)
    names2, x2 = run(2)
    assert names2 == names0
    assert torch.equal(x2, x0)


def test_cached_subsets_follow_set_epoch_also_in_persistent_workers(tmp_path: Path) -> None:
    cohort = _noisy_cohort(tmp_path).subset([2])
    ds = BagDataset(cohort, max_instances=3, train=True, seed=0, cache_images=True)
    ds.preload()
    loader = DataLoader(ds, batch_size=1, num_workers=1, persistent_workers=True, collate_fn=collate_bags)
    seen = []
    for epoch in [0, 1, 2, 0]:
        ds.set_epoch(epoch)
        (batch,) = list(loader)
        ref = BagDataset(cohort, max_instances=3, train=True, seed=0)
        ref.set_epoch(epoch)
        assert batch.instance_names == [ref[0].instance_names]
        seen.append(tuple(batch.instance_names[0]))
    assert len(set(seen)) > 1 and seen[0] == seen[3]


def test_cached_dataset_resumes_exactly(tmp_path: Path) -> None:
    from milcell.nn.model import create_mil_model
    from milcell.train.distributed import make_loader
    from milcell.train.trainer import Trainer

    cohort = _noisy_cohort(tmp_path / "data")
    transform = build_transforms({"input_size": (3, 16, 16)}, train=True)

    def train(epochs: int, out: Path, resume: bool) -> dict[str, Tensor]:
        torch.manual_seed(0)
        model = create_mil_model("milcell_mini_resnet_k8", pooling="mean", fusion="linear")
        ds = BagDataset(cohort, transform, max_instances=3, train=True, seed=5, cache_images=True)
        trainer = Trainer(model, max_epochs=epochs, output_dir=out, progress=False, seed=7, lr=0.01)
        last = out / "checkpoints" / "last"
        trainer.fit(
            make_loader(ds, 2, shuffle=True, seed=1, distributed=False), resume_from=last if resume else None
        )
        return {k: v.clone() for k, v in model.state_dict().items()}

    straight = train(2, tmp_path / "straight", resume=False)
    train(1, tmp_path / "resumed", resume=False)
    resumed = train(2, tmp_path / "resumed", resume=True)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def test_cached_instance_dataset_and_masks(cells: CellSet) -> None:
    plain = InstanceDataset(cells, apply_mask=True)
    cached = InstanceDataset(cells, apply_mask=True, cache_images=True)
    cached.preload()
    assert cached.image_cache is not None and len(cached.image_cache) == 5  # 4 images + 1 mask
    for index in range(len(cells)):
        assert torch.equal(plain[index].instances, cached[index].instances)


def test_image_cache_errors(cohort: BagCohort, cells: CellSet) -> None:
    with pytest.raises(ConfigError, match="cache_images must be a bool or an ImageCache"):
        BagDataset(cohort, cache_images="memory")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no image cache"):
        BagDataset(cohort).preload()
    with pytest.raises(ConfigError, match="no image cache"):
        InstanceDataset(cells).preload()
    shared = ImageCache()
    a = BagDataset(cohort, cache_images=shared)
    b = BagDataset(cohort.subset([1]), cache_images=shared)
    a.preload()
    before = len(shared)
    b.preload()
    assert a.image_cache is b.image_cache and len(shared) == before == 23


# --------------------------------------------------------------------------- bag-level transforms


def test_bag_transform_runs_on_the_stacked_instances(cohort: BagCohort) -> None:
    calls: list[tuple[int, ...]] = []

    def double(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x * 2

    plain = BagDataset(cohort)[1].instances
    doubled = BagDataset(cohort, bag_transform=double)[1].instances
    torch.testing.assert_close(doubled, plain * 2)
    assert calls == [tuple(plain.shape)]  # once per bag, not per image


def test_cache_transformed_runs_the_image_transform_once_per_file(cohort: BagCohort) -> None:
    from milcell.data.transforms import build_bag_transforms

    cfg = {"input_size": (3, SIZE, SIZE), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    per_image, per_bag = build_bag_transforms(cfg, train=False)
    runs: list[int] = []

    class Counting:
        def __call__(self, image: Image.Image) -> torch.Tensor:
            runs.append(1)
            return per_image(image)

        def __repr__(self) -> str:
            return f"Counting({per_image!r})"

    lazy = BagDataset(cohort, transform=per_image, bag_transform=per_bag)
    cached = BagDataset(
        cohort, transform=Counting(), bag_transform=per_bag, cache_images=True, cache_transformed=True
    )
    for _ in range(3):
        for i in range(len(cohort)):
            torch.testing.assert_close(cached[i].instances, lazy[i].instances)
    assert len(runs) == sum(r.num_instances for r in cohort)  # each file transformed once
    assert cached.image_cache is not None and len(cached.image_cache) == len(runs)  # tensors only


def test_bag_transform_errors_name_the_patient(cohort: BagCohort) -> None:
    with pytest.raises(ConfigError, match="cache_transformed=True needs cache_images"):
        BagDataset(cohort, cache_transformed=True)
    with pytest.raises(ConfigError, match="bag_transform must be callable"):
        BagDataset(cohort, bag_transform=3)  # type: ignore[arg-type]
    with pytest.raises(
        DataError, match=r"patient 'P1': bag_transform must return a tensor with the 3 instances"
    ):
        BagDataset(cohort, bag_transform=lambda x: x[:1])[0]
