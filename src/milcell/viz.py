"""Figures for MIL experiments: ROC, training and risk-coverage curves, reliability diagrams, montages.

Every function builds a :class:`matplotlib.figure.Figure` with the object API
(no pyplot state, no window, nothing left open) and returns it; write it with
:func:`save_figure`. matplotlib is a dependency of milcell, imported only
when a figure is drawn (so ``import milcell`` stays light); where it has been
removed, drawing raises :class:`MissingExtraError` with the install command.

Examples
--------
>>> import torch
>>> from milcell.viz import attention_montage, plot_roc
>>> fig = plot_roc([([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), ([0, 1, 0, 1], [0.2, 0.9, 0.3, 0.7])])
>>> fig.axes[0].get_xlabel()
'False positive rate (1 - specificity)'
>>> fig = attention_montage(torch.rand(6, 3, 16, 16), torch.tensor([0.1, 0.3, 0.05, 0.2, 0.25, 0.12]), k=2)
>>> [ax.get_label() for ax in fig.axes]
['cell 1', 'cell 4', 'cell 2', 'cell 0']
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from milcell._utils import atomic_path
from milcell.exceptions import ConfigError, DataError, MilcellError, ShapeError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "MissingExtraError",
    "attention_montage",
    "attention_order",
    "plot_confusion_matrix",
    "plot_reliability_diagram",
    "plot_risk_coverage",
    "plot_roc",
    "plot_roc_comparison",
    "plot_training_curves",
    "save_figure",
]

logger = logging.getLogger("milcell")

_MISSING_MATPLOTLIB = "milcell.viz needs matplotlib (a milcell dependency): pip install 'milcell[viz]'"
_MEAN_FPR = np.linspace(0.0, 1.0, 201)
_ROW_PREFIXES = ("train_", "val_", "valid_", "validation_", "test_")
_LINESTYLES = {"train_": "-", "val_": "--", "valid_": "--", "validation_": "--", "test_": ":"}


class MissingExtraError(MilcellError, ImportError):
    """An optional dependency (here matplotlib, the ``viz`` extra) is not installed.

    Also an :class:`ImportError`, so ``except ImportError`` keeps working.

    Examples
    --------
    >>> issubclass(MissingExtraError, ImportError) and issubclass(MissingExtraError, MilcellError)
    True
    """


def _figure_class() -> type[Figure]:
    """Import matplotlib lazily and return its ``Figure`` class."""
    try:
        import matplotlib  # noqa: F401  (imported first so a blocked parent package is detected)
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtraError(_MISSING_MATPLOTLIB) from exc
    return Figure


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Turn a tensor, array or sequence into a numpy array; name ``name`` on failure."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} cannot be read as an array: {exc}") from exc


# ----------------------------------------------------------------------------- ROC


def _fold_roc(y_true: Any, y_score: Any, where: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Validate one ``(y_true, y_score)`` pair and return ``fpr, tpr, auc``."""
    from sklearn.metrics import auc, roc_curve

    t = _to_numpy(y_true, f"y_true of {where}")
    s = _to_numpy(y_score, f"y_score of {where}")
    if t.ndim != 1 or s.ndim != 1:
        raise ShapeError(
            f"{where}: y_true and y_score must be 1-D (N,), got shapes {t.shape} and {s.shape}; "
            "pass the probability of the positive class as y_score"
        )
    if len(t) != len(s):
        raise ShapeError(f"{where}: y_true has {len(t)} entries but y_score has {len(s)}")
    keep = t != -1
    t, s = t[keep], s[keep].astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise DataError(f"{where}: y_score contains NaN or infinite values")
    labels = set(np.unique(t).tolist())
    if not labels <= {0, 1}:
        raise DataError(f"{where}: y_true must be binary (0, 1, or -1 for unlabelled), got {sorted(labels)}")
    if labels != {0, 1}:
        raise DataError(
            f"{where}: a ROC curve needs both classes among the labelled entries, got only {sorted(labels)}"
        )
    fpr, tpr, _ = roc_curve(t.astype(np.int64), s)
    return fpr, tpr, float(auc(fpr, tpr))


def _check_pair(entry: Any, where: str) -> tuple[Any, Any]:
    """Split ``entry`` into ``(y_true, y_score)``; DataError naming ``where`` otherwise."""
    ok = isinstance(entry, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(entry, (str, bytes))
    if not ok or len(entry) != 2:
        raise DataError(f"{where} must be a (y_true, y_score) pair, got {type(entry).__name__}")
    return entry[0], entry[1]


def _mean_roc(
    folds: Sequence[tuple[np.ndarray, np.ndarray, float]],
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Mean TPR (and its std) on the common FPR grid; mean and std of the fold AUCs.

    Standard deviations are sample ones (``ddof=1``), as in the cross-validation table
    (:func:`milcell.metrics.summarize_folds`), so the legend and the table agree.
    """
    tprs = []
    for fpr, tpr, _ in folds:
        interp = np.interp(_MEAN_FPR, fpr, tpr)
        interp[0] = 0.0
        tprs.append(interp)
    stack = np.stack(tprs)
    mean_tpr = stack.mean(axis=0)
    mean_tpr[-1] = 1.0
    aucs = np.array([a for _, _, a in folds])
    return mean_tpr, stack.std(axis=0, ddof=1), float(aucs.mean()), float(aucs.std(ddof=1))


def _roc_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    return _figure_class()(figsize=figsize, layout="constrained").add_subplot()


def _finish_roc_axes(ax: Axes, title: str | None) -> None:
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title)


def plot_roc(
    curves: Sequence[tuple[Any, Any]],
    ax: Axes | None = None,
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Plot one ROC curve per cross-validation fold and their mean.

    Each fold's curve is drawn thinly with its AUC in the legend; with two or
    more folds the mean curve (true positive rates interpolated on a common
    false positive rate grid, then averaged) is drawn bold with a ±1 standard
    deviation band, labelled with the mean ± std of the fold AUCs.

    Parameters
    ----------
    curves : sequence of (y_true, y_score) pairs
        One pair per fold. ``y_true`` is ``(N,)`` with labels 0 / 1 (entries
        labelled ``-1`` are unlabelled and left out); ``y_score`` is ``(N,)``,
        the score or probability of the positive class. Tensors, arrays or
        lists.
    ax : matplotlib Axes or None, default None
        Draw into this axes; a new figure is made when None.
    title : str or None, default None
        Axes title.
    labels : sequence of str or None, default None
        One legend name per fold; ``"fold 1"``, ``"fold 2"``, ... when None.

    Returns
    -------
    matplotlib.figure.Figure
        The figure holding the axes.

    Raises
    ------
    MissingExtraError
        matplotlib is not installed.
    ShapeError
        ``y_true`` and ``y_score`` of a fold differ in length or are not 1-D,
        or ``labels`` does not have one name per fold.
    DataError
        ``curves`` is empty, an entry is not a pair, labels are not binary or a
        fold lacks one of the two classes.

    Examples
    --------
    >>> fig = plot_roc([([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), ([0, 1, 0, 1], [0.2, 0.9, 0.3, 0.7])])
    >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    ['fold 1 (AUC = 0.75)', 'fold 2 (AUC = 1.00)', 'mean (AUC = 0.88 ± 0.18)', '± 1 std', 'chance']
    """
    if isinstance(curves, Mapping) or not isinstance(curves, Sequence) or len(curves) == 0:
        raise DataError("curves must be a non-empty sequence of (y_true, y_score) pairs, one per fold")
    if labels is not None and len(labels) != len(curves):
        raise ShapeError(f"labels has {len(labels)} names but curves has {len(curves)} folds")
    if _is_pair(curves):
        raise DataError(
            "curves must be a sequence of (y_true, y_score) pairs, one per fold; "
            "for a single curve pass [(y_true, y_score)]"
        )
    if labels is not None:
        names = [str(label) for label in labels]
    else:
        names = ["ROC"] if len(curves) == 1 else [f"fold {i + 1}" for i in range(len(curves))]
    folds = [
        _fold_roc(*_check_pair(entry, f"curves[{i}]"), where=f"curves[{i}] ({names[i]})")
        for i, entry in enumerate(curves)
    ]
    ax = _roc_axes(ax, (5.5, 5.5))
    single = len(folds) == 1
    for i, (fpr, tpr, area) in enumerate(folds):
        ax.plot(
            fpr,
            tpr,
            color=f"C{i % 10}",
            linewidth=2.0 if single else 1.0,
            alpha=1.0 if single else 0.6,
            label=f"{names[i]} (AUC = {area:.2f})",
        )
    if not single:
        mean_tpr, std_tpr, mean_auc, std_auc = _mean_roc(folds)
        ax.plot(
            _MEAN_FPR,
            mean_tpr,
            color="black",
            linewidth=2.5,
            label=f"mean (AUC = {mean_auc:.2f} ± {std_auc:.2f})",
        )
        ax.fill_between(
            _MEAN_FPR,
            np.clip(mean_tpr - std_tpr, 0, 1),
            np.clip(mean_tpr + std_tpr, 0, 1),
            color="grey",
            alpha=0.25,
            label="± 1 std",
        )
    _finish_roc_axes(ax, title)
    return ax.figure  # type: ignore[return-value]


def _ndim(x: Any) -> int:
    """Number of dimensions of an array-like; -1 when it is ragged."""
    if isinstance(x, torch.Tensor):
        return x.ndim
    try:
        return int(np.ndim(x))
    except ValueError:
        return -1


def _is_pair(value: Any) -> bool:
    """True for one ``(y_true, y_score)`` pair of 1-D array-likes (not a sequence of such pairs)."""
    return len(value) == 2 and _ndim(value[0]) == 1 and _ndim(value[1]) == 1


def _as_folds(value: Any, name: str) -> list[tuple[Any, Any]]:
    """One ``(y_true, y_score)`` pair, or a sequence of them, as a list of pairs."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise DataError(f"model {name!r}: expected a (y_true, y_score) pair or a sequence of such pairs")
    if _is_pair(value):
        return [(value[0], value[1])]
    return [_check_pair(entry, f"model {name!r}, fold {i}") for i, entry in enumerate(value)]


def plot_roc_comparison(
    models: Mapping[str, Any],
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Plot the ROC curves of several models in one axes, each with its AUC.

    Parameters
    ----------
    models : mapping of str to (y_true, y_score) or sequence of such pairs
        Model name -> its predictions. A single ``(y_true, y_score)`` pair
        (arrays ``(N,)``, labels 0 / 1, ``-1`` left out) gives one curve; a
        sequence of pairs (cross-validation folds) gives the mean curve with a
        ±1 std band, labelled with the mean ± std of the fold AUCs.
    ax : matplotlib Axes or None, default None
        Draw into this axes; a new figure is made when None.
    title : str or None, default None
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    MissingExtraError
        matplotlib is not installed.
    DataError
        ``models`` is empty or a model's predictions are malformed.
    ShapeError
        ``y_true`` and ``y_score`` differ in length.

    Examples
    --------
    >>> y = [0, 0, 1, 1]
    >>> models = {"CNN": (y, [0.1, 0.4, 0.35, 0.8]), "CNN + clinical": (y, [0.1, 0.2, 0.7, 0.8])}
    >>> fig = plot_roc_comparison(models)
    >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    ['CNN (AUC = 0.75)', 'CNN + clinical (AUC = 1.00)', 'chance']
    """
    if not isinstance(models, Mapping) or len(models) == 0:
        raise DataError("models must be a non-empty mapping of model name to (y_true, y_score)")
    results = []
    for name, value in models.items():
        folds = [
            _fold_roc(t, s, where=f"model {name!r}" + (f", fold {i}" if i else ""))
            for i, (t, s) in enumerate(_as_folds(value, str(name)))
        ]
        results.append((str(name), folds))
    ax = _roc_axes(ax, (5.5, 5.5))
    for i, (name, folds) in enumerate(results):
        color = f"C{i % 10}"
        if len(folds) == 1:
            fpr, tpr, area = folds[0]
            ax.plot(fpr, tpr, color=color, linewidth=2.0, label=f"{name} (AUC = {area:.2f})")
            continue
        mean_tpr, std_tpr, mean_auc, std_auc = _mean_roc(folds)
        ax.plot(
            _MEAN_FPR,
            mean_tpr,
            color=color,
            linewidth=2.0,
            label=f"{name} (AUC = {mean_auc:.2f} ± {std_auc:.2f})",
        )
        ax.fill_between(
            _MEAN_FPR,
            np.clip(mean_tpr - std_tpr, 0, 1),
            np.clip(mean_tpr + std_tpr, 0, 1),
            color=color,
            alpha=0.15,
            linewidth=0,
        )
    _finish_roc_axes(ax, title)
    return ax.figure  # type: ignore[return-value]


# ----------------------------------------------------------------------------- training curves


def _parse_float(text: Any) -> float | None:
    """A number from a CSV cell; NaN for an empty cell; None when the cell is not numeric."""
    if text is None:
        return math.nan
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    text = str(text).strip()
    if text == "" or text.lower() in {"nan", "none", "null"}:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return None


def _read_log(
    log: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
) -> tuple[str, list[Mapping[str, Any]]]:
    """Rows of a training log, and a name for it used in error messages."""
    if isinstance(log, (str, os.PathLike)):
        path = Path(log)
        where = f"training log {str(path)!r}"
        if not path.is_file():
            raise DataError(f"{where} does not exist or is not a file")
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                raise DataError(f"{where} is empty (no header row)")
            rows: list[Mapping[str, Any]] = list(reader)
        if "epoch" not in [f.strip() for f in reader.fieldnames]:
            raise DataError(f"{where} has no 'epoch' column (columns: {', '.join(reader.fieldnames)})")
        rows = [{(k or "").strip(): v for k, v in row.items()} for row in rows]
    elif isinstance(log, Sequence):
        where = "training log (list of rows)"
        rows = list(cast("Sequence[Mapping[str, Any]]", log))
        if not all(isinstance(r, Mapping) for r in rows):
            raise DataError(f"{where}: every row must be a mapping of column name to value")
        if rows and not any("epoch" in r for r in rows):
            raise DataError(f"{where} has no 'epoch' column (columns: {', '.join(rows[0])})")
    else:
        raise DataError(f"log must be a CSV path or a list of row dicts, got {type(log).__name__}")
    if not rows:
        raise DataError(f"{where} has no rows")
    return where, rows


def _is_auxiliary(column: str) -> bool:
    """Columns that are bookkeeping, not curves: wall time, steps, sample counts."""
    lower = column.lower()
    return "time" in lower or lower in {"step", "global_step", "iteration", "samples", "fold"}


def _is_lr(column: str) -> bool:
    lower = column.lower()
    return lower == "lr" or lower.startswith("lr_") or lower.startswith("lr/") or "learning_rate" in lower


#: Confusion counts and sample counts: drawn on their own axis, never beside rates in [0, 1].
_COUNT_NAMES = frozenset({"tp", "fp", "tn", "fn", "support", "samples"})


def _is_count(column: str) -> bool:
    base = _split_name(column)[0].lower()
    return base in _COUNT_NAMES or base.startswith("n_")


def _split_name(column: str) -> tuple[str, str]:
    """(base metric name, line style) for a column such as ``val_auc``."""
    for prefix in _ROW_PREFIXES:
        if column.lower().startswith(prefix):
            return column[len(prefix) :], _LINESTYLES[prefix]
    return column, "-"


def plot_training_curves(
    log: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Plot losses, metrics and the learning rate of a training run against the epoch.

    The log is the trainer's CSV (one row per epoch, or separate rows for
    training and validation; empty cells are skipped, so validation run every
    few epochs still draws a line). Panels, left to right: columns whose name
    contains ``"loss"``; the other numeric columns (metrics); the learning
    rate (``lr``, ``lr_*``, ``*learning_rate*``) when logged. A metric shares
    its colour across ``train_`` / ``val_`` / ``test_`` prefixes, which set the
    line style (solid / dashed / dotted). Non-numeric columns and bookkeeping
    columns (names containing ``time``; ``step``, ``global_step``,
    ``iteration``, ``samples``, ``fold``) are left out unless named in
    ``columns``.

    Parameters
    ----------
    log : path or sequence of mappings
        Path of the CSV log (must have an ``epoch`` column), or its rows as
        dicts of column name -> value.
    columns : sequence of str or None, default None
        Plot only these columns (``epoch`` is always the x axis).
    title : str or None, default None
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    MissingExtraError
        matplotlib is not installed.
    DataError
        The file is missing or empty, has no ``epoch`` column, an ``epoch``
        cell is not a number, a requested column is absent, or nothing numeric
        is left to plot. The message names the file.

    Examples
    --------
    >>> rows = [
    ...     {"epoch": 1, "lr": 1e-3, "train_loss": 0.9, "val_loss": 0.8, "val_auc": 0.6},
    ...     {"epoch": 2, "lr": 1e-4, "train_loss": 0.5, "val_loss": 0.6, "val_auc": 0.7},
    ... ]
    >>> fig = plot_training_curves(rows)
    >>> [ax.get_title() for ax in fig.axes]
    ['Loss', 'Metrics', 'Learning rate']
    """
    where, rows = _read_log(log)
    epochs = []
    for i, row in enumerate(rows):
        value = _parse_float(row.get("epoch"))
        if value is None or math.isnan(value):
            raise DataError(f"{where}: row {i + 1} has epoch {row.get('epoch')!r}, not a number")
        epochs.append(value)
    x = np.array(epochs)

    present: list[str] = []
    for row in rows:
        present.extend(k for k in row if k not in present and k != "epoch")
    if columns is not None:
        missing = [c for c in columns if c not in present]
        if missing:
            raise DataError(f"{where} has no column(s) {missing} (columns: {', '.join(present)})")
        wanted = [c for c in columns if c != "epoch"]
    else:
        wanted = [c for c in present if not _is_auxiliary(c)]

    series: dict[str, np.ndarray] = {}
    for column in wanted:
        values = [_parse_float(row.get(column)) for row in rows]
        if any(v is None for v in values):
            if columns is not None:
                raise DataError(f"{where}: column {column!r} holds non-numeric values")
            logger.debug("%s: skipping non-numeric column %r", where, column)
            continue
        arr = np.array(values, dtype=np.float64)
        if np.isfinite(arr).any():
            series[column] = arr
    groups = {
        "Loss": [c for c in series if "loss" in c.lower()],
        "Metrics": [c for c in series if "loss" not in c.lower() and not _is_lr(c) and not _is_count(c)],
        "Counts": [c for c in series if "loss" not in c.lower() and _is_count(c)],
        "Learning rate": [c for c in series if _is_lr(c)],
    }
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        raise DataError(f"{where} has no numeric column to plot besides 'epoch'")

    from matplotlib.ticker import MaxNLocator

    figure = _figure_class()(figsize=(4.5 * len(groups), 3.8), layout="constrained")
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    for ax, (panel, names) in zip(axes, groups.items(), strict=True):
        colours: dict[str, str] = {}
        for column in names:
            base, style = _split_name(column)
            colour = colours.setdefault(base, f"C{len(colours) % 10}")
            y = series[column]
            ok = np.isfinite(y)
            ax.plot(
                x[ok],
                y[ok],
                linestyle=style,
                color=colour,
                marker="o" if ok.sum() <= 20 else None,
                markersize=3,
                drawstyle="steps-post" if panel == "Learning rate" else "default",
                label=column,
            )
        if panel == "Learning rate":
            lrs = np.concatenate([series[c][np.isfinite(series[c])] for c in names])
            if lrs.min() > 0 and lrs.max() / lrs.min() >= 10:
                ax.set_yscale("log")
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if len(names) > 1 or panel != "Learning rate":
            ax.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return figure


# ----------------------------------------------------------------------------- confusion matrix


def plot_confusion_matrix(
    cm: Any,
    class_names: Sequence[str] | None = None,
    normalize: bool = False,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Draw a confusion matrix with the count written in every cell.

    Rows are true classes, columns predicted classes (the scikit-learn
    convention of :func:`sklearn.metrics.confusion_matrix`).

    Parameters
    ----------
    cm : array-like
        ``(C, C)`` non-negative counts.
    class_names : sequence of str or None, default None
        ``C`` names for the ticks; ``"0"``, ``"1"``, ... when None.
    normalize : bool, default False
        Colour by row fractions (the recall of each true class) and write the
        row percentage under each count.
    ax : matplotlib Axes or None, default None
        Draw into this axes; a new figure is made when None.
    title : str or None, default None
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    MissingExtraError
        matplotlib is not installed.
    ShapeError
        ``cm`` is not square 2-D, or ``class_names`` does not have ``C`` names.
    DataError
        ``cm`` holds negative or non-finite values.

    Examples
    --------
    >>> fig = plot_confusion_matrix([[5, 1], [2, 8]], class_names=["healthy", "ALL"], normalize=True)
    >>> sorted(t.get_text() for t in fig.axes[0].texts)
    ['1\\n(16.7%)', '2\\n(20.0%)', '5\\n(83.3%)', '8\\n(80.0%)']
    """
    m = _to_numpy(cm, "cm")
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ShapeError(f"cm must be a square (C, C) matrix, got shape {m.shape}")
    m = m.astype(np.float64)
    if not np.all(np.isfinite(m)) or (m < 0).any():
        raise DataError("cm must hold non-negative finite counts")
    n = m.shape[0]
    if class_names is not None and len(class_names) != n:
        raise ShapeError(f"class_names has {len(class_names)} names but cm is {n} x {n}")
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(n)]
    row_sums = m.sum(axis=1, keepdims=True)
    fractions = np.divide(m, row_sums, out=np.zeros_like(m), where=row_sums > 0)
    shown = fractions if normalize else m

    if ax is None:
        side = max(3.5, 0.9 * n + 2.0)
        ax = _figure_class()(figsize=(side + 0.8, side), layout="constrained").add_subplot()
    figure = ax.figure
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1.0 if normalize else max(shown.max(), 1.0))
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="row fraction" if normalize else "count")
    threshold = (1.0 if normalize else max(shown.max(), 1.0)) / 2
    integral = np.allclose(m, np.round(m))
    fontsize = "medium" if n <= 6 else "small" if n <= 12 else "x-small"
    for i in range(n):
        for j in range(n):
            count = f"{round(m[i, j])}" if integral else f"{m[i, j]:.3g}"
            text = f"{count}\n({100 * fractions[i, j]:.1f}%)" if normalize else count
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if shown[i, j] > threshold else "black",
            )
    ax.set_xticks(
        range(n),
        names,
        rotation=45 if max(len(s) for s in names) > 6 else 0,
        ha="right" if max(len(s) for s in names) > 6 else "center",
    )
    ax.set_yticks(range(n), names)
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    if title:
        ax.set_title(title)
    return figure  # type: ignore[return-value]


# ----------------------------------------------------------------------------- calibration


#: ``gid`` of the diagonal of a reliability diagram and of its count panel, so that a second call on
#: the same axes neither repeats the diagonal nor puts an x-label on the top panel.
_PERFECT_CALIBRATION_GID = "milcell-perfect-calibration"
_RELIABILITY_COUNTS_GID = "milcell-reliability-counts"


def plot_reliability_diagram(
    y_true: Any,
    y_prob: Any,
    *,
    n_bins: int = 10,
    strategy: str = "uniform",
    mode: str = "auto",
    label: str | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Reliability diagram: observed frequency against mean predicted probability, with bin counts.

    The top axes shows one point per non-empty bin (the table of
    :func:`milcell.metrics.calibration_bins`) against the diagonal of perfect
    calibration, with the ECE in the legend; a bar chart below shows how many
    patients fall into each bin (a bin of 3 patients says little). Call it
    again with ``ax`` set to the top axes (e.g. before and after calibration)
    to compare: the later call adds only its curve and legend entry (the
    diagonal, the counts and the x-label are drawn once).

    Parameters
    ----------
    y_true : array-like
        ``(n,)`` labels; ``-1`` (unlabelled) is left out.
    y_prob : array-like or Tensor
        ``(n,)`` positive-class probabilities or ``(n, C)`` probabilities.
    n_bins, strategy, mode
        Binning, as :func:`milcell.metrics.calibration_bins`.
    label : str or None, default None
        Curve name in the legend (``"model"`` when None).
    ax : matplotlib Axes or None, default None
        Draw the curve into this axes (no count panel); a new two-panel
        figure is made when None.
    title : str or None, default None
        Title of the top axes.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    MissingExtraError
        matplotlib is not installed.
    DataError, ConfigError
        As :func:`milcell.metrics.calibration_bins`.

    Examples
    --------
    >>> fig = plot_reliability_diagram([0, 1, 1, 0, 1], [0.1, 0.8, 0.7, 0.3, 0.4], n_bins=5)
    >>> [ax.get_ylabel() for ax in fig.axes]
    ['Observed frequency (class 1)', 'Patients']
    """
    from milcell.metrics import calibration_bins

    if isinstance(y_prob, torch.Tensor):
        y_prob = y_prob.detach().float().cpu().numpy()
    if isinstance(y_true, torch.Tensor):
        y_true = y_true.detach().cpu().numpy()
    bins = calibration_bins(y_true, y_prob, n_bins=n_bins, strategy=strategy, mode=mode)
    full = bins.counts > 0
    count_ax: Axes | None = None
    if ax is None:
        figure = _figure_class()(figsize=(4.6, 5.4), layout="constrained")
        top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        bottom.set_gid(_RELIABILITY_COUNTS_GID)
        ax, count_ax = top, bottom
    if not any(line.get_gid() == _PERFECT_CALIBRATION_GID for line in ax.lines):
        # One diagonal (and one legend entry) however many curves are drawn into this axes.
        ax.plot(
            [0, 1],
            [0, 1],
            linestyle=":",
            color="grey",
            linewidth=1,
            label="perfect calibration",
            gid=_PERFECT_CALIBRATION_GID,
        )
    ax.plot(
        bins.confidence[full],
        bins.frequency[full],
        marker="o",
        label=f"{label or 'model'} (ECE {bins.ece:.3f})",
    )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    what = "class 1" if bins.mode == "binary" else "accuracy"
    ax.set_ylabel(f"Observed frequency ({what})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    xlabel = (
        "Predicted probability of class 1" if bins.mode == "binary" else "Confidence (largest probability)"
    )
    if count_ax is not None:
        centres = np.where(full, bins.confidence, (bins.lower + bins.upper) / 2)
        widths = np.where(np.isfinite(bins.upper - bins.lower), bins.upper - bins.lower, 0.0)
        widths = np.maximum(widths, 0.02) * 0.9
        count_ax.bar(centres[full], bins.counts[full], width=widths[full], color="C0", alpha=0.6)
        count_ax.set_ylabel("Patients")
        count_ax.set_xlabel(xlabel)
        count_ax.grid(True, alpha=0.3)
    elif not any(
        other is not ax and other.get_gid() == _RELIABILITY_COUNTS_GID
        for other in ax.get_shared_x_axes().get_siblings(ax)
    ):
        # The top panel of a two-panel diagram leaves its x-label to the count panel below it.
        ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    return ax.figure  # type: ignore[return-value]


def plot_risk_coverage(
    curves: Mapping[str, tuple[Any, Any]],
    *,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Risk-coverage curves of selective prediction, one per confidence score, with their AURC.

    Parameters
    ----------
    curves : mapping of str to (correct, confidence)
        ``name -> (correct, confidence)``: ``(n,)`` 0/1 correctness of each
        patient's prediction and ``(n,)`` confidence (higher = kept first),
        as :func:`milcell.metrics.risk_coverage_curve` takes them.
    ax : matplotlib Axes or None, default None
        Draw into this axes; a new figure is made when None.
    title : str or None, default None
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    MissingExtraError
        matplotlib is not installed.
    ConfigError
        ``curves`` is empty.
    DataError
        As :func:`milcell.metrics.risk_coverage_curve`.

    Examples
    --------
    >>> fig = plot_risk_coverage({"max probability": ([1, 1, 0, 1], [0.9, 0.8, 0.6, 0.7])})
    >>> fig.axes[0].get_legend().get_texts()[0].get_text()
    'max probability (AURC 0.062)'
    """
    from milcell.metrics import risk_coverage_curve

    if not isinstance(curves, Mapping) or not curves:
        raise ConfigError(
            "plot_risk_coverage: curves must be a non-empty mapping name -> (correct, confidence)"
        )
    ax = _roc_axes(ax, (4.8, 4.0))
    for name, (correct, confidence) in curves.items():
        rc = risk_coverage_curve(_to_numpy(correct, "correct"), _to_numpy(confidence, "confidence"))
        ax.step(rc.coverage, rc.risk, where="post", label=f"{name} (AURC {rc.aurc:.3f})")
    ax.set_xlim(0.0, 1.01)
    ax.set_xlabel("Coverage (fraction of patients not referred)")
    ax.set_ylabel("Risk (error rate of the kept patients)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    if title:
        ax.set_title(title)
    return ax.figure  # type: ignore[return-value]


# ----------------------------------------------------------------------------- attention montage


def attention_order(weights: Any, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest- and ``k`` lowest-attention instances.

    Instances are ranked by weight, ties in their original order; the top
    row is the head of the ranking and the bottom row its tail, read from the
    end, so the two never share a cell. When there are fewer than
    ``2 * k`` instances, all of them are returned in the first array (highest
    first) and the second is empty, so no cell is shown twice.

    Parameters
    ----------
    weights : array-like
        ``(N,)`` attention weights of the real instances of one bag.
    k : int, default 8
        Number of cells per row, ``k >= 1``.

    Returns
    -------
    top : numpy.ndarray
        ``(min(k, N),)`` indices, highest weight first (all ``N`` when ``N < 2k``).
    bottom : numpy.ndarray
        ``(k,)`` indices, lowest weight first (empty when ``N < 2k``).

    Raises
    ------
    ConfigError
        ``k < 1``.
    ShapeError
        ``weights`` is not 1-D or is empty.
    DataError
        ``weights`` contains NaN or infinite values.

    Examples
    --------
    >>> top, bottom = attention_order([0.1, 0.4, 0.2, 0.3], k=1)
    >>> top.tolist(), bottom.tolist()
    ([1], [0])
    >>> attention_order([0.1, 0.4, 0.2], k=2)[0].tolist()
    [1, 2, 0]
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be an integer >= 1, got {k!r}")
    w = _to_numpy(weights, "weights").astype(np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ShapeError(
            f"weights must be a non-empty 1-D (N,) array of the bag's real instances, got shape {w.shape}; "
            "for padded attention (B, N_max) pass attention[b][mask[b]]"
        )
    if not np.all(np.isfinite(w)):
        raise DataError("weights contains NaN or infinite values")
    descending = np.argsort(-w, kind="stable")
    if len(w) < 2 * k:
        return descending, np.empty(0, dtype=np.int64)
    return descending[:k], descending[::-1][:k]


def _cell_image(item: Any, index: int) -> np.ndarray:
    """One cell as a ``(C, H, W)`` array; ``item`` is an image file path or a ``(C, H, W)`` image."""
    if isinstance(item, (str, os.PathLike)):
        from milcell.data.images import read_image  # 16-bit, EXIF and alpha handled as in training

        path = Path(item)
        if not path.is_file():
            raise DataError(f"image {str(path)!r} (cell {index}) does not exist")
        image = read_image(path, "RGB", owner=f"cell {index}")
        return np.moveaxis(np.asarray(image, dtype=np.float64) / 255.0, -1, 0)
    arr = _to_numpy(item, f"images[{index}]")
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise ShapeError(f"images[{index}] must be (C, H, W) with C = 1 or 3, got shape {arr.shape}")
    return arr


def _prepare(
    arr: np.ndarray,
    index: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> np.ndarray:
    """Undo normalisation of a ``(C, H, W)`` array and return ``(H, W[, 3])`` in [0, 1]."""
    if np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    c = arr.shape[0]
    if mean is not None or std is not None:
        m = np.asarray(mean if mean is not None else [0.0] * c, dtype=np.float64).reshape(-1, 1, 1)
        s = np.asarray(std if std is not None else [1.0] * c, dtype=np.float64).reshape(-1, 1, 1)
        if m.shape[0] not in (1, c) or s.shape[0] not in (1, c):
            raise ShapeError(
                f"mean and std need 1 or {c} values (one per channel), got {m.shape[0]} and {s.shape[0]}"
            )
        arr = arr * s + m
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise DataError(
            f"images[{index}] has values in [{lo:.3g}, {hi:.3g}], outside [0, 1]; "
            "pass mean= and std= to undo the normalisation"
        )
    arr = np.clip(arr, 0.0, 1.0)
    return arr[0] if c == 1 else np.moveaxis(arr, 0, -1)


def attention_montage(
    images: Any,
    weights: Any,
    k: int = 8,
    names: Sequence[str] | None = None,
    title: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Figure:
    """Show a patient's cells ranked by attention: the top ``k`` and the bottom ``k``.

    The first row holds the ``k`` cells with the highest attention weight
    (highest first), the second row the ``k`` with the lowest (lowest first),
    each with its weight written underneath (and its name, when given). With
    fewer than ``2 * k`` cells, all are shown once, sorted from highest to
    lowest, ``k`` per row. Each cell's axes carries the label ``"cell <i>"``
    (``i`` its index in ``images``), so the order can be read back with
    ``[ax.get_label() for ax in fig.axes]``.

    Parameters
    ----------
    images : Tensor, array or sequence
        ``(N, C, H, W)`` images with ``C`` = 1 or 3, values in [0, 1]
        (``uint8`` is divided by 255); or a sequence of ``(C, H, W)`` images or
        of image file paths (only the shown cells are read).
    weights : Tensor or array-like
        ``(N,)`` attention weights of the real instances (for a padded
        ``(B, N_max)`` attention, pass ``attention[b][mask[b]]``).
    k : int, default 8
        Cells per row, ``k >= 1``.
    names : sequence of str or None, default None
        ``N`` names (e.g. ``bag.instance_names`` or file names) written under
        the weights; long names are shortened in the middle.
    title : str or None, default None
        Figure title (e.g. the patient ID and label).
    mean, std : sequence of float or None, default None
        Per-channel normalisation applied to ``images`` (e.g. ImageNet's);
        undone before display (``x * std + mean``).

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    MissingExtraError
        matplotlib is not installed.
    ConfigError
        ``k < 1``.
    ShapeError
        The number of images, weights and names differ, or an image is not
        ``(C, H, W)`` with 1 or 3 channels.
    DataError
        An image file is missing or undecodable, or pixel values fall outside
        [0, 1] after undoing ``mean`` / ``std``.

    Examples
    --------
    >>> import torch
    >>> names = ["a.bmp", "b.bmp", "c.bmp"]
    >>> fig = attention_montage(torch.rand(3, 1, 8, 8), [0.2, 0.5, 0.3], k=2, names=names)
    >>> [ax.get_xlabel() for ax in fig.axes if ax.get_label().startswith("cell")]
    ['0.500\\nb.bmp', '0.300\\nc.bmp', '0.200\\na.bmp']
    """
    top, bottom = attention_order(weights, k)
    w = _to_numpy(weights, "weights").astype(np.float64)
    if isinstance(images, (str, os.PathLike)):
        raise DataError("images must be a tensor (N, C, H, W) or a sequence of images or paths, not one path")
    n_images = images.shape[0] if isinstance(images, (torch.Tensor, np.ndarray)) else len(images)
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim != 4:
        raise ShapeError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if n_images != len(w):
        raise ShapeError(f"images has {n_images} cells but weights has {len(w)} values")
    if names is not None and len(names) != len(w):
        raise ShapeError(f"names has {len(names)} entries but weights has {len(w)} values")

    if len(bottom):
        rows = [("highest\nattention", top), ("lowest\nattention", bottom)]
    else:
        rows = [
            ("sorted by\nattention" if r == 0 else "", top[r * k : (r + 1) * k])
            for r in range(math.ceil(len(top) / k))
        ]
    ncols = min(k, len(top))
    label_lines = 2 if names is not None else 1
    figure = _figure_class()(
        figsize=(1.5 * ncols + 0.9, (1.45 + 0.2 * label_lines) * len(rows) + (0.4 if title else 0.1)),
        layout="constrained",
    )
    grid = figure.subplots(len(rows), ncols, squeeze=False)
    for r, (row_label, indices) in enumerate(rows):
        for c in range(ncols):
            ax = grid[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(indices):
                ax.set_axis_off()
                continue
            i = int(indices[c])
            img = _prepare(_cell_image(images[i], i), i, mean, std)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            label = _format_weight(w[i])
            if names is not None:
                label += "\n" + _shorten(str(names[i]), 20)
            ax.set_xlabel(label, fontsize="small" if names is None else "x-small")
            ax.set_label(f"cell {i}")
            for spine in ax.spines.values():
                spine.set_visible(False)
        if row_label:
            grid[r][0].set_ylabel(row_label, fontsize="medium")
    if title:
        figure.suptitle(title)
    return figure


def _format_weight(value: float) -> str:
    """Three decimals, or scientific notation for weights too small to show that way."""
    return f"{value:.3f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.1e}"


def _shorten(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    half = (width - 1) // 2
    return text[:half] + "…" + text[-(width - 1 - half) :]


# ----------------------------------------------------------------------------- saving


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    """Write a figure to ``path`` atomically, creating parent folders.

    The format follows the suffix (``.png``, ``.pdf``, ``.svg``, ...). A crash
    while writing leaves any previous file at ``path`` untouched.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        The figure, e.g. from :func:`plot_roc`.
    path : str or os.PathLike
        Destination file; its suffix picks the format.
    dpi : int, default 150
        Resolution for raster formats.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ConfigError
        The suffix is missing or not a format matplotlib can write, or ``dpi < 1``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> fig = plot_confusion_matrix([[3, 1], [0, 4]])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     out = save_figure(fig, pathlib.Path(d) / "plots" / "cm.png")
    ...     out.name, out.stat().st_size > 0
    ('cm.png', True)
    """
    target = Path(path)
    fmt = target.suffix.lstrip(".").lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise ConfigError(
            f"cannot save figure to {str(target)!r}: suffix {target.suffix!r} is not one of "
            f"{', '.join('.' + s for s in sorted(supported))}"
        )
    if dpi < 1:
        raise ConfigError(f"dpi must be >= 1, got {dpi}")
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", facecolor="white")
    logger.debug("saved figure to %s", target)
    return target
