"""Patient-level cross-validation with a fresh model per fold, resumable fold by fold.

:func:`cross_validate` splits the samples with
:func:`~milcell.data.splits.patient_kfold` (stratified, grouped by patient,
optionally repeated) or with the caller's own split (``folds=``: a
scikit-learn splitter, a ``patient -> fold`` mapping, one fold per sample, or
a CSV file; see :func:`~milcell.data.splits.make_folds`), and for every fold
builds a new model, asks the caller for the fold's ``(train, val)``
datasets, trains it with :func:`~milcell.train.fit.fit_model` (a
:class:`~milcell.train.trainer.Trainer`), restores the best checkpoint and
predicts the validation bags. It returns a :class:`CVResult`: per-fold
metrics with their mean ± std, the out-of-fold predictions and the fold
models (for an ensemble, see :mod:`milcell.train.ensemble`).

Model selection
---------------
By default (``selection="inner"``) every outer fold is nested: a stratified,
patient-level share ``inner_fraction`` of its *training* patients is held
out (:func:`~milcell.data.splits.inner_split`, seeded by the fold) for early
stopping and the choice of the best epoch, the model trains on the rest, and
the outer validation fold is used only for the reported metrics and the
out-of-fold predictions. ``make_datasets`` is then called twice per fold,
with ``Fold(inner.train, fold.val)`` (the model's training set and the
reported set) and ``Fold(inner.train, inner.val)`` (the selection set), so
any preprocessing fitted on ``fold.train`` is fitted on exactly what the model
trains on.

``selection="outer"`` chooses the epoch (and stops early) on the same fold
whose metrics are reported (what earlier milcell versions did): those metrics are
optimistic (with few patients per fold, markedly so; see
``docs/evaluating.rst``), and the result says so (:attr:`CVResult.optimistic`,
its table, the log).

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
(``n_splits``, ``n_repeats``, ``seed``, a digest of the labels and groups,
and of custom folds), the selection protocol (``selection``,
``inner_fraction``) and the caller's ``fingerprint`` (e.g. preprocessing and
data identity).
When any existing fold differs, :func:`cross_validate` refuses before
touching anything, with a :class:`~milcell.exceptions.ConfigError` naming the
differing settings; ``overwrite=True`` discards the existing folds instead.

Reproducibility
---------------
Before fold ``(r, k)`` builds its model the global torch generator is seeded
with ``seed + 1000 * r + k`` (also the trainer's shuffle seed unless
``trainer_kwargs`` sets ``seed``, and the seed of the fold's inner split), so
a fold trains identically whether or not earlier folds were loaded from disk.

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
from milcell._validation import check_choice, check_int, check_real
from milcell.data.bag import Bag, collate_bags
from milcell.data.datasets import FeatureBagDataset
from milcell.data.samplers import ClassBalancedSampler, MinorityOversampler, bag_sizes
from milcell.data.splits import Fold, inner_split, make_folds
from milcell.exceptions import CheckpointError, ConfigError, DataError
from milcell.metrics import format_summary, summarize_folds
from milcell.train.checkpoint import load_weights
from milcell.train.distributed import barrier, get_rank, get_world_size, is_main_process, make_loader
from milcell.train.fit import fit_model

__all__ = [
    "EXECUTORS",
    "SELECTIONS",
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
_RESULT_VERSION = 3
#: Model-selection protocols of :func:`cross_validate`: nested (honest, the default) or on the reported fold.
SELECTIONS = ("inner", "outer")
#: Where :func:`cross_validate` trains its folds: here one after another, local processes, Ray tasks.
EXECUTORS = ("sequential", "process", "ray")
_OPTIMISTIC_NOTE = (
    "optimistic: selection='outer' chose each fold's epoch on the fold it reports "
    "(use the default selection='inner' for an honest estimate)"
)
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
    calibrated : ndarray or None
        ``(m, C)`` float32 probabilities after each fold's calibrator
        (``cross_validate(calibrate=...)``), else None.

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
    calibrated: np.ndarray | None = None

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
        The trainer's epoch logs of each fold (their ``val_*`` keys are the
        selection set's: the inner one, or the reported fold with
        ``selection="outer"``).
    selection : {"inner", "outer"}, default "inner"
        The model-selection protocol (see the module docstring).
    inner_fraction : float or None, default None
        Share of each training fold held out for selection (``"inner"``).
    fit_indices : list of ndarray
        Per fold, the ``(k,)`` int64 positions the fold model trained on
        (``fold.train`` less the selection set with ``"inner"``): fit any
        preprocessing that goes with a fold model on these.
    calibrators : list of dict
        Per fold, the :class:`~milcell.calibration.Calibrator` fitted with
        ``calibrate=`` as plain JSON (:meth:`~milcell.calibration.Calibrator.to_dict`);
        empty without calibration.

    Examples
    --------
    >>> r = CVResult(folds=[], summary={"auc": (0.9, 0.05)}, oof=None, models=[], histories=[])
    >>> print(r.table(["auc"]))
    auc  0.90 ± 0.05
    >>> print(CVResult([], {"auc": (0.9, 0.05)}, None, selection="outer").table(["auc"]))
    auc  0.90 ± 0.05
    (optimistic: selection='outer' chose each fold's epoch on the fold it reports ...)
    """

    folds: list[dict[str, float]]
    summary: dict[str, tuple[float, float]]
    oof: OOFPredictions
    models: list[nn.Module] = field(default_factory=list)
    histories: list[list[dict[str, float]]] = field(default_factory=list)
    selection: str = "inner"
    inner_fraction: float | None = None
    fit_indices: list[np.ndarray] = field(default_factory=list)
    calibrators: list[dict[str, Any]] = field(default_factory=list)

    @property
    def optimistic(self) -> bool:
        """True when the reported metrics come from the fold the epochs were chosen on (``"outer"``)."""
        return self.selection == "outer"

    def table(self, metrics: Sequence[str] = _DEFAULT_TABLE, digits: int = 2) -> str:
        """``metric  mean ± std`` rows, one per metric (e.g. ``balanced_accuracy  0.91 ± 0.05``).

        With the default ``metrics``, names absent from the summary (e.g.
        ``sensitivity`` of a multiclass problem) are skipped; a name passed
        explicitly must exist. An optimistic result (``selection="outer"``)
        ends with a line saying so.

        Raises
        ------
        ConfigError
            A requested metric that the folds do not have.
        """
        names = list(metrics)
        if tuple(names) == _DEFAULT_TABLE:
            names = [n for n in names if n in self.summary]
        text = format_summary(self.summary, names, digits=digits)
        return f"{text}\n({_OPTIMISTIC_NOTE})" if self.optimistic else text


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


def _folds_digest(folds: Sequence[Fold]) -> str:
    """A short sha256 of custom folds' numbers and positions."""
    rows = [
        [int(f.repeat), int(f.fold), np.asarray(f.train).tolist(), np.asarray(f.val).tolist()] for f in folds
    ]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


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
    selection: str = "inner",
    inner_fraction: float | None = 0.2,
    folds: Sequence[Fold] | None = None,
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
    selection, inner_fraction
        The model-selection protocol (``inner_fraction`` is recorded only
        for ``"inner"``): folds made with the other protocol are never reused.
    folds : sequence of Fold, optional
        Custom folds (not :func:`~milcell.data.splits.patient_kfold`'s):
        recorded as a digest of their positions (``split``).

    Returns
    -------
    dict
        ``name -> value``; two runs that may share folds have equal settings.

    Examples
    --------
    >>> s = fold_settings(None, [0, 1, 0, 1], None, n_splits=2, n_repeats=1, seed=0, batch_size=2,
    ...                   sampler=None, drop_last=False, trainer_kwargs={"lr": 0.01, "progress": False})
    >>> s["lr"], "progress" in s, s["n_splits"], s["selection"], s["split"]
    (0.01, False, 2, 'inner', 'kfold')
    """
    selection = check_choice(selection, "selection", SELECTIONS)
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
            "split": "kfold" if folds is None else f"custom:{_folds_digest(folds)}",
            "selection": selection,
            "inner_fraction": inner_fraction if selection == "inner" else None,
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
        if is_main_process():  # one rank deletes; the others wait for it (cross_validate's barrier)
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
    # Under torchrun every rank draws the same epoch and keeps its share, dealt by bag size.
    shard: dict[str, Any] = {"num_replicas": get_world_size(), "rank": get_rank()}
    if shard["num_replicas"] > 1:
        shard["sizes"] = bag_sizes(dataset)
    chosen: Any
    if sampler == "balanced":
        chosen = ClassBalancedSampler(train_labels, seed=seed, **shard)
    else:
        chosen = MinorityOversampler(train_labels, seed=seed, **shard)
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
    folds: Any = None,
    selection: str = "inner",
    inner_fraction: float = 0.2,
    calibrate: str | None = None,
    loggers: Sequence[Any] = (),
    executor: str = "sequential",
    executor_options: Mapping[str, Any] | None = None,
) -> CVResult:
    """Stratified patient-level k-fold cross-validation with a fresh model per fold.

    Honest by default: each fold's epoch is chosen on a selection set held
    out of its training patients, never on the fold it reports (see the
    module docstring, "Model selection").

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
        ``fold.train`` here. With ``selection="inner"`` it is called twice
        per fold, with ``fold.train`` the model's training patients (see
        the module docstring).
    labels : array-like
        ``(n,)`` int labels of the ``n`` samples (bags or cells); ``-1``
        samples are left out of every fold.
    groups : array-like, optional
        ``(n,)`` patient of each sample (cells of a patient stay together);
        ``None``: each sample is its own patient.
    n_splits, n_repeats, seed : int
        Passed to :func:`~milcell.data.splits.patient_kfold` (``n_splits``
        and ``n_repeats`` are unused with ``folds``); ``seed`` also seeds
        every fold and its inner split (see the module docstring).
    batch_size : int, default 1
        Bags per batch (training and validation).
    num_workers : int, default 0
        DataLoader workers.
    sampler : {None, "balanced", "oversample"}, default None
        Training-loader sampling: shuffled (None),
        :class:`~milcell.data.samplers.ClassBalancedSampler` or
        :class:`~milcell.data.samplers.MinorityOversampler`. Under ``torchrun`` every
        loader is sharded across the ranks (each rank draws the same epoch and keeps its
        share, dealt by bag size when the sizes are known; see
        :class:`~milcell.data.samplers.DistributedBagSampler`), so ``batch_size`` is per rank.
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
    folds : splitter, mapping, sequence or path-like, optional
        A custom split instead of ``patient_kfold``: a scikit-learn splitter
        (anything with ``split(X, y, groups)``), a ``patient -> fold``
        mapping (patients as ``groups`` names them), one fold per sample, a
        CSV file with the columns ``patient_id`` and ``fold``, or a list of
        :class:`~milcell.data.splits.Fold` (see
        :func:`~milcell.data.splits.make_folds`).
    selection : {"inner", "outer"}, default "inner"
        ``"inner"``: early stopping and the best epoch are chosen on a
        selection set held out of each training fold, and the outer fold is
        only reported (an honest estimate). ``"outer"``: chosen on the
        reported fold itself: optimistic, and marked so in the result.
    inner_fraction : float, default 0.2
        Share of each fold's training patients held out for selection
        (``"inner"``), in (0, 1); at least one patient per class.
    calibrate : {None, "temperature", "vector", "platt"}, default None
        Fit a :class:`~milcell.calibration.Calibrator` per fold on the fold
        model's predictions of its inner selection set (patients held out of
        the fold's training patients, never the reported fold; needs
        ``selection="inner"`` and at least 10 selection patients per fold),
        apply it to the fold's out-of-fold probabilities
        (``result.oof.calibrated``) and add to each fold's metrics ``ece``,
        ``brier`` and ``nll`` before and ``ece_calibrated``,
        ``brier_calibrated`` and ``nll_calibrated`` after calibration
        (and ``temperature``). Not part of the settings fingerprint: finished
        folds are calibrated again on resume.
    loggers : sequence of RunLogger, optional
        Experiment loggers (:mod:`milcell.train.loggers`): each is the parent
        run (started here unless it already is, and then finished here too)
        of one child run per fold, ``fold_<repeat>_<fold>``, holding the
        fold's parameters, epoch logs and reported metrics; the parent gets
        the summary ``<metric>_mean`` / ``<metric>_std``. With the sequential
        executor the epochs are logged as they end; otherwise (and for folds
        loaded from ``output_dir``) from the fold's history once it is back.
    executor : {"sequential", "process", "ray"}, default "sequential"
        Where the folds that need training run: one after another in this
        process; in local processes (:class:`concurrent.futures.ProcessPoolExecutor`,
        ``spawn``; ``build_model``, ``make_datasets``, the factories and the
        datasets must pickle: module-level functions or
        :func:`functools.partial`, not lambdas); or as Ray tasks (``ray``
        installed; ``ray.init`` is called when Ray is not running yet). Each
        fold is seeded as in the sequential run and every worker uses this
        process's torch thread count and :func:`milcell.checks` setting, so
        the results (metrics, predictions, weights) are those of the
        sequential run. ``callbacks_factory`` runs in the workers.
    executor_options : mapping, optional
        ``"process"``: ``max_workers`` (default: the number of folds, at most
        the CPU count). ``"ray"``: ``address`` (an existing cluster; default a
        local Ray), ``num_cpus`` and ``num_gpus`` per fold task (default 1
        and 0), ``init_kwargs`` for ``ray.init``.

    Returns
    -------
    CVResult

    Raises
    ------
    ConfigError
        Invalid arguments, an ``output_dir`` holding folds of another split,
        or folds trained with other settings or the other selection protocol
        (without ``overwrite``); the message names the differing settings. A
        training fold too small for an inner selection set.
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
    selection = check_choice(selection, "cross_validate: selection", SELECTIONS)
    inner_fraction = check_real(
        inner_fraction, "cross_validate: inner_fraction", low=0.0, high=1.0, low_open=True, high_open=True
    )
    _check_calibrate(calibrate, selection)
    executor = check_choice(executor, "cross_validate: executor", EXECUTORS)
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
    custom = folds is not None
    splits = make_folds(folds, y, g, n_splits=n_splits, n_repeats=n_repeats, seed=seed)
    if custom:
        n_repeats = 1 + max(f.repeat for f in splits)
        n_splits = 1 + max(f.fold for f in splits)
    if selection == "outer":
        logger.warning("cross_validate: %s", _OPTIMISTIC_NOTE)
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
            selection=selection,
            inner_fraction=inner_fraction,
            folds=splits if custom else None,
        )
        del probe
        _check_splits(root, splits, bool(overwrite))
        _check_output_dir(root, settings, bool(overwrite))
        # Under torchrun every rank checks the folder as it was before any fold wrote to it: rank 0
        # writes a fold's settings as soon as it starts the fold, and a rank still checking would
        # take the half-written fold for one of another run.
        barrier()

    fold_rows: list[dict[str, float]] = []
    histories: list[list[dict[str, float]]] = []
    models: list[nn.Module] = []
    oof_parts: list[dict[str, Any]] = []
    fit_indices: list[np.ndarray] = []
    calibrated_parts: list[tuple[dict[str, float], dict[str, Any], np.ndarray]] = []
    fold_args: dict[str, Any] = {
        "build_model": build_model,
        "make_datasets": make_datasets,
        "y": y,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "sampler": sampler,
        "drop_last": drop_last,
        "kwargs": kwargs,
        "build_optimizer": build_optimizer,
        "build_scheduler": build_scheduler,
        "callbacks_factory": callbacks_factory,
        "settings": settings,
        "groups": g,
        "selection": selection,
        "inner_fraction": inner_fraction,
    }
    elsewhere: dict[tuple[int, int], tuple[dict[str, Any], nn.Module]] = {}
    if executor != "sequential":
        todo = [f for f in splits if root is None or not (_fold_dir(root, f) / RESULT_NAME).is_file()]
        elsewhere = _run_folds_elsewhere(executor, todo, seed, root, fold_args, executor_options)
    from milcell.train.loggers import finish_on_error

    # Runs opened here (the parents not started by the caller, every fold's children) end FAILED
    # (KILLED on an interrupt) when a fold raises; the error then propagates.
    with finish_on_error(*(lg for lg in loggers if not getattr(lg, "active", True))) as opened:
        parents = _start_loggers(loggers, splits, fold_args, n_splits, n_repeats, seed)
        for fold in splits:
            fold_seed = seed + 1000 * fold.repeat + fold.fold
            fold_dir = None if root is None else _fold_dir(root, fold)
            loaded = (
                None
                if fold_dir is None
                else _load_finished(fold_dir, fold, build_model, keep_models or calibrate is not None)
            )
            children = []
            for lg in loggers:
                children.append(
                    lg.child(f"fold_{fold.repeat}_{fold.fold}", {"repeat": fold.repeat, "fold": fold.fold})
                )
                opened.append(children[-1])
            live = loaded is None and (fold.repeat, fold.fold) not in elsewhere
            if loaded is not None:
                record, model = loaded
            elif not live:
                record, model = elsewhere[(fold.repeat, fold.fold)]
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
                    callbacks_factory=_with_loggers(callbacks_factory, children),
                    settings=settings,
                    groups=g,
                    selection=selection,
                    inner_fraction=inner_fraction,
                )
            metrics = {k: float(v) for k, v in record["metrics"].items()}
            fit_indices.append(np.asarray(record.get("fit", record["train"]), dtype=np.int64))
            fold_rows.append({**metrics, "repeat": float(fold.repeat), "fold": float(fold.fold)})
            histories.append([{k: float(v) for k, v in row.items()} for row in record["history"]])
            oof_parts.append(record["oof"] | {"repeat": fold.repeat, "fold": fold.fold})
            if calibrate is not None:
                calibrated_parts.append(
                    _calibrate_fold(
                        model,
                        make_datasets,
                        fold,
                        record,
                        calibrate,
                        batch_size=batch_size,
                        num_workers=num_workers,
                        trainer_kwargs=kwargs,
                    )
                )
                fold_rows[-1].update(calibrated_parts[-1][0])
            if keep_models and model is not None:
                models.append(model)
            summary_line = ", ".join(
                f"{k}={metrics[k]:.3f}" for k in ("balanced_accuracy", "auc", "accuracy") if k in metrics
            )
            logger.info(
                "cross_validate: repeat %d fold %d: %s%s",
                fold.repeat,
                fold.fold,
                summary_line,
                " (optimistic: selected on this fold)" if selection == "outer" else "",
            )

            _finish_fold_loggers(children, record, fold_rows[-1], live)

        summary = summarize_folds(
            [{k: v for k, v in r.items() if k not in ("repeat", "fold")} for r in fold_rows]
        )
        _finish_loggers(loggers, parents, summary)
    oof = OOFPredictions(
        ids=[i for part in oof_parts for i in part["ids"]],
        indices=np.concatenate([np.asarray(p["indices"], dtype=np.int64) for p in oof_parts]),
        probabilities=np.concatenate(
            [np.asarray(p["probabilities"], dtype=np.float32).reshape(len(p["ids"]), -1) for p in oof_parts]
        ),
        labels=np.concatenate([np.asarray(p["labels"], dtype=np.int64) for p in oof_parts]),
        fold=np.concatenate([np.full(len(p["ids"]), p["fold"], dtype=np.int64) for p in oof_parts]),
        repeat=np.concatenate([np.full(len(p["ids"]), p["repeat"], dtype=np.int64) for p in oof_parts]),
        calibrated=(
            np.concatenate([part[2] for part in calibrated_parts]).astype(np.float32)
            if calibrated_parts
            else None
        ),
    )
    return CVResult(
        folds=fold_rows,
        summary=summary,
        oof=oof,
        models=models,
        histories=histories,
        selection=selection,
        inner_fraction=inner_fraction if selection == "inner" else None,
        fit_indices=fit_indices,
        calibrators=[part[1] for part in calibrated_parts],
    )


# --------------------------------------------------------------------------- calibration


def _check_calibrate(calibrate: str | None, selection: str) -> None:
    """Validate ``cross_validate(calibrate=...)`` (needs the inner selection set to calibrate on)."""
    if calibrate is None:
        return
    from milcell.calibration import CALIBRATION_METHODS

    check_choice(calibrate, "cross_validate: calibrate", (None, *CALIBRATION_METHODS))
    if selection != "inner":
        raise ConfigError(
            "cross_validate: calibrate needs selection='inner': the calibrator is fitted on the inner "
            "selection set, and selection='outer' holds out no training patient"
        )


def _calibrate_fold(
    model: nn.Module | None,
    make_datasets: Callable[[Fold], tuple[Dataset[Bag], Dataset[Bag]]],
    fold: Fold,
    record: Mapping[str, Any],
    method: str,
    *,
    batch_size: int,
    num_workers: int,
    trainer_kwargs: Mapping[str, Any],
) -> tuple[dict[str, float], dict[str, Any], np.ndarray]:
    """Fit a calibrator on the fold's inner selection set; metrics before/after on the reported fold.

    Returns the extra fold metrics, the calibrator as JSON and the calibrated ``(n_val, C)``
    out-of-fold probabilities.
    """
    from milcell.calibration import CalibrationError, Calibrator
    from milcell.metrics import calibration_report
    from milcell.train.inference import predict

    where = f"fold {fold.fold} of repeat {fold.repeat}"
    if model is None:
        raise CheckpointError(f"cross_validate: calibrate: no model for {where}")
    select = np.asarray(record.get("select") or [], dtype=np.int64)
    fit = np.asarray(record.get("fit", record["train"]), dtype=np.int64)
    if select.size == 0:
        raise CalibrationError(f"cross_validate: calibrate: {where} has no inner selection set")
    select_ds = _datasets(make_datasets, Fold(fit, select, fold.repeat, fold.fold))[1]
    loader = make_loader(select_ds, batch_size, shuffle=False, num_workers=num_workers)
    preds = predict(
        model,
        loader,
        device=trainer_kwargs.get("device"),
        precision=str(trainer_kwargs.get("precision", "32")),
    )
    held = preds.probabilities.double().clamp_min(1e-12).log().numpy()
    try:
        calibrator = Calibrator(method).fit(held, preds.labels.numpy())
    except CalibrationError as exc:
        raise CalibrationError(
            f"cross_validate: calibrate: {where}: {exc} (the inner selection set has {select.size} "
            "samples; raise inner_fraction or use more patients)"
        ) from exc
    raw = np.asarray(record["oof"]["probabilities"], dtype=np.float64).reshape(len(record["oof"]["ids"]), -1)
    labels = np.asarray(record["oof"]["labels"], dtype=np.int64)
    calibrated = calibrator.transform_probabilities(raw / raw.sum(axis=1, keepdims=True))
    before = calibration_report(labels, raw / raw.sum(axis=1, keepdims=True))
    after = calibration_report(labels, calibrated)
    metrics = {
        "ece": before.ece,
        "brier": before.brier,
        "nll": before.nll,
        "ece_calibrated": after.ece,
        "brier_calibrated": after.brier,
        "nll_calibrated": after.nll,
        "temperature": calibrator.temperature,
    }
    logger.info(
        "cross_validate: %s: %s calibration on %d held-out samples: ECE %.3f -> %.3f, NLL %.3f -> %.3f",
        where,
        method,
        select.size,
        before.ece,
        after.ece,
        before.nll,
        after.nll,
    )
    return metrics, calibrator.to_dict(), calibrated


def _datasets(
    make_datasets: Callable[[Fold], tuple[Dataset[Bag], Dataset[Bag]]], fold: Fold
) -> tuple[Dataset[Bag], Dataset[Bag]]:
    """``make_datasets(fold)``, checked: a pair whose second item holds ``fold.val``."""
    datasets = make_datasets(fold)
    if not isinstance(datasets, tuple) or len(datasets) != 2:
        raise ConfigError("cross_validate: make_datasets must return a (train_ds, val_ds) tuple")
    train_ds, val_ds = datasets
    if len(val_ds) != len(fold.val):  # type: ignore[arg-type]
        raise DataError(
            f"cross_validate: make_datasets returned {len(val_ds)} validation items for fold "  # type: ignore[arg-type]
            f"{fold.fold} of repeat {fold.repeat}, but the fold has {len(fold.val)} (use fold.val)"
        )
    return train_ds, val_ds


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
    groups: np.ndarray | None = None,
    selection: str = "inner",
    inner_fraction: float = 0.2,
) -> tuple[dict[str, Any], nn.Module]:
    if fold_dir is not None and settings is not None and is_main_process():
        # Recorded before any checkpoint, so a resumed fold is checked against the settings it began with.
        with atomic_path(fold_dir / SETTINGS_NAME) as tmp:
            tmp.write_text(json.dumps(dict(settings), indent=1) + "\n", encoding="utf-8")
    torch.manual_seed(fold_seed)
    model = build_model()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"cross_validate: build_model returned {type(model).__name__}, not an nn.Module")
    if selection == "inner":
        inner = inner_split(fold, y, groups, fraction=inner_fraction, seed=fold_seed)
        fit, select = inner.train, inner.val
    else:
        fit, select = fold.train, fold.val
    # The model's training set and the reported set; then (inner) the selection set, same preprocessing.
    train_ds, val_ds = _datasets(make_datasets, Fold(fit, fold.val, fold.repeat, fold.fold))
    select_ds = (
        val_ds
        if selection == "outer"
        else _datasets(make_datasets, Fold(fit, select, fold.repeat, fold.fold))[1]
    )
    train_loader = _train_loader(
        train_ds, y[fit], sampler, batch_size, num_workers, fold_seed, drop_last=drop_last
    )
    val_loader = make_loader(val_ds, batch_size, shuffle=False, num_workers=num_workers)
    select_loader = (
        val_loader
        if selection == "outer"
        else make_loader(select_ds, batch_size, shuffle=False, num_workers=num_workers)
    )
    logger.info(
        "cross_validate: training fold %d of repeat %d on %d samples, selecting on %d%s, reporting %d",
        fold.fold,
        fold.repeat,
        len(fit),
        len(select),
        " (the reported fold: optimistic)" if selection == "outer" else " held out of the training fold",
        len(fold.val),
    )
    _, trainer, history = fit_model(
        model,
        train_loader,
        select_loader,
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
        "selection": selection,
        "fit": np.asarray(fit).tolist(),
        "select": np.asarray(select).tolist(),
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


# --------------------------------------------------------------------------- loggers and executors


def _with_loggers(
    factory: Callable[[Fold], Sequence[Any]] | None, children: Sequence[Any]
) -> Callable[[Fold], Sequence[Any]] | None:
    """``callbacks_factory`` plus the fold's child loggers (trainer callbacks of a live fold)."""
    if not children:
        return factory

    def combined(fold: Fold) -> list[Any]:
        return [*(factory(fold) if factory is not None else ()), *children]

    return combined


def _start_loggers(
    loggers: Sequence[Any],
    splits: Sequence[Fold],
    fold_args: Mapping[str, Any],
    n_splits: int,
    n_repeats: int,
    seed: int,
) -> list[bool]:
    """Start the parent runs with the cross-validation settings; which of them were started here."""
    from milcell.train.loggers import RunLogger

    params = {
        "cross_validation": {
            "n_splits": n_splits,
            "n_repeats": n_repeats,
            "n_folds": len(splits),
            "seed": seed,
            "batch_size": fold_args["batch_size"],
            "sampler": fold_args["sampler"],
            "selection": fold_args["selection"],
            "inner_fraction": fold_args["inner_fraction"],
        },
    }
    for lg in loggers:  # all checked before any run opens
        if not isinstance(lg, RunLogger):
            raise ConfigError(
                f"cross_validate: loggers must be milcell.train.loggers.RunLogger objects, got "
                f"{type(lg).__name__} (build them by name with make_loggers)"
            )
    started = []
    for lg in loggers:
        started.append(not lg.active)
        lg.start(params)
    return started


def _finish_fold_loggers(
    children: Sequence[Any], record: Mapping[str, Any], row: Mapping[str, float], live: bool
) -> None:
    """A fold's child runs: its history (unless logged live), reported metrics and best epoch."""
    reported = {k: v for k, v in row.items() if k not in ("repeat", "fold")}
    if record.get("best_epoch") is not None:
        reported["best_epoch"] = float(record["best_epoch"])
    for child in children:
        if not live:
            child.log_history(record["history"])
        child.log_metrics(reported)
        child.finish()


def _finish_loggers(
    loggers: Sequence[Any], started: Sequence[bool], summary: Mapping[str, tuple[float, float]]
) -> None:
    """Log ``<metric>_mean`` / ``<metric>_std`` on the parents; finish those started here."""
    flat = {f"{k}_mean": pair[0] for k, pair in summary.items()}
    flat.update({f"{k}_std": pair[1] for k, pair in summary.items()})
    for lg, mine in zip(loggers, started, strict=True):
        lg.log_metrics(flat)
        if mine:
            lg.finish()


def _worker_setup(threads: int, checks: bool) -> None:
    """Make a fold worker compute like this process: torch threads and value checks."""
    from milcell._checks import set_checks

    torch.set_num_threads(threads)
    set_checks(checks)


def _fold_task(
    fold: Fold,
    fold_seed: int,
    fold_dir: Path | None,
    fold_args: Mapping[str, Any],
    setup: tuple[int, bool] | None = None,
) -> tuple[dict[str, Any], bytes]:
    """One fold in a worker: ``_run_fold``; the model comes back as ``torch.save`` bytes."""
    import io

    if setup is not None:
        _worker_setup(*setup)
    record, model = _run_fold(fold, fold_seed, fold_dir=fold_dir, **fold_args)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return record, buffer.getvalue()


def _model_from_bytes(data: bytes) -> nn.Module:
    import io

    model = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"cross_validate: a fold worker returned {type(model).__name__}, not a model")
    return model.eval()


def _run_folds_elsewhere(
    executor: str,
    folds: Sequence[Fold],
    seed: int,
    root: Path | None,
    fold_args: Mapping[str, Any],
    options: Mapping[str, Any] | None,
) -> dict[tuple[int, int], tuple[dict[str, Any], nn.Module]]:
    """Train ``folds`` in local processes or as Ray tasks; ``(repeat, fold) -> (record, model)``."""
    if not folds:
        return {}
    from milcell._checks import checks_enabled

    opts = dict(options or {})
    known = {"process": {"max_workers"}, "ray": {"address", "num_cpus", "num_gpus", "init_kwargs"}}[executor]
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ConfigError(
            f"cross_validate: executor_options {unknown} do not apply to executor={executor!r} "
            f"(known: {sorted(known)})"
        )
    setup = (torch.get_num_threads(), checks_enabled())
    jobs = [
        (fold, seed + 1000 * fold.repeat + fold.fold, None if root is None else _fold_dir(root, fold))
        for fold in folds
    ]
    logger.info("cross_validate: training %d folds with executor=%r", len(jobs), executor)
    if executor == "process":
        import multiprocessing
        import pickle
        from concurrent.futures import ProcessPoolExecutor

        try:
            pickle.dumps(fold_args)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise ConfigError(
                "cross_validate: executor='process' needs build_model, make_datasets, the factories and "
                f"the datasets to pickle (module-level functions or functools.partial, not lambdas): {exc}"
            ) from None
        max_workers = check_int(
            opts.get("max_workers", min(len(jobs), os.cpu_count() or 1)),
            "cross_validate: executor_options['max_workers']",
            low=1,
        )
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=max_workers, mp_context=context) as pool:
            futures = [pool.submit(_fold_task, fold, s, d, fold_args, setup) for fold, s, d in jobs]
            results = [future.result() for future in futures]
    else:
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "cross_validate: executor='ray' needs the 'ray' package, which is not installed: "
                'pip install "milcell[ray]"'
            ) from None
        if not ray.is_initialized():
            ray.init(
                address=opts.get("address"),
                include_dashboard=False,
                log_to_driver=False,
                **dict(opts.get("init_kwargs") or {}),
            )
        task = ray.remote(num_cpus=opts.get("num_cpus", 1), num_gpus=opts.get("num_gpus", 0))(_fold_task)
        results = ray.get([task.remote(fold, s, d, fold_args, setup) for fold, s, d in jobs])
    return {
        (fold.repeat, fold.fold): (record, _model_from_bytes(data))
        for (fold, _, _), (record, data) in zip(jobs, results, strict=True)
    }
