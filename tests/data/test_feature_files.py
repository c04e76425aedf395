"""Feature files of other tools (CLAM / TRIDENT .h5, .pt, slideflow, torchmil .npy) in and out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from milcell.data.datasets import FeatureBagDataset
from milcell.data.formats import load_feature_files, read_feature_file, write_feature_h5
from milcell.exceptions import ConfigError, DataError

h5py = pytest.importorskip("h5py")


def _h5(path: Path, **datasets: np.ndarray) -> Path:
    with h5py.File(path, "w") as fh:
        for name, value in datasets.items():
            fh.create_dataset(name, data=value)
    return path


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def clam(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A CLAM output folder: h5_files/ with features and coords, pt_files/ with the same features."""
    rng = np.random.default_rng(0)
    feats = {f"slide_{i}": rng.normal(size=(3 + i, 6)).astype(np.float32) for i in range(4)}
    (tmp_path / "h5_files").mkdir()
    (tmp_path / "pt_files").mkdir()
    for name, f in feats.items():
        coords = np.stack([np.arange(len(f)) * 256, np.zeros(len(f))], axis=1).astype(np.int64)
        _h5(tmp_path / "h5_files" / f"{name}.h5", features=f, coords=coords)
        torch.save(torch.from_numpy(f), tmp_path / "pt_files" / f"{name}.pt")
    return tmp_path, feats


def test_clam_folder_with_labels_and_patients(
    clam: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    folder, feats = clam
    table = _csv(
        tmp_path / "labels.csv",
        "case_id,slide_id,label\nA,slide_0.svs,tumor\nA,slide_1,normal\nB,slide_3,tumor\n",
    )
    bags = load_feature_files(folder, table)
    assert bags.dataset.ids == ["slide_0", "slide_1", "slide_3"]  # slide_2 is not in the CSV
    assert bags.class_names == ("normal", "tumor") and bags.dataset.labels.tolist() == [1, 0, 1]
    assert bags.groups.tolist() == ["A", "A", "B"]
    for i, bag_id in enumerate(bags.dataset.ids):
        assert np.array_equal(bags.dataset[i].instances.numpy(), feats[bag_id])
        assert bags.coords[bag_id] is not None and bags.coords[bag_id].shape == (len(feats[bag_id]), 2)
    ordered = load_feature_files(folder, table, class_names=["tumor", "normal"])
    assert ordered.dataset.labels.tolist() == [0, 1, 0]
    # the pt_files are the same bags, without coordinates
    pts = load_feature_files(folder / "pt_files", table)
    assert all(torch.equal(a.instances, b.instances) for a, b in zip(pts.dataset, bags.dataset, strict=True))
    assert all(c is None for c in pts.coords.values())


def test_trident_batch_axis_and_custom_columns(tmp_path: Path) -> None:
    f = np.arange(12, dtype=np.float16).reshape(1, 4, 3)
    _h5(tmp_path / "s1.h5", features=f, coords=np.zeros((1, 4, 2)))
    _h5(tmp_path / "s2.h5", features=f[0, :2] + 1)
    table = _csv(tmp_path / "meta.csv", "Slide,Diagnosis,Patient\ns1,1,p1\ns2,0,p2\n")
    bags = load_feature_files(
        tmp_path, table, id_column="slide", label_column="diagnosis", patient_column="patient"
    )
    assert bags.dataset[0].instances.shape == (4, 3) and bags.dataset[0].instances.dtype == torch.float32
    assert bags.dataset.labels.tolist() == [1, 0] and bags.groups.tolist() == ["p1", "p2"]
    assert bags.class_names == ("0", "1")


def test_pt_dictionary_slideflow_index_and_torchmil_npy(tmp_path: Path) -> None:
    torch.save(
        {"features": torch.ones(3, 4), "coords": torch.tensor([[0, 0], [1, 0], [2, 0]])}, tmp_path / "a.pt"
    )
    torch.save(torch.ones(2, 4) * 2, tmp_path / "b.pt")
    np.savez(tmp_path / "b.index.npz", np.array([[5, 5], [6, 6]]))  # slideflow's locations, arr_0
    coords_dir = tmp_path / "coords"
    coords_dir.mkdir()
    np.save(tmp_path / "c.npy", np.full((2, 4), 3.0))
    np.save(tmp_path / "c.index.npy", np.zeros((2, 2)))  # an index file is not a bag
    np.save(coords_dir / "c.npy", np.array([[7, 8], [9, 10]]))
    bags = load_feature_files(tmp_path, coords_dir=coords_dir)
    assert bags.dataset.ids == ["a", "b", "c"]
    assert bags.dataset.labels.tolist() == [-1, -1, -1] and bags.groups.tolist() == ["a", "b", "c"]
    assert bags.coords["a"].tolist() == [[0, 0], [1, 0], [2, 0]]
    assert bags.coords["b"].tolist() == [[5, 5], [6, 6]]
    assert bags.coords["c"].tolist() == [[7, 8], [9, 10]]


def test_write_cache_and_dataset_round_trip(tmp_path: Path) -> None:
    from milcell.data import Bag
    from milcell.train.features import extract_features, read_feature_cache

    bags = [Bag(torch.rand(2 + i, 3, 8, 8), label=i % 2, id=f"P{i}") for i in range(3)]
    net = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(192, 5))
    cache_dir = tmp_path / "cache"
    extract_features(net, bags, cache_dir, progress=False)
    cache = read_feature_cache(cache_dir)
    out = tmp_path / "h5"
    files = write_feature_h5(cache_dir, out, groups={"P0": "X", "P1": "X"})
    assert [p.name for p in files] == ["P0.h5", "P1.h5", "P2.h5"]
    with h5py.File(files[1], "r") as fh:
        assert fh["features"].shape == (3, 5) and fh["features"].dtype == np.float32
        assert "coords" not in fh
        assert fh.attrs["bag_id"] == "P1" and fh.attrs["backbone"] == cache.backbone
    back = load_feature_files(out)
    for a, b in zip(back.dataset, cache.dataset, strict=True):
        assert a.id == b.id and torch.equal(a.instances, b.instances)
    # a labelled dataset writes CLAM's dataset.csv; coordinates go with it
    labelled = FeatureBagDataset(cache.dataset.features, labels=[0, 1, 0], ids=cache.dataset.ids)
    coords = {"P2": np.arange(8).reshape(4, 2)}
    write_feature_h5(labelled, tmp_path / "h5b", coords=coords, groups={"P0": "X", "P1": "X"})
    again = load_feature_files(tmp_path / "h5b", tmp_path / "h5b" / "dataset.csv")
    assert again.dataset.labels.tolist() == [0, 1, 0] and again.groups.tolist() == ["X", "X", "P2"]
    assert again.coords["P2"].tolist() == coords["P2"].tolist() and again.coords["P0"] is None
    with pytest.raises(DataError, match="exists"):
        write_feature_h5(labelled, tmp_path / "h5b")
    write_feature_h5(labelled, tmp_path / "h5b", overwrite=True)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda p: _h5(p / "x.h5", feats=np.ones((2, 3))),
            r"x\.h5' has no dataset 'features' \(it has: \['feats'\]\)",
        ),
        (lambda p: _h5(p / "x.h5", features=np.ones(3)), r"x\.h5': 'features' has shape \(3,\)"),
        (lambda p: _h5(p / "x.h5", features=np.ones((2, 2, 3))), r"x\.h5': 'features' has shape \(2, 2, 3\)"),
        (lambda p: _h5(p / "x.h5", features=np.zeros((0, 3))), r"x\.h5': empty bag"),
        (
            lambda p: _h5(p / "x.h5", features=np.array([[1.0, 2.0], [np.nan, 0.0], [1.0, np.inf]])),
            r"x\.h5': 2 of 3 rows have NaN or infinite values \(first row 1\)",
        ),
        (
            lambda p: _h5(p / "x.h5", features=np.ones((2, 3)), coords=np.ones((3, 2))),
            r"coords has shape \(3, 2\)",
        ),
        (
            lambda p: (p / "x.h5").write_bytes(b"not hdf5 at all"),
            r"cannot read feature file '.*x\.h5' as HDF5",
        ),
        (lambda p: (p / "x.pt").write_bytes(b"not a torch file"), r"cannot read feature file '.*x\.pt'"),
        (lambda p: torch.save({"feats": torch.ones(2, 2)}, p / "x.pt"), r"x\.pt' has no 'features' entry"),
        (lambda p: torch.save([torch.ones(2, 2)], p / "x.pt"), r"x\.pt' holds a list"),
        (lambda p: np.save(p / "x.npy", np.array(["a", "b"]).reshape(2, 1)), r"x\.npy': the array has dtype"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, make: object, match: str) -> None:
    make(tmp_path)  # type: ignore[operator]
    with pytest.raises(DataError, match=match):
        load_feature_files(tmp_path)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    torch.save({"features": torch.ones(2, 2), "where": Path("x")}, tmp_path / "x.pt")  # needs a class
    with pytest.raises(DataError, match=r"x\.pt': not a weights-only torch file"):
        read_feature_file(tmp_path / "x.pt")


def test_csv_and_folder_errors(clam: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    folder, _ = clam
    with pytest.raises(DataError, match=r"lists 1 bags without a feature file, e\.g\. \['slide_9'\]"):
        load_feature_files(folder, _csv(tmp_path / "a.csv", "slide_id,label\nslide_0,1\nslide_9,0\n"))
    with pytest.raises(DataError, match="line 3: bag 'slide_0' is listed twice"):
        load_feature_files(folder, _csv(tmp_path / "b.csv", "slide_id,label\nslide_0,1\nslide_0,0\n"))
    with pytest.raises(DataError, match="has no column 'label'"):
        load_feature_files(folder, _csv(tmp_path / "c.csv", "slide_id,y\nslide_0,1\n"))
    with pytest.raises(DataError, match=r"labels \['x'\] are not in class_names"):
        load_feature_files(folder, _csv(tmp_path / "d.csv", "slide_id,label\nslide_0,x\n"), class_names=["a"])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _h5(mixed / "s.h5", features=np.ones((2, 3)))
    torch.save(torch.ones(2, 3), mixed / "s.pt")
    with pytest.raises(DataError, match="two feature files for bag 's'"):
        load_feature_files(mixed)
    assert load_feature_files(mixed, suffixes=(".pt",)).files["s"].suffix == ".pt"
    torch.save(torch.ones(2, 4), mixed / "t.pt")
    with pytest.raises(DataError, match=r"t\.pt' has width 4, '.*s\.pt' has 3"):
        load_feature_files(mixed, suffixes=(".pt",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no feature files"):
        load_feature_files(tmp_path / "empty")
    with pytest.raises(ConfigError, match="unsupported suffix '.txt'"):
        read_feature_file(tmp_path / "a.txt")
    with pytest.raises(DataError, match="cannot be a file name"):
        write_feature_h5(FeatureBagDataset({".hidden": np.ones((1, 2))}), tmp_path / "out")
