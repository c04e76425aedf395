"""Bad flag combinations of every ``milcell`` subcommand: one line, exit status 2, the culprit named.

Extends the table of ``tests/test_cli.py`` with the combinations it lacks: zero, negative and
non-finite numbers, incompatible flags (a clinical fusion on a layout without clinical data, a
fusion with the prediction-level pooling), unknown names, a data folder of another layout,
unusable output paths, malformed configuration values, and broken or mismatched saved runs for
``evaluate`` and ``predict``. Everything runs in-process through :func:`milcell.cli.main`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from milcell.cli import main
from milcell.data.synthetic import make_cohort
from milcell.nn.model import create_mil_model

TRAIN = [
    "train",
    "--data-dir",
    "{dlmi}",
    "--format",
    "dlmi",
    "--no-progress",
    "--folds",
    "2",
    "--output-dir",
    "{tmp}/run",
]
FEATS = ["extract-features", "--no-progress", "--output-dir", "{tmp}/feats", "--image-size", "16"]


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_err")
    return {
        "dlmi": make_cohort(root / "dlmi", n_patients=8, seed=0, image_size=16, bag_size=(2, 3)),
        "cnmc": make_cohort(
            root / "cnmc", n_patients=4, seed=0, layout="cnmc", image_size=16, bag_size=(2, 2)
        ),
        "if": make_cohort(
            root / "if", n_patients=4, seed=0, layout="imagefolder", image_size=16, bag_size=(2, 2)
        ),
    }


def _fake_run(
    folder: Path, data_format: str, class_names: list[str], clinical: list[str], data_dir: Path
) -> Path:
    """A saved run in the layout ``milcell train`` writes (one untrained fold model)."""
    model = create_mil_model(
        "milcell_mini_resnet_k8",
        pooling="mean",
        fusion="concat" if clinical else "linear",
        num_classes=len(class_names),
        clinical_dim=len(clinical),
    )
    model_dir = folder / "models" / "fold_0_0"
    model_dir.mkdir(parents=True)
    safetensors.torch.save_model(model, str(model_dir / "model.safetensors"))
    scaler = None
    if clinical:
        n = len(clinical)
        scaler = {
            "names": clinical,
            "method": "minmax",
            "fill": [0.0] * n,
            "scale": [1.0] * n,
            "offset": [0.0] * n,
        }
    meta = {"model_config": model.config, "clinical_scaler": scaler, "repeat": 0, "fold": 0}
    (model_dir / "model.json").write_text(json.dumps(meta))
    record = {
        "format": "milcell.run",
        "format_version": 1,
        "data_format": data_format,
        "class_names": class_names,
        "clinical_names": clinical,
        "image_size": 16,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "max_instances": None,
        "models": [{"path": "models/fold_0_0", "repeat": 0, "fold": 0}],
    }
    (folder / "run.json").write_text(json.dumps(record))
    (folder / "config.yaml").write_text(f"command: train\ndata_dir: {data_dir}\nformat: {data_format}\n")
    return folder


@pytest.fixture(scope="module")
def paths(cohorts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("cli_err_files")
    (tmp / "afile").write_text("not a folder\n")
    runs = tmp / "runs"
    dlmi_run = _fake_run(
        runs / "dlmi", "dlmi", ["reactive", "malignant"], ["age", "lymph_count", "sex"], cohorts["dlmi"]
    )
    if_classes = ["Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil"]
    if_run = _fake_run(runs / "if", "imagefolder", if_classes, [], cohorts["if"])
    # broken runs
    bad_json = runs / "bad_json"
    bad_json.mkdir()
    (bad_json / "run.json").write_text("{not json")
    other = runs / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"format": "something.else", "models": [1]}))
    no_model = _fake_run(runs / "no_model", "dlmi", ["reactive", "malignant"], [], cohorts["dlmi"])
    (no_model / "models" / "fold_0_0" / "model.json").unlink()
    truncated = _fake_run(runs / "truncated", "dlmi", ["reactive", "malignant"], [], cohorts["dlmi"])
    weights = truncated / "models" / "fold_0_0" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    no_cfg = _fake_run(runs / "no_cfg", "dlmi", ["reactive", "malignant"], [], cohorts["dlmi"])
    (no_cfg / "config.yaml").unlink()
    no_format = _fake_run(runs / "no_format", "dlmi", ["reactive", "malignant"], [], cohorts["dlmi"])
    record = json.loads((no_format / "run.json").read_text())
    del record["data_format"]
    (no_format / "run.json").write_text(json.dumps(record))
    odd_meta = _fake_run(runs / "odd_meta", "dlmi", ["reactive", "malignant"], [], cohorts["dlmi"])
    meta = json.loads((odd_meta / "models" / "fold_0_0" / "model.json").read_text())
    meta["model_config"]["wings"] = 2
    (odd_meta / "models" / "fold_0_0" / "model.json").write_text(json.dumps(meta))
    # configuration files with malformed values
    cfg = tmp / "cfg"
    cfg.mkdir()
    files = {
        "list": "epochs: [1, 2]\n",
        "bool_lr": "lr: true\n",
        "dict": "format: {a: 1}\n",
        "float_folds": '{"folds": 2.5}',
        "inf_lr": "lr: .inf\n",
        "neg_workers": "num-workers: -2\n",
        "list_backbone": "backbone: [resnet18]\n",
        "int_data_dir": "data-dir: 123\nformat: dlmi\n",
        "int_monitor": "monitor: 5\n",
    }
    for name, text in files.items():
        (cfg / (name + (".json" if text.startswith("{") else ".yaml"))).write_text(text)
    (cfg / "latin1.yaml").write_bytes("format: dlmi # caf\xe9\n".encode("latin-1"))
    (cfg / "precision.yaml").write_text(f"precision: 32\ndata-dir: {tmp / 'nowhere'}\nformat: dlmi\n")
    return {
        "tmp": str(tmp),
        "dlmi": str(cohorts["dlmi"]),
        "cnmc": str(cohorts["cnmc"]),
        "if": str(cohorts["if"]),
        "dlmi_run": str(dlmi_run),
        "if_run": str(if_run),
        "bad_json": str(bad_json),
        "other": str(other),
        "no_model": str(no_model),
        "truncated": str(truncated),
        "no_cfg": str(no_cfg),
        "no_format": str(no_format),
        "odd_meta": str(odd_meta),
        "cfg": str(cfg),
    }


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    # Warnings may come first (they reach stderr by default); the error is one line, the last.
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("milcell: warning: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("milcell: error: "), err
    return lines[0]


# (argv, text the one-line message must contain). {name} fields come from the `paths` fixture.
BAD = [
    # ---- train: numbers out of range
    ([*TRAIN, "--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    ([*TRAIN, "--epochs=-1"], "argument --epochs: must be a positive integer, got -1"),
    ([*TRAIN, "--batch-size", "0"], "argument --batch-size"),
    ([*TRAIN, "--lr", "0"], "argument --lr: must be a positive finite number"),
    ([*TRAIN, "--lr=-0.001"], "argument --lr: must be a positive finite number, got -0.001"),
    ([*TRAIN, "--lr", "nan"], "argument --lr"),
    ([*TRAIN, "--lr", "inf"], "argument --lr: must be a positive finite number, got inf"),
    ([*TRAIN, "--lr", "fast"], "argument --lr: invalid"),
    ([*TRAIN, "--seed=-1"], "argument --seed: must be >= 0"),
    ([*TRAIN, "--image-size", "0"], "argument --image-size"),
    ([*TRAIN, "--max-instances", "0"], "argument --max-instances"),
    ([*TRAIN, "--chunk-size", "0"], "argument --chunk-size"),
    ([*TRAIN, "--threads", "0"], "argument --threads"),
    ([*TRAIN, "--repeats", "0"], "argument --repeats"),
    ([*TRAIN, "--patience", "0"], "argument --patience"),
    ([*TRAIN, "--num-workers=-1"], "argument --num-workers: must be >= 0"),
    ([*TRAIN, "--folds", "abc"], "argument --folds"),
    ([*TRAIN, "--folds", "50"], "n_splits=50"),
    # ---- train: unknown choices and names
    ([*TRAIN, "--inputs", "video"], "argument --inputs: invalid choice: 'video'"),
    ([*TRAIN, "--sampler", "magic"], "argument --sampler: invalid choice: 'magic'"),
    ([*TRAIN, "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    ([*TRAIN, "--backbone", "nosuchnet"], "nosuchnet"),
    ([*TRAIN, "--trainable", "bogus"], "trainable must be 'all', 'head'"),
    ([*TRAIN, "--device", "quantum"], "--device 'quantum' is not a torch device"),
    ([*TRAIN, "--pooling", "Mean"], "unknown pooling 'Mean'"),
    # ---- train: incompatible combinations
    (
        ["train", "--data-dir", "{cnmc}", "--format", "cnmc", "--fusion", "concat"],
        "--fusion concat fuses clinical attributes, but the cnmc layout has none",
    ),
    (
        ["train", "--data-dir", "{if}", "--format", "imagefolder", "--fusion", "moe"],
        "the imagefolder layout has none",
    ),
    ([*TRAIN, "--inputs", "image", "--fusion", "gated"], "--inputs image leaves them out"),
    (
        [*TRAIN, "--pooling", "instance_mean", "--fusion", "moe"],
        "cannot be used with --pooling instance_mean",
    ),
    (["train", "--data-dir", "{cnmc}", "--format", "cnmc", "--inputs", "clinical"], "--inputs clinical"),
    ([*TRAIN, "--fusion", "linear"], "--fusion linear uses the image only"),
    # ---- train: data folder of another layout, or not a folder; unusable output
    (["train", "--data-dir", "{dlmi}", "--format", "cnmc"], "no training_data/ folder"),
    (["train", "--data-dir", "{cnmc}", "--format", "dlmi"], "missing split folder"),
    (["train", "--data-dir", "{if}", "--format", "dlmi"], "missing split folder"),
    (["train", "--data-dir", "{tmp}/afile", "--format", "dlmi"], "is not a folder"),
    (["train", "--data-dir", "{dlmi}", "--format", "dlmi", "--output-dir", "{tmp}/afile"], "afile"),
    # ---- train: configuration values of the wrong kind
    (["train", "--config", "{cfg}/list.yaml"], "'epochs' (--epochs) must be a single value"),
    (["train", "--config", "{cfg}/bool_lr.yaml"], "'lr' (--lr) must be a single value"),
    (["train", "--config", "{cfg}/dict.yaml"], "'format' (--format) must be a single value"),
    (["train", "--config", "{cfg}/float_folds.json"], "invalid value 2.5 for 'folds'"),
    (["train", "--config", "{cfg}/inf_lr.yaml"], "for 'lr' (--lr): must be a positive finite number"),
    (["train", "--config", "{cfg}/neg_workers.yaml"], "for 'num-workers'"),
    (["train", "--config", "{cfg}/list_backbone.yaml"], "'backbone' (--backbone) must be a single value"),
    (["train", "--config", "{cfg}/latin1.yaml"], "latin1.yaml' is not UTF-8 text"),
    (["train", "--config", "{cfg}/precision.yaml"], "nowhere' does not exist"),  # `precision: 32` is fine
    (["train", "extra"], "unrecognized arguments: extra"),
    # Regression: these gave tracebacks with exit status 1.
    (
        ["train", "--config", "{cfg}/int_data_dir.yaml"],
        "'data-dir' (--data-dir) must be a string, got int 123",
    ),
    (["train", "--config", "{cfg}/int_monitor.yaml"], "'monitor' (--monitor) must be a string, got int 5"),
    ([*TRAIN, "--monitor", "auc"], "monitor must name an epoch-log key starting with 'val_'"),
    # ---- evaluate / predict
    (["evaluate", "--run", "{tmp}/absent"], "run folder '{tmp}/absent' does not exist"),
    (["evaluate", "--run", "{tmp}/afile"], "has no run.json"),
    (["evaluate"], "missing required option(s) --run"),
    (["evaluate", "--run", "{dlmi_run}", "--batch-size", "0"], "argument --batch-size"),
    (["evaluate", "--run", "{dlmi_run}", "--method", "median"], "invalid choice: 'median'"),
    (["evaluate", "--run", "{dlmi_run}", "--split", "val"], "invalid choice: 'val'"),
    (["evaluate", "--run", "{dlmi_run}", "--device", "quantum"], "--device 'quantum'"),
    (["evaluate", "--run", "{dlmi_run}", "--split", "test", "--no-progress"], "no labelled sample"),
    (["evaluate", "--run", "{bad_json}"], "run.json' is unreadable"),
    (["evaluate", "--run", "{other}"], "is not a milcell run record"),
    (["evaluate", "--run", "{no_model}"], "model.json' is missing"),
    (["predict", "--run", "{truncated}"], "model.safetensors"),
    (["predict", "--run", "{no_cfg}"], "--data-dir is required"),
    (["predict", "--run", "{no_format}"], "run.json' has no 'data_format'"),
    (["evaluate", "--run", "{odd_meta}"], "model.json': 'model_config' is invalid"),
    (["predict", "--run", "{if_run}", "--data-dir", "{dlmi}", "--no-progress"], "are not in class_names"),
    (["predict", "--run", "{dlmi_run}", "--data-dir", "{cnmc}", "--no-progress"], "missing split folder"),
    (["predict", "--run", "{dlmi_run}", "--data-dir", "{tmp}/absent"], "does not exist"),
    (["predict", "--run", "{dlmi_run}", "--precision", "16"], "invalid choice: '16'"),
    (["predict", "--run", "{dlmi_run}", "--output"], "argument --output: expected one argument"),
    (["predict", "--run", "{dlmi_run}", "--output", "{tmp}", "--no-progress"], "{tmp}"),
    # ---- extract-features
    ([*FEATS, "--data-dir", "{dlmi}"], "missing required option(s) --format"),
    ([*FEATS, "--format", "dlmi", "--data-dir", "{dlmi}", "--precision", "fp16"], "invalid choice: 'fp16'"),
    ([*FEATS, "--format", "dlmi", "--data-dir", "{dlmi}", "--chunk-size", "0"], "argument --chunk-size"),
    ([*FEATS, "--format", "dlmi", "--data-dir", "{dlmi}", "--batch-size=-3"], "argument --batch-size"),
    ([*FEATS, "--format", "dlmi", "--data-dir", "{dlmi}", "--backbone", "nosuchnet"], "nosuchnet"),
    (
        [*FEATS, "--format", "dlmi", "--data-dir", "{dlmi}", "--checkpoint-path", "{tmp}/none.safetensors"],
        "none.safetensors' does not exist",
    ),
    ([*FEATS, "--format", "dlmi", "--data-dir", "{dlmi}", "--checkpoint-path", "{tmp}/afile"], "afile"),
    ([*FEATS, "--format", "cnmc", "--data-dir", "{dlmi}"], "no training_data/ folder"),
    ([*FEATS, "--format", "dlmi", "--data-dir", "{dlmi}", "--output-dir", "{tmp}/afile"], "afile"),
    # ---- demo
    (["demo", "--patients", "0"], "argument --patients"),
    (["demo", "--smoke", "--patients", "2", "--output-dir", "{tmp}/d1"], "n_patients must be at least 4"),
    (["demo", "--image-size=-4"], "argument --image-size"),
    (["demo", "--max-cells", "0"], "argument --max-cells"),
    (["demo", "--lr", "inf"], "argument --lr"),
    (["demo", "--smoke", "--pooling", "nope"], "unknown pooling 'nope'"),
    (["demo", "--smoke", "--fusion", "nope"], "unknown fusion 'nope'"),
    (["demo", "--smoke", "--output-dir", "{tmp}/afile"], "afile"),
    # ---- info and the top level
    (["info", "--config", "x.yaml"], "unrecognized arguments"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_flags_give_one_line_and_status_2(
    argv: list[str], message: str, paths: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([a.format(**paths) for a in argv]) == 2
    assert message.format(**paths) in _error_line(capsys)


def test_cuda_device_without_cuda(paths: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for argv in ([*TRAIN, "--device", "cuda"], ["predict", "--run", "{dlmi_run}", "--device", "cuda:1"]):
        assert main([a.format(**paths) for a in argv]) == 2
        assert "CUDA is not available" in _error_line(capsys)


def test_incompatible_fusion_is_refused_before_the_data_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The layout alone decides it: the (absent) data folder is never looked at."""
    argv = ["train", "--data-dir", str(tmp_path / "absent"), "--format", "cnmc", "--fusion", "gated"]
    assert main(argv) == 2
    assert "--fusion gated" in _error_line(capsys)


def test_no_output_is_left_by_a_refused_train(
    paths: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(paths["tmp"]) / "refused"
    argv = [
        "train",
        "--data-dir",
        paths["cnmc"],
        "--format",
        "cnmc",
        "--fusion",
        "moe",
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 2
    _error_line(capsys)
    assert not out.exists()
