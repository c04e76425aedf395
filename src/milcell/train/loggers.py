"""Experiment tracking as trainer callbacks: CSV, TensorBoard and MLflow loggers.

A logger is a :class:`RunLogger`: a *tracking run* that records parameters,
metrics (one row per epoch, with the epoch as the step) and artifacts (files
and folders), and that opens *child runs*. Given to a
:class:`~milcell.train.trainer.Trainer` as a callback it records the trainer's
settings when :meth:`~milcell.train.trainer.Trainer.fit` starts and every
epoch's logs. Given to :func:`~milcell.train.crossval.cross_validate`
(``loggers=``) it becomes the parent run of one child run per fold (named
``fold_<repeat>_<fold>``, with the fold's parameters, epochs and final
metrics), and the parent gets the cross-validated summary
(``<metric>_mean`` / ``<metric>_std``); :func:`milcell.runs.train_run`
(``loggers=``) adds the resolved run configuration and, at the end, the saved
run folder and its figures as artifacts.

- :class:`CSVLogger` (``"csv"``): ``metrics.csv`` in its folder, one row per
  epoch; a child writes in the subfolder named after it. Rows the trainer
  already writes (its own ``output_dir/metrics.csv``) are not written twice,
  so the default of :func:`milcell.runs.train_run` leaves the run folder as
  it always was.
- :class:`TensorBoardLogger` (``"tensorboard"``): event files of
  :class:`torch.utils.tensorboard.SummaryWriter` (scalars per epoch, the
  parameters as text, PNG artifacts as images); a child run is a subfolder,
  so ``tensorboard --logdir FOLDER`` shows the folds side by side. Needs the
  ``tensorboard`` package.
- :class:`MLflowLogger` (``"mlflow"``): an MLflow run through
  :class:`mlflow.tracking.MlflowClient`; children are nested runs (the
  ``mlflow.parentRunId`` tag). Without a ``tracking_uri`` the runs go to a
  local file store, ``FOLDER/mlruns`` (nothing to start: ``mlflow ui
  --backend-store-uri FOLDER/mlruns`` shows them; MLflow 3 asks for
  ``MLFLOW_ALLOW_FILE_STORE=true`` for such a store, which this logger sets
  when it uses one); any tracking URI (a server, ``sqlite:///...``) otherwise.
  Needs ``mlflow`` or ``mlflow-skinny``.

A run that an error interrupts is not left ``RUNNING``: every place that
opens runs (:func:`~milcell.train.crossval.cross_validate`,
:func:`~milcell.train.noisy_student.noisy_student`,
:func:`milcell.runs.train_run`, and so the trials of :mod:`milcell.tune`)
does so under :func:`finish_on_error`, which closes the runs it opened with
``"FAILED"`` (``"KILLED"`` for a :class:`KeyboardInterrupt` or a pruned
trial) and re-raises. A logger given to a bare
:class:`~milcell.train.trainer.Trainer` as a callback is closed the same way
when ``fit`` raises (its ``on_fit_error`` hook); after a ``fit`` that ends
normally it stays open for the caller to log more and :meth:`RunLogger.finish`.

The optional packages are imported only when a logger that needs them is
built; a missing one raises a :class:`~milcell.exceptions.ConfigError` naming
the extra to install (``pip install "milcell[track]"``). :func:`make_loggers`
builds loggers from names (what ``milcell train --logger`` passes).

Examples
--------
>>> import tempfile, torch
>>> from milcell.data import Bag
>>> from milcell.nn.model import create_mil_model
>>> from milcell.train.distributed import make_loader
>>> from milcell.train.trainer import Trainer
>>> bags = [Bag(torch.randn(3, 4) + i % 2, label=i % 2, id=f"P{i}") for i in range(8)]
>>> folder = tempfile.mkdtemp()
>>> csv = CSVLogger(folder)
>>> trainer = Trainer(create_mil_model(None, pooling="mean", in_dim=4), max_epochs=2,
...                   progress=False, callbacks=[csv])
>>> _ = trainer.fit(make_loader(bags, 4, shuffle=True), make_loader(bags, 4, shuffle=False))
>>> csv.finish()
>>> open(f"{folder}/metrics.csv").readline().split(",")[:3]
['epoch', 'lr', 'train_loss']
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from milcell._utils import json_safe, write_dict_csv
from milcell.exceptions import ConfigError
from milcell.train.callbacks import Callback

__all__ = [
    "LOGGERS",
    "CSVLogger",
    "MLflowLogger",
    "RunLogger",
    "TensorBoardLogger",
    "error_status",
    "finish_on_error",
    "flatten_params",
    "make_loggers",
    "parse_logger_names",
    "trainer_params",
]

logger = logging.getLogger("milcell")

#: Logger names accepted by :func:`make_loggers` (and ``milcell train --logger``).
LOGGERS = ("csv", "tensorboard", "mlflow")
_EXTRA_HINT = 'pip install "milcell[track]"'
_MAX_PARAM_CHARS = 500


def _missing(package: str, what: str) -> ConfigError:
    return ConfigError(f"{what} needs the '{package}' package, which is not installed: {_EXTRA_HINT}")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters as flat ``"a.b" -> str`` pairs, JSON-safe, each value at most 500 characters.

    Parameters
    ----------
    params : mapping
        Any (nested) mapping; lists and other values are written as JSON.
    prefix : str, default ""
        Prepended to every key (with a dot).

    Returns
    -------
    dict of str to str

    Examples
    --------
    >>> flatten_params({"lr": 0.01, "model": {"pooling": "mean", "hidden": [64, 32]}, "fusion": None})
    {'lr': '0.01', 'model.pooling': 'mean', 'model.hidden': '[64, 32]', 'fusion': 'null'}
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
            continue
        safe = json_safe(value)
        text = safe if isinstance(safe, str) else json.dumps(safe)
        out[name] = text[:_MAX_PARAM_CHARS]
    return out


def trainer_params(trainer: Any) -> dict[str, Any]:
    """The settings of a :class:`~milcell.train.trainer.Trainer` worth recording (JSON-safe).

    Examples
    --------
    >>> import torch
    >>> from milcell.nn.model import create_mil_model
    >>> from milcell.train.trainer import Trainer
    >>> p = trainer_params(Trainer(create_mil_model(None, pooling="mean", in_dim=4), lr=0.01))
    >>> p["lr"], p["optimizer"], p["max_epochs"]
    (0.01, 'Adam', 10)
    """
    names = (
        "max_epochs",
        "precision",
        "accumulate_grad_batches",
        "gradient_clip_norm",
        "monitor",
        "mode",
        "patience",
        "min_delta",
        "seed",
        "threshold",
        "pos_weight",
        "distributed",
        "scheduler_interval",
    )
    params: dict[str, Any] = {name: getattr(trainer, name, None) for name in names}
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is not None:
        params["lr"] = float(optimizer.param_groups[0]["lr"])
        params["weight_decay"] = float(optimizer.param_groups[0].get("weight_decay", 0.0))
        params["optimizer"] = type(optimizer).__name__
    scheduler = getattr(trainer, "scheduler", None)
    params["scheduler"] = None if scheduler is None else type(scheduler).__name__
    params["device"] = str(getattr(trainer, "device", ""))
    config = getattr(getattr(trainer, "model", None), "config", None)
    if isinstance(config, Mapping):
        params["model"] = dict(config)
    result: dict[str, Any] = json_safe(params)
    return result


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite float values of ``metrics`` (others are left out: trackers refuse NaN or text)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[str(key)] = number
    return out


class RunLogger(Callback):
    """Base class of experiment loggers: a tracking run with parameters, metrics, artifacts, children.

    Subclasses implement :meth:`_open`, :meth:`log_params`,
    :meth:`log_metrics`, :meth:`log_artifacts`, :meth:`_close` and
    :meth:`_new_child`. :meth:`start` opens the run once (later calls only
    log their parameters); :meth:`finish` closes it (idempotent).

    As a trainer callback it starts the run if needed, records
    :func:`trainer_params` under ``trainer.`` when ``fit`` starts, and every
    epoch's logs with the epoch as the step.

    Parameters
    ----------
    name : str, optional
        The run's name (MLflow run name, TensorBoard/CSV subfolder of a child).

    Examples
    --------
    >>> class Memory(RunLogger):
    ...     def __init__(self): super().__init__("memory"); self.rows = []
    ...     def log_metrics(self, metrics, step=None): self.rows.append((step, dict(metrics)))
    >>> lg = Memory()
    >>> lg.on_epoch_end(None, {"epoch": 1.0, "train_loss": 0.5})
    >>> lg.rows, lg.active
    ([(1, {'epoch': 1.0, 'train_loss': 0.5})], True)
    """

    kind = "base"

    def __init__(self, name: str | None = None) -> None:
        self.name = name
        self.active = False
        self.finished = False

    # ------------------------------------------------------------------ what subclasses implement

    def _open(self) -> None:
        """Open the underlying run (called once, by :meth:`start`)."""

    def _close(self, status: str) -> None:
        """Close the underlying run (called once, by :meth:`finish`)."""

    def _new_child(self, name: str) -> RunLogger:
        """A new, not yet started logger of the same kind for the child run ``name``."""
        raise NotImplementedError(f"{type(self).__name__} has no child runs")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record parameters (nested mappings are flattened, see :func:`flatten_params`)."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record metrics (non-numeric and non-finite values are left out) at ``step``."""

    def log_artifacts(self, path: str | os.PathLike[str]) -> None:
        """Record a file, or every file of a folder."""

    # ------------------------------------------------------------------ lifecycle

    def start(self, params: Mapping[str, Any] | None = None) -> RunLogger:
        """Open the run if it is not open yet, then log ``params``; return ``self``."""
        if not self.active:
            self._open()
            self.active = True
            self.finished = False
        if params:
            self.log_params(params)
        return self

    def child(self, name: str, params: Mapping[str, Any] | None = None) -> RunLogger:
        """Start and return a child run named ``name`` (a fold), logging ``params``."""
        self.start()
        return self._new_child(name).start(params)

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run (``status``: ``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``); idempotent."""
        if self.active and not self.finished:
            self._close(status)
            self.finished = True
            self.active = False

    def log_history(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Log epoch rows (``epoch`` gives the step), e.g. a fold trained in another process."""
        for row in history:
            epoch = row.get("epoch")
            self.log_metrics(row, step=None if epoch is None else int(float(epoch)))

    # ------------------------------------------------------------------ trainer callback

    def on_fit_start(self, trainer: Any, logs: Mapping[str, Any]) -> None:
        """Start the run and record the trainer's settings (prefix ``trainer.``)."""
        self.start({"trainer": trainer_params(trainer)})

    def on_epoch_end(self, trainer: Any, logs: Mapping[str, float]) -> None:
        """Record the epoch's logs with the epoch as the step."""
        self.start()
        epoch = logs.get("epoch")
        self.log_metrics(logs, step=None if epoch is None else int(float(epoch)))

    def on_fit_error(self, trainer: Any, error: BaseException) -> None:
        """Close the run with :func:`error_status` of ``error`` (``"FAILED"`` / ``"KILLED"``)."""
        if self.active:
            self.finish(error_status(error))


class CSVLogger(RunLogger):
    """``metrics.csv`` in ``folder``: one row per logged epoch (metrics with a step).

    Parameters are not written (a saved run keeps them in ``run.json``),
    artifacts stay where they are, and metrics without a step (summaries) are
    left out. A child run writes in ``folder/<name>``. When the trainer it is
    a callback of writes the same file (its ``output_dir`` is ``folder``),
    or the file exists before the logger's first row (another writer's),
    the logger leaves it alone.

    Parameters
    ----------
    folder : path-like
        Where ``metrics.csv`` goes.
    name : str, optional
        The run's name.

    Examples
    --------
    >>> import tempfile
    >>> lg = CSVLogger(tempfile.mkdtemp()).start()
    >>> lg.log_metrics({"epoch": 1, "val_auc": 0.75}, step=1)
    >>> fold = lg.child("fold_0_0"); fold.log_metrics({"epoch": 1, "val_auc": 0.5}, step=1)
    >>> print((fold.folder / "metrics.csv").read_text().strip())
    epoch,val_auc
    1,0.5
    """

    kind = "csv"

    def __init__(self, folder: str | os.PathLike[str], name: str | None = None) -> None:
        super().__init__(name)
        self.folder = Path(folder)
        self.rows: list[dict[str, Any]] = []
        self._skip = False

    def _new_child(self, name: str) -> RunLogger:
        return CSVLogger(self.folder / name, name)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Append a row (with a step) and rewrite ``metrics.csv`` (unless another writer owns it)."""
        if step is None or self._skip:
            return
        if not self.rows and (self.folder / "metrics.csv").exists():
            # Written by someone else (the trainer of a fold trained elsewhere or loaded, an earlier run).
            logger.debug("CSVLogger: leaving the existing %s alone", self.folder / "metrics.csv")
            self._skip = True
            return
        self.rows.append({k: v for k, v in metrics.items()})
        write_dict_csv(self.rows, self.folder / "metrics.csv")

    def on_fit_start(self, trainer: Any, logs: Mapping[str, Any]) -> None:
        """Leave ``metrics.csv`` to the trainer when it writes that very file."""
        own = getattr(trainer, "output_dir", None)
        self._skip = own is not None and Path(own).resolve() == self.folder.resolve()
        self.start()


class TensorBoardLogger(RunLogger):
    """TensorBoard event files in ``folder`` (children in subfolders).

    Metrics are scalars at their step, parameters one text entry (a JSON
    block under the tag ``params``), PNG artifacts images (tag: the file
    name); other artifacts are not copied (their paths go in a text entry).

    Parameters
    ----------
    folder : path-like
        The log directory (``tensorboard --logdir folder``).
    name : str, optional
        The run's name.

    Raises
    ------
    ConfigError
        ``tensorboard`` is not installed (``pip install "milcell[track]"``).

    Examples
    --------
    >>> import tempfile
    >>> lg = TensorBoardLogger(tempfile.mkdtemp()).start({"lr": 0.01})  # doctest: +SKIP
    >>> lg.log_metrics({"val_auc": 0.75}, step=1); lg.finish()  # doctest: +SKIP
    """

    kind = "tensorboard"

    def __init__(self, folder: str | os.PathLike[str], name: str | None = None) -> None:
        super().__init__(name)
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise _missing("tensorboard", "TensorBoardLogger")
        self.folder = Path(folder)
        self._writer: Any = None
        self._params: dict[str, str] = {}

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.folder.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.folder))

    def _close(self, status: str) -> None:
        self._writer.add_text("status", status)
        self._writer.close()

    def _new_child(self, name: str) -> RunLogger:
        return TensorBoardLogger(self.folder / name, name)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Write all parameters so far as one JSON text entry (tag ``params``)."""
        self.start()
        self._params.update(flatten_params(params))
        text = json.dumps(self._params, indent=1, sort_keys=True)
        self._writer.add_text("params", "```\n" + text + "\n```", global_step=len(self._params))
        self._writer.flush()

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """One scalar per finite metric, at ``step`` (0 without one); ``epoch`` is the step itself."""
        self.start()
        for key, value in _numbers(metrics).items():
            if key != "epoch":
                self._writer.add_scalar(key, value, global_step=0 if step is None else step)
        self._writer.flush()

    def log_artifacts(self, path: str | os.PathLike[str]) -> None:
        """PNG files become images; the paths of the others are listed in a text entry."""
        self.start()
        root = Path(path)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        others = []
        for file in files:
            if file.suffix.lower() == ".png":
                import matplotlib.image

                image = matplotlib.image.imread(str(file))
                self._writer.add_image(file.name, image[..., :3], dataformats="HWC")
            else:
                others.append(str(file))
        if others:
            self._writer.add_text("artifacts", "\n".join(others))
        self._writer.flush()


class MLflowLogger(RunLogger):
    """An MLflow run (children: nested runs), through :class:`mlflow.tracking.MlflowClient`.

    Parameters
    ----------
    folder : path-like, optional
        Without ``tracking_uri``: the local file store ``folder/mlruns``.
    tracking_uri : str, optional
        Any MLflow tracking URI (``http://host:5000``, ``sqlite:///runs.db``,
        ``file:///...``); default the local store under ``folder``.
    experiment : str, default "milcell"
        The experiment's name (created when missing).
    name : str, optional
        The run's name.
    tags : mapping, optional
        Extra run tags.

    Raises
    ------
    ConfigError
        Neither ``folder`` nor ``tracking_uri``, or MLflow not installed
        (``pip install "milcell[track]"``).

    Examples
    --------
    >>> import tempfile
    >>> lg = MLflowLogger(tempfile.mkdtemp(), name="cv").start({"lr": 0.01})  # doctest: +SKIP
    >>> fold = lg.child("fold_0_0", {"fold": 0})  # doctest: +SKIP
    >>> fold.log_metrics({"val_auc": 0.75}, step=1); fold.finish(); lg.finish()  # doctest: +SKIP
    """

    kind = "mlflow"

    def __init__(
        self,
        folder: str | os.PathLike[str] | None = None,
        *,
        tracking_uri: str | None = None,
        experiment: str = "milcell",
        name: str | None = None,
        tags: Mapping[str, str] | None = None,
        _client: Any = None,
        _experiment_id: str | None = None,
        _parent_id: str | None = None,
    ) -> None:
        super().__init__(name)
        if folder is None and tracking_uri is None and _client is None:
            raise ConfigError("MLflowLogger needs a folder (for a local store) or a tracking_uri")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "MLflowLogger") from None
        if tracking_uri is None and folder is not None:
            store = Path(folder).resolve() / "mlruns"
            store.mkdir(parents=True, exist_ok=True)
            tracking_uri = store.as_uri()
            # MLflow 3 keeps its file store behind this switch; it is the embedded default here.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.tags = dict(tags or {})
        self.client = _client if _client is not None else MlflowClient(tracking_uri=tracking_uri)
        self._experiment_id = _experiment_id
        self._parent_id = _parent_id
        self.run_id: str | None = None
        self._params: dict[str, str] = {}

    @property
    def experiment_id(self) -> str:
        """The experiment's id (the experiment is created when missing)."""
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            self._experiment_id = (
                found.experiment_id if found is not None else self.client.create_experiment(self.experiment)
            )
        return self._experiment_id

    def _open(self) -> None:
        tags = dict(self.tags)
        if self._parent_id is not None:
            tags["mlflow.parentRunId"] = self._parent_id
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=self.name)
        self.run_id = run.info.run_id

    @property
    def _id(self) -> str:
        """The open run's id."""
        if self.run_id is None:
            raise ConfigError("MLflowLogger: the run is not started")
        return self.run_id

    def _close(self, status: str) -> None:
        self.client.set_terminated(self._id, status=status)

    def _new_child(self, name: str) -> RunLogger:
        self.start()
        return MLflowLogger(
            tracking_uri=self.tracking_uri,
            experiment=self.experiment,
            name=name,
            tags=self.tags,
            _client=self.client,
            _experiment_id=self.experiment_id,
            _parent_id=self.run_id,
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log the flattened parameters not logged before (MLflow parameters cannot change)."""
        from mlflow.entities import Param

        self.start()
        new = {k: v for k, v in flatten_params(params).items() if k not in self._params}
        changed = [k for k, v in flatten_params(params).items() if k in self._params and self._params[k] != v]
        if changed:
            logger.debug("MLflowLogger: parameters %s already logged with another value; kept", changed)
        if new:
            self.client.log_batch(self._id, params=[Param(k, v) for k, v in new.items()])
            self._params.update(new)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the finite metrics at ``step`` (``epoch`` itself is the step, not a metric)."""
        import time

        from mlflow.entities import Metric

        self.start()
        stamp = int(time.time() * 1000)
        rows = [
            Metric(key, value, stamp, 0 if step is None else step)
            for key, value in _numbers(metrics).items()
            if key != "epoch"
        ]
        if rows:
            self.client.log_batch(self._id, metrics=rows)

    def log_artifacts(self, path: str | os.PathLike[str]) -> None:
        """Copy a file or a folder into the run's artifacts (a folder under its own name)."""
        self.start()
        source = Path(path)
        if source.is_dir():
            self.client.log_artifacts(self._id, str(source), artifact_path=source.name)
        else:
            self.client.log_artifact(self._id, str(source))


def error_status(error: BaseException) -> str:
    """The status of a tracking run that ``error`` ends: ``"KILLED"`` or ``"FAILED"``.

    A :class:`KeyboardInterrupt` (or :class:`SystemExit`) kills a run; an
    exception with a ``tracking_status`` attribute gives its own (a trial a
    tuning backend prunes: ``"KILLED"``); any other error fails it.

    Examples
    --------
    >>> error_status(KeyboardInterrupt()), error_status(ValueError("bad bag"))
    ('KILLED', 'FAILED')
    """
    own = getattr(error, "tracking_status", None)
    if own in ("FAILED", "KILLED", "FINISHED"):
        return str(own)
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


@contextlib.contextmanager
def finish_on_error(*runs: RunLogger) -> Iterator[list[RunLogger]]:
    """Close the runs opened in a block with ``"FAILED"`` / ``"KILLED"`` when it raises, then re-raise.

    Yields the list of runs to close (``runs`` to begin with); append the runs
    (parents, child runs) the block opens. When an exception leaves the block,
    every run of the list that is still open is finished with
    :func:`error_status` of the exception, newest first (children before their
    parent); a run that cannot be closed (a tracking server gone) is logged as
    a warning, and the block's own exception propagates unchanged. Runs the
    block finished itself are left as they are (:meth:`RunLogger.finish` is
    idempotent). Nothing happens when the block ends normally.

    Parameters
    ----------
    *runs : RunLogger
        Runs opened before the block.

    Yields
    ------
    list of RunLogger
        The runs to close on an error.

    Examples
    --------
    >>> import tempfile
    >>> parent = CSVLogger(tempfile.mkdtemp()).start()
    >>> try:
    ...     with finish_on_error(parent) as opened:
    ...         opened.append(parent.child("fold_0_0"))
    ...         raise RuntimeError("fold 0 failed")
    ... except RuntimeError:
    ...     pass
    >>> parent.finished, opened[1].finished
    (True, True)
    """
    opened = list(runs)
    try:
        yield opened
    except BaseException as error:
        status = error_status(error)
        for run in reversed(opened):
            if not run.active:
                continue
            try:
                run.finish(status)
            except Exception as close_error:  # the original error matters more
                logger.warning(
                    "could not close the %s run %r as %s: %s", run.kind, run.name, status, close_error
                )
        raise


def parse_logger_names(names: str | Sequence[str] | None) -> list[str]:
    """Logger names from ``"csv,mlflow"``, ``["csv", "mlflow"]`` or repeated flags; validated, deduplicated.

    Raises
    ------
    ConfigError
        An unknown name (the message lists the known ones).

    Examples
    --------
    >>> parse_logger_names(["csv", "mlflow,tensorboard", "csv"])
    ['csv', 'mlflow', 'tensorboard']
    >>> parse_logger_names(None)
    []
    """
    if names is None:
        return []
    items = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in items:
        for part in str(item).split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in LOGGERS:
                raise ConfigError(f"unknown logger {name!r}; known loggers: {', '.join(LOGGERS)}")
            if name not in out:
                out.append(name)
    return out


def make_loggers(
    names: str | Sequence[str | RunLogger] | None,
    folder: str | os.PathLike[str],
    *,
    tracking_uri: str | None = None,
    experiment: str = "milcell",
    name: str | None = None,
    csv_folder: str | os.PathLike[str] | None = None,
) -> list[RunLogger]:
    """Build loggers from names (``"csv"``, ``"tensorboard"``, ``"mlflow"``); loggers pass through.

    Parameters
    ----------
    names : str or sequence
        Names (also comma-separated) or :class:`RunLogger` objects.
    folder : path-like
        The output folder: ``csv`` writes in it, ``tensorboard`` in
        ``folder/tensorboard``, ``mlflow`` (without ``tracking_uri``) in
        ``folder/mlruns``.
    tracking_uri : str, optional
        MLflow tracking URI.
    experiment : str, default "milcell"
        MLflow experiment name.
    name : str, optional
        The runs' name.
    csv_folder : path-like, optional
        Where ``csv`` writes instead of ``folder`` (a saved run: ``cv``, where
        the fold trainers write their ``metrics.csv``).

    Returns
    -------
    list of RunLogger
        Not started.

    Raises
    ------
    ConfigError
        An unknown name, or a package that is not installed.

    Examples
    --------
    >>> import tempfile
    >>> [type(lg).__name__ for lg in make_loggers("csv", tempfile.mkdtemp())]
    ['CSVLogger']
    """
    root = Path(folder)
    given: list[Any] = [names] if isinstance(names, (str, RunLogger)) else list(names or [])
    built: list[RunLogger] = [item for item in given if isinstance(item, RunLogger)]
    for kind in parse_logger_names([item for item in given if not isinstance(item, RunLogger)]):
        if kind == "csv":
            built.append(CSVLogger(root if csv_folder is None else csv_folder, name))
        elif kind == "tensorboard":
            built.append(TensorBoardLogger(root / "tensorboard", name))
        else:
            built.append(MLflowLogger(root, tracking_uri=tracking_uri, experiment=experiment, name=name))
    return built
