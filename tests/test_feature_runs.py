"""Runs trained on a feature cache: ``train_run(features=...)`` and ``milcell train --features``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from milcell.cli import main
from milcell.data.datasets import BagDataset, InstanceDataset
from milcell.data.formats.cnmc import load_cnmc
from milcell.data.formats.dlmi import load_dlmi
from milcell.data.synthetic import make_cohort
from milcell.exceptions import ConfigError, DataError
from milcell.nn.backbones import create_backbone
from milcell.runs import Preprocessing, cached_features, load_run, train_run
from milcell.train.features import extract_features, read_feature_cache

BACKBONE = "milcell_mini_resnet_k8"
FAST = {"folds": 2, "epochs": 2, "batch_size": 2, "figures": False, "device": "cpu"}


def _extract(cohort, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    backbone = create_backbone(BACKBONE, trainable="head")
    transform = Preprocessing.from_backbone(BACKBONE, 32).transform(train=False)
    dataset = (
        BagDataset(cohort, transform)
        if hasattr(cohort, "clinical_names")
        else InstanceDataset(cohort, transform)
    )
    extract_features(backbone, dataset, folder, progress=False, key_extra={"image_size": 32})
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("feature_runs")
    dlmi = make_cohort(root / "dlmi", n_patients=20, seed=0, image_size=32, bag_size=(2, 4))
    all_patients = load_dlmi(dlmi, "all")
    return {
        "dlmi": dlmi,
        "cache": _extract(all_patients, root / "cache"),
        "other_weights": _extract(all_patients, root / "cache_other", seed=1),
    }


@pytest.fixture(scope="module")
def feature_run(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run") / "run"
    run = train_run(
        load_dlmi(data["dlmi"], "train"), out, features=data["cache"], pooling="attention", **FAST
    )
    return run, out


def test_cached_features_follow_the_samples_order(data: dict[str, Path]) -> None:
    cohort = load_dlmi(data["dlmi"], "train")
    cache = read_feature_cache(data["cache"])
    bags = cached_features(cohort.subset([3, 0]), cache)
    position = {bag_id: i for i, bag_id in enumerate(cache.dataset.ids)}
    assert torch.equal(bags[0], cache.dataset.features[position[cohort.ids[3]]])
    assert bags[1].shape == (len(cohort[0].paths), cache.dim)


def test_feature_run_records_the_cache_and_round_trips(feature_run, data: dict[str, Path]) -> None:
    run, out = feature_run
    cache = read_feature_cache(data["cache"])
    assert run.features == {**cache.identity, "dim": cache.dim}
    assert run.record["config"]["backbone"] == BACKBONE and run.record["config"]["augment"] is False
    assert all(m.encoder is None and m.in_dim == cache.dim for m in run.models)
    loaded = load_run(out)
    assert loaded.features == run.features
    test = load_dlmi(data["dlmi"], "test")
    a = run.predict(test, features=cache, held_out=True)
    b = loaded.predict(test, features=data["cache"], held_out=True)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
    assert a.ids == test.ids


def test_feature_run_matches_a_model_trained_on_the_same_features_by_hand(feature_run) -> None:
    run, _ = feature_run
    assert len(run.models) == 2 and np.isfinite(list(run.summary["auc"])).all()


def test_feature_run_refuses_missing_or_foreign_features(feature_run, data: dict[str, Path]) -> None:
    run, _ = feature_run
    test = load_dlmi(data["dlmi"], "test")
    with pytest.raises(ConfigError, match="trained on cached features.*--features DIR"):
        run.predict(test)
    with pytest.raises(ConfigError, match="differ in weights"):
        run.predict(test, features=data["other_weights"])


def test_image_options_do_not_apply_to_features(data: dict[str, Path], tmp_path: Path) -> None:
    cohort = load_dlmi(data["dlmi"], "train")
    for option in (
        {"backbone": "resnet18"},
        {"augment": "quarter"},
        {"image_size": 48},
        {"trainable": "head"},
    ):
        with pytest.raises(ConfigError, match="do\\(es\\) not apply to a run on cached features"):
            train_run(cohort, tmp_path / "x", features=data["cache"], **option, **FAST)
        assert not (tmp_path / "x").exists()


def test_cache_must_hold_the_samples_files(data: dict[str, Path], tmp_path: Path) -> None:
    cohort = load_dlmi(data["dlmi"], "train")
    partial = _extract(cohort.subset([0, 1]), tmp_path / "partial")
    with pytest.raises(DataError, match=r"no features for \d+ of the"):
        train_run(cohort, tmp_path / "run", features=partial, **FAST)
    # Another cohort with the same patient IDs but other image files: refused, naming the patient.
    other = make_cohort(tmp_path / "other", n_patients=20, seed=5, image_size=32, bag_size=(5, 6))
    foreign = _extract(load_dlmi(other, "all"), tmp_path / "foreign")
    shared = sorted(set(load_dlmi(other, "all").ids) & set(cohort.ids))
    if shared:
        with pytest.raises(DataError, match="made from other data"):
            cached_features(cohort.subset([cohort.ids.index(shared[0])]), foreign)


def test_image_run_refuses_features(data: dict[str, Path], tmp_path: Path) -> None:
    cohort = load_dlmi(data["dlmi"], "train")
    run = train_run(cohort, None, image_size=32, max_instances=2, **{**FAST, "epochs": 1})
    with pytest.raises(ConfigError, match="trained on images"):
        run.predict(load_dlmi(data["dlmi"], "test"), features=data["cache"])


def test_single_cells_train_on_features(tmp_path: Path) -> None:
    root = make_cohort(
        tmp_path / "cnmc", n_patients=12, seed=0, layout="cnmc", image_size=32, bag_size=(2, 3)
    )
    cells = load_cnmc(root, "train")
    cache = _extract(cells, tmp_path / "cache")
    run = train_run(cells, None, features=cache, pooling="mean", **FAST)
    preds = run.predict(cells, features=cache)
    assert len(preds.ids) == len(cells)


@pytest.mark.slow
def test_cli_extract_then_train_evaluate_predict_on_features(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "run"
    common = ["--data-dir", str(data["dlmi"]), "--format", "dlmi", "--image-size", "32"]
    assert main(["extract-features", *common, "--output-dir", str(cache), "--no-progress"]) == 0
    train = ["train", *common, "--features", str(cache), "--folds", "2", "--epochs", "1", "--batch-size", "2"]
    assert main([*train, "--output-dir", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((out / "run.json").read_text())["features"]["backbone"] == BACKBONE
    assert main(["predict", "--run", str(out), "--features", str(cache), "--no-progress"]) == 0
    assert (out / "submission.csv").is_file()
    assert (
        main(["evaluate", "--run", str(out), "--split", "train", "--features", str(cache), "--no-progress"])
        == 0
    )
    capsys.readouterr()
    assert main(["predict", "--run", str(out), "--no-progress"]) == 2
    assert "trained on cached features" in capsys.readouterr().err
