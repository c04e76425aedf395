"""The synthetic cohort: determinism, layouts, quirks, learnable-but-imperfect signals."""

from __future__ import annotations

import csv
import hashlib
import re
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from milcell.data.formats.cnmc import load_cnmc
from milcell.data.formats.dlmi import load_dlmi
from milcell.data.formats.imagefolder import load_imagefolder
from milcell.data.synthetic import CELL_KINDS, make_cohort, render_cell, smear_background
from milcell.exceptions import ConfigError


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("layout", ["dlmi", "cnmc", "imagefolder"])
def test_same_seed_same_bytes(tmp_path: Path, layout: str) -> None:
    kw = dict(n_patients=6, layout=layout, image_size=16, bag_size=(2, 3))
    a = tree_digest(make_cohort(tmp_path / "a", seed=5, **kw))
    b = tree_digest(make_cohort(tmp_path / "b", seed=5, **kw))
    c = tree_digest(make_cohort(tmp_path / "c", seed=6, **kw))
    assert a == b
    assert a != c


def test_returns_root_and_dlmi_tree(tmp_path: Path) -> None:
    root = make_cohort(tmp_path / "new" / "cohort", n_patients=10, seed=0, image_size=16, bag_size=(3, 5))
    assert root == tmp_path / "new" / "cohort"
    assert sorted(p.name for p in root.iterdir()) == ["synthetic_truth.csv", "testset", "trainset"]
    assert (root / "trainset" / "trainset_true.csv").is_file()
    assert (root / "testset" / "testset_data.csv").is_file()
    truth = read_rows(root / "synthetic_truth.csv")
    assert len(truth) == 10
    for row in truth:
        folder = root / row["SPLIT"] / row["ID"]
        assert len(list(folder.glob("*.jpg"))) == int(row["N_CELLS"])
        assert 3 <= int(row["N_CELLS"]) <= 5


def test_dlmi_quirks(tmp_path: Path) -> None:
    root = make_cohort(tmp_path, n_patients=30, seed=1, image_size=16, bag_size=(1, 2))
    train = read_rows(root / "trainset" / "trainset_true.csv")
    test = read_rows(root / "testset" / "testset_data.csv")
    assert {r["LABEL"] for r in test} == {"-1"}
    assert {r["LABEL"] for r in train} == {"0", "1"}
    assert len(test) == 6  # 20 % of 30, stratified
    dobs = [r["DOB"] for r in train + test]
    assert any(re.fullmatch(r"\d{2}-\d{2}-\d{4}", d) for d in dobs)
    assert any(re.fullmatch(r"\d{1,2}/\d{1,2}/\d{4}", d) for d in dobs)
    genders = [r["GENDER"] for r in train]
    assert genders.count("f") == 1 and set(genders) <= {"M", "F", "f"}
    cohort = load_dlmi(root, split="all")
    assert len(cohort) == 30


def test_image_size_and_bag_range(tmp_path: Path) -> None:
    from PIL import Image

    root = make_cohort(tmp_path, n_patients=4, seed=0, image_size=40, bag_size=(7, 7))
    cohort = load_dlmi(root, split="all")
    assert all(r.num_instances == 7 for r in cohort)
    with Image.open(cohort[0].paths[0]) as im:
        assert im.size == (40, 40) and im.mode == "RGB"


def test_clinical_signal_is_good_not_perfect(tmp_path: Path) -> None:
    root = make_cohort(tmp_path, n_patients=200, seed=2, image_size=16, bag_size=(1, 1), test_fraction=0.05)
    cohort = load_dlmi(root)
    x = cohort.clinical_matrix()
    x[:, 1] = np.log(x[:, 1])
    y = cohort.labels
    ba = cross_val_score(LogisticRegression(), x, y, cv=5, scoring="balanced_accuracy").mean()
    assert 0.7 < ba < 0.93
    assert x[y == 1, 0].mean() > x[y == 0, 0].mean() + 10  # malignant patients are older
    assert x[y == 1, 1].mean() > x[y == 0, 1].mean()  # with more lymphocytes


def test_malignant_patients_carry_more_atypical_cells(tmp_path: Path) -> None:
    root = make_cohort(tmp_path, n_patients=30, seed=4, image_size=16, bag_size=(12, 12))
    truth = read_rows(root / "synthetic_truth.csv")
    frac = {
        lab: [int(r["N_ATYPICAL"]) / int(r["N_CELLS"]) for r in truth if r["LABEL"] == lab] for lab in "01"
    }
    assert max(frac["0"]) <= 0.2
    assert np.mean(frac["1"]) > 0.2
    assert min(frac["1"]) < max(frac["0"]) + 0.15  # some malignant bags look almost reactive


def _cell_features(img: np.ndarray) -> list[float]:
    im = img.astype(np.float64) / 255.0
    nucleus = (im[..., 0] < 0.6) & (im[..., 2] > im[..., 0])
    colour = [im[..., c][nucleus].mean() if nucleus.any() else 0.0 for c in range(3)]
    return [float(nucleus.mean()), *colour]


def test_cell_signal_is_learnable_not_trivial() -> None:
    rng = np.random.default_rng(0)
    feats, labels = [], []
    for i in range(300):
        atypical = i % 2
        stain = 1 + rng.normal(0, 0.06, 3)
        feats.append(_cell_features(render_cell("atypical" if atypical else "normal", 32, rng, stain)))
        labels.append(atypical)
    acc = cross_val_score(LogisticRegression(max_iter=1000), np.array(feats), np.array(labels), cv=5).mean()
    assert 0.7 < acc < 0.98


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_render_every_kind(kind: str) -> None:
    img = render_cell(kind, 24, np.random.default_rng(0))
    assert img.shape == (24, 24, 3) and img.dtype == np.uint8
    assert img.std() > 5  # a cell, not a flat image


def test_segmented_and_background() -> None:
    rng = np.random.default_rng(0)
    seg = render_cell("atypical", 32, rng, segmented=True)
    assert (seg[0, 0] == 0).all() and (seg[-1, -1] == 0).all()
    assert seg[16, 16].sum() > 0
    canvas = smear_background(rng, 64, 64, 32)
    img = render_cell("normal", 32, rng, background=canvas[:32, :32])
    assert img.shape == (32, 32, 3)
    with pytest.raises(ConfigError, match="background must have shape"):
        render_cell("normal", 32, rng, background=canvas)


def test_off_centre_moves_cells() -> None:
    def centre(img: np.ndarray) -> np.ndarray:
        cell = img.astype(float).sum(axis=2) > 0  # segmented: black outside the cell
        ys, xs = np.nonzero(cell)
        return np.array([ys.mean(), xs.mean()])

    rng = np.random.default_rng(0)
    near = [np.abs(centre(render_cell("normal", 48, rng, segmented=True)) - 24).max() for _ in range(20)]
    far = [
        np.abs(centre(render_cell("normal", 48, rng, segmented=True, off_centre=0.4)) - 24).max()
        for _ in range(20)
    ]
    assert np.mean(far) > np.mean(near) + 1.5


def test_cnmc_and_imagefolder_layouts_load(tmp_path: Path) -> None:
    cn = make_cohort(tmp_path / "cn", n_patients=6, seed=0, layout="cnmc", image_size=16, bag_size=(2, 2))
    assert len(load_cnmc(cn)) == 12
    assert (cn / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv").is_file()
    wf = make_cohort(
        tmp_path / "wf", n_patients=5, seed=0, layout="imagefolder", image_size=16, bag_size=(3, 3)
    )
    total = len(load_imagefolder(wf / "train")) + len(load_imagefolder(wf / "val"))
    assert total == 15


@pytest.mark.slow
def test_default_cohort_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    root = make_cohort(tmp_path, n_patients=60, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 20.0, f"writing 60 patients took {elapsed:.1f} s"
    cohort = load_dlmi(root, split="all")
    sizes = [r.num_instances for r in cohort]
    assert len(cohort) == 60 and min(sizes) >= 8 and max(sizes) <= 40


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layout": "tiff"}, "layout must be"),
        ({"n_patients": 3}, "n_patients must be at least 4"),
        ({"image_size": 8}, "image_size must be at least 16"),
        ({"bag_size": (5, 2)}, "bag_size must be"),
        ({"bag_size": (0, 2)}, "bag_size must be"),
        ({"malignant_fraction": 1.0}, "malignant_fraction must be"),
        ({"test_fraction": 0.0}, "test_fraction must be"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_cohort(tmp_path / "x", **kwargs)


def test_refuses_non_empty_root(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        make_cohort(tmp_path, n_patients=4)


def test_render_cell_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="unknown kind 'blast'"):
        render_cell("blast")
    with pytest.raises(ConfigError, match="at least 16"):
        render_cell("normal", 8)
