"""``milcell tune``: read the search file, validate its ``train`` options as ``milcell train`` does, search.

The search itself is :func:`milcell.tune.optimize`; each trial is ``milcell
train`` (:func:`milcell._cli.runs.train_command`) with the trial's options in
``OUTPUT_DIR/trials/<trial>/`` (its own ``config.yaml``), and the best trial's
options are written as ``OUTPUT_DIR/best/config.yaml``, which ``milcell train
--config`` reruns (into ``OUTPUT_DIR/best``).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from milcell.exceptions import ConfigError

__all__ = ["TUNE_DEFAULTS", "tune_command"]

#: The search settings (flags of ``milcell tune`` or keys of its file) and their defaults.
TUNE_DEFAULTS: dict[str, Any] = {
    "output_dir": "milcell-tune",
    "n_trials": 20,
    "backend": "optuna",
    "address": None,
    "metric": "balanced_accuracy",
    "pruner": "median",
    "seed": 0,
    "cpus_per_trial": 1.0,
    "gpus_per_trial": 0.0,
}
#: ``milcell train`` options a search space may vary.
_NOT_SEARCHED = frozenset(
    {"overwrite", "resume", "progress", "features", "checkpoint_path", "tracking_uri", "num_workers"}
)


def _searchable() -> list[str]:
    from milcell._cli.runs import _TRAIN_OPTIONS

    return [k for k in _TRAIN_OPTIONS if k not in _NOT_SEARCHED] + ["sampler"]


def _train_config(train: Any, file: str) -> dict[str, Any]:
    """The ``train`` section resolved and validated exactly as ``milcell train --config`` would."""
    import yaml

    from milcell._cli.config import resolve
    from milcell.cli import build_parser

    if not isinstance(train, Mapping):
        raise ConfigError(f"tune file '{file}': 'train' must be a mapping of 'milcell train' options")
    sub = build_parser()._subcommands["train"]  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.yaml"
        path.write_text(yaml.safe_dump({"command": "train", **dict(train)}), encoding="utf-8")
        try:
            cfg = resolve(sub, argparse.Namespace(config=str(path)))
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(path), f"{file} (section 'train')")) from None
    cfg.pop("config", None)
    return cfg


def tune_command(cfg: Mapping[str, Any]) -> tuple[Any, Path]:
    """``milcell tune``: the search result and the best trial's ``config.yaml``.

    ``cfg`` holds the flags (None: not given) and ``tune_config``, the
    search file: ``train`` (options of ``milcell train``, fixed), ``space``
    (see :mod:`milcell.tune`) and the search settings of
    :data:`TUNE_DEFAULTS` (flags override them).
    """
    from milcell._cli.config import load_config_file, save_config
    from milcell._cli.runs import train_command
    from milcell.tune import SearchSpace, TrialReporter, optimize

    file = cfg.get("tune_config")
    if not file:
        raise ConfigError("missing required option --config (the search file: train, space, ...)")
    raw = {k.replace("-", "_"): v for k, v in load_config_file(file).items()}
    unknown = sorted(set(raw) - {"train", "space", *TUNE_DEFAULTS})
    if unknown:
        raise ConfigError(
            f"tune file '{file}': unknown key(s) {unknown}; known: train, space, "
            f"{', '.join(sorted(TUNE_DEFAULTS))}"
        )
    settings: dict[str, Any] = {
        k: cfg.get(k) if cfg.get(k) is not None else raw.get(k, v) for k, v in TUNE_DEFAULTS.items()
    }
    if "space" not in raw:
        raise ConfigError(f"tune file '{file}' has no 'space' (the options to search)")
    space = SearchSpace.from_mapping(raw["space"], allowed=_searchable())
    train_cfg = _train_config(raw.get("train") or {}, str(file))
    missing = [k for k in ("data_dir", "format") if not train_cfg.get(k)]
    if missing:
        raise ConfigError(f"tune file '{file}': section 'train' needs {', '.join(missing)}")
    if not Path(train_cfg["data_dir"]).exists():
        raise FileNotFoundError(f"data directory '{train_cfg['data_dir']}' does not exist")
    fixed = [
        k
        for k in space.names
        if k in (raw.get("train") or {}) or k.replace("_", "-") in (raw.get("train") or {})
    ]
    if fixed:
        raise ConfigError(f"tune file '{file}': {fixed} are both in 'train' and in 'space'")
    out = Path(settings["output_dir"])
    metric = settings["metric"]

    def run_trial(params: dict[str, Any], folder: Path, reporter: TrialReporter) -> float:
        trial = {**train_cfg, **params, "output_dir": str(folder), "overwrite": True, "progress": False}

        def write_config(where: Path) -> None:
            save_config(trial, where, "train")

        run = train_command(trial, folder, before_training=write_config, callbacks=[reporter])
        return float(run.summary[metric][0])

    result = optimize(
        run_trial,
        space,
        out,
        metric=metric,
        n_trials=settings["n_trials"],
        backend=settings["backend"],
        pruner=settings["pruner"],
        seed=settings["seed"],
        address=settings["address"],
        cpus_per_trial=float(settings["cpus_per_trial"]),
        gpus_per_trial=float(settings["gpus_per_trial"]),
    )
    best = out / "best"
    best.mkdir(parents=True, exist_ok=True)
    save_config({**train_cfg, **result.best_params, "output_dir": str(best)}, best, "train")
    return result, best / "config.yaml"
