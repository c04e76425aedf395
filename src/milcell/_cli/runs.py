"""Glue between the ``train``, ``evaluate`` and ``predict`` commands and :mod:`milcell.runs`.

The work (data, cross-validation, saved runs, predictions) is done by the
library; what remains here is command-line specific: the ``--device auto``
choice, checks whose messages name flags, the run's data folder taken from
its ``config.yaml``, and the CSV files ``predict`` writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milcell.exceptions import ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from milcell.runs import SavedRun

__all__ = [
    "check_inputs",
    "evaluate_command",
    "predict_command",
    "resolve_device",
    "saved_data_dir",
    "train_command",
]

#: ``milcell train`` options passed on to :func:`milcell.runs.train_run` under the same name.
_TRAIN_OPTIONS = (
    "backbone",
    "pooling",
    "fusion",
    "inputs",
    "pretrained",
    "trainable",
    "chunk_size",
    "folds",
    "repeats",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "seed",
    "image_size",
    "augment",
    "max_instances",
    "cache_images",
    "precision",
    "monitor",
    "patience",
    "num_workers",
    "progress",
    "overwrite",
    "resume",
    "checkpoint_path",
    "features",
    "calibrate",
    "selection",
    "inner_fraction",
    "one_logit",
    "pos_weight",
    "tracking_uri",
)


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` picks CUDA when available; a CUDA device must exist."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name!r} is not a torch device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def check_inputs(cfg: Mapping[str, Any], clinical_names: Sequence[str]) -> None:
    """Reject ``--inputs`` / ``--fusion`` combinations the data cannot serve (messages name the flags)."""
    inputs = cfg.get("inputs", "both")
    if inputs == "clinical" and not clinical_names:
        raise ConfigError("--inputs clinical needs a layout with clinical attributes (dlmi)")
    if inputs == "both" and clinical_names and cfg.get("fusion") == "linear":
        raise ConfigError(
            "--fusion linear uses the image only; choose concat, moe or gated to use the clinical "
            "attributes, or --inputs image"
        )


def train_command(
    cfg: Mapping[str, Any],
    out: Path,
    before_training: Callable[[Path], None] | None = None,
    callbacks: Sequence[Any] = (),
) -> SavedRun:
    """``milcell train``: read ``--data-dir`` and cross-validate into the run folder ``out``.

    Nothing is written before :func:`milcell.runs.train_run` has validated the
    run; ``before_training(out)`` is then called (it writes ``config.yaml``).
    ``callbacks`` go to every fold's trainer (``milcell tune``'s reporter).
    """
    from milcell.runs import load_samples, train_run

    device = resolve_device(cfg["device"])
    samples = load_samples(cfg["format"], cfg["data_dir"], "train")
    check_inputs(cfg, getattr(samples, "clinical_names", ()))
    options = {key: cfg[key] for key in _TRAIN_OPTIONS if key in cfg}
    if cfg.get("logger"):
        from milcell.train.loggers import parse_logger_names

        options["loggers"] = parse_logger_names(cfg["logger"])
    if cfg.get("folds_file"):
        folds_file = Path(cfg["folds_file"])
        if not folds_file.is_file():
            raise FileNotFoundError(f"--folds-file '{folds_file}' does not exist or is not a file")
        options["split"] = folds_file
    sampler = cfg.get("sampler", "none")
    return train_run(
        samples,
        out,
        **options,
        sampler=None if sampler == "none" else sampler,
        device=device,
        data_format=cfg["format"],
        before_training=before_training,
        callbacks=callbacks,
    )


def saved_data_dir(run: SavedRun) -> str:
    """The ``data_dir`` recorded in the run's ``config.yaml`` (``--data-dir`` is required without it)."""
    import yaml

    folder = Path(run.path or ".")
    cfg_path = folder / "config.yaml"
    saved = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    data_dir = saved.get("data_dir") if isinstance(saved, dict) else None
    if not data_dir:
        raise ConfigError(f"--data-dir is required: run '{folder}' does not record its data folder")
    return str(data_dir)


def _data_format(run: SavedRun) -> str:
    fmt = run.record.get("data_format")
    if not fmt:
        raise ConfigError(
            f"run record '{Path(run.path or '.') / 'run.json'}' has no 'data_format' (the run was saved from "
            "Python without data_format); use milcell.runs.load_run(...).predict(...) instead"
        )
    return str(fmt)


def _predict_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "method": cfg["method"],
        "batch_size": cfg["batch_size"],
        "device": resolve_device(cfg["device"]),
        "precision": cfg["precision"],
        "progress": cfg["progress"],
        "features": cfg.get("features"),
    }


def evaluate_command(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``milcell evaluate``: the table and the result.

    ``--split oof`` (the default) gives the run's out-of-fold estimate for its
    training patients without reading any data; another split is predicted by
    the fold models and their vote (test patients must not be training
    patients; training patients are evaluated with a caution).
    """
    from milcell.runs import load_run, load_samples

    run = load_run(cfg["run"])
    options = _predict_options(cfg)  # validated whatever the split
    if cfg["split"] == "oof":
        table = run.table()
        calibration = run.calibration
        if calibration is not None and calibration.metrics:
            from milcell.calibration import format_calibration

            table += "\n\nout-of-fold calibration (cross-fitted over the folds)\n" + format_calibration(
                calibration.metrics
            )
        return table, {
            "data_dir": None,
            "split": "oof",
            "summary": {k: list(v) for k, v in run.summary.items()},
            "trained_on": [],
            "calibration": None if calibration is None else calibration.metrics,
        }
    data_dir = cfg.get("data_dir") or saved_data_dir(run)
    samples = load_samples(_data_format(run), data_dir, cfg["split"], run.class_names)
    if (samples.labels >= 0).sum() == 0:
        raise DataError(f"no labelled sample in '{data_dir}' (split {cfg['split']!r}); evaluate needs labels")
    evaluation = run.evaluate(
        samples, held_out=cfg["split"] == "test", refer_target=cfg.get("refer_target", 0.95), **options
    )
    result = {
        "data_dir": str(data_dir),
        "split": cfg["split"],
        "ensemble": evaluation.ensemble,
        "fold_models": evaluation.fold_models,
        "trained_on": evaluation.trained_on,
        "calibration": evaluation.calibration,
    }
    return evaluation.table(), result


def predict_command(cfg: Mapping[str, Any]) -> tuple[list[Path], int]:
    """``milcell predict``: write the vote of a saved run's models on ``--data-dir`` as CSV.

    Every layout gets ``id,predicted,prob_<class>...``; for the lymphocytosis
    layout that file is ``<output>_probabilities.csv`` next to the challenge
    submission ``Id,Predicted`` (one row per patient of the split, in CSV
    order). Returns the files written and the number of samples.
    """
    from milcell.runs import load_run, load_samples

    run = load_run(cfg["run"])
    options = _predict_options(cfg)
    if cfg.get("alpha") is None and (cfg.get("mondrian") or cfg.get("conformal_score") not in (None, "lac")):
        raise ConfigError("--conformal-score and --mondrian shape the prediction sets: they need --alpha")
    if cfg.get("alpha") is not None and run.calibration is None:
        raise ConfigError(
            f"--alpha needs a calibrated run: '{run.path}' was trained without --calibrate (train it again "
            "with --calibrate temperature)"
        )
    fmt = _data_format(run)
    data_dir = cfg.get("data_dir") or saved_data_dir(run)
    split = cfg.get("split") or ("all" if fmt == "cnmc" else "test")
    samples = load_samples(fmt, data_dir, split, run.class_names)
    preds = run.predict(samples, held_out=split == "test", **options)
    default_name = "submission.csv" if fmt == "dlmi" else "predictions.csv"
    target = Path(cfg.get("output") or (Path(cfg["run"]) / default_name))
    written = [preds.write_csv(target)] if fmt != "dlmi" else []
    if fmt == "dlmi":
        probabilities = target.with_name(f"{target.stem}_probabilities.csv")
        written = [preds.write_submission(target), preds.write_csv(probabilities)]
    if cfg.get("alpha") is not None:
        written.append(
            _write_calibrated(
                run,
                preds,
                target,
                cfg["alpha"],
                cfg.get("refer_target", 0.95),
                score=cfg.get("conformal_score") or "lac",
                mondrian=bool(cfg.get("mondrian")),
            )
        )
    return written, len(preds.ids)


def _write_calibrated(
    run: SavedRun,
    preds: Any,
    target: Path,
    alpha: float,
    refer_target: float,
    *,
    score: str = "lac",
    mondrian: bool = False,
) -> Path:
    """``<output>_calibrated.csv``: probability, calibrated probability, prediction set and refer flag."""
    import numpy as np

    from milcell._utils import write_dict_csv

    calibration = run.calibration
    assert calibration is not None  # checked by predict_command before predicting
    mean = np.mean(np.stack(preds.fold_probabilities).astype(np.float64), axis=0)
    rows = calibration.rows(
        preds.ids, mean, run.class_names, alpha=alpha, score=score, mondrian=mondrian, target=refer_target
    )
    path = target.with_name(f"{target.stem}_calibrated.csv")
    write_dict_csv(rows, path)
    return path
