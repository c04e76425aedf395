"""Tests of milcell.runs: preprocessing, fold datasets, training, saving, loading and predicting runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch

from milcell.data import BagCohort
from milcell.data.datasets import BagDataset, ImageCache, InstanceDataset
from milcell.data.formats.dlmi import load_dlmi
from milcell.data.synthetic import make_cohort
from milcell.exceptions import CheckpointError, ConfigError, DataError
from milcell.runs import (
    RUN_FORMAT_VERSION,
    Preprocessing,
    SavedRun,
    backbone_data_config,
    fold_datasets,
    load_run,
    load_samples,
    model_arguments,
    train_run,
)


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs_data")
    return make_cohort(root / "dlmi", n_patients=10, seed=0, image_size=32, bag_size=(3, 5))


@pytest.fixture(scope="module")
def trained(cohort_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SavedRun, Path]:
    out = tmp_path_factory.mktemp("runs") / "run"
    run = train_run(
        load_dlmi(cohort_root, "train"),
        out,
        pooling="attention",
        folds=2,
        epochs=1,
        batch_size=2,
        image_size=32,
        max_instances=3,
        figures=False,
        device="cpu",
        data_format="dlmi",
    )
    return run, out


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "test_resnet", "milcell_mini_resnet_k8"])
def test_preprocessing_is_the_backbones_own(name: str) -> None:
    # Regression: the command normalised every backbone with ImageNet statistics, while timm's
    # configuration of e.g. vit_base_patch16_224's weights says mean = std = 0.5.
    expected = timm.models.get_pretrained_cfg(name)
    cfg = backbone_data_config(name)
    assert tuple(cfg["mean"]) == tuple(expected.mean) and tuple(cfg["std"]) == tuple(expected.std)
    prep = Preprocessing.from_backbone(name, image_size=32)
    assert prep.mean == tuple(expected.mean) and prep.std == tuple(expected.std)
    assert prep.interpolation == expected.interpolation
    assert prep.image_size == 32
    assert Preprocessing.from_backbone(name).image_size == expected.input_size[-1]


def test_preprocessing_validation() -> None:
    with pytest.raises(ConfigError, match="image_size"):
        Preprocessing(0)
    with pytest.raises(ConfigError, match="interpolation"):
        Preprocessing(32, interpolation="lanczos")
    with pytest.raises(ConfigError, match="std"):
        Preprocessing(32, std=(0.0, 1.0, 1.0))
    assert Preprocessing(np.int64(32)).image_size == 32
    with pytest.raises(ConfigError, match="unknown backbone"):
        backbone_data_config("resnet_18")


# --------------------------------------------------------------------------- fold datasets


def test_fold_datasets_cache_keeps_the_training_augmentation(cohort_root: Path) -> None:
    # Regression: --cache-images switched the augmentation from flips + rotations up to 180 degrees
    # to flips + quarter turns; the cache must change nothing but where the decoded images come from.
    cohort = load_dlmi(cohort_root, "train")
    common = {"image_size": 24, "max_instances": 3, "seed": 4}
    plain = fold_datasets(cohort, [0, 1, 2, 3, 4], [5, 6], **common)
    cached = fold_datasets(cohort, [0, 1, 2, 3, 4], [5, 6], cache_images=True, **common)
    for a_ds, b_ds in zip(plain[:2], cached[:2], strict=True):
        assert isinstance(a_ds, BagDataset) and isinstance(b_ds, BagDataset)
        assert b_ds.image_cache is not None and a_ds.image_cache is None
        for epoch in (0, 3):
            a_ds.set_epoch(epoch)
            b_ds.set_epoch(epoch)
            for index in range(len(a_ds)):
                torch.manual_seed(100 + index)
                a = a_ds[index]
                torch.manual_seed(100 + index)
                b = b_ds[index]
                assert a.instance_names == b.instance_names and a.id == b.id
                torch.testing.assert_close(a.instances, b.instances, rtol=0, atol=0)
                torch.testing.assert_close(a.clinical, b.clinical, rtol=0, atol=0)
    assert cached[0].image_cache.nbytes > 0  # type: ignore[union-attr]
    # The training augmentation rotates by any angle, not only quarter turns (bag-level, per instance).
    augment = plain[0].bag_transform
    assert augment is not None and augment.rotation == 180.0 and augment.hflip and augment.vflip
    assert plain[1].bag_transform is not None and not plain[1].bag_transform.random  # validation


def test_fold_datasets_quarter_turn_augmentation(cohort_root: Path) -> None:
    from milcell.runs import check_augment

    cohort = load_dlmi(cohort_root, "train")
    train_ds, val_ds, _ = fold_datasets(cohort, [0, 1, 2], [3], image_size=16, augment="quarter")
    assert train_ds.bag_transform.quarter_turns and not val_ds.bag_transform.random  # type: ignore[attr-defined]
    assert check_augment("rotate") is True and check_augment(np.bool_(False)) is False
    with pytest.raises(ConfigError, match="augment must be one of"):
        fold_datasets(cohort, [0], [1], image_size=16, augment="spin")


def test_fold_datasets_scaler_comes_from_the_training_rows(cohort_root: Path) -> None:
    cohort = load_dlmi(cohort_root, "train")
    train_ds, val_ds, scaler = fold_datasets(cohort, [0, 1, 2], [3, 4], image_size=16, augment=False)
    assert scaler is not None and scaler.names == cohort.clinical_names
    raw = cohort.clinical_matrix()
    assert np.allclose(val_ds[1].clinical.numpy(), scaler.transform(raw[[4]])[0], equal_nan=True)  # type: ignore[union-attr]
    assert [val_ds[i].id for i in range(2)] == [cohort.ids[3], cohort.ids[4]]
    assert len(train_ds) == 3 and val_ds[0].instances.shape[-1] == 16
    shared = ImageCache()
    fold_datasets(cohort, [0], [1], image_size=16, cache_images=shared)[0][0]
    assert len(shared) == cohort[0].num_instances


def test_fold_datasets_single_cells_and_errors(tmp_path: Path) -> None:
    root = make_cohort(
        tmp_path / "if", n_patients=4, seed=0, layout="imagefolder", image_size=16, bag_size=(2, 2)
    )
    cells = load_samples("imagefolder", root, "train")
    train_ds, val_ds, scaler = fold_datasets(cells, [0, 1], [2], image_size=16, cache_images=True)
    assert isinstance(train_ds, InstanceDataset) and scaler is None
    assert val_ds[0].instances.shape == (1, 3, 16, 16)
    with pytest.raises(ConfigError, match="samples must be a BagCohort or a CellSet"):
        fold_datasets([1, 2], [0], [1], image_size=16)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_instances"):
        fold_datasets(cells, [0], [1], image_size=16, max_instances=0)
    with pytest.raises(ConfigError, match="cache_images"):
        fold_datasets(cells, [0], [1], image_size=16, cache_images="memory")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data_format"):
        load_samples("nifti", root)


# --------------------------------------------------------------------------- models


def test_model_arguments_follow_the_poolings_prediction_level_attribute() -> None:
    # Regression: the literal "instance_mean" was tested instead of the pooling's attribute.
    from milcell.nn.pooling import InstanceMeanPooling, list_poolings, register_pooling

    if "instance_mean_alias_test" not in list_poolings():

        @register_pooling("instance_mean_alias_test")
        class Alias(InstanceMeanPooling):
            pass

    assert model_arguments(2, ["age"], pooling="instance_mean_alias_test")["fusion"] is None
    assert model_arguments(2, ["age"], pooling="mean")["fusion"] == "concat"
    assert model_arguments(3, [], pooling="mean")["fusion"] == "linear"
    from milcell.cli import main

    argv = ["train", "--format", "dlmi", "--data-dir", ".", "--pooling", "instance_mean_alias_test"]
    assert main([*argv, "--fusion", "moe"]) == 2
    with pytest.raises(ConfigError, match="inputs='clinical'"):
        model_arguments(2, [], inputs="clinical")
    with pytest.raises(ConfigError, match="fusion 'linear' uses the image only"):
        model_arguments(2, ["age"], fusion="linear")


# --------------------------------------------------------------------------- runs


def test_train_run_saves_what_load_run_reads(trained: tuple[SavedRun, Path], cohort_root: Path) -> None:
    run, out = trained
    assert run.path == out and run.cv is not None and len(run.models) == 2
    for name in ("run.json", "summary.txt", "oof_predictions.csv", "folds.csv"):
        assert (out / name).is_file(), name
    record = json.loads((out / "run.json").read_text())
    assert record["format_version"] == RUN_FORMAT_VERSION and record["data_format"] == "dlmi"
    assert record["interpolation"] == "bilinear" and record["image_size"] == 32
    assert record["backbone_data_config"]["mean"] == [0.485, 0.456, 0.406]
    assert record["config"]["pooling"] == "attention" and record["max_instances"] == 3
    loaded = load_run(out)
    assert loaded.class_names == run.class_names and loaded.clinical_names == ["age", "lymph_count", "sex"]
    assert loaded.preprocessing == run.preprocessing and loaded.max_instances == 3
    assert json.dumps(loaded.summary, sort_keys=True) == json.dumps(run.summary, sort_keys=True)
    assert [s.to_dict() for s in loaded.scalers] == [s.to_dict() for s in run.scalers]  # type: ignore[union-attr]
    test = load_dlmi(cohort_root, "test")
    fresh, again = run.predict(test, device="cpu"), loaded.predict(test, device="cpu", cache_images=False)
    assert fresh.ids == again.ids == test.ids
    np.testing.assert_allclose(again.probabilities, fresh.probabilities, rtol=0, atol=1e-6)
    np.testing.assert_allclose(again.probabilities, np.mean(again.fold_probabilities, axis=0), atol=1e-6)
    hard = loaded.predict(test, method="hard", device="cpu")
    np.testing.assert_allclose(hard.probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert hard.method == "hard"
    assert hard.predicted.shape == (len(test),)


def test_saved_run_evaluate_and_its_errors(trained: tuple[SavedRun, Path], cohort_root: Path) -> None:
    run, _ = trained
    train = load_dlmi(cohort_root, "train")
    evaluation = run.evaluate(train, device="cpu")
    assert 0.0 <= evaluation.ensemble["balanced_accuracy"] <= 1.0 and len(evaluation.fold_models) == 2
    assert "soft vote of 2 models" in evaluation.table()
    with pytest.raises(DataError, match="no labelled sample"):
        run.evaluate(load_dlmi(cohort_root, "test"), device="cpu")
    with pytest.raises(ConfigError, match="scales the clinical attributes per fold"):
        run.predict(run.dataset(train, 0), device="cpu")
    other = BagCohort(list(train), clinical_names=("a", "b", "c"), class_names=train.class_names)
    with pytest.raises(DataError, match="clinical attributes"):
        run.predict(other, device="cpu")
    with pytest.raises(ConfigError, match="method"):
        run.predict(train, method="median")


def test_a_run_without_clinical_scaling_predicts_a_prepared_dataset(
    trained: tuple[SavedRun, Path], cohort_root: Path
) -> None:
    run, _ = trained
    cohort = load_dlmi(cohort_root, "test")
    model = run.models[0]
    from milcell.nn.model import MILModel

    image_only = MILModel.from_config({**model.config, "clinical_dim": 0, "fusion": "linear"})  # type: ignore[operator]
    plain = SavedRun(dict(run.record), [image_only], [None])
    by_samples = plain.predict(cohort, device="cpu")
    by_dataset = plain.predict(plain.dataset(cohort), device="cpu")
    assert by_dataset.ids == by_samples.ids
    np.testing.assert_allclose(by_dataset.probabilities, by_samples.probabilities, atol=1e-6)


def test_load_run_refuses_newer_and_broken_records(trained: tuple[SavedRun, Path], tmp_path: Path) -> None:
    import shutil

    _, out = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    record = json.loads((copy / "run.json").read_text())
    record["format_version"] = RUN_FORMAT_VERSION + 1
    (copy / "run.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="newer than the 1 this milcell reads"):
        load_run(copy)
    record["format_version"] = "1"
    (copy / "run.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="invalid format_version"):
        load_run(copy)
    record["format_version"] = 1
    del record["mean"]
    (copy / "run.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="lacks"):
        load_run(copy)
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "absent")


def test_a_run_loads_without_the_command_line_package(trained: tuple[SavedRun, Path]) -> None:
    _, out = trained
    code = (
        "import sys, milcell.runs as r; run = r.load_run(sys.argv[1]); "
        "assert not [m for m in sys.modules if m.startswith('milcell._cli') or m == 'milcell.cli'], "
        "sorted(sys.modules); print(len(run.models))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"


# ----------------------------------------------------------------------- nothing silently wrong (issue 10)


def test_train_run_counts_skipped_and_imputed_values(cohort_root: Path) -> None:
    # Regression: unlabelled patients were dropped and missing clinical values imputed without a word.
    from milcell.data import BagRecord
    from milcell.runs import describe_data

    cohort = load_dlmi(cohort_root, "train")
    records = list(cohort)
    records[0] = BagRecord(records[0].id, -1, records[0].paths, records[0].clinical)
    clinical = list(records[1].clinical or ())
    clinical[2] = float("nan")
    records[1] = BagRecord(records[1].id, records[1].label, records[1].paths, tuple(clinical))
    changed = BagCohort(records, clinical_names=cohort.clinical_names, class_names=cohort.class_names)
    run = train_run(changed, folds=2, epochs=1, image_size=16, max_instances=2, figures=False, device="cpu")
    assert run.data["labelled"] == len(cohort) - 1 and run.data["unlabelled_skipped"] == 1
    assert run.data["imputed"] == {"sex": [records[1].id]}
    assert describe_data(run.data) == (
        f"{len(cohort) - 1} labelled patients, 1 unlabelled skipped, 1 values imputed (sex: {records[1].id})"
    )
    assert records[0].id not in (run.training_ids or [])


def test_held_out_ids_that_trained_the_models_are_an_error(
    trained: tuple[SavedRun, Path], cohort_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: test patients equal to training patients were predicted and scored without a caveat.
    run, _ = trained
    train = load_dlmi(cohort_root, "train")
    assert run.training_ids == sorted(train.ids)
    with caplog.at_level("WARNING", logger="milcell"):
        evaluation = run.evaluate(train, device="cpu")
    assert sorted(evaluation.trained_on) == sorted(train.ids)
    assert "trained the fold models" in caplog.text
    test = load_dlmi(cohort_root, "test")
    assert run.training_overlap(test) == []
    run.predict(test, device="cpu", held_out=True)  # distinct IDs: fine
    leaky = SavedRun(
        {**run.record, "train_ids": [*run.record["train_ids"], test.ids[0]]}, run.models, run.scalers
    )
    with pytest.raises(DataError, match=f"also training IDs of the run \\({test.ids[0]}\\)"):
        leaky.predict(test, device="cpu", held_out=True)


def test_predictions_write_probabilities_and_the_submission(
    trained: tuple[SavedRun, Path], cohort_root: Path, tmp_path: Path
) -> None:
    run, _ = trained
    preds = run.predict(load_dlmi(cohort_root, "test"), device="cpu")
    text = preds.write_csv(tmp_path / "p.csv").read_text().splitlines()
    assert text[0] == "id,predicted,prob_reactive,prob_malignant" and len(text) == len(preds.ids) + 1
    assert preds.write_submission(tmp_path / "s.csv").read_text().splitlines()[0] == "Id,Predicted"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r, m: r.pop("image_size"), "lacks the key 'image_size'"),
        (lambda r, m: r.update(mean="0.5"), "'mean' must be list"),
        (lambda r, m: r.update(class_names=[0, 1]), "'class_names' must be a list of strings"),
        (lambda r, m: r.update(data_format=3), "'data_format' must be str or null"),
        (lambda r, m: r["models"][0].pop("path"), "has no 'path' string"),
        (lambda r, m: m.update(extra=1), "model.json' has unknown key(s) 'extra'"),
        (lambda r, m: m["model_config"].update(wings=2), "'model_config' is invalid"),
        (lambda r, m: m.update(clinical_scaler={"names": 1}), "'clinical_scaler' is invalid"),
        (lambda r, m: m.pop("model_config"), "lacks the key 'model_config'"),
    ],
)
def test_load_run_names_the_file_and_key_of_a_malformed_record(
    trained: tuple[SavedRun, Path], tmp_path: Path, edit: Any, message: str
) -> None:
    # Regression: malformed run.json / model.json gave a KeyError or TypeError traceback.
    import shutil

    _, out = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    record = json.loads((copy / "run.json").read_text())
    meta_path = copy / record["models"][0]["path"] / "model.json"
    meta = json.loads(meta_path.read_text())
    edit(record, meta)
    (copy / "run.json").write_text(json.dumps(record))
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as exc:
        load_run(copy)
    assert message in str(exc.value)
    assert ("model.json" if "model" in message or "scaler" in message else "run.json") in str(exc.value)


def test_train_run_refuses_changed_settings_and_leaves_the_run_untouched(
    trained: tuple[SavedRun, Path], cohort_root: Path
) -> None:
    # Regression: a rerun with other settings reused the old folds and rewrote run.json with the new ones.
    _, out = trained
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    common = {"folds": 2, "epochs": 1, "batch_size": 2, "max_instances": 3, "figures": False, "device": "cpu"}
    with pytest.raises(ConfigError) as exc:
        train_run(load_dlmi(cohort_root, "train"), out, pooling="max", image_size=24, lr=0.01, **common)
    text = str(exc.value)
    assert "pooling='attention'" in text and "pooling='max'" in text and "image_size=32" in text
    assert "lr=0.001" in text and "lr=0.01" in text and "overwrite" in text
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    with pytest.raises(ConfigError, match="nothing to resume"):
        train_run(load_dlmi(cohort_root, "train"), out.parent / "fresh", resume=True, **common)
    assert not (out.parent / "fresh").exists()


# --------------------------------------------------------------------------- calibration


@pytest.mark.slow
def test_a_calibrated_run_stores_its_calibrator_and_predicts_calibrated_probabilities(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from milcell.calibration import RunCalibration

    root = tmp_path_factory.mktemp("calibrated_data")
    cohort = make_cohort(root / "dlmi", n_patients=28, seed=1, image_size=32, bag_size=(2, 3))
    out = tmp_path_factory.mktemp("calibrated") / "run"
    common = {"folds": 2, "epochs": 1, "batch_size": 4, "image_size": 32, "max_instances": 2}
    with pytest.raises(ConfigError, match="calibrate"):
        train_run(load_dlmi(cohort, "train"), None, calibrate="isotonic", **common)
    run = train_run(
        load_dlmi(cohort, "train"),
        out,
        pooling="mean",
        figures=False,
        device="cpu",
        data_format="dlmi",
        calibrate="temperature",
        **common,
    )
    stored = RunCalibration.from_dict(json.loads((out / "run.json").read_text())["calibration"])
    n_oof = int((run.cv.oof.repeat == 0).sum())
    assert stored.labels.shape == (n_oof,)
    assert stored.metrics is not None and set(stored.metrics) >= {"ece", "ece_calibrated", "brier_calibrated"}
    loaded = load_run(out)
    assert loaded.calibration is not None
    assert loaded.calibration.calibrator.temperature == pytest.approx(stored.calibrator.temperature)
    train = load_dlmi(cohort, "train")
    preds = loaded.predict(train)
    assert preds.calibrated is not None and preds.calibrated.shape == preds.probabilities.shape
    mean = np.mean(np.stack(preds.fold_probabilities), axis=0)
    expected = stored.calibrator.transform_probabilities(mean.astype(np.float64))
    assert preds.calibrated == pytest.approx(expected, abs=1e-5)
    assert "calprob_malignant" in preds.rows()[0]
    evaluation = loaded.evaluate(train, refer_target=0.9)
    assert {"ece", "ece_calibrated", "referred", "referral_metric"} <= set(evaluation.calibration)
    assert "calibration" in evaluation.table() and "referred" in evaluation.table()


def test_fold_scalers_are_fitted_on_what_the_fold_models_trained_on(
    trained: tuple[SavedRun, Path], cohort_root: Path
) -> None:
    # Honest selection: each fold model trains on its fold's training patients less the inner
    # selection set, and its saved clinical scaler must come from exactly those patients.
    from milcell.runs import fit_clinical_scaler

    run, out = trained
    cohort = load_dlmi(cohort_root, "train")
    assert run.cv is not None and run.cv.selection == "inner" and run.record["config"]["selection"] == "inner"
    folds = json.loads((out / "cv" / "fold_0_0" / "result.json").read_text())
    assert set(folds["fit"]) < set(folds["train"]) and folds["select"]
    for k, (scaler, fit) in enumerate(zip(run.scalers, run.cv.fit_indices, strict=True)):
        record = json.loads((out / "cv" / f"fold_0_{k}" / "result.json").read_text())
        assert fit.tolist() == record["fit"]
        assert scaler.to_dict() == fit_clinical_scaler(cohort, fit).to_dict()  # type: ignore[union-attr]
    assert "optimistic" not in run.table()
