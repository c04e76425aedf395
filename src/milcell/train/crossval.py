"""Patient-level cross-validation with a fresh model per fold, resumable fold by fold.

:func:`cross_validate` splits the samples with
:func:`~milcell.data.splits.patient_kfold` (stratified, grouped by patient,
optionally repeated), and for every fold builds a new model, asks the caller
for the fold's ``(train, val)`` datasets, trains it with
:func:`~milcell.train.fit.fit_model` (a :class:`~milcell.train.trainer.Trainer`),
restores the best checkpoint and predicts the validation bags. It returns a :class:`CVResult`: per-fold
metrics with their mean ± std, the out-of-fold predictions and the fold
models (for an ensemble, see :mod:`milcell.train.ensemble`).

Leakage
-------
Every fold-dependent preprocessing belongs in ``make_datasets``, which sees
the :class:`~milcell.data.splits.Fold`: fit the clinical scaler on the
training rows only (``cohort.fit_scaler(fold.train)``) and apply it to both
sides.

Resume
------
With ``output_dir``, fold ``(r, k)`` works in ``output_dir/fold_<r>_<k>/``:
the trainer writes its checkpoints there (an interrupted fold resumes from
its last epoch), and a finished fold writes ``model.safetensors`` (the
restored best weights) and then ``result.json`` (metrics, history,
out-of-fold predictions and the fold's indices), each atomically. A rerun
loads every fold that has ``result.json`` instead of training it again, so a
run interrupted after fold ``k`` resumes at fold ``k + 1``.

A fold is reused or resumed only when it was trained with the same settings:
before training, each fold folder records ``settings.json`` — the model's
configuration, the trainer options (``lr``, ``max_epochs``, ``monitor``, ...;
not ``progress`` or ``device``), ``batch_size``, ``sampler``, the split
(``n_splits``, ``n_repeats``, ``seed``, a digest of the labels and groups)
and the caller's ``fingerprint`` (e.g. preprocessing and data identity).
When any existing fold differs, :func:`cross_validate` refuses before
touching anything, with a :class:`~milcell.exceptions.ConfigError` naming the
differing settings; ``overwrite=True`` discards the existing folds instead.

Reproducibility
---------------
Before fold ``(r, k)`` builds its model the global torch generator is seeded
with ``seed + 1000 * r + k`` (also the trainer's shuffle seed unless
``trainer_kwargs`` sets ``seed``), so a fold trains identically whether or
not earlier folds were loaded from disk.

Examples
--------
>>> import torch
>>> from milcell.data import FeatureBagDataset
>>> from milcell.nn.model import create_mil_model
>>> g = torch.Generator().manual_seed(0)
>>> labels = [0, 1] * 6
>>> ds = FeatureBagDataset([torch.randn(3, 4, generator=g) + y for y in labels], labels=labels)
>>> result = cross_validate(
...     lambda: create_mil_model(None, pooling="mean", in_dim=4),
...     lambda fold: (feature_subset(ds, fold.train), feature_subset(ds, fold.val)),
...     labels, n_splits=3, batch_size=2, trainer_kwargs={"max_epochs": 2, "progress": False},
... )
>>> len(result.folds), result.oof.probabilities.shape
(3, (12, 2))
>>> print(result.table(["balanced_accuracy"]))
balanced_accuracy  ... ± ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from numpy.typing import ArrayLike
from torch import nn
from torch.utils.data import DataLoader, Dataset

from milcell._utils import atomic_path, json_safe
from milcell._validation import check_choice, check_int
from milcell.data.bag import Bag, collate_bags
from milcell.data.datasets import FeatureBagDataset
from milcell.data.samplers import ClassBalancedSampler, MinorityOversampler
from milcell.data.splits import Fold, patient_kfold
from milcell.exceptions import CheckpointError, ConfigError, DataError
from milcell.metrics import format_summary, summarize_folds
from milcell.train.checkpoint import load_weights
from milcell.train.distributed import is_main_process, make_loader
from milcell.train.fit import fit_model

__all__ = [
    "CVResult",
    "OOFPredictions",
    "cross_validate",
    "feature_subset",
    "fold_settings",
    "settings_differences",
    "stale_folds",
]

logger = logging.getLogger("milcell")

RESULT_NAME = "result.json"
WEIGHTS_NAME = "model.safetensors"
SETTINGS_NAME = "settings.json"
_RESULT_VERSION = 2
#: Trainer options that do not change a fold's result (left out of the settings fingerprint).
_UNFINGERPRINTED = frozenset({"progress", "device", "class_names", "log_every", "num_workers"})
_DEFAULT_TABLE = ("balanced_accuracy", "sensitivity", "specificity", "auc")
_RESERVED_TRAINER_KWARGS = ("output_dir", "optimizer", "scheduler", "callbacks")


@dataclass
class OOFPredictions:
    """Out-of-fold predictions: each labelled sample predicted by the model that did not train on it.

    With ``n_repeats > 1`` every sample appears once per repetition. Rows are
    ordered by repetition, fold, then position.

    Attributes
    ----------
    ids : list of str
        ``m`` sample (bag) identifiers.
    indices : ndarray
        ``(m,)`` int64 position of each row in the ``labels`` given to
        :func:`cross_validate`.
    probabilities : ndarray
        ``(m, C)`` float32 class probabilities.
    labels : ndarray
        ``(m,)`` int64 true labels.
    fold, repeat : ndarray
        ``(m,)`` int64 fold and repetition of each row.

    Examples
    --------
    >>> import numpy as np
    >>> oof = OOFPredictions(["a", "b"], np.array([1, 0]), np.array([[0.2, 0.8], [0.6, 0.4]]),
    ...                      np.array([1, 0]), np.array([0, 1]), np.array([0, 0]))
    >>> len(oof), oof.predicted.tolist()
    (2, [1, 0])
    """

    ids: list[str]
    indices: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray
    fold: np.ndarray
    repeat: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def predicted(self) -> np.ndarray:
        """``(m,)`` int64 most probable class of each row."""
        return self.probabilities.argmax(axis=1).astype(np.int64)


@dataclass
class CVResult:
    """What :func:`cross_validate` returns.

    Attributes
    ----------
    folds : list of dict
        Per fold, the validation metrics of the restored best model (keys of
        :meth:`Trainer.evaluate <milcell.train.trainer.Trainer.evaluate>`:
        ``loss``, ``balanced_accuracy``, ``sensitivity``, ``specificity``,
        ``auc``, ...) plus ``repeat`` and ``fold``.
    summary : dict of str to (float, float)
        ``metric -> (mean, std)`` over the folds (sample std).
    oof : OOFPredictions
        Out-of-fold predictions.
    models : list of nn.Module
        The fold models on the CPU, best weights loaded (empty with
        ``keep_models=False``).
    histories : list of list of dict
        The trainer's epoch logs of each fold.

    Examples
    --------
    >>> r = CVResult(folds=[], summary={"auc": (0.9, 0.05)}, oof=None, models=[], histories=[])
    >>> print(r.table(["auc"]))
    auc  0.90 ± 0.05
    """

    folds: list[dict[str, float]]
    summary: dict[str, tuple[float, float]]
    oof: OOFPredictions
    models: list[nn.Module] = field(default_factory=list)
    histories: list[list[dict[str, float]]] = field(default_factory=list)

    def table(self, metrics: Sequence[str] = _DEFAULT_TABLE, digits: int = 2) -> str:
        """``metric  mean ± std`` rows, one per metric (e.g. ``balanced_accuracy  0.91 ± 0.05``).

        With the default ``metrics``, names absent from the summary (e.g.
        ``sensitivity`` of a multiclass problem) are skipped; a name passed
        explicitly must exist.

        Raises
        ------
        ConfigError
            A requested metric that the folds do not have.
        """
        names = list(metrics)
        if tuple(names) == _DEFAULT_TABLE:
            names = [n for n in names if n in self.summary]
        return format_summary(self.summary, names, digits=digits)


# --------------------------------------------------------------------------- helpers


def feature_subset(
    dataset: FeatureBagDataset,
    indices: ArrayLike,
    clinical_scaler: Any | None = None,
    *,
    train: bool | None = None,
    max_instances: int | None = None,
    seed: int | None = None,
) -> FeatureBagDataset:
    """A :class:`~milcell.data.FeatureBagDataset` of some bags of another, sharing its tensors.

    Use it in ``make_datasets`` over a cached feature dataset; when the
    dataset holds *raw* clinical attributes, pass a scaler fitted on the
    training fold so the validation fold never informs the scaling.

    Parameters
    ----------
    dataset : FeatureBagDataset
        The full dataset.
    indices : array-like of int
        ``(k,)`` positions to keep, in this order.
    clinical_scaler : ClinicalScaler or callable, optional
        Applied to the kept rows of ``dataset.clinical`` ``(k, F)`` (a fitted
        :class:`~milcell.data.ClinicalScaler`, or any callable on the float64
        matrix). ``None`` keeps the values as they are.
    train, max_instances, seed : optional
        Override the source dataset's instance cap settings.

    Returns
    -------
    FeatureBagDataset

    Raises
    ------
    DataError
        An index out of range, or a scaler given for a dataset without clinical attributes.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from milcell.data import ClinicalScaler, FeatureBagDataset
    >>> ds = FeatureBagDataset([torch.ones(2, 3)] * 3, labels=[0, 1, 0], ids=["a", "b", "c"],
    ...                        clinical=[[10.0], [20.0], [40.0]], clinical_names=["age"])
    >>> scaler = ClinicalScaler(["age"]).fit(ds.clinical[[0, 1]].numpy())   # training rows only
    >>> val = feature_subset(ds, [2], scaler)
    >>> val.ids, val.clinical.tolist()
    (['c'], [[3.0]])
    """
    if not isinstance(dataset, FeatureBagDataset):
        raise ConfigError(
            f"feature_subset: dataset must be a FeatureBagDataset, got {type(dataset).__name__}"
        )
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= len(dataset)):
        raise DataError(f"feature_subset: indices out of range for {len(dataset)} bags: {idx[:5].tolist()}")
    clinical = None
    if dataset.clinical is not None:
        clinical = dataset.clinical[torch.from_numpy(idx)]
        if clinical_scaler is not None:
            fn = getattr(clinical_scaler, "transform", clinical_scaler)
            clinical = torch.as_tensor(np.asarray(fn(clinical.double().numpy()), dtype=np.float32))
    elif clinical_scaler is not None:
        raise DataError(
            "feature_subset: a clinical_scaler was given but the dataset has no clinical attributes"
        )
    names = None if dataset.instance_names is None else [dataset.instance_names[i] for i in idx]
    return FeatureBagDataset(
        [dataset.features[i] for i in idx],
        dataset.labels[idx],
        [dataset.ids[i] for i in idx],
        clinical,
        clinical_names=dataset.clinical_names if clinical is not None else (),
        instance_names=names,
        max_instances=dataset.max_instances if max_instances is None else max_instances,
        train=dataset.train if train is None else train,
        seed=dataset.seed if seed is None else seed,
        metadata=dataset.metadata,
    )


def _fold_dir(output_dir: Path, fold: Fold) -> Path:
    return output_dir / f"fold_{fold.repeat}_{fold.fold}"


def _digest(*arrays: Any) -> str:
    """A short sha256 of arrays or JSON values (labels, groups, data identity)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(json.dumps(json_safe(np.asarray(a).tolist() if a is not None else None)).encode())
    return h.hexdigest()[:16]


def fold_settings(
    model: nn.Module | None,
    labels: ArrayLike,
    groups: ArrayLike | None,
    *,
    n_splits: int,
    n_repeats: int,
    seed: int,
    batch_size: int,
    sampler: str | None,
    drop_last: bool,
    trainer_kwargs: Mapping[str, Any] | None,
    fingerprint: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The flat settings fingerprint :func:`cross_validate` records with every fold (JSON-ready).

    Parameters
    ----------
    model : nn.Module or None
        A model as ``build_model`` returns it: its ``config`` (or, without
        one, its ``repr``) goes in.
    labels, groups, n_splits, n_repeats, seed, batch_size, sampler, drop_last, trainer_kwargs
        As for :func:`cross_validate`.
    fingerprint : mapping, optional
        Extra settings of the caller (preprocessing, data identity, ...).

    Returns
    -------
    dict
        ``name -> value``; two runs that may share folds have equal settings.

    Examples
    --------
    >>> s = fold_settings(None, [0, 1, 0, 1], None, n_splits=2, n_repeats=1, seed=0, batch_size=2,
    ...                   sampler=None, drop_last=False, trainer_kwargs={"lr": 0.01, "progress": False})
    >>> s["lr"], "progress" in s, s["n_splits"]
    (0.01, False, 2)
    """
    settings: dict[str, Any] = {}
    if model is not None:
        config = getattr(model, "config", None)
        if isinstance(config, Mapping):
            settings.update({k: v for k, v in config.items()})
        else:
            settings["model"] = hashlib.sha256(repr(model).encode()).hexdigest()[:16]
    settings.update({k: v for k, v in (trainer_kwargs or {}).items() if k not in _UNFINGERPRINTED})
    settings.update(
        {
            "n_splits": n_splits,
            "n_repeats": n_repeats,
            "seed": seed,
            "batch_size": batch_size,
            "sampler": sampler,
            "drop_last": bool(drop_last),
            "labels": _digest(
                labels, None if groups is None else np.asarray(groups, dtype=object).astype(str)
            ),
        }
    )
    settings.update(dict(fingerprint or {}))
    result: dict[str, Any] = json.loads(json.dumps(json_safe(settings)))
    return result


def settings_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, str]:
    """``("pooling='gated_attention', lr=0.002", "pooling='max', lr=0.01")``: the differing settings.

    Examples
    --------
    >>> settings_differences({"lr": 0.002, "seed": 0}, {"lr": 0.01, "seed": 0})
    ('lr=0.002', 'lr=0.01')
    """
    keys = [k for k in new if old.get(k, _MISSING) != new[k]]
    keys += [k for k in old if k not in new]

    def show(values: Mapping[str, Any]) -> str:
        return ", ".join(f"{k}={values[k]!r}" if k in values else f"{k} unset" for k in keys)

    return show(old), show(new)


_MISSING = object()


def _stored_settings(fold_dir: Path) -> dict[str, Any] | None:
    """The settings recorded in a fold folder; ``None`` when it records none (an older milcell)."""
    path = fold_dir / SETTINGS_NAME
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cross_validate: settings file '{path}' is unreadable: {exc}") from exc
    if not isinstance(stored, dict):
        raise CheckpointError(f"cross_validate: settings file '{path}' does not hold a JSON object")
    return stored


def stale_folds(
    output_dir: str | os.PathLike[str], settings: Mapping[str, Any]
) -> list[tuple[Path, str, str]]:
    """Fold folders under ``output_dir`` trained with other settings: ``(folder, was, now)`` each.

    A fold folder that holds files but no ``settings.json`` (written by an
    older milcell) counts as different. An absent ``output_dir`` has none.

    Examples
    --------
    >>> import tempfile
    >>> stale_folds(tempfile.mkdtemp(), {"lr": 0.01})
    []
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for fold_dir in sorted(p for p in root.glob("fold_*_*") if p.is_dir()):
        stored = _stored_settings(fold_dir)
        if stored is None:
            if any(fold_dir.iterdir()):
                found.append((fold_dir, "an unrecorded configuration (older milcell)", "the given settings"))
            continue
        if stored != dict(settings):
            was, now = settings_differences(stored, settings)
            found.append((fold_dir, was, now))
    return found


def _check_output_dir(root: Path, settings: Mapping[str, Any], overwrite: bool) -> None:
    stale = stale_folds(root, settings)
    if not stale:
        return
    if overwrite:
        for fold_dir, was, _ in stale:
            logger.warning("cross_validate: overwrite: discarding %s (trained with %s)", fold_dir, was)
            shutil.rmtree(fold_dir)
        return
    fold_dir, was, now = stale[0]
    raise ConfigError(
        f"cross_validate: output_dir '{root}' holds {len(stale)} fold(s) trained with {was}; now {now} "
        f"(first: {fold_dir.name}): pass overwrite=True to replace them, or the same settings to resume"
    )


_RESULT_SCHEMA: dict[str, tuple[type, ...]] = {
    "version": (int,),
    "train": (list,),
    "val": (list,),
    "metrics": (dict,),
    "history": (list,),
    "oof": (dict,),
}
_OOF_KEYS = ("ids", "indices", "probabilities", "labels")


def _check_result(record: Any, path: Path) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise CheckpointError(f"cross_validate: fold result '{path}' does not hold a JSON object")
    for key, types in _RESULT_SCHEMA.items():
        if key not in record:
            raise CheckpointError(f"cross_validate: fold result '{path}' lacks the key {key!r}")
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise CheckpointError(
                f"cross_validate: fold result '{path}': {key!r} must be a {types[0].__name__}, "
                f"got {type(value).__name__} {value!r:.60}"
            )
    for key, value in record["metrics"].items():
        try:
            float(value)
        except (TypeError, ValueError):
            raise CheckpointError(
                f"cross_validate: fold result '{path}': metric {key!r} is not a number: {value!r:.60}"
            ) from None
    missing = [k for k in _OOF_KEYS if not isinstance(record["oof"].get(k), list)]
    if missing:
        raise CheckpointError(f"cross_validate: fold result '{path}': 'oof' lacks the list(s) {missing}")
    if not all(isinstance(row, dict) for row in record["history"]):
        raise CheckpointError(f"cross_validate: fold result '{path}': 'history' must be a list of objects")
    return record


def _check_split(record: Mapping[str, Any], fold_dir: Path, fold: Fold) -> None:
    if record.get("train") != fold.train.tolist() or record.get("val") != fold.val.tolist():
        raise ConfigError(
            f"cross_validate: {fold_dir} holds fold {fold.fold} of repeat {fold.repeat} with other "
            "patients than this run's split (different labels, groups, n_splits or seed?); "
            "use another output_dir or delete it"
        )


def _check_splits(root: Path, folds: Sequence[Fold], overwrite: bool) -> None:
    """Refuse folds of another split first: the most likely mistake, with the most specific message."""
    if overwrite:
        return
    for fold in folds:
        result_file = _fold_dir(root, fold) / RESULT_NAME
        try:
            record = json.loads(result_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(record, dict):
            _check_split(record, result_file.parent, fold)


def _load_finished(
    fold_dir: Path, fold: Fold, build_model: Callable[[], nn.Module], keep_models: bool
) -> tuple[dict[str, Any], nn.Module | None] | None:
    result_file = fold_dir / RESULT_NAME
    if not result_file.is_file():
        return None
    try:
        raw = json.loads(result_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("cross_validate: %s is unreadable (%s); the fold is trained again", result_file, exc)
        return None
    record = _check_result(raw, result_file)
    if record["version"] != _RESULT_VERSION:
        raise CheckpointError(
            f"cross_validate: fold result '{result_file}' has version {record['version']!r}, not "
            f"{_RESULT_VERSION}; pass overwrite=True to train the fold again"
        )
    _check_split(record, fold_dir, fold)
    model = None
    if keep_models:
        model = build_model()
        load_weights(fold_dir / WEIGHTS_NAME, model)
        model.cpu().eval()
    logger.info("cross_validate: fold %d of repeat %d loaded from %s", fold.fold, fold.repeat, fold_dir)
    return record, model


def _write_finished(fold_dir: Path, model: nn.Module, record: Mapping[str, Any]) -> None:
    fold_dir.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(fold_dir / WEIGHTS_NAME) as tmp:
            safetensors.torch.save_model(model, str(tmp), force_contiguous=True)
        # The JSON is written last: its presence marks the fold as finished.
        with atomic_path(fold_dir / RESULT_NAME) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(
            f"cross_validate: could not write the finished fold to {fold_dir}: {exc}"
        ) from exc


def _train_loader(
    dataset: Dataset[Bag],
    labels: np.ndarray,
    sampler: str | None,
    batch_size: int,
    num_workers: int,
    seed: int,
    drop_last: bool = False,
) -> DataLoader[Any]:
    if sampler is None:
        return make_loader(
            dataset, batch_size, shuffle=True, seed=seed, num_workers=num_workers, drop_last=drop_last
        )
    train_labels = getattr(dataset, "labels", None)
    train_labels = labels if train_labels is None else np.asarray(train_labels)
    if len(train_labels) != len(dataset):  # type: ignore[arg-type]
        raise DataError(
            f"cross_validate: the training dataset has {len(dataset)} items but {len(train_labels)} "  # type: ignore[arg-type]
            "labels for the sampler"
        )
    chosen: Any
    if sampler == "balanced":
        chosen = ClassBalancedSampler(train_labels, seed=seed)
    else:
        chosen = MinorityOversampler(train_labels, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=chosen,
        collate_fn=collate_bags,
        num_workers=num_workers,
        drop_last=drop_last,
    )


# --------------------------------------------------------------------------- main


def cross_validate(
    build_model: Callable[[], nn.Module],
    make_datasets: Callable[[Fold], tuple[Dataset[Bag], Dataset[Bag]]],
    labels: ArrayLike,
    groups: ArrayLike | None = None,
    *,
    n_splits: int = 5,
    n_repeats: int = 1,
    seed: int = 0,
    batch_size: int = 1,
    num_workers: int = 0,
    sampler: str | None = None,
    drop_last: bool = False,
    trainer_kwargs: Mapping[str, Any] | None = None,
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    build_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    keep_models: bool = True,
    callbacks_factory: Callable[[Fold], Sequence[Any]] | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> CVResult:
    """Stratified patient-level k-fold cross-validation with a fresh model per fold.

    Parameters
    ----------
    build_model : callable
        ``() -> nn.Module`` following
        :class:`~milcell.train.trainer.MILModelLike`; called once per fold
        (and to rebuild a finished fold's model on resume).
    make_datasets : callable
        ``Fold -> (train_ds, val_ds)``: the fold's datasets of
        :class:`~milcell.data.Bag`. ``val_ds`` must hold the samples
        ``fold.val`` in that order (``train_ds`` usually ``fold.train``).
        Fit any fold-dependent preprocessing (clinical scaling) on
        ``fold.train`` here.
    labels : array-like
        ``(n,)`` int labels of the ``n`` samples (bags or cells); ``-1``
        samples are left out of every fold.
    groups : array-like, optional
        ``(n,)`` patient of each sample (cells of a patient stay together);
        ``None``: each sample is its own patient.
    n_splits, n_repeats, seed : int
        Passed to :func:`~milcell.data.splits.patient_kfold`; ``seed`` also
        seeds every fold (see the module docstring).
    batch_size : int, default 1
        Bags per batch (training and validation).
    num_workers : int, default 0
        DataLoader workers.
    sampler : {None, "balanced", "oversample"}, default None
        Training-loader sampling: shuffled (None),
        :class:`~milcell.data.samplers.ClassBalancedSampler` or
        :class:`~milcell.data.samplers.MinorityOversampler`.
    drop_last : bool, default False
        Drop the last incomplete training batch (a batch of one bag breaks
        train-mode BatchNorm on 1×1 feature maps).
    trainer_kwargs : mapping, optional
        Forwarded to :class:`~milcell.train.trainer.Trainer` (``max_epochs``,
        ``lr``, ``precision``, ``monitor``, ``patience``, ``progress``...);
        ``output_dir``, ``optimizer``, ``scheduler`` and ``callbacks`` are set
        here and may not appear.
    build_optimizer : callable, optional
        ``model -> optimizer``; default the trainer's Adam with ``lr``.
    build_scheduler : callable, optional
        ``optimizer -> scheduler``.
    output_dir : path-like, optional
        Enables checkpoints and resume (``fold_<r>_<k>/`` subfolders).
    keep_models : bool, default True
        Return the fold models (on the CPU).
    callbacks_factory : callable, optional
        ``Fold -> callbacks`` for the fold's trainer.
    fingerprint : mapping, optional
        Further settings that determine a fold's result and that
        ``cross_validate`` cannot see (preprocessing, data identity): recorded
        with every fold and compared on resume (see the module docstring).
        ``build_optimizer``, ``build_scheduler`` and ``callbacks_factory`` are
        code and are not compared: describe them here when they change.
    overwrite : bool, default False
        Discard the folds of ``output_dir`` trained with other settings
        instead of refusing.

    Returns
    -------
    CVResult

    Raises
    ------
    ConfigError
        Invalid arguments, an ``output_dir`` holding folds of another split,
        or folds trained with other settings (without ``overwrite``); the
        message names the differing settings.
    CheckpointError
        A finished fold's ``result.json`` that is unreadable or lacks a key
        (the message names the file and the key).
    DataError
        Datasets that do not match the fold.
    """
    y = np.asarray(labels)
    n_splits = check_int(n_splits, "cross_validate: n_splits", low=2)
    n_repeats = check_int(n_repeats, "cross_validate: n_repeats", low=1)
    batch_size = check_int(batch_size, "cross_validate: batch_size", low=1)
    num_workers = check_int(num_workers, "cross_validate: num_workers", low=0)
    seed = check_int(seed, "cross_validate: seed", low=0)
    sampler = check_choice(sampler, "cross_validate: sampler", (None, "balanced", "oversample"))
    if not callable(build_model) or not callable(make_datasets):
        raise ConfigError("cross_validate: build_model and make_datasets must be callables")
    kwargs = dict(trainer_kwargs or {})
    reserved = [k for k in _RESERVED_TRAINER_KWARGS if k in kwargs]
    if reserved:
        raise ConfigError(
            f"cross_validate: trainer_kwargs may not set {reserved}; use output_dir, build_optimizer, "
            "build_scheduler and callbacks_factory instead"
        )
    g = None if groups is None else np.asarray(groups, dtype=object)  # as patient_kfold reads them
    folds = patient_kfold(y, g, n_splits=n_splits, n_repeats=n_repeats, seed=seed)
    root = None if output_dir is None else Path(output_dir)
    settings: dict[str, Any] | None = None
    if root is not None:
        with torch.random.fork_rng(devices=[]):
            probe = build_model()
        settings = fold_settings(
            probe,
            y,
            g,
            n_splits=n_splits,
            n_repeats=n_repeats,
            seed=seed,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            trainer_kwargs=kwargs,
            fingerprint=fingerprint,
        )
        del probe
        _check_splits(root, folds, bool(overwrite))
        _check_output_dir(root, settings, bool(overwrite))

    fold_rows: list[dict[str, float]] = []
    histories: list[list[dict[str, float]]] = []
    models: list[nn.Module] = []
    oof_parts: list[dict[str, Any]] = []
    for fold in folds:
        fold_seed = seed + 1000 * fold.repeat + fold.fold
        fold_dir = None if root is None else _fold_dir(root, fold)
        loaded = None if fold_dir is None else _load_finished(fold_dir, fold, build_model, keep_models)
        if loaded is not None:
            record, model = loaded
        else:
            record, model = _run_fold(
                fold,
                fold_seed,
                build_model,
                make_datasets,
                y,
                batch_size=batch_size,
                num_workers=num_workers,
                sampler=sampler,
                drop_last=drop_last,
                kwargs=kwargs,
                build_optimizer=build_optimizer,
                build_scheduler=build_scheduler,
                fold_dir=fold_dir,
                callbacks_factory=callbacks_factory,
                settings=settings,
            )
        metrics = {k: float(v) for k, v in record["metrics"].items()}
        fold_rows.append({**metrics, "repeat": float(fold.repeat), "fold": float(fold.fold)})
        histories.append([{k: float(v) for k, v in row.items()} for row in record["history"]])
        oof_parts.append(record["oof"] | {"repeat": fold.repeat, "fold": fold.fold})
        if keep_models and model is not None:
            models.append(model)
        summary_line = ", ".join(
            f"{k}={metrics[k]:.3f}" for k in ("balanced_accuracy", "auc", "accuracy") if k in metrics
        )
        logger.info("cross_validate: repeat %d fold %d: %s", fold.repeat, fold.fold, summary_line)

    summary = summarize_folds(
        [{k: v for k, v in r.items() if k not in ("repeat", "fold")} for r in fold_rows]
    )
    oof = OOFPredictions(
        ids=[i for part in oof_parts for i in part["ids"]],
        indices=np.concatenate([np.asarray(p["indices"], dtype=np.int64) for p in oof_parts]),
        probabilities=np.concatenate(
            [np.asarray(p["probabilities"], dtype=np.float32).reshape(len(p["ids"]), -1) for p in oof_parts]
        ),
        labels=np.concatenate([np.asarray(p["labels"], dtype=np.int64) for p in oof_parts]),
        fold=np.concatenate([np.full(len(p["ids"]), p["fold"], dtype=np.int64) for p in oof_parts]),
        repeat=np.concatenate([np.full(len(p["ids"]), p["repeat"], dtype=np.int64) for p in oof_parts]),
    )
    return CVResult(folds=fold_rows, summary=summary, oof=oof, models=models, histories=histories)


def _run_fold(
    fold: Fold,
    fold_seed: int,
    build_model: Callable[[], nn.Module],
    make_datasets: Callable[[Fold], tuple[Dataset[Bag], Dataset[Bag]]],
    y: np.ndarray,
    *,
    batch_size: int,
    num_workers: int,
    sampler: str | None,
    drop_last: bool,
    kwargs: dict[str, Any],
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None,
    build_scheduler: Callable[[torch.optim.Optimizer], Any] | None,
    fold_dir: Path | None,
    callbacks_factory: Callable[[Fold], Sequence[Any]] | None,
    settings: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], nn.Module]:
    if fold_dir is not None and settings is not None and is_main_process():
        # Recorded before any checkpoint, so a resumed fold is checked against the settings it began with.
        with atomic_path(fold_dir / SETTINGS_NAME) as tmp:
            tmp.write_text(json.dumps(dict(settings), indent=1) + "\n", encoding="utf-8")
    torch.manual_seed(fold_seed)
    model = build_model()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"cross_validate: build_model returned {type(model).__name__}, not an nn.Module")
    datasets = make_datasets(fold)
    if not isinstance(datasets, tuple) or len(datasets) != 2:
        raise ConfigError("cross_validate: make_datasets must return a (train_ds, val_ds) tuple")
    train_ds, val_ds = datasets
    if len(val_ds) != len(fold.val):  # type: ignore[arg-type]
        raise DataError(
            f"cross_validate: make_datasets returned {len(val_ds)} validation items for fold "  # type: ignore[arg-type]
            f"{fold.fold} of repeat {fold.repeat}, but the fold has {len(fold.val)} (use fold.val)"
        )
    train_loader = _train_loader(
        train_ds, y[fold.train], sampler, batch_size, num_workers, fold_seed, drop_last=drop_last
    )
    val_loader = make_loader(val_ds, batch_size, shuffle=False, num_workers=num_workers)
    logger.info("cross_validate: training fold %d of repeat %d", fold.fold, fold.repeat)
    _, trainer, history = fit_model(
        model,
        train_loader,
        val_loader,
        trainer_kwargs={"seed": fold_seed, **kwargs},
        build_optimizer=build_optimizer,
        build_scheduler=build_scheduler,
        output_dir=fold_dir,
        callbacks=list(callbacks_factory(fold)) if callbacks_factory is not None else (),
        resume=True,
    )
    metrics = trainer.evaluate(val_loader)
    preds = trainer.predict(val_loader)
    if len(preds.ids) != len(fold.val):
        raise DataError(
            f"cross_validate: got {len(preds.ids)} validation predictions for {len(fold.val)} samples"
        )
    record = {
        "version": _RESULT_VERSION,
        "repeat": fold.repeat,
        "fold": fold.fold,
        "train": fold.train.tolist(),
        "val": fold.val.tolist(),
        "best_epoch": trainer.best_epoch,
        "settings": None if settings is None else dict(settings),
        "metrics": json_safe(metrics),
        "history": json_safe(history),
        "oof": {
            "ids": list(preds.ids),
            "indices": fold.val.tolist(),
            "probabilities": preds.probabilities.tolist(),
            "labels": preds.labels.tolist(),
        },
    }
    model.cpu().eval()
    if fold_dir is not None and is_main_process():
        _write_finished(fold_dir, model, record)
    return record, model
