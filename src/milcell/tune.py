"""Hyper-parameter search over the options of a run, scored by patient-level cross-validation.

A trial trains one cross-validated run (:func:`milcell.runs.train_run`) with
options drawn from a :class:`SearchSpace`; its score is the run's mean
out-of-fold ``balanced_accuracy`` or ``auc`` over the folds (the honest,
nested estimate of ``selection="inner"``). While a trial trains, every epoch
reports the selection-set value of the metric (``val_<metric>``), and a
pruner stops trials that fall behind the others at the same epoch.

Two backends run the same space and objective:

- ``"optuna"`` (default, embedded): an Optuna study in the SQLite file
  ``output_dir/study.db`` (inspect it with ``optuna-dashboard`` or
  :func:`optuna.load_study`); rerunning continues the study up to
  ``n_trials`` finished trials. TPE sampling seeded by ``seed``, pruning with
  :class:`optuna.pruners.MedianPruner` (``pruner="median"``) or none.
- ``"ray"``: Ray Tune on a running cluster (``address``) or a local Ray,
  each trial with ``cpus_per_trial`` / ``gpus_per_trial``; pruning with
  :class:`ray.tune.schedulers.ASHAScheduler`; results under
  ``output_dir/ray`` (an interrupted search is restored from there).

Each trial trains in ``output_dir/trials/<trial>/`` (a saved run), and the
best parameters go to ``output_dir/best.json``. ``milcell tune --config
space.yaml`` also writes ``output_dir/best/config.yaml``, which ``milcell
train --config`` turns into the best trial's run, with the same score.

The search space
----------------
One entry per option of :func:`~milcell.runs.train_run` (``lr``,
``pooling``, ``fusion``, ``max_instances``, ``trainable``, ``epochs``,
``batch_size``, ``inner_fraction``, ...)::

    lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
    inner_fraction: {type: uniform, low: 0.15, high: 0.3}
    max_instances: {type: int, low: 8, high: 64, log: true}
    pooling: {type: categorical, choices: [mean, attention, gated_attention]}

``loguniform`` / ``uniform``: a float in ``[low, high]``; ``int``: an integer
in ``[low, high]`` (``log: true`` samples its logarithm uniformly, ``step``
spaces the values); ``categorical``: one of ``choices`` (strings, numbers,
booleans or null).

Optuna, Ray and their dependencies are imported only by the backend in use
(``pip install "milcell[tune]"`` for Optuna, ``"milcell[ray]"`` for Ray).

Examples
--------
>>> space = SearchSpace.from_mapping({
...     "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
...     "pooling": {"type": "categorical", "choices": ["mean", "attention"]},
... })
>>> space.names
['lr', 'pooling']
>>> space.sample(seed=0)  # doctest: +SKIP
{'lr': 0.0011..., 'pooling': 'attention'}
>>> sorted(space.sample(seed=0)) == space.names
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from milcell._utils import atomic_path, json_safe
from milcell._validation import check_choice, check_int
from milcell.exceptions import ConfigError
from milcell.train.callbacks import Callback

__all__ = [
    "BACKENDS",
    "METRICS",
    "Param",
    "SearchSpace",
    "TrialReporter",
    "TuneResult",
    "optimize",
    "tune",
]

logger = logging.getLogger("milcell")

#: Objectives: the mean over folds of these patient-level out-of-fold metrics.
METRICS = ("balanced_accuracy", "auc")
#: Search backends.
BACKENDS = ("optuna", "ray")
_TYPES = ("uniform", "loguniform", "int", "categorical")
_HINT = 'pip install "milcell[tune]"'


@dataclasses.dataclass(frozen=True)
class Param:
    """One dimension of a :class:`SearchSpace`.

    Attributes
    ----------
    name : str
        The option (a keyword of :func:`milcell.runs.train_run`).
    type : {"uniform", "loguniform", "int", "categorical"}
    low, high : float or int, optional
        Bounds (inclusive) of the numeric types.
    choices : tuple, optional
        The values of ``categorical``.
    log : bool, default False
        ``int``: sample the logarithm uniformly.
    step : int, optional
        ``int``: spacing of the values.

    Examples
    --------
    >>> Param.from_mapping("epochs", {"type": "int", "low": 2, "high": 8, "step": 2})
    Param(name='epochs', type='int', low=2, high=8, choices=None, log=False, step=2)
    >>> Param.from_mapping("lr", {"type": "loguniform", "low": 0.1, "high": 0.01})
    Traceback (most recent call last):
    ...
    milcell.exceptions.ConfigError: search space: 'lr': low (0.1) must be below high (0.01)
    """

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    log: bool = False
    step: int | None = None

    @classmethod
    def from_mapping(cls, name: str, spec: Any) -> Param:
        """Validate one entry of the YAML schema (see the module docstring)."""
        where = f"search space: {name!r}"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where} must be a mapping like {{type: loguniform, low: ..., high: ...}}")
        kind = spec.get("type")
        if kind not in _TYPES:
            raise ConfigError(f"{where}: type must be one of {', '.join(_TYPES)}, got {kind!r}")
        allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high"}
        if kind == "int":
            allowed |= {"log", "step"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {unknown} for type {kind!r} (known: {sorted(allowed)})"
            )
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ConfigError(f"{where}: categorical needs a non-empty list of choices")
            bad = [c for c in choices if c is not None and not isinstance(c, (str, int, float, bool))]
            if bad:
                raise ConfigError(f"{where}: choices must be strings, numbers, booleans or null, got {bad}")
            return cls(name, kind, choices=tuple(choices))
        low, high = spec.get("low"), spec.get("high")
        for label, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{where}: {label} must be a finite number, got {value!r}")
        assert low is not None and high is not None
        if low >= high:
            raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
        if kind != "int":
            return cls(name, kind, float(low), float(high))
        if low != int(low) or high != int(high):
            raise ConfigError(f"{where}: int bounds must be whole numbers, got {low}, {high}")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{where}: log must be true or false, got {log!r}")
        step = spec.get("step")
        if step is not None:
            step = check_int(step, f"{where}: step", low=1)
            if log and step != 1:
                raise ConfigError(f"{where}: log and step > 1 exclude each other")
        if log and low <= 0:
            raise ConfigError(f"{where}: log needs low >= 1, got {low}")
        return cls(name, kind, int(low), int(high), log=log, step=step)

    def suggest(self, trial: Any) -> Any:
        """Draw the value from an Optuna trial (``trial.suggest_*``)."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices or ()))
        if self.type == "int":
            return trial.suggest_int(
                self.name, int(self.low or 0), int(self.high or 0), step=self.step or 1, log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, log=self.type == "loguniform")

    def _bounds(self) -> tuple[float, float]:
        if self.low is None or self.high is None:
            raise ConfigError(f"search space: {self.name!r} ({self.type}) has no bounds")
        return float(self.low), float(self.high)

    def to_ray(self) -> Any:
        """The Ray Tune search domain of this dimension (``uniform``, ``loguniform``, ``randint``...)."""
        from ray import tune as ray_tune

        if self.type == "categorical":
            return ray_tune.choice(list(self.choices or ()))
        lo, hi = self._bounds()
        if self.type == "uniform":
            return ray_tune.uniform(lo, hi)
        if self.type == "loguniform":
            return ray_tune.loguniform(lo, hi)
        low, high = int(lo), int(hi)
        if self.log:
            return ray_tune.lograndint(low, high + 1)
        if self.step and self.step > 1:
            return ray_tune.qrandint(low, high, self.step)
        return ray_tune.randint(low, high + 1)  # the upper bound of randint is exclusive


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Named :class:`Param` dimensions over the options of a run.

    Examples
    --------
    >>> SearchSpace.from_mapping({"max_instances": {"type": "int", "low": 8, "high": 32}}).names
    ['max_instances']
    >>> SearchSpace.from_mapping({"dropout": {"type": "uniform", "low": 0, "high": 1}},
    ...                          allowed=["lr", "pooling"])
    Traceback (most recent call last):
    ...
    milcell.exceptions.ConfigError: search space: 'dropout' is not an option of a run; options: lr, pooling
    """

    params: tuple[Param, ...]

    @classmethod
    def from_mapping(cls, mapping: Any, allowed: Sequence[str] | None = None) -> SearchSpace:
        """Validate ``name -> spec`` entries; with ``allowed``, names must be among them."""
        if not isinstance(mapping, Mapping) or not mapping:
            raise ConfigError("search space: needs a non-empty mapping of option names to specifications")
        params = []
        for name, spec in mapping.items():
            key = str(name).replace("-", "_")
            if allowed is not None and key not in allowed:
                raise ConfigError(
                    f"search space: {name!r} is not an option of a run; options: {', '.join(sorted(allowed))}"
                )
            params.append(Param.from_mapping(key, spec))
        return cls(tuple(params))

    @property
    def names(self) -> list[str]:
        """The option names, in order."""
        return [p.name for p in self.params]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """``name -> value`` drawn from an Optuna trial."""
        return {p.name: p.suggest(trial) for p in self.params}

    def to_ray(self) -> dict[str, Any]:
        """``name -> Ray Tune domain`` (a ``param_space`` of :class:`ray.tune.Tuner`)."""
        return {p.name: p.to_ray() for p in self.params}

    def sample(self, seed: int = 0) -> dict[str, Any]:
        """One random point (uniform in each dimension, log-uniform where asked), without any backend."""
        import numpy as np

        rng = np.random.default_rng(seed)
        out: dict[str, Any] = {}
        for p in self.params:
            if p.type == "categorical":
                choices = list(p.choices or ())
                out[p.name] = choices[int(rng.integers(len(choices)))]
            elif p.type == "uniform":
                out[p.name] = float(rng.uniform(*p._bounds()))
            elif p.type == "loguniform":
                lo, hi = p._bounds()
                out[p.name] = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            else:
                step = p.step or 1
                values = list(range(int(p.low or 0), int(p.high or 0) + 1, step))
                out[p.name] = values[int(rng.integers(len(values)))]
        return out


class TrialReporter(Callback):
    """Trainer callback of a trial: reports ``val_<metric>`` every epoch; stops a pruned trial.

    The step is ``fold_index * max_epochs + epoch`` (folds in the order they
    train), so trials are compared at the same fold and epoch. ``report(value,
    step)`` returns True when the trial should stop; the reporter then raises
    ``prune_error()``, marked (``tracking_status = "KILLED"``) so that the
    tracking runs of the trial (``milcell tune`` with ``logger:``) end
    ``KILLED`` rather than ``FAILED``; a trial Ray's scheduler stops exits the
    same way (Ray raises :class:`SystemExit` in it).

    Parameters
    ----------
    metric : {"balanced_accuracy", "auc"}
    report : callable
        ``(value, step) -> bool``.
    prune_error : callable
        ``() -> Exception`` raised to stop the trial.

    Examples
    --------
    >>> seen = []
    >>> reporter = TrialReporter("auc", lambda v, s: seen.append((s, v)) or False, RuntimeError)
    >>> class T: max_epochs = 3
    >>> reporter.on_fit_start(T(), {}); reporter.on_epoch_end(T(), {"epoch": 2, "val_auc": 0.7})
    >>> reporter.on_fit_start(T(), {}); reporter.on_epoch_end(T(), {"epoch": 1, "val_auc": 0.6})
    >>> seen
    [(2, 0.7), (4, 0.6)]
    """

    def __init__(
        self,
        metric: str,
        report: Callable[[float, int], bool],
        prune_error: Callable[[], BaseException],
    ) -> None:
        self.metric = check_choice(metric, "metric", METRICS)
        self._report = report
        self._prune_error = prune_error
        self._fold = -1
        self._epochs = 1

    def on_fit_start(self, trainer: Any, logs: Mapping[str, Any]) -> None:
        """A new fold starts."""
        self._fold += 1
        self._epochs = int(getattr(trainer, "max_epochs", 1))

    def on_epoch_end(self, trainer: Any, logs: Mapping[str, float]) -> None:
        """Report the epoch's selection-set metric; raise when the backend prunes the trial."""
        value = logs.get(f"val_{self.metric}")
        if value is None or not math.isfinite(float(value)):
            return
        step = max(self._fold, 0) * self._epochs + int(logs.get("epoch", 0))
        if self._report(float(value), step):
            error = self._prune_error()
            # A pruned trial is stopped, not broken: its tracking runs end KILLED (see finish_on_error).
            with contextlib.suppress(AttributeError):
                error.tracking_status = "KILLED"  # type: ignore[attr-defined]
            raise error


@dataclasses.dataclass
class TuneResult:
    """What :func:`optimize` / :func:`tune` return.

    Attributes
    ----------
    best_params : dict
        The options of the best trial.
    best_value : float
        Its score (mean out-of-fold metric over the folds).
    best_trial : str
        Its name (the folder under ``output_dir/trials``).
    trials : list of dict
        Every finished trial: ``name``, ``state`` (``complete``, ``pruned``,
        ``failed``), ``value``, ``params``.
    metric : str
    backend : str
    output_dir : Path
    """

    best_params: dict[str, Any]
    best_value: float
    best_trial: str
    trials: list[dict[str, Any]]
    metric: str
    backend: str
    output_dir: Path

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what ``best.json`` holds)."""
        return {
            "metric": self.metric,
            "backend": self.backend,
            "best_params": json_safe(self.best_params),
            "best_value": self.best_value,
            "best_trial": self.best_trial,
            "trials": json_safe(self.trials),
        }


RunTrial = Callable[[dict[str, Any], Path, TrialReporter], float]


def optimize(
    run_trial: RunTrial,
    space: SearchSpace | Mapping[str, Any],
    output_dir: str | os.PathLike[str],
    *,
    metric: str = "balanced_accuracy",
    n_trials: int = 20,
    backend: str = "optuna",
    pruner: Any = "median",
    seed: int = 0,
    study_name: str = "milcell",
    address: str | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
) -> TuneResult:
    """Search ``space`` with ``run_trial(params, trial_dir, reporter) -> score`` (maximised).

    :func:`tune` calls it with :func:`milcell.runs.train_run` as the trial;
    ``milcell tune`` with ``milcell train``'s.

    Parameters
    ----------
    run_trial : callable
        Trains one trial in ``trial_dir`` with the options ``params``, passing
        ``reporter`` to its trainers as a callback; returns the score.
    space : SearchSpace or mapping
        The search space (a mapping is read with :meth:`SearchSpace.from_mapping`).
    output_dir : path-like
        ``study.db`` (Optuna) or ``ray/`` (Ray), ``trials/``, ``best.json``.
    metric : {"balanced_accuracy", "auc"}, default "balanced_accuracy"
        What the reporter reports (``val_<metric>`` per epoch).
    n_trials : int, default 20
        Finished trials the study should hold (Optuna: a rerun adds only the
        missing ones).
    backend : {"optuna", "ray"}, default "optuna"
    pruner : {"median", "none"} or object, default "median"
        Optuna: :class:`~optuna.pruners.MedianPruner` (defaults: 5 trials
        before pruning starts) or none, or any Optuna pruner. Ray:
        ``"median"`` means :class:`~ray.tune.schedulers.ASHAScheduler`, or
        any Ray scheduler.
    seed : int, default 0
        Seed of the sampler (a resumed Optuna study continues with ``seed +``
        the number of trials so far, so it does not repeat its first draws).
    study_name : str, default "milcell"
    address : str, optional
        Ray: the cluster to join (``"auto"``, ``"ray://host:10001"``);
        default a local Ray.
    cpus_per_trial, gpus_per_trial : float
        Ray: each trial's share of the cluster.

    Returns
    -------
    TuneResult

    Raises
    ------
    ConfigError
        Invalid arguments, a backend that is not installed, or no trial that
        completed.
    """
    metric = check_choice(metric, "metric", METRICS)
    backend = check_choice(backend, "backend", BACKENDS)
    n_trials = check_int(n_trials, "n_trials", low=1)
    seed = check_int(seed, "seed", low=0)
    if not isinstance(space, SearchSpace):
        space = SearchSpace.from_mapping(space)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if backend == "optuna":
        result = _optimize_optuna(run_trial, space, out, metric, n_trials, pruner, seed, study_name)
    else:
        result = _optimize_ray(
            run_trial,
            space,
            out,
            metric,
            n_trials,
            pruner,
            seed,
            study_name,
            address,
            cpus_per_trial,
            gpus_per_trial,
        )
    with atomic_path(out / "best.json") as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
    logger.info(
        "tune: best %s %.4f with %s (trial %s)",
        metric,
        result.best_value,
        result.best_params,
        result.best_trial,
    )
    return result


def _optimize_optuna(
    run_trial: RunTrial,
    space: SearchSpace,
    out: Path,
    metric: str,
    n_trials: int,
    pruner: Any,
    seed: int,
    study_name: str,
) -> TuneResult:
    try:
        import optuna
    except ImportError:
        raise ConfigError(
            f"backend='optuna' needs the 'optuna' package, which is not installed: {_HINT}"
        ) from None
    if isinstance(pruner, str):
        pruner = check_choice(pruner, "pruner", ("median", "none"))
        pruner = optuna.pruners.MedianPruner() if pruner == "median" else optuna.pruners.NopPruner()
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    probe = optuna.create_study(
        study_name=study_name, storage=storage, load_if_exists=True, direction="maximize"
    )
    done_states = (
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.FAIL,
    )
    finished = len(probe.get_trials(deepcopy=False, states=done_states))
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed + len(probe.trials)),
        pruner=pruner,
    )
    remaining = n_trials - finished
    if finished:
        logger.info(
            "tune: study %s in %s holds %d finished trials; %d to go", study_name, out, finished, remaining
        )

    def objective(trial: Any) -> float:
        params = space.suggest(trial)

        def report(value: float, step: int) -> bool:
            trial.report(value, step)
            return bool(trial.should_prune())

        reporter = TrialReporter(metric, report, optuna.TrialPruned)
        name = f"trial_{trial.number:04d}"
        logger.info("tune: %s with %s", name, params)
        return float(run_trial(params, out / "trials" / name, reporter))

    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=())
    states = {
        optuna.trial.TrialState.COMPLETE: "complete",
        optuna.trial.TrialState.PRUNED: "pruned",
        optuna.trial.TrialState.FAIL: "failed",
    }
    trials: list[dict[str, Any]] = [
        {
            "name": f"trial_{t.number:04d}",
            "state": states[t.state],
            "value": t.value,
            "params": dict(t.params),
        }
        for t in study.get_trials(deepcopy=False, states=done_states)
    ]
    completed = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    if not completed:
        raise ConfigError(f"tune: no trial of study {study_name!r} in {out} completed")
    best = max(completed, key=lambda t: t["value"])
    return TuneResult(dict(best["params"]), float(best["value"]), best["name"], trials, metric, "optuna", out)


def _optimize_ray(
    run_trial: RunTrial,
    space: SearchSpace,
    out: Path,
    metric: str,
    n_trials: int,
    pruner: Any,
    seed: int,
    study_name: str,
    address: str | None,
    cpus_per_trial: float,
    gpus_per_trial: float,
) -> TuneResult:
    try:
        import ray
        from ray import tune as ray_tune
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search import BasicVariantGenerator
    except ImportError:
        raise ConfigError(
            "backend='ray' needs 'ray[tune]', which is not installed: pip install \"milcell[ray]\""
        ) from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    scheduler = pruner
    if isinstance(pruner, str):
        pruner = check_choice(pruner, "pruner", ("median", "none"))
        scheduler = ASHAScheduler(time_attr="step", grace_period=1) if pruner == "median" else None
    trials_dir = (out / "trials").resolve()
    names = space.names

    class _Stop(Exception):
        pass

    def trainable(config: dict[str, Any]) -> None:
        params = {k: config[k] for k in names}
        name = f"trial_{ray_tune.get_context().get_trial_id()}"

        def report(value: float, step: int) -> bool:
            ray_tune.report({"score": value, "step": step, "final": 0})
            return False  # the scheduler stops the trial itself

        score = float(run_trial(params, trials_dir / name, TrialReporter(metric, report, _Stop)))
        ray_tune.report({"score": score, "step": 10**9, "final": 1, "trial_name": name})

    resources = {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
    storage = (out / "ray").resolve()
    path = storage / study_name
    if ray_tune.Tuner.can_restore(str(path)):
        tuner = ray_tune.Tuner.restore(
            str(path), trainable=ray_tune.with_resources(trainable, resources), resume_errored=True
        )
    else:
        tuner = ray_tune.Tuner(
            ray_tune.with_resources(trainable, resources),
            param_space=space.to_ray(),
            tune_config=ray_tune.TuneConfig(
                metric="score",
                mode="max",
                num_samples=n_trials,
                scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=seed),
            ),
            run_config=ray_tune.RunConfig(name=study_name, storage_path=str(storage), verbose=0),
        )
    grid = tuner.fit()
    trials: list[dict[str, Any]] = []
    for index in range(len(grid)):
        res = grid[index]
        final = res.metrics or {}
        complete = res.error is None and final.get("final") == 1
        trials.append(
            {
                "name": final.get("trial_name", res.path),
                "state": "complete" if complete else ("failed" if res.error else "pruned"),
                "value": final.get("score") if complete else None,
                "params": {k: (res.config or {}).get(k) for k in names},
            }
        )
    completed = [t for t in trials if t["state"] == "complete"]
    if not completed:
        raise ConfigError(f"tune: no Ray trial in {path} completed")
    best = max(completed, key=lambda t: t["value"])
    return TuneResult(
        dict(best["params"]), float(best["value"]), str(best["name"]), trials, metric, "ray", out
    )


def run_options() -> list[str]:
    """The options of :func:`milcell.runs.train_run` a search space may vary."""
    from milcell.runs import train_run

    excluded = {"samples", "output_dir", "before_training", "loggers", "callbacks", "overwrite", "resume"}
    return [name for name in inspect.signature(train_run).parameters if name not in excluded]


def tune(
    samples: Any,
    space: SearchSpace | Mapping[str, Any],
    output_dir: str | os.PathLike[str],
    *,
    train_options: Mapping[str, Any] | None = None,
    metric: str = "balanced_accuracy",
    **kwargs: Any,
) -> TuneResult:
    """Search the options of :func:`milcell.runs.train_run` on ``samples`` (see the module docstring).

    Each trial is ``train_run(samples, output_dir/trials/<trial>, **train_options,
    **params)``; its score is the mean over folds of ``metric``.

    Parameters
    ----------
    samples : BagCohort or CellSet
        The training data.
    space : SearchSpace or mapping
        Over options of :func:`~milcell.runs.train_run`.
    output_dir : path-like
        The study's folder.
    train_options : mapping, optional
        Fixed options of every trial (``folds``, ``epochs``, ``features``,
        ``device``, ``seed``...); a searched option may not appear here.
    metric : {"balanced_accuracy", "auc"}, default "balanced_accuracy"
    **kwargs
        Passed to :func:`optimize` (``n_trials``, ``backend``, ``pruner``,
        ``seed``, ``address``, ``cpus_per_trial``, ``gpus_per_trial``...).

    Returns
    -------
    TuneResult
        Reproduce the best trial with ``train_run(samples, folder,
        **train_options, **result.best_params)``.

    Raises
    ------
    ConfigError
        A space or train option that is not an option of a run, or an
        option set both ways.
    """
    from milcell.runs import train_run

    fixed = dict(train_options or {})
    allowed = run_options()
    if not isinstance(space, SearchSpace):
        space = SearchSpace.from_mapping(space, allowed=allowed)
    unknown = [k for k in [*space.names, *fixed] if k not in allowed]
    if unknown:
        raise ConfigError(f"tune: {unknown} are not options of a run; options: {', '.join(allowed)}")
    both = [k for k in space.names if k in fixed]
    if both:
        raise ConfigError(f"tune: {both} are both searched and fixed in train_options")
    fixed.setdefault("figures", False)

    def run_trial(params: dict[str, Any], folder: Path, reporter: TrialReporter) -> float:
        run = train_run(samples, folder, **fixed, **params, callbacks=[reporter], overwrite=True)
        return float(run.summary[metric][0])

    return optimize(run_trial, space, output_dir, metric=metric, **kwargs)
