"""Tests of the ``milcell`` command, run in-process through ``main([...])``."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from milcell.cli import main
from milcell.data.synthetic import make_cohort

COMMANDS = ["demo", "train", "evaluate", "predict", "extract-features", "export", "tune", "info"]
FAST = ["--folds", "2", "--epochs", "1", "--no-progress", "--threads", "1", "--batch-size", "2"]


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cohorts")
    return {
        "dlmi": make_cohort(root / "dlmi", n_patients=12, seed=0, image_size=32, bag_size=(2, 4)),
        "cnmc": make_cohort(
            root / "cnmc", n_patients=8, seed=0, layout="cnmc", image_size=32, bag_size=(2, 3)
        ),
        "imagefolder": make_cohort(
            root / "if", n_patients=6, seed=0, layout="imagefolder", image_size=32, bag_size=(3, 4)
        ),
    }


@pytest.fixture(scope="module")
def dlmi_run(cohorts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "dlmi"
    args = ["train", "--data-dir", str(cohorts["dlmi"]), "--format", "dlmi", "--image-size", "32"]
    code = main([*args, *FAST, "--output-dir", str(out)])
    assert code == 0
    return out


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    # Warnings may come first (they reach stderr by default); the error is one line, the last.
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("milcell: warning: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("milcell: error: ")
    return lines[0]


# --------------------------------------------------------------------------- info and help


def test_info_lists_registries_versions_and_device(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for text in ("milcell 0.1.0", "torch ", "timm ", "python ", "device: ", "gated_attention", "moe"):
        assert text in out
    assert "milcell_mini_resnet_k8" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: milcell {command}")
    assert "--debug" in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "<command>" in capsys.readouterr().out


def test_console_script_help() -> None:
    exe = shutil.which("milcell", path=str(Path(sys.executable).parent))
    assert exe is not None, "the milcell console script is not installed (pip install -e .)"
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0
    for command in COMMANDS:
        assert command in done.stdout


# --------------------------------------------------------------------------- train / evaluate / predict


def test_train_dlmi_writes_a_saved_run(dlmi_run: Path) -> None:
    for name in ("config.yaml", "config.json", "run.json", "folds.csv", "oof_predictions.csv", "roc.png"):
        assert (dlmi_run / name).is_file(), name
    record = json.loads((dlmi_run / "run.json").read_text())
    assert record["data_format"] == "dlmi" and len(record["models"]) == 2
    for entry in record["models"]:
        folder = dlmi_run / entry["path"]
        assert (folder / "model.safetensors").is_file()
        meta = json.loads((folder / "model.json").read_text())
        assert meta["model_config"]["pooling"] == "gated_attention"
        assert meta["clinical_scaler"]["names"] == ["age", "lymph_count", "sex"]
    with open(dlmi_run / "oof_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10  # the 10 labelled training patients, each predicted once out of fold


def test_predict_dlmi_writes_the_submission_for_exactly_the_test_patients(
    dlmi_run: Path, cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "sub.csv"
    assert main(["predict", "--run", str(dlmi_run), "--output", str(target), "--no-progress"]) == 0
    with open(target, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["Id", "Predicted"]
    with open(next((cohorts["dlmi"] / "testset").glob("*.csv")), newline="") as fh:
        test_ids = [r["ID"] for r in csv.DictReader(fh)]
    assert [r[0] for r in rows[1:]] == test_ids
    assert {r[1] for r in rows[1:]} <= {"0", "1"}
    assert "2 samples" in capsys.readouterr().out
    # Regression: the dlmi layout got no probabilities at all.
    with open(tmp_path / "sub_probabilities.csv", newline="") as fh:
        probs = list(csv.DictReader(fh))
    assert [r["id"] for r in probs] == test_ids
    for r in probs:
        assert abs(float(r["prob_reactive"]) + float(r["prob_malignant"]) - 1.0) < 1e-5


def test_evaluate_prints_vote_and_fold_rows(
    dlmi_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "eval.json"
    argv = ["evaluate", "--run", str(dlmi_run), "--split", "train", "--output", str(target)]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "soft vote of 2 models" in out and "fold models (mean ± std)" in out and "balanced acc." in out
    result = json.loads(target.read_text())
    assert 0.0 <= result["ensemble"]["balanced_accuracy"] <= 1.0
    assert len(result["fold_models"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["cnmc", "imagefolder"])
def test_train_and_predict_single_cell_layouts(
    fmt: str, cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / fmt
    args = ["train", "--data-dir", str(cohorts[fmt]), "--format", fmt, "--image-size", "64"]
    args += [*FAST, "--output-dir", str(out), "--cache-images"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "balanced acc." in table
    record = json.loads((out / "run.json").read_text())
    assert record["clinical_names"] == []
    assert main(["predict", "--run", str(out), "--no-progress"]) == 0
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and set(rows[0]) >= {"id", "predicted"}
    assert all(r["predicted"] in record["class_names"] for r in rows)


def test_train_normalises_with_the_backbones_own_statistics(
    cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: every backbone was normalised with ImageNet statistics, whatever timm's configuration
    # of its weights says (mean = std = 0.5 for timm's test_resnet, as for vit_base_patch16_224).
    from milcell.runs import load_run

    out = tmp_path / "run"
    args = ["train", "--data-dir", str(cohorts["dlmi"]), "--format", "dlmi", "--image-size", "32"]
    assert main([*args, *FAST, "--backbone", "test_resnet", "--output-dir", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["mean"] == [0.5, 0.5, 0.5] and record["std"] == [0.5, 0.5, 0.5]
    assert record["backbone_data_config"]["mean"] == [0.5, 0.5, 0.5]
    assert load_run(out).preprocessing.mean == (0.5, 0.5, 0.5)


@pytest.mark.slow
def test_cache_images_changes_nothing_but_speed(
    dlmi_run: Path, cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: --cache-images replaced the rotations up to 180 degrees by quarter turns.
    out = tmp_path / "cached"
    args = ["train", "--data-dir", str(cohorts["dlmi"]), "--format", "dlmi", "--image-size", "32"]
    assert main([*args, *FAST, "--output-dir", str(out), "--cache-images"]) == 0
    cached = json.loads((out / "run.json").read_text())
    plain = json.loads((dlmi_run / "run.json").read_text())
    assert json.dumps(cached["summary"]) == json.dumps(plain["summary"])  # same seed on the CPU: same numbers
    assert (out / "oof_predictions.csv").read_text() == (dlmi_run / "oof_predictions.csv").read_text()


# --------------------------------------------------------------------------- configuration files


@pytest.mark.slow
def test_saved_config_reruns_the_same_run(
    dlmi_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = yaml.safe_load((dlmi_run / "config.yaml").read_text())
    assert saved["command"] == "train" and saved["folds"] == 2 and saved["image_size"] == 32
    assert json.loads((dlmi_run / "config.json").read_text()) == saved
    rerun = tmp_path / "rerun"
    assert main(["train", "--config", str(dlmi_run / "config.yaml"), "--output-dir", str(rerun)]) == 0
    again = yaml.safe_load((rerun / "config.yaml").read_text())
    assert again == {**saved, "output_dir": str(rerun)}
    first = json.loads((dlmi_run / "run.json").read_text())["summary"]
    second = json.loads((rerun / "run.json").read_text())["summary"]
    assert first == second  # same seed on the CPU: the same numbers


def test_flags_override_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"format": "dlmi", "data-dir": str(tmp_path / "nowhere"), "folds": 3}))
    assert main(["train", "--config", str(cfg), "--data-dir", str(tmp_path / "elsewhere")]) == 2
    assert "elsewhere" in _error_line(capsys)


# --------------------------------------------------------------------------- errors


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("format: dlmi\nbatch_sise: 4\nfoo-bar: 1\n")
    malformed = tmp_path / "bad.yaml"
    malformed.write_text("format: dlmi\n  folds: [2\n")
    wrong_type = tmp_path / "type.yaml"
    wrong_type.write_text("epochs: many\n")
    other = tmp_path / "demo.yaml"
    other.write_text("command: demo\n")
    return {"unknown": unknown, "malformed": malformed, "type": wrong_type, "other": other, "dir": tmp_path}


BAD_ARGUMENTS = [
    (["train", "--format", "nifti", "--data-dir", "."], "invalid choice: 'nifti'"),
    (["train", "--format", "dlmi"], "missing required option(s) --data-dir"),
    (["train", "--data-dir", "{dir}"], "missing required option(s) --format"),
    (["train", "--format", "dlmi", "--data-dir", "{dir}/absent"], "does not exist"),
    (["train", "--format", "dlmi", "--data-dir", "{dir}"], "{dir}"),
    (["train", "--format", "dlmi", "--data-dir", "{dir}", "--precision", "16"], "invalid choice: '16'"),
    (
        ["train", "--format", "dlmi", "--data-dir", "{dir}", "--pooling", "gated_atention"],
        "did you mean 'gated_attention'",
    ),
    (["train", "--format", "dlmi", "--data-dir", "{dir}", "--fusion", "mo"], "unknown fusion 'mo'"),
    (["train", "--format", "dlmi", "--data-dir", "{dir}", "--folds", "1"], "at least 2 folds"),
    (["train", "--config", "{unknown}"], "unknown key(s) 'batch_sise', 'foo-bar'"),
    (["train", "--config", "{malformed}"], "not valid YAML at line 2"),
    (["train", "--config", "{type}"], "invalid value 'many' for 'epochs'"),
    (["train", "--config", "{other}"], "saved by 'milcell demo'"),
    (["train", "--config", "{dir}/none.yaml"], "does not exist"),
    (["evaluate", "--run", "{dir}"], "has no run.json"),
    (["predict", "--run", "{dir}/absent"], "does not exist"),
    (["predict"], "missing required option(s) --run"),
    (["demo", "--min-cells", "9", "--max-cells", "3"], "larger than --max-cells"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
    (["fly"], "invalid choice: 'fly'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS)
def test_bad_arguments_give_one_line_and_status_2(
    argv: list[str], message: str, bad_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fill = {k: str(v) for k, v in bad_files.items()}
    assert main([a.format(**fill) for a in argv]) == 2
    line = _error_line(capsys)
    assert message.format(**fill) in line


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["evaluate", "--run", str(tmp_path)]
    assert main([*argv, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "CheckpointError" in err
    assert err.strip().splitlines()[-1].startswith("milcell: error: ")


def test_demo_refuses_to_overwrite_without_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "roc.png").write_bytes(b"earlier result")
    assert main(["demo", "--output-dir", str(tmp_path), "--smoke"]) == 2
    assert "--overwrite" in _error_line(capsys)
    assert (tmp_path / "roc.png").read_bytes() == b"earlier result"


# --------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_smoke_prints_the_table_and_writes_the_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--smoke", "--output-dir", str(out), "--no-progress", "--patients", "12"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    for column in ("balanced acc.", "sensitivity", "specificity", "AUC"):
        assert column in header
    for row in ("concat fusion", "image only", "clinical only"):
        assert any(line.startswith("gated_attention") or row in line for line in lines)
        assert any(row in line and "±" in line for line in lines), row
    for name in ("roc.png", "training_curves.png", "attention_montage.png", "config.yaml", "results.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["command"] == "demo" and saved["folds"] == 2 and saved["patients"] == 12
    results = json.loads((out / "results.json").read_text())
    assert len(results["models"]) == 3


def test_demo_prints_the_table_before_drawing_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: the demo drew its figures before printing the table, so a plotting failure
    # (matplotlib missing on a base install) lost six minutes of results.
    import milcell._cli.demo as demo

    record = {"patients_cross_validated": 3, "cells": 9, "models": {}, "figures": []}
    result = demo.DemoResult("TABLE-LINE", record, [], [], (0.5,), (0.5,))
    monkeypatch.setattr(demo, "run_demo", lambda cfg, out: result)

    def fail(result: object, out: Path) -> list[Path]:
        from milcell.viz import MissingExtraError

        raise MissingExtraError("no plotting here")

    monkeypatch.setattr(demo, "write_demo_figures", fail)
    assert main(["demo", "--smoke", "--output-dir", str(tmp_path / "d")]) == 2
    captured = capsys.readouterr()
    assert "TABLE-LINE" in captured.out
    assert "no plotting here" in captured.err


def test_extract_features_writes_a_reusable_cache(
    cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from milcell.data.datasets import FeatureBagDataset

    out = tmp_path / "cache"
    args = ["extract-features", "--data-dir", str(cohorts["dlmi"]), "--format", "dlmi"]
    args += ["--image-size", "32", "--output-dir", str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    assert "12 bags of 64-d features" in capsys.readouterr().out
    cached = FeatureBagDataset.from_safetensors(out / "features.safetensors")
    assert len(cached) == 12 and cached.dim == 64
    assert yaml.safe_load((out / "config.yaml").read_text())["command"] == "extract-features"


# ----------------------------------------------------------------------- nothing silently wrong (issue 10)

TRAIN_DLMI = ["train", "--format", "dlmi", "--image-size", "32", *FAST]


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_train_leaves_an_existing_run_byte_identical(
    dlmi_run: Path, cohorts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: a rerun with other settings exited 0, kept the old weights and rewrote config.yaml,
    # model.json and run.json with the new settings; a refused one still rewrote config.yaml first.
    before = _snapshot(dlmi_run)
    argv = [*TRAIN_DLMI, "--data-dir", str(cohorts["dlmi"]), "--output-dir", str(dlmi_run)]
    assert main([*argv, "--pooling", "max", "--lr", "0.01"]) == 2
    line = _error_line(capsys)
    assert f"run folder '{dlmi_run}' was trained with" in line
    assert "pooling='gated_attention'" in line and "lr=0.001" in line
    assert "now" in line and "pooling='max'" in line and "lr=0.01" in line
    assert "--overwrite" in line and "--resume" in line
    assert main([*argv, "--epochs", "2"]) == 2 and "max_epochs=1" in _error_line(capsys)
    assert main([*argv, "--trainable", "bogus"]) == 2 and "trainable" in _error_line(capsys)
    assert main([*argv, "--overwrite", "--resume"]) == 2 and "exclude each other" in _error_line(capsys)
    assert _snapshot(dlmi_run) == before


def test_a_refused_train_into_a_new_folder_leaves_no_folder(
    cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new"
    argv = [*TRAIN_DLMI, "--data-dir", str(cohorts["dlmi"]), "--output-dir", str(out)]
    for extra, message in (
        (["--trainable", "bogus"], "trainable"),
        (["--folds", "9"], "n_splits=9"),
        (["--resume"], "nothing to resume"),
        (["--checkpoint-path", str(tmp_path / "none.pt")], "none.pt' does not exist"),
    ):
        assert main([*argv, *extra]) == 2
        assert message in _error_line(capsys)
        assert not out.exists()


def test_a_frozen_backbone_without_weights_is_warned_about(
    cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: --trainable head from the command line always trained on random frozen features.
    argv = [*TRAIN_DLMI, "--data-dir", str(cohorts["dlmi"]), "--output-dir", str(tmp_path / "o")]
    assert main([*argv, "--trainable", "head", "--folds", "9"]) == 2  # refused after the warning
    err = capsys.readouterr().err
    assert "milcell: warning: trainable='head' freezes the backbone" in err and "random features" in err


def test_overwrite_retrains_a_run_with_other_settings(
    dlmi_run: Path, cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(dlmi_run, copy)
    argv = [*TRAIN_DLMI, "--data-dir", str(cohorts["dlmi"]), "--output-dir", str(copy), "--pooling", "max"]
    assert main([*argv, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "10 labelled patients, 0 unlabelled skipped" in out
    record = json.loads((copy / "run.json").read_text())
    assert record["config"]["pooling"] == "max" and record["settings"]["pooling"] == "max"
    for entry in record["models"]:
        assert (
            json.loads((copy / entry["path"] / "model.json").read_text())["model_config"]["pooling"] == "max"
        )
    assert json.loads((copy / "cv" / "fold_0_0" / "settings.json").read_text())["pooling"] == "max"
    assert main([*argv, "--resume"]) == 0  # the same settings: continued (every fold loaded)


def test_a_second_writer_of_a_run_folder_is_refused(
    cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    out = tmp_path / "locked"
    holder = (
        "import sys, time; from milcell._locks import folder_lock\n"
        "with folder_lock(sys.argv[1], what='run folder'):\n"
        "    print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        argv = [*TRAIN_DLMI, "--data-dir", str(cohorts["dlmi"]), "--output-dir", str(out)]
        start = time.monotonic()
        assert main(argv) == 2
        line = _error_line(capsys)
        assert f"the run folder {out} is in use by process {proc.pid}" in line
        assert time.monotonic() - start < 60  # refused at once, not after waiting for the lock
        assert not (out / "config.yaml").exists()
    finally:
        proc.kill()
        proc.wait()


def test_warnings_reach_stderr_and_broken_links_are_errors(
    cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: the command hid every warning: .webp cells and subfolders were dropped with exit 0
    # and an empty stderr.
    root = tmp_path / "dlmi"
    shutil.copytree(cohorts["dlmi"], root)
    patient = next(p for p in (root / "trainset").iterdir() if p.is_dir())
    (patient / "cell.webp").write_bytes(b"RIFF")
    (patient / "more").mkdir()
    argv = ["extract-features", "--data-dir", str(root), "--format", "dlmi", "--image-size", "16"]
    argv += ["--output-dir", str(tmp_path / "f"), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "milcell: warning: patient" in captured.err and "cell.webp" in captured.err
    assert "more" in captured.err and "1 warning(s) above" in captured.out
    (patient / "gone.jpg").symlink_to(patient / "absent.jpg")
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "['gone.jpg']" in line and "broken links" in line


def test_evaluate_defaults_to_the_out_of_fold_estimate(
    dlmi_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Regression: evaluate defaulted to --split train, i.e. the patients the fold models trained on,
    # and printed their (in-sample) metrics with no caveat.
    target = tmp_path / "oof.json"
    assert main(["evaluate", "--run", str(dlmi_run), "--output", str(target)]) == 0
    out = capsys.readouterr().out
    assert "out-of-fold estimate" in out
    result = json.loads(target.read_text())
    assert result["split"] == "oof"
    assert result["summary"] == json.loads((dlmi_run / "run.json").read_text())["summary"]
    argv = ["evaluate", "--run", str(dlmi_run), "--split", "train", "--output", str(tmp_path / "t.json")]
    assert main([*argv, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "CAUTION: 10 of these samples trained the fold models" in captured.out
    assert "milcell: warning: 10 of the 10 evaluated samples" in captured.err


def test_predict_rejects_test_ids_that_trained_the_models(
    dlmi_run: Path, cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "dlmi"
    shutil.copytree(cohorts["dlmi"], root)
    train_ids = json.loads((dlmi_run / "run.json").read_text())["train_ids"]
    test_csv = next((root / "testset").glob("*.csv"))
    with open(test_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    (root / "testset" / rows[0]["ID"]).rename(root / "testset" / train_ids[0])
    rows[0]["ID"] = train_ids[0]
    with open(test_csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    argv = ["predict", "--run", str(dlmi_run), "--data-dir", str(root), "--output", str(tmp_path / "s.csv")]
    assert main(argv) == 2
    assert f"also training IDs of the run ({train_ids[0]})" in _error_line(capsys)


@pytest.mark.slow
def test_train_calibrate_then_predict_alpha_writes_sets_and_refer_flags(
    dlmi_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cohort = make_cohort(tmp_path / "dlmi", n_patients=26, seed=3, image_size=32, bag_size=(2, 3))
    out = tmp_path / "calibrated"
    args = ["train", "--data-dir", str(cohort), "--format", "dlmi", "--image-size", "32"]
    assert main([*args, *FAST, "--output-dir", str(out), "--calibrate", "temperature"]) == 0
    assert "calibration" in json.loads((out / "run.json").read_text())
    target = tmp_path / "sub.csv"
    argv = ["predict", "--run", str(out), "--output", str(target), "--alpha", "0.2", "--no-progress"]
    assert main(argv) == 0
    assert "sub_calibrated.csv" in capsys.readouterr().out
    with open(tmp_path / "sub_calibrated.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    with open(target, newline="") as fh:
        assert [r["id"] for r in rows] == [r["Id"] for r in csv.DictReader(fh)]  # the submission's patients
    for row in rows:
        assert set(row) >= {"prob_malignant", "calprob_malignant", "prediction_set", "refer"}
        assert set(filter(None, row["prediction_set"].split("|"))) <= {"reactive", "malignant"}
        assert row["refer"] in {"0", "1"}
    assert main(["evaluate", "--run", str(out), "--split", "train", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "calibration   ECE    Brier  NLL" in printed and "referred" in printed
    # --alpha on a run trained without --calibrate (the module's dlmi run) is refused with one line.
    assert "calibration" not in json.loads((dlmi_run / "run.json").read_text())
    capsys.readouterr()
    argv = ["predict", "--run", str(dlmi_run), "--output", str(tmp_path / "p.csv"), "--alpha", "0.2"]
    assert main(argv) != 0
    assert "--calibrate" in _error_line(capsys)
    assert not (tmp_path / "p.csv").exists()  # refused before predicting


@pytest.mark.slow
def test_train_folds_file_outer_selection_and_a_one_logit_head(
    cohorts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from milcell.runs import load_run, load_samples

    samples = load_samples("dlmi", str(cohorts["dlmi"]), "train")
    folds_file = tmp_path / "folds.csv"
    rows = "".join(f"{pid},{i % 2}\n" for i, pid in enumerate(samples.ids))
    folds_file.write_text("patient_id,fold\n" + rows)
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(cohorts["dlmi"]), "--format", "dlmi", "--image-size", "32"]
    extra = ["--folds-file", str(folds_file), "--selection", "outer", "--one-logit", "--pos-weight", "2"]
    assert main([*args, *FAST, "--output-dir", str(out), *extra]) == 0
    printed = capsys.readouterr().out
    assert f"2 fixed folds ({folds_file})" in printed and "optimistic" in printed
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["split"] == str(folds_file) and config["selection"] == "outer"
    assert config["one_logit"] is True and config["pos_weight"] == 2.0
    run = load_run(out)
    assert all(m.one_logit for m in run.models) and "optimistic" in run.table()
    with open(out / "oof_predictions.csv", newline="") as fh:
        oof = {row["id"]: row for row in csv.DictReader(fh)}
    assert {pid: i % 2 for i, pid in enumerate(samples.ids)} == {
        pid: int(row["fold"]) for pid, row in oof.items()
    }
    assert main(["evaluate", "--run", str(out), "--split", "train", "--no-progress"]) == 0
    # A folds file naming a patient the data does not have: one line naming it, nothing written.
    bad = tmp_path / "bad.csv"
    bad.write_text(folds_file.read_text() + "nobody,1\n")
    capsys.readouterr()
    assert main([*args, *FAST, "--output-dir", str(tmp_path / "bad"), "--folds-file", str(bad)]) == 2
    assert "'nobody'" in _error_line(capsys) and not (tmp_path / "bad").exists()
