"""The ``milcell`` command: demo, train, tune, evaluate, predict, extract-features, export, info.

Every subcommand has ``--help``. Options can also come from a YAML or JSON
file (``--config FILE``) whose keys are the option names (``batch-size`` or
``batch_size``); flags typed on the command line override the file. Every run
saves its resolved options as ``config.yaml`` and ``config.json`` next to its
outputs, so ``milcell train --config run/config.yaml`` reruns it.

Errors reach the user as one line, ``milcell: error: <message>``, with exit
status 2 (``--debug`` shows the traceback); success is 0. This module is the
only part of milcell that prints.

Examples
--------
>>> from milcell.cli import main
>>> main(["info"])  # doctest: +ELLIPSIS
milcell ...
0
>>> main(["train", "--format", "dlmi", "--data-dir", "/no/such/folder"])
2
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from milcell._cli.config import add_option, resolve, save_config, set_default
from milcell.exceptions import ConfigError, MilcellError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("milcell")

PROG = "milcell"
FORMATS = ("dlmi", "cnmc", "imagefolder")
PRECISIONS = ("32", "bf16", "fp16")


class _UsageError(Exception):
    """An argparse usage error, turned into one line and exit status 2 by :func:`main`."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (the usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _folds(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"cross-validation needs at least 2 folds, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _open_unit(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def _common(parser: argparse.ArgumentParser, config: bool = True) -> None:
    group = parser.add_argument_group("general")
    if config:
        group.add_argument(
            "--config",
            metavar="FILE",
            default=argparse.SUPPRESS,
            help="YAML or JSON file of options (keys as the flags); flags override it",
        )
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    group.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress messages"
    )


def _run_options(parser: argparse.ArgumentParser, *, epochs: int | None, batch_size: int, lr: float) -> None:
    model = parser.add_argument_group("model")
    add_option(
        model, "--backbone", default="milcell_mini_resnet_k8", help="timm name or preset (milcell info)"
    )
    add_option(model, "--pooling", default="gated_attention", help="MIL pooling (milcell info)")
    train = parser.add_argument_group("training")
    add_option(train, "--folds", type=_folds, default=5, help="patient-level cross-validation folds (>= 2)")
    add_option(train, "--epochs", type=_positive_int, default=epochs, help="epochs per fold")
    add_option(train, "--batch-size", type=_positive_int, default=batch_size, help="bags per batch")
    add_option(train, "--lr", type=_positive_float, default=lr, help="Adam learning rate")
    add_option(train, "--seed", type=_non_negative_int, default=0, help="seed of data, folds and weights")
    add_option(train, "--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    add_option(train, "--threads", type=_positive_int, default=None, help="torch CPU threads")
    add_option(
        train,
        "--progress",
        dest="progress",
        action="store_true",
        default=True,
        help="progress bars (default)",
    )
    add_option(train, "--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_option(train, "--max-instances", type=_positive_int, default=None, help="cap on cells per bag")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``milcell`` command (subcommands and their options).

    Examples
    --------
    >>> parser = build_parser()
    >>> args = parser.parse_args(["train", "--format", "dlmi", "--epochs", "3"])
    >>> args.command, args.format, args.epochs
    ('train', 'dlmi', 3)
    """
    parser = _Parser(
        prog=PROG,
        description="Multiple-instance learning for blood-cell images: "
        "train, evaluate and predict from the command line.",
        epilog="Run 'milcell <command> --help' for the options of a command. Exit status: 0 success, "
        "2 bad arguments, data or files (one-line message; --debug for the traceback).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    commands: dict[str, argparse.ArgumentParser] = {}

    demo = sub.add_parser(
        "demo",
        help="synthetic lymphocytosis cohort: fusion vs image-only vs clinical-only, cross-validated",
        description="Write a synthetic lymphocytosis cohort, cross-validate gated-attention MIL with "
        "clinical fusion next to image-only and clinical-only models, print the table and write "
        "roc.png, training_curves.png and attention_montage.png to the output folder.",
    )
    add_option(demo, "--output-dir", default="milcell-demo", help="folder of the results")
    add_option(demo, "--overwrite", action="store_true", default=False, help="replace earlier demo results")
    sizes = demo.add_argument_group("size (defaults: ~2.5 minutes of CPU time on 2 cores)")
    add_option(
        sizes,
        "--smoke",
        action="store_true",
        default=False,
        help="tiny run (seconds): 16 patients, 2 folds, 1 epoch",
    )
    add_option(
        sizes,
        "--quick",
        action="store_true",
        default=False,
        help="smaller run: 50 patients, 3 folds, 8 epochs",
    )
    add_option(sizes, "--patients", type=_positive_int, default=None, help="patients in the cohort")
    add_option(sizes, "--image-size", type=_positive_int, default=None, help="cell image side in pixels")
    add_option(sizes, "--min-cells", type=_positive_int, default=None, help="fewest cells per patient")
    add_option(sizes, "--max-cells", type=_positive_int, default=None, help="most cells per patient")
    add_option(demo, "--fusion", default="concat", help="fusion head of the image + clinical model")
    add_option(demo, "--augment", action="store_true", default=True, help=argparse.SUPPRESS)
    _run_options(demo, epochs=None, batch_size=4, lr=3e-3)
    # the demo's fold count and epochs come from the preset unless given; one thread is fastest
    set_default(demo, "folds", None)
    set_default(demo, "threads", 1)
    _common(demo)
    commands["demo"] = demo

    train = sub.add_parser(
        "train",
        help="cross-validate a MIL model on a dataset and save the fold models",
        description="Cross-validate (patient level) a MIL model on a dataset folder and save the run: "
        "fold models (safetensors + JSON), out-of-fold predictions, metrics, ROC and training curves.",
    )
    data = train.add_argument_group("data")
    add_option(data, "--data-dir", metavar="DIR", help="dataset folder (required)")
    add_option(data, "--format", choices=FORMATS, help="on-disk layout (required)")
    add_option(data, "--image-size", type=_positive_int, default=64, help="images are resized to this side")
    add_option(
        data, "--cache-images", action="store_true", default=False, help="decode images once into memory"
    )
    add_option(
        data, "--no-augment", dest="augment", action="store_false", default=True, help="no flips/rotations"
    )
    add_option(
        data,
        "--features",
        metavar="DIR",
        default=None,
        help="train on the feature cache written by 'milcell extract-features' (no backbone pass)",
    )
    add_option(train, "--output-dir", default="milcell-run", help="folder of the saved run")
    add_option(
        train,
        "--overwrite",
        action="store_true",
        default=False,
        help="replace a run in --output-dir trained with other settings",
    )
    add_option(
        train,
        "--resume",
        action="store_true",
        default=False,
        help="continue the (interrupted) run in --output-dir; its settings must be the same",
    )
    add_option(
        train, "--fusion", default=None, help="fusion head (default: concat with clinical data, else linear)"
    )
    add_option(
        train, "--inputs", choices=("both", "image", "clinical"), default="both", help="what the model reads"
    )
    add_option(
        train, "--pretrained", action="store_true", default=False, help="ImageNet weights (needs the network)"
    )
    add_option(
        train, "--trainable", default="all", help="'all', 'head' (frozen backbone) or the last N stages"
    )
    add_option(
        train,
        "--checkpoint-path",
        metavar="FILE",
        default=None,
        help="local backbone weights (safetensors or torch state dict), e.g. for --trainable head offline",
    )
    add_option(train, "--chunk-size", type=_positive_int, default=None, help="instances per backbone call")
    add_option(train, "--precision", choices=PRECISIONS, default="32", help="autocast precision")
    add_option(train, "--repeats", type=_positive_int, default=1, help="repetitions of the k-fold split")
    add_option(
        train,
        "--sampler",
        choices=("none", "balanced", "oversample"),
        default="none",
        help="training sampler",
    )
    add_option(train, "--monitor", default="val_loss", help="metric selecting each fold's best epoch")
    add_option(train, "--patience", type=_positive_int, default=None, help="early-stopping patience (epochs)")
    add_option(train, "--num-workers", type=_non_negative_int, default=0, help="DataLoader workers")
    add_option(
        train, "--weight-decay", type=_non_negative_float, default=0.0, help="Adam weight decay (L2 penalty)"
    )
    add_option(
        train,
        "--calibrate",
        choices=("temperature", "vector", "platt"),
        default=None,
        help="fit a calibrator on the out-of-fold predictions and store it with the run",
    )
    add_option(
        train,
        "--folds-file",
        metavar="FILE",
        default=None,
        help="fixed folds: a CSV file with the columns patient_id and fold (replaces --folds/--repeats)",
    )
    add_option(
        train,
        "--selection",
        choices=("inner", "outer"),
        default="inner",
        help="choose each fold's epoch on an inner split of its training patients (honest, default) or "
        "on the reported fold ('outer': optimistic)",
    )
    add_option(
        train,
        "--inner-fraction",
        type=_positive_float,
        default=0.2,
        help="share of each training fold held out for --selection inner",
    )
    add_option(
        train, "--one-logit", action="store_true", default=False, help="binary: one-logit head (sigmoid, BCE)"
    )
    add_option(
        train, "--pos-weight", type=_positive_float, default=None, help="binary: positive-class loss weight"
    )
    tracking = train.add_argument_group("tracking")
    add_option(
        tracking,
        "--logger",
        action="append",
        metavar="NAME",
        default=None,
        help="experiment logger: csv, tensorboard or mlflow (repeat it or comma-separate; tensorboard and "
        'mlflow need pip install "milcell[track]")',
    )
    add_option(
        tracking,
        "--tracking-uri",
        metavar="URI",
        default=None,
        help="MLflow tracking URI (default: a local file store in OUTPUT_DIR/mlruns)",
    )
    _run_options(train, epochs=20, batch_size=4, lr=1e-3)
    _common(train)
    commands["train"] = train

    for name, text in (
        ("evaluate", "metrics of a saved run's fold models and their vote on labelled data"),
        ("predict", "predictions of a saved run (lymphocytosis: the Id,Predicted submission CSV)"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        add_option(p, "--run", metavar="DIR", help="folder written by 'milcell train' (required)")
        add_option(p, "--data-dir", metavar="DIR", default=None, help="dataset folder (default: the run's)")
        if name == "evaluate":
            add_option(
                p,
                "--split",
                choices=("oof", "train", "test", "all"),
                default="oof",
                help="'oof': the run's out-of-fold estimate for its training patients (no data read); "
                "train/test/all: predict that split (training patients give optimistic metrics)",
            )
        else:
            add_option(
                p,
                "--split",
                choices=("train", "test", "all"),
                default=None,
                help="which samples (default: test; cnmc: all)",
            )
        add_option(
            p,
            "--features",
            metavar="DIR",
            default=None,
            help="feature cache of the data (required for a run trained with --features)",
        )
        add_option(p, "--method", choices=("soft", "hard"), default="soft", help="vote of the fold models")
        add_option(
            p,
            "--refer-target",
            type=_open_unit,
            default=0.95,
            help="calibrated runs: refer the fewest patients so that the sensitivity on the rest reaches it",
        )
        if name == "predict":
            add_option(
                p,
                "--alpha",
                type=_open_unit,
                default=None,
                help="calibrated runs: write prediction sets at this error rate, the calibrated "
                "probabilities and a refer flag to <output>_calibrated.csv",
            )
            add_option(
                p,
                "--conformal-score",
                choices=("lac", "aps"),
                default="lac",
                help="with --alpha: conformity score of the prediction sets (lac: smallest sets; aps: "
                "adaptive, larger sets for uncertain patients)",
            )
            add_option(
                p,
                "--mondrian",
                action="store_true",
                default=False,
                help="with --alpha: class-conditional sets (the error rate holds within each class)",
            )
        add_option(p, "--batch-size", type=_positive_int, default=4, help="bags per batch")
        add_option(p, "--precision", choices=PRECISIONS, default="32", help="autocast precision")
        add_option(p, "--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
        add_option(p, "--threads", type=_positive_int, default=None, help="torch CPU threads")
        add_option(
            p, "--no-progress", dest="progress", action="store_false", default=True, help="no progress bars"
        )
        if name == "evaluate":
            add_option(
                p,
                "--output",
                metavar="FILE",
                default=None,
                help="metrics JSON (default: RUN/evaluation.json)",
            )
        else:
            add_option(
                p,
                "--output",
                metavar="FILE",
                default=None,
                help="CSV (default: RUN/submission.csv or predictions.csv)",
            )
        _common(p)
        commands[name] = p

    feats = sub.add_parser(
        "extract-features",
        help="embed every cell once with a frozen backbone into a feature cache",
        description="Embed every cell of a dataset with a frozen backbone and write the features "
        "(safetensors, keyed by backbone and preprocessing) to a cache folder.",
    )
    add_option(feats, "--data-dir", metavar="DIR", help="dataset folder (required)")
    add_option(feats, "--format", choices=FORMATS, help="on-disk layout (required)")
    add_option(feats, "--split", choices=("train", "test", "all"), default="all", help="which patients")
    add_option(feats, "--output-dir", default="milcell-features", help="cache folder")
    add_option(feats, "--backbone", default="milcell_mini_resnet_k8", help="timm name or preset")
    add_option(
        feats, "--pretrained", action="store_true", default=False, help="ImageNet weights (needs the network)"
    )
    add_option(feats, "--checkpoint-path", metavar="FILE", default=None, help="local backbone weights")
    add_option(feats, "--image-size", type=_positive_int, default=64, help="images are resized to this side")
    add_option(feats, "--batch-size", type=_positive_int, default=8, help="bags per batch")
    add_option(feats, "--chunk-size", type=_positive_int, default=256, help="instances per backbone call")
    add_option(feats, "--precision", choices=("32", "bf16"), default="32", help="autocast precision")
    add_option(feats, "--device", default="auto", help="'auto', 'cpu', 'cuda', ...")
    add_option(feats, "--threads", type=_positive_int, default=None, help="torch CPU threads")
    add_option(
        feats, "--no-progress", dest="progress", action="store_false", default=True, help="no progress bars"
    )
    _common(feats)
    commands["extract-features"] = feats

    export = sub.add_parser(
        "export",
        help="a saved run's patient-level model as one ONNX or TorchScript file",
        description="Export a saved run (fold models soft-voted, clinical scaling and calibration "
        "included) as one ONNX or TorchScript file mapping one bag of any size to class probabilities "
        "and per-instance attention; the preprocessing is recorded in the file's metadata.",
    )
    add_option(export, "run", metavar="RUN", help="folder written by 'milcell train'")
    add_option(export, "--format", choices=("onnx", "torchscript"), default="onnx", help="file format")
    add_option(
        export,
        "--output",
        metavar="FILE",
        default=None,
        help="file to write (default: RUN/model.onnx or .pt)",
    )
    add_option(
        export,
        "--normalize",
        action="store_true",
        default=False,
        help="image runs: normalise (mean/std) inside the graph, so inputs are images in [0, 1]",
    )
    add_option(
        export,
        "--no-calibration",
        dest="calibrated",
        action="store_false",
        default=True,
        help="leave the run's calibration out",
    )
    _common(export)
    commands["export"] = export

    tune = sub.add_parser(
        "tune",
        help="search the options of 'milcell train' by cross-validated balanced accuracy or AUC",
        description="Hyper-parameter search (Optuna, resumable, in OUTPUT_DIR/study.db; or Ray Tune) over "
        "options of 'milcell train', each trial a cross-validated run; the best trial's options are "
        "written to OUTPUT_DIR/best/config.yaml for 'milcell train --config'. The --config file holds "
        "'train' (fixed 'milcell train' options), 'space' and the settings below (flags override them).",
    )
    add_option(tune, "--config", dest="tune_config", metavar="FILE", help="the search file (required)")
    add_option(tune, "--output-dir", help="folder of the study (default: milcell-tune)")
    add_option(tune, "--n-trials", type=_positive_int, help="finished trials to reach (default: 20)")
    add_option(tune, "--backend", choices=("optuna", "ray"), help="search backend (default: optuna)")
    add_option(tune, "--address", help="Ray cluster address (default: a local Ray)")
    add_option(
        tune, "--metric", choices=("balanced_accuracy", "auc"), help="objective (default: balanced_accuracy)"
    )
    add_option(tune, "--pruner", choices=("median", "none"), help="early pruning of trials (default: median)")
    add_option(tune, "--seed", type=_non_negative_int, help="seed of the sampler (default: 0)")
    add_option(tune, "--cpus-per-trial", type=_positive_float, help="Ray: CPUs per trial (default: 1)")
    add_option(tune, "--gpus-per-trial", type=float, help="Ray: GPUs per trial (default: 0)")
    _common(tune, config=False)
    commands["tune"] = tune

    info = sub.add_parser(
        "info",
        help="registered poolings, fusions, backbone presets; versions; device",
        description="List the registered poolings, fusion heads and backbone presets, the versions of "
        "milcell, torch, timm and Python, and the compute device.",
    )
    _common(info, config=False)
    commands["info"] = info
    parser._subcommands = commands  # type: ignore[attr-defined]
    return parser


def _version() -> str:
    import milcell

    return milcell.__version__


# --------------------------------------------------------------------------- checks


def _check_name(kind: str, name: str | None, known: Sequence[str]) -> None:
    import difflib

    if name is None or name in known:
        return
    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown {kind} {name!r}{hint}; known: {', '.join(known)}")


def _require(cfg: dict[str, Any], *keys: str) -> None:
    missing = [f"--{k.replace('_', '-')}" for k in keys if cfg.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"missing required option(s) {', '.join(missing)}")


def _check_model_names(cfg: dict[str, Any]) -> None:
    from milcell.nn.fusion import list_fusions
    from milcell.nn.pooling import list_poolings

    _check_name("pooling", cfg.get("pooling"), list_poolings())
    _check_name("fusion", cfg.get("fusion"), list_fusions())


def _check_fusion(cfg: dict[str, Any]) -> None:
    """Reject a fusion head given with flags that leave it nothing to fuse (before any data is read)."""
    fusion = cfg.get("fusion")
    if fusion in (None, "linear"):
        return
    from milcell.runs import _prediction_level

    pooling = cfg.get("pooling")
    if pooling is not None and _prediction_level(pooling):
        raise ConfigError(
            f"--fusion {fusion} cannot be used with --pooling {pooling}: that pooling outputs the class "
            "scores itself (prediction-level; clinical attributes go in per instance); drop --fusion"
        )
    if cfg.get("format") in ("cnmc", "imagefolder"):
        raise ConfigError(
            f"--fusion {fusion} fuses clinical attributes, but the {cfg['format']} layout has none; "
            "use --fusion linear (or leave it out)"
        )
    if cfg.get("inputs") == "image":
        raise ConfigError(
            f"--fusion {fusion} fuses clinical attributes, but --inputs image leaves them out; "
            "use --fusion linear (or leave it out)"
        )


def _setup(cfg: dict[str, Any]) -> None:
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))


# --------------------------------------------------------------------------- commands


def _cmd_info(cfg: dict[str, Any]) -> int:
    import timm
    import torch

    from milcell.nn.backbones import BACKBONE_PRESETS
    from milcell.nn.fusion import list_fusions
    from milcell.nn.pooling import list_poolings

    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    lines = [
        f"milcell {_version()}",
        f"torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}",
        f"device: {device}; CPU threads: {torch.get_num_threads()}",
        f"poolings: {', '.join(list_poolings())}",
        f"fusions: {', '.join(list_fusions())}",
        "backbone presets (any timm name also works; 'torchvision/<name>' for torchvision):",
    ]
    width = max(len(n) for n in BACKBONE_PRESETS)
    lines += [f"  {name.ljust(width)}  {text}" for name, text in sorted(BACKBONE_PRESETS.items())]
    print("\n".join(lines))
    return 0


def _cmd_demo(cfg: dict[str, Any]) -> int:
    from milcell._cli.demo import calibration_line, demo_sizes, run_demo, write_demo_figures

    _check_model_names(cfg)
    sizes = demo_sizes(cfg)
    cfg = {**cfg, "augment": True, "max_instances": cfg.get("max_instances")}
    out = Path(cfg["output_dir"])
    start = time.perf_counter()
    result = run_demo(cfg, out)
    save_config({**cfg, **{k: v for k, v in sizes.items()}}, out, "demo")
    record = result.record
    print(
        f"Synthetic lymphocytosis cohort: {record['patients_cross_validated']} training patients, "
        f"{record['cells']} cells of {sizes['image_size']} px; {sizes['folds']}-fold patient-level "
        f"cross-validation, {sizes['epochs']} epochs (mean ± std over folds)\n"
    )
    print(result.table, flush=True)  # the table first: plotting comes after it
    line = calibration_line(record)
    if line:
        print(f"\n{line}", flush=True)
    figures = write_demo_figures(result, out)
    seconds = time.perf_counter() - start
    written = ", ".join([*(p.name for p in figures), "results.json", "summary.txt", "config.yaml"])
    print(f"\nwrote {written} to {out}/ in {seconds:.0f} s")
    return 0


def _cmd_train(cfg: dict[str, Any]) -> int:
    from milcell._cli.runs import train_command
    from milcell.runs import describe_data

    _require(cfg, "data_dir", "format")
    _check_model_names(cfg)
    _check_fusion(cfg)
    if not Path(cfg["data_dir"]).exists():
        raise FileNotFoundError(f"data directory '{cfg['data_dir']}' does not exist")
    out = Path(cfg["output_dir"])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir '{out}' is a file, not a folder")
    if cfg.get("logger"):  # repeated flags or a comma-separated string: saved as one string
        from milcell.train.loggers import parse_logger_names

        cfg["logger"] = ",".join(parse_logger_names(cfg["logger"])) or None

    # Nothing is written until the library has validated the run: config.yaml goes in just before training.
    def write_config(folder: Path) -> None:
        save_config(cfg, folder, "train")

    run = train_command(cfg, out, before_training=write_config)
    print(f"{cfg['data_dir']}: {describe_data(run.data)}")
    done = run.record.get("config") or {}
    split = f"{done.get('folds', cfg['folds'])}-fold"
    if cfg.get("folds_file"):
        split = f"{done.get('folds')} fixed folds ({cfg['folds_file']})"
    chosen = (
        "epochs chosen on the reported folds: optimistic"
        if done.get("selection") == "outer"
        else "epochs chosen on inner splits"
    )
    print(f"{split} patient-level cross-validation on {cfg['data_dir']} ({chosen}; mean ± std over folds)\n")
    print(run.table())
    print(f"\nsaved {len(run.models)} fold models, metrics and figures to {out}/")
    return 0


def _cmd_tune(cfg: dict[str, Any]) -> int:
    from milcell._cli.tune import tune_command

    result, best = tune_command(cfg)
    for trial in result.trials:
        value = "" if trial["value"] is None else f"{trial['value']:.4f}"
        print(f"{trial['name']}  {trial['state']:<8}  {value:>7}  {trial['params']}")
    print(f"\nbest {result.metric} {result.best_value:.4f} ({result.best_trial}): {result.best_params}")
    print(f"rerun it with: milcell train --config {best}")
    return 0


def _cmd_evaluate(cfg: dict[str, Any]) -> int:
    import json

    from milcell._cli.runs import evaluate_command
    from milcell._utils import atomic_path, json_safe

    _require(cfg, "run")
    table, result = evaluate_command(cfg)
    target = Path(cfg.get("output") or Path(cfg["run"]) / "evaluation.json")
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(json_safe(result), indent=2) + "\n", encoding="utf-8")
    if result["split"] == "oof":
        print(
            "out-of-fold estimate for the run's training patients: each predicted by the fold model that "
            "did not train on it (mean ± std over folds)\n"
        )
    else:
        print(f"{result['data_dir']} (split {result['split']})\n")
    print(table)
    trained_on = result.get("trained_on") or []
    if trained_on:
        print(
            f"\nCAUTION: {len(trained_on)} of these samples trained the fold models; these metrics are "
            "optimistic (the out-of-fold estimate, milcell evaluate without --split, is not)"
        )
    print(f"\nwrote {target}")
    return 0


def _cmd_predict(cfg: dict[str, Any]) -> int:
    from milcell._cli.runs import predict_command

    _require(cfg, "run")
    targets, n = predict_command(cfg)
    print(f"wrote predictions for {n} samples to {' and '.join(str(t) for t in targets)}")
    return 0


def _cmd_extract_features(cfg: dict[str, Any]) -> int:
    from milcell._cli.runs import resolve_device
    from milcell.data.datasets import BagDataset, InstanceDataset
    from milcell.data.records import BagCohort
    from milcell.nn.backbones import create_backbone
    from milcell.runs import Preprocessing, load_samples
    from milcell.train.features import extract_features

    _require(cfg, "data_dir", "format")
    samples = load_samples(cfg["format"], cfg["data_dir"], cfg["split"])
    backbone = create_backbone(
        cfg["backbone"],
        pretrained=cfg["pretrained"],
        checkpoint_path=cfg.get("checkpoint_path"),
        trainable="head",
    )
    transform = Preprocessing.from_data_config(backbone.data_config, cfg["image_size"]).transform(train=False)
    dataset = (
        BagDataset(samples, transform=transform)
        if isinstance(samples, BagCohort)
        else InstanceDataset(samples, transform)
    )
    out = Path(cfg["output_dir"])
    features = extract_features(
        backbone,
        dataset,
        out,
        batch_size=cfg["batch_size"],
        chunk_size=cfg["chunk_size"],
        precision=cfg["precision"],
        device=resolve_device(cfg["device"]),
        progress=cfg["progress"],
        key_extra={"image_size": cfg["image_size"]},
    )
    save_config(cfg, out, "extract-features")
    print(f"{len(features)} bags of {features.dim}-d features from {cfg['backbone']} cached in {out}/")
    return 0


def _cmd_export(cfg: dict[str, Any]) -> int:
    from milcell.export import export_run, read_metadata

    _require(cfg, "run")
    suffix = ".onnx" if cfg["format"] == "onnx" else ".pt"
    target = Path(cfg.get("output") or Path(cfg["run"]) / f"model{suffix}")
    path = export_run(
        cfg["run"], target, cfg["format"], normalize=cfg["normalize"], calibrated=cfg["calibrated"]
    )
    meta = read_metadata(path)
    if meta["input"] == "images":
        size = f"{meta['image_size']} px images"
    else:
        size = f"{meta['feature_dim']}-d features"
    print(
        f"exported {meta['folds']} fold model(s) ({meta['pooling']}, {size}, calibration: "
        f"{meta['calibration']}) to {path}"
    )
    return 0


_COMMANDS = {
    "demo": _cmd_demo,
    "train": _cmd_train,
    "tune": _cmd_tune,
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
    "extract-features": _cmd_extract_features,
    "export": _cmd_export,
    "info": _cmd_info,
}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, FileNotFoundError) and exc.filename and not text.startswith("data"):
        text = f"{exc.strerror or 'no such file or directory'}: '{exc.filename}'"
    return text or type(exc).__name__


class _CountingHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """Writes milcell's log records to the current ``sys.stderr`` and counts the warnings."""

    def __init__(self, level: int) -> None:
        super().__init__(sys.stderr)
        self.setLevel(level)
        self.warnings = 0
        fmt = (
            "%(asctime)s %(levelname)s %(message)s"
            if level <= logging.INFO
            else "milcell: %(levelname)s: %(message)s"
        )
        self.setFormatter(_LowerLevelFormatter(fmt, "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.warnings += 1
        self.stream = sys.stderr  # capsys and the like swap sys.stderr between calls
        super().emit(record)


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord(record.__dict__)
        record.levelname = record.levelname.lower()
        return super().format(record)


def _configure_logging(verbose: bool) -> tuple[_CountingHandler, int]:
    """Send milcell's warnings (with ``-v``: progress too) to stderr; :func:`_restore_logging` undoes it."""
    log = logging.getLogger("milcell")
    handler = _CountingHandler(logging.INFO if verbose else logging.WARNING)
    log.addHandler(handler)
    previous = log.level
    wanted = logging.INFO if verbose else logging.WARNING
    if log.getEffectiveLevel() > wanted:
        log.setLevel(wanted)
    return handler, previous


def _restore_logging(state: tuple[_CountingHandler, int] | None) -> None:
    if state is None:
        return
    handler, previous = state
    log = logging.getLogger("milcell")
    log.removeHandler(handler)
    log.setLevel(previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``milcell`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Parameters
    ----------
    argv : list of str or None
        The arguments after ``milcell``.

    Returns
    -------
    int
        0 on success; 2 for a usage error, bad options or configuration, or
        missing or malformed data, files or checkpoints (a one-line
        ``milcell: error: ...`` on stderr; ``--debug`` adds the traceback).

    Examples
    --------
    >>> main(["train", "--folds", "1"])
    2
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    parser = build_parser()
    logging_state = None
    try:
        try:
            args = parser.parse_args(args_list)
        except _UsageError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        if args.command is None:
            parser.print_help()
            return 2
        sub = parser._subcommands[args.command]  # type: ignore[attr-defined]
        cfg = resolve(sub, args)
        logging_state = _configure_logging(bool(getattr(args, "verbose", False)))
        _setup(cfg)
        code = _COMMANDS[args.command](cfg)
        if code == 0 and logging_state[0].warnings:
            print(f"{logging_state[0].warnings} warning(s) above (on stderr)")
        return code
    except (MilcellError, OSError, ValueError) as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        _restore_logging(logging_state)


if __name__ == "__main__":
    raise SystemExit(main())
