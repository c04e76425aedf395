"""Clinical classification metrics, computed with scikit-learn.

The names are the clinical ones, for a positive class ``1`` (disease) and a
negative class ``0`` (healthy):

- ``sensitivity`` = TP / (TP + FN), the recall of the positives (recall, TPR);
- ``specificity`` = TN / (TN + FP), the recall of the negatives (TNR);
- ``ppv`` = TP / (TP + FP), the positive predictive value (precision);
- ``npv`` = TN / (TN + FN), the negative predictive value;
- ``balanced_accuracy`` = (sensitivity + specificity) / 2;
- ``f1`` = harmonic mean of PPV and sensitivity;
- ``auc`` = area under the ROC curve of the scores;
- ``kappa`` = Cohen's kappa of the thresholded predictions.

Calibration (do the probabilities mean what they say?) is measured by
:func:`expected_calibration_error` (ECE, equal-width or equal-mass bins;
binary on ``P(class 1)``, top-label or class-wise),
:func:`maximum_calibration_error`, :func:`brier_score` and
:func:`negative_log_likelihood`, gathered with bootstrap intervals by
:func:`calibration_report`; :func:`calibration_bins` gives the reliability
table behind :func:`milcell.viz.plot_reliability_diagram`. Selective
prediction (answer only the most confident patients) is measured by
:func:`risk_coverage_curve` and its area :func:`aurc`.

Scores are *probabilities*, never logits. Bags labelled ``-1`` (unlabelled)
are left out of every metric and counted in ``n_unlabelled``.

Examples
--------
>>> from milcell.metrics import binary_report
>>> report = binary_report([0, 0, 1, 1, -1], [0.1, 0.7, 0.8, 0.9, 0.5])
>>> report.sensitivity, report.specificity, report.ppv, report.n_unlabelled
(1.0, 0.5, 0.666..., 1)
>>> report.as_dict()["auc"]
1.0
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from milcell.exceptions import ConfigError, DataError

__all__ = [
    "BinaryReport",
    "CalibrationBins",
    "CalibrationReport",
    "MulticlassReport",
    "RiskCoverage",
    "aurc",
    "binary_report",
    "brier_score",
    "calibration_bins",
    "calibration_report",
    "expected_calibration_error",
    "format_mean_std",
    "format_summary",
    "maximum_calibration_error",
    "multiclass_report",
    "negative_log_likelihood",
    "risk_coverage_curve",
    "summarize_folds",
]

logger = logging.getLogger("milcell")

_BINARY_SCALARS = (
    "balanced_accuracy",
    "accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "auc",
    "kappa",
)
_MULTICLASS_SCALARS = ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "kappa", "auc")


# --------------------------------------------------------------------------- validation


def _as_labels(y_true: Any, n_classes: int, n_expected: int | None = None) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise DataError(f"y_true must be 1-D (one label per sample), got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.number):
        raise DataError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    if y.size and not np.all(np.equal(np.mod(y, 1), 0)):
        raise DataError("y_true must hold integer class indices (-1 = unlabelled), got non-integer values")
    y = y.astype(np.int64)
    if n_expected is not None and y.shape[0] != n_expected:
        raise DataError(f"y_true has {y.shape[0]} samples but the scores have {n_expected}")
    bad = (y < -1) | (y >= n_classes)
    if bad.any():
        raise DataError(
            f"y_true holds labels {sorted(set(y[bad].tolist()))[:5]} outside "
            f"0..{n_classes - 1} (and -1 for unlabelled)"
        )
    return y


def _check_probabilities(p: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(p)):
        raise DataError(f"{what} contains NaN or infinite values; probabilities are expected")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise DataError(
            f"{what} has values in [{p.min():.4g}, {p.max():.4g}] outside [0, 1]: probabilities are "
            "expected (apply softmax or sigmoid to logits first)"
        )


def _check_bootstrap(n_bootstrap: int, ci: float) -> None:
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise ConfigError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}")
    if not 0.0 < float(ci) < 1.0:
        raise ConfigError(f"ci must lie strictly between 0 and 1, got {ci!r}")


def _split_unlabelled(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    keep = y >= 0
    n_unlabelled = int((~keep).sum())
    if not keep.any():
        raise DataError(f"no labelled samples to score ({n_unlabelled} unlabelled samples with label -1)")
    return y[keep], scores[keep], n_unlabelled


# --------------------------------------------------------------------------- bootstrap


def _bootstrap(
    compute: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    y: np.ndarray,
    scores: np.ndarray,
    n_bootstrap: int,
    ci: float,
    seed: int | None,
) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(seed)
    n = y.shape[0]
    samples: dict[str, list[float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n_bootstrap):
            idx = rng.integers(0, n, size=n)
            for name, value in compute(y[idx], scores[idx]).items():
                samples.setdefault(name, []).append(value)
    alpha = (1.0 - ci) / 2.0
    out: dict[str, tuple[float, float]] = {}
    for name, values in samples.items():
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        if arr.size == 0:
            out[name] = (math.nan, math.nan)
        else:
            low, high = np.quantile(arr, [alpha, 1.0 - alpha])
            out[name] = (float(low), float(high))
    return out


def _auc_or_nan(y: np.ndarray, score: np.ndarray, quiet: bool, what: str = "AUC") -> float:
    if np.unique(y).size < 2:
        if not quiet:
            logger.warning("%s is undefined: only one class is present among the labels; reporting nan", what)
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def _ci_dict(ci: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for name, (low, high) in ci.items():
        flat[f"{name}_ci_low"] = low
        flat[f"{name}_ci_high"] = high
    return flat


# --------------------------------------------------------------------------- binary


@dataclass(frozen=True)
class BinaryReport:
    """Metrics of a two-class problem (positive class ``1``).

    Attributes
    ----------
    balanced_accuracy, accuracy, sensitivity, specificity, ppv, npv, f1, auc, kappa : float
        See the module docstring for the definitions; ``nan`` where undefined
        (for example ``auc`` when only one class is present).
    confusion_matrix : numpy.ndarray
        ``(2, 2)`` int counts, rows = true class, columns = predicted class:
        ``[[TN, FP], [FN, TP]]``.
    threshold : float
        Probability at or above which a sample is predicted positive.
    n_samples : int
        Number of labelled samples scored.
    n_unlabelled : int
        Number of samples with label ``-1`` that were left out.
    ci : dict of str to (float, float)
        Bootstrap percentile confidence intervals, empty without bootstrap.

    Examples
    --------
    >>> r = binary_report([0, 1, 1], [0.2, 0.6, 0.4])
    >>> r.confusion_matrix.tolist()
    [[1, 0], [1, 1]]
    """

    balanced_accuracy: float
    accuracy: float
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    f1: float
    auc: float
    kappa: float
    confusion_matrix: np.ndarray
    threshold: float
    n_samples: int
    n_unlabelled: int
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Flat ``name -> float`` view for logging (CSV, callbacks).

        Holds the nine metrics, ``tn``, ``fp``, ``fn``, ``tp``, ``n_samples``,
        ``n_unlabelled`` and, with bootstrap, ``<name>_ci_low`` /
        ``<name>_ci_high``.

        Examples
        --------
        >>> d = binary_report([0, 1], [0.3, 0.8]).as_dict()
        >>> d["sensitivity"], d["tp"], d["n_samples"]
        (1.0, 1.0, 2.0)
        """
        out = {name: float(getattr(self, name)) for name in _BINARY_SCALARS}
        (tn, fp), (fn, tp) = self.confusion_matrix.tolist()
        out.update(tn=float(tn), fp=float(fp), fn=float(fn), tp=float(tp))
        out.update(n_samples=float(self.n_samples), n_unlabelled=float(self.n_unlabelled))
        out.update(_ci_dict(self.ci))
        return out


def _binary_scalars(y: np.ndarray, score: np.ndarray, threshold: float, quiet: bool) -> dict[str, float]:
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        cohen_kappa_score,
        precision_recall_fscore_support,
    )

    pred = (score >= threshold).astype(np.int64)
    # Per-class precision and recall: index 1 = positive class, index 0 = negative class.
    precision, recall, fscore, _ = precision_recall_fscore_support(
        y, pred, labels=[0, 1], average=None, zero_division=np.nan
    )
    with warnings.catch_warnings():
        # One class only: balanced accuracy and kappa warn; the values (or nan) are still right.
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(y, pred)
        kappa = cohen_kappa_score(y, pred, labels=[0, 1])
    return {
        "balanced_accuracy": float(balanced),
        "accuracy": float(accuracy_score(y, pred)),
        "sensitivity": float(recall[1]),
        "specificity": float(recall[0]),
        "ppv": float(precision[1]),
        "npv": float(precision[0]),
        "f1": float(fscore[1]),  # F1 of the positive class
        "auc": _auc_or_nan(y, score, quiet),
        "kappa": float(kappa),
    }


def binary_report(
    y_true: Any,
    y_score: Any,
    threshold: float = 0.5,
    *,
    n_bootstrap: int = 0,
    ci: float = 0.95,
    seed: int | None = 0,
) -> BinaryReport:
    """Clinical metrics of a binary classifier from positive-class probabilities.

    Parameters
    ----------
    y_true : array-like
        ``(n,)`` labels in ``{0, 1}``; ``-1`` marks an unlabelled sample,
        excluded and counted in ``n_unlabelled``.
    y_score : array-like
        ``(n,)`` probability of the positive class, in ``[0, 1]``; a
        ``(n, 2)`` probability matrix is also accepted (column 1 is used).
        Logits are refused.
    threshold : float, default 0.5
        A sample is predicted positive when ``y_score >= threshold``.
    n_bootstrap : int, default 0
        Number of bootstrap resamples (with replacement, over the labelled
        samples) for percentile confidence intervals; 0 disables them. Each
        resample recomputes every metric with scikit-learn (a few ms each).
    ci : float, default 0.95
        Coverage of the confidence intervals.
    seed : int or None, default 0
        Seed of the :class:`numpy.random.Generator` that draws the resamples.

    Returns
    -------
    BinaryReport
        Metrics, confusion matrix and counts; ``.as_dict()`` flattens it.

    Raises
    ------
    DataError
        If the scores are not probabilities, lengths differ, labels are not in
        ``{-1, 0, 1}`` or no sample is labelled.
    ConfigError
        For a threshold outside ``(0, 1)`` or bad bootstrap settings.

    Examples
    --------
    >>> r = binary_report([0, 0, 1, 1, 1], [0.2, 0.6, 0.9, 0.7, 0.3], n_bootstrap=50, seed=1)
    >>> round(r.sensitivity, 3), round(r.ppv, 3), r.auc
    (0.667, 0.667, 0.8333...)
    >>> low, high = r.ci["balanced_accuracy"]
    >>> 0.0 <= low <= high <= 1.0
    True
    """
    if not 0.0 < float(threshold) < 1.0:
        raise ConfigError(f"threshold must lie strictly between 0 and 1, got {threshold!r}")
    _check_bootstrap(n_bootstrap, ci)
    score = np.asarray(y_score, dtype=np.float64)
    if score.ndim == 2 and score.shape[1] == 2:
        score = score[:, 1]
    if score.ndim != 1:
        raise DataError(
            "y_score must be (n,) positive-class probabilities or (n, 2) probabilities, "
            f"got shape {score.shape}"
        )
    _check_probabilities(score, "y_score")
    y = _as_labels(y_true, 2, score.shape[0])
    y, score, n_unlabelled = _split_unlabelled(y, score)
    values = _binary_scalars(y, score, float(threshold), quiet=False)
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, (score >= threshold).astype(np.int64), labels=[0, 1])
    intervals: dict[str, tuple[float, float]] = {}
    if n_bootstrap:
        intervals = _bootstrap(
            lambda yy, ss: _binary_scalars(yy, ss, float(threshold), quiet=True),
            y,
            score,
            int(n_bootstrap),
            float(ci),
            seed,
        )
    return BinaryReport(
        **values,
        confusion_matrix=cm,
        threshold=float(threshold),
        n_samples=int(y.shape[0]),
        n_unlabelled=n_unlabelled,
        ci=intervals,
    )


# --------------------------------------------------------------------------- multiclass


@dataclass(frozen=True)
class MulticlassReport:
    """Metrics of a problem with ``C >= 2`` classes, predicted by the argmax.

    Attributes
    ----------
    accuracy, balanced_accuracy, f1_macro, f1_weighted, kappa : float
        Scikit-learn definitions; balanced accuracy is the mean per-class recall.
    auc : float
        Macro average of the one-vs-rest AUCs that are defined.
    recall : numpy.ndarray
        ``(C,)`` per-class recall (``nan`` for a class absent from the labels).
    auc_per_class : numpy.ndarray
        ``(C,)`` one-vs-rest AUC of each class (``nan`` where undefined).
    confusion_matrix : numpy.ndarray
        ``(C, C)`` int counts, rows = true class, columns = predicted class.
    class_names : tuple of str
        Names used in :meth:`as_dict` keys (default ``"0"``, ``"1"``, ...).
    n_samples, n_unlabelled : int
        Labelled samples scored and unlabelled samples (label ``-1``) left out.
    ci : dict of str to (float, float)
        Bootstrap percentile confidence intervals, empty without bootstrap.

    Examples
    --------
    >>> r = multiclass_report([0, 1, 2], [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3]])
    >>> r.recall.tolist(), r.confusion_matrix.diagonal().tolist()
    ([1.0, 1.0, 0.0], [1, 1, 0])
    """

    accuracy: float
    balanced_accuracy: float
    f1_macro: float
    f1_weighted: float
    kappa: float
    auc: float
    recall: np.ndarray
    auc_per_class: np.ndarray
    confusion_matrix: np.ndarray
    class_names: tuple[str, ...]
    n_samples: int
    n_unlabelled: int
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Flat ``name -> float`` view for logging.

        Holds the six scalar metrics, ``recall_<class>``, ``auc_<class>``,
        ``n_samples``, ``n_unlabelled`` and, with bootstrap,
        ``<name>_ci_low`` / ``<name>_ci_high``.

        Examples
        --------
        >>> r = multiclass_report([0, 1], [[0.9, 0.1], [0.4, 0.6]], class_names=["hem", "all"])
        >>> sorted(k for k in r.as_dict() if k.startswith("recall_"))
        ['recall_all', 'recall_hem']
        """
        out = {name: float(getattr(self, name)) for name in _MULTICLASS_SCALARS}
        for name, rec, auc in zip(self.class_names, self.recall, self.auc_per_class, strict=True):
            out[f"recall_{name}"] = float(rec)
            out[f"auc_{name}"] = float(auc)
        out.update(n_samples=float(self.n_samples), n_unlabelled=float(self.n_unlabelled))
        out.update(_ci_dict(self.ci))
        return out


def _ovr_aucs(y: np.ndarray, prob: np.ndarray, quiet: bool) -> np.ndarray:
    from sklearn.metrics import roc_auc_score

    aucs = np.full(prob.shape[1], np.nan)
    missing = []
    for k in range(prob.shape[1]):
        target = (y == k).astype(np.int64)
        if np.unique(target).size < 2:
            missing.append(k)
            continue
        aucs[k] = roc_auc_score(target, prob[:, k])
    if missing and not quiet:
        logger.warning(
            "one-vs-rest AUC is undefined for classes %s (only one class present); reporting nan", missing
        )
    return aucs


def _multiclass_scalars(
    y: np.ndarray, prob: np.ndarray, quiet: bool
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        cohen_kappa_score,
        f1_score,
        recall_score,
    )

    labels = list(range(prob.shape[1]))
    pred = prob.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recall = recall_score(y, pred, labels=labels, average=None, zero_division=np.nan)
        values = {
            "accuracy": float(accuracy_score(y, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "f1_macro": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0.0)),
            "f1_weighted": float(f1_score(y, pred, labels=labels, average="weighted", zero_division=0.0)),
            "kappa": float(cohen_kappa_score(y, pred, labels=labels)),
        }
    aucs = _ovr_aucs(y, prob, quiet)
    values["auc"] = float(np.mean(aucs[np.isfinite(aucs)])) if np.isfinite(aucs).any() else math.nan
    return values, np.asarray(recall, dtype=np.float64), aucs


def multiclass_report(
    y_true: Any,
    y_prob: Any,
    *,
    class_names: Sequence[str] | None = None,
    n_bootstrap: int = 0,
    ci: float = 0.95,
    seed: int | None = 0,
) -> MulticlassReport:
    """Metrics of a ``C``-class classifier from class probabilities.

    Parameters
    ----------
    y_true : array-like
        ``(n,)`` labels in ``0..C-1``; ``-1`` marks an unlabelled sample,
        excluded and counted in ``n_unlabelled``.
    y_prob : array-like
        ``(n, C)`` class probabilities (rows in ``[0, 1]`` summing to 1).
    class_names : sequence of str, optional
        ``C`` names used in the keys of :meth:`MulticlassReport.as_dict`.
    n_bootstrap : int, default 0
        Number of bootstrap resamples for percentile confidence intervals.
    ci : float, default 0.95
        Coverage of the confidence intervals.
    seed : int or None, default 0
        Seed of the :class:`numpy.random.Generator` that draws the resamples.

    Returns
    -------
    MulticlassReport

    Raises
    ------
    DataError
        If ``y_prob`` is not a probability matrix, shapes disagree, a label is
        out of range or no sample is labelled.
    ConfigError
        For a wrong number of class names or bad bootstrap settings.

    Examples
    --------
    >>> import numpy as np
    >>> prob = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])
    >>> r = multiclass_report([0, 1, 2, 1], prob)
    >>> r.accuracy, r.balanced_accuracy, round(r.auc, 3)
    (0.75, 0.8333..., 1.0)
    """
    _check_bootstrap(n_bootstrap, ci)
    prob = np.asarray(y_prob, dtype=np.float64)
    if prob.ndim != 2 or prob.shape[1] < 2:
        raise DataError(f"y_prob must be an (n, C) probability matrix with C >= 2, got shape {prob.shape}")
    _check_probabilities(prob, "y_prob")
    sums = prob.sum(axis=1)
    if prob.shape[0] and not np.allclose(sums, 1.0, atol=1e-3):
        worst = int(np.argmax(np.abs(sums - 1.0)))
        raise DataError(
            f"y_prob rows must sum to 1 (row {worst} sums to {sums[worst]:.4g}): probabilities are "
            "expected (apply softmax to logits first)"
        )
    n_classes = prob.shape[1]
    if class_names is None:
        names = tuple(str(k) for k in range(n_classes))
    else:
        names = tuple(str(n) for n in class_names)
        if len(names) != n_classes:
            raise ConfigError(f"class_names has {len(names)} names but y_prob has {n_classes} columns")
    y = _as_labels(y_true, n_classes, prob.shape[0])
    y, prob, n_unlabelled = _split_unlabelled(y, prob)
    values, recall, aucs = _multiclass_scalars(y, prob, quiet=False)
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, prob.argmax(axis=1), labels=list(range(n_classes)))
    intervals: dict[str, tuple[float, float]] = {}
    if n_bootstrap:
        intervals = _bootstrap(
            lambda yy, pp: _multiclass_scalars(yy, pp, quiet=True)[0],
            y,
            prob,
            int(n_bootstrap),
            float(ci),
            seed,
        )
    return MulticlassReport(
        **values,
        recall=recall,
        auc_per_class=aucs,
        confusion_matrix=cm,
        class_names=names,
        n_samples=int(y.shape[0]),
        n_unlabelled=n_unlabelled,
        ci=intervals,
    )


# --------------------------------------------------------------------------- calibration

_CALIBRATION_MODES = ("auto", "binary", "top_label", "classwise")
_BIN_STRATEGIES = ("uniform", "quantile")
_CALIBRATION_SCALARS = ("ece", "mce", "classwise_ece", "brier", "nll")
#: Probabilities are clipped to ``[_NLL_EPS, 1]`` before the logarithm of the NLL.
_NLL_EPS = 1e-12


def _probability_matrix(y_prob: Any, what: str = "y_prob") -> np.ndarray:
    """``(n,)`` positive-class probabilities or ``(n, C)`` rows summing to 1, as ``(n, C)`` float64."""
    prob = np.asarray(y_prob, dtype=np.float64)
    if prob.ndim == 1:
        _check_probabilities(prob, what)
        return np.stack([1.0 - prob, prob], axis=1)
    if prob.ndim != 2 or prob.shape[1] < 2:
        raise DataError(
            f"{what} must be (n,) positive-class probabilities or an (n, C) probability matrix with "
            f"C >= 2, got shape {prob.shape}"
        )
    _check_probabilities(prob, what)
    sums = prob.sum(axis=1)
    if prob.shape[0] and not np.allclose(sums, 1.0, atol=1e-3):
        worst = int(np.argmax(np.abs(sums - 1.0)))
        raise DataError(
            f"{what} rows must sum to 1 (row {worst} sums to {sums[worst]:.4g}): probabilities are "
            "expected (apply softmax to logits first)"
        )
    return prob


def _labelled_matrix(y_true: Any, y_prob: Any) -> tuple[np.ndarray, np.ndarray, int]:
    prob = _probability_matrix(y_prob)
    y = _as_labels(y_true, prob.shape[1], prob.shape[0])
    return _split_unlabelled(y, prob)


def _resolve_mode(mode: str, n_classes: int) -> str:
    mode = str(mode)
    if mode not in _CALIBRATION_MODES:
        raise ConfigError(f"mode must be one of {', '.join(map(repr, _CALIBRATION_MODES))}, got {mode!r}")
    if mode == "auto":
        return "binary" if n_classes == 2 else "top_label"
    if mode == "binary" and n_classes != 2:
        raise ConfigError(f"mode='binary' needs two classes, but the probabilities have {n_classes} columns")
    return mode


def _check_bins(n_bins: Any, strategy: Any) -> tuple[int, str]:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ConfigError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    if strategy not in _BIN_STRATEGIES:
        raise ConfigError(
            f"strategy must be one of {', '.join(map(repr, _BIN_STRATEGIES))}, got {strategy!r}"
        )
    return int(n_bins), str(strategy)


@dataclass(frozen=True)
class CalibrationBins:
    """A reliability table: predicted probability against observed frequency, bin by bin.

    Attributes
    ----------
    lower, upper : numpy.ndarray
        ``(n_bins,)`` bin limits: the equal-width edges (bin ``b`` holds
        ``lower < p <= upper``, the first bin also ``p = 0``), or for
        equal-mass bins the smallest and largest probability in the bin.
    counts : numpy.ndarray
        ``(n_bins,)`` int64 samples per bin (an equal-mass bin is empty only
        when there are fewer samples than bins).
    confidence : numpy.ndarray
        ``(n_bins,)`` mean predicted probability in each bin (``nan`` if empty).
    frequency : numpy.ndarray
        ``(n_bins,)`` observed frequency of the event in each bin: the
        accuracy (top-label) or the fraction of class-1 labels (binary)
        (``nan`` if empty).
    mode, strategy : str
        ``"binary"`` or ``"top_label"``; ``"uniform"`` or ``"quantile"``.

    Examples
    --------
    >>> bins = calibration_bins([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.4], n_bins=2)
    >>> bins.counts.tolist(), bins.confidence.tolist(), bins.frequency.tolist()
    ([2, 2], [0.25, 0.85], [0.0, 1.0])
    >>> round(bins.ece, 3), round(bins.mce, 3)
    (0.2, 0.25)
    """

    lower: np.ndarray
    upper: np.ndarray
    counts: np.ndarray
    confidence: np.ndarray
    frequency: np.ndarray
    mode: str
    strategy: str

    @property
    def gap(self) -> np.ndarray:
        """``(n_bins,)`` ``frequency - confidence`` (``nan`` for empty bins); negative = over-confident."""
        return self.frequency - self.confidence

    @property
    def ece(self) -> float:
        """Count-weighted mean ``|gap|`` over the non-empty bins."""
        full = self.counts > 0
        if not full.any():
            return math.nan
        weights = self.counts[full] / self.counts[full].sum()
        return float(np.sum(weights * np.abs(self.gap[full])))

    @property
    def mce(self) -> float:
        """Largest ``|gap|`` over the non-empty bins."""
        full = self.counts > 0
        return float(np.max(np.abs(self.gap[full]))) if full.any() else math.nan


def _bin_table(
    confidence: np.ndarray, event: np.ndarray, n_bins: int, strategy: str, mode: str
) -> CalibrationBins:
    n = confidence.shape[0]
    counts = np.zeros(n_bins, dtype=np.int64)
    mean_conf = np.full(n_bins, np.nan)
    freq = np.full(n_bins, np.nan)
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        lower, upper = edges[:-1].copy(), edges[1:].copy()
        index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
        counts = np.bincount(index, minlength=n_bins).astype(np.int64)
        full = counts > 0
        mean_conf[full] = np.bincount(index, weights=confidence, minlength=n_bins)[full] / counts[full]
        freq[full] = np.bincount(index, weights=event, minlength=n_bins)[full] / counts[full]
    else:
        lower = np.full(n_bins, np.nan)
        upper = np.full(n_bins, np.nan)
        order = np.argsort(confidence, kind="stable")
        for b, chunk in enumerate(np.array_split(order, n_bins) if n else []):
            if chunk.size == 0:
                continue
            counts[b] = chunk.size
            mean_conf[b] = confidence[chunk].mean()
            freq[b] = event[chunk].mean()
            lower[b] = confidence[chunk].min()
            upper[b] = confidence[chunk].max()
    return CalibrationBins(lower, upper, counts, mean_conf, freq, mode, strategy)


def _events(y: np.ndarray, prob: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    if mode == "binary":
        return prob[:, 1], (y == 1).astype(np.float64)
    return prob.max(axis=1), (prob.argmax(axis=1) == y).astype(np.float64)


def calibration_bins(
    y_true: Any, y_prob: Any, *, n_bins: int = 15, strategy: str = "uniform", mode: str = "auto"
) -> CalibrationBins:
    """The reliability table of predicted probabilities (what a reliability diagram draws).

    Parameters
    ----------
    y_true : array-like
        ``(n,)`` labels in ``0..C-1``; ``-1`` (unlabelled) is left out.
    y_prob : array-like
        ``(n,)`` positive-class probabilities or ``(n, C)`` probabilities.
    n_bins : int, default 15
        Number of bins.
    strategy : {"uniform", "quantile"}, default "uniform"
        Equal-width bins on ``[0, 1]``, or equal-mass bins (the sorted
        samples split into ``n_bins`` groups of sizes differing by at most 1;
        tied probabilities may fall into neighbouring bins).
    mode : {"auto", "binary", "top_label"}, default "auto"
        ``"binary"`` bins ``P(class 1)`` against the fraction of class-1
        labels (two classes only); ``"top_label"`` bins the largest
        probability against the accuracy of the argmax. ``"auto"``: binary
        for two classes, else top-label.

    Returns
    -------
    CalibrationBins

    Raises
    ------
    DataError
        Probabilities that are not probabilities, labels out of range, no labelled sample.
    ConfigError
        Bad ``n_bins``, ``strategy`` or ``mode`` (``"classwise"`` has no single table).

    Examples
    --------
    >>> b = calibration_bins([0, 1, 2, 2], [[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.5, 0.1, 0.4],
    ...                                     [0.1, 0.1, 0.8]], n_bins=2, strategy="quantile")
    >>> b.counts.tolist(), b.frequency.tolist()
    ([2, 2], [0.5, 1.0])
    """
    n_bins, strategy = _check_bins(n_bins, strategy)
    y, prob, _ = _labelled_matrix(y_true, y_prob)
    mode = _resolve_mode(mode, prob.shape[1])
    if mode == "classwise":
        raise ConfigError(
            "calibration_bins: mode='classwise' has one table per class; pick 'binary' "
            "(two classes) or 'top_label', or bin each class's probability yourself"
        )
    confidence, event = _events(y, prob, mode)
    return _bin_table(confidence, event, n_bins, strategy, mode)


def _calibration_errors(
    y: np.ndarray, prob: np.ndarray, n_bins: int, strategy: str, mode: str
) -> tuple[float, float]:
    """(ECE, MCE) of labelled samples; class-wise = mean ECE and largest MCE over the classes."""
    if mode == "classwise":
        eces, mces = [], []
        for k in range(prob.shape[1]):
            table = _bin_table(prob[:, k], (y == k).astype(np.float64), n_bins, strategy, "binary")
            eces.append(table.ece)
            mces.append(table.mce)
        return float(np.mean(eces)), float(np.max(mces))
    confidence, event = _events(y, prob, mode)
    table = _bin_table(confidence, event, n_bins, strategy, mode)
    return table.ece, table.mce


def expected_calibration_error(
    y_true: Any, y_prob: Any, *, n_bins: int = 15, strategy: str = "uniform", mode: str = "auto"
) -> float:
    """Expected calibration error: the count-weighted mean ``|observed - predicted|`` over bins.

    ``ECE = sum_b (n_b / n) |freq_b - conf_b|`` where ``conf_b`` is the mean
    predicted probability of bin ``b`` and ``freq_b`` the observed frequency
    of the event (see :func:`calibration_bins`). 0 is perfectly calibrated
    (at this binning); the value depends on the bins and is biased upwards
    on few samples, so compare models at the same ``n_bins`` and ``strategy``.

    Parameters
    ----------
    y_true : array-like
        ``(n,)`` labels in ``0..C-1``; ``-1`` (unlabelled) is left out.
    y_prob : array-like
        ``(n,)`` positive-class probabilities or ``(n, C)`` probabilities.
    n_bins : int, default 15
        Number of bins.
    strategy : {"uniform", "quantile"}, default "uniform"
        Equal-width or equal-mass bins.
    mode : {"auto", "binary", "top_label", "classwise"}, default "auto"
        ``"binary"``: ``P(class 1)`` against the class-1 frequency;
        ``"top_label"``: the largest probability against the accuracy;
        ``"classwise"``: the mean over classes ``k`` of the ECE of
        ``P(class k)`` against ``1[y = k]``. ``"auto"``: binary for two
        classes, else top-label.

    Returns
    -------
    float
        In ``[0, 1]``.

    Raises
    ------
    DataError, ConfigError
        As :func:`calibration_bins`.

    Examples
    --------
    Two bins: ``(0.1, 0.4)`` with no positive and ``(0.9, 0.8)`` with two:
    ``0.5 * |0 - 0.25| + 0.5 * |1 - 0.85| = 0.2``.

    >>> round(expected_calibration_error([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.4], n_bins=2), 6)
    0.2
    """
    n_bins, strategy = _check_bins(n_bins, strategy)
    y, prob, _ = _labelled_matrix(y_true, y_prob)
    return _calibration_errors(y, prob, n_bins, strategy, _resolve_mode(mode, prob.shape[1]))[0]


def maximum_calibration_error(
    y_true: Any, y_prob: Any, *, n_bins: int = 15, strategy: str = "uniform", mode: str = "auto"
) -> float:
    """Maximum calibration error: the largest ``|observed - predicted|`` over the non-empty bins.

    Arguments as :func:`expected_calibration_error`; with ``mode="classwise"``
    the largest over all classes' bins. Sensitive to sparsely filled bins.

    Examples
    --------
    >>> maximum_calibration_error([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.4], n_bins=2)
    0.25
    """
    n_bins, strategy = _check_bins(n_bins, strategy)
    y, prob, _ = _labelled_matrix(y_true, y_prob)
    return _calibration_errors(y, prob, n_bins, strategy, _resolve_mode(mode, prob.shape[1]))[1]


def _brier(y: np.ndarray, prob: np.ndarray) -> float:
    if prob.shape[1] == 2:
        return float(np.mean((prob[:, 1] - (y == 1)) ** 2))
    onehot = np.eye(prob.shape[1])[y]
    return float(np.mean(np.sum((prob - onehot) ** 2, axis=1)))


def brier_score(y_true: Any, y_prob: Any) -> float:
    """Brier score: the mean squared error of the predicted probabilities (lower is better).

    Two classes: ``mean((P(class 1) - y)^2)`` in ``[0, 1]`` (scikit-learn's
    ``brier_score_loss``); ``C > 2`` classes: ``mean(sum_k (p_k - 1[y = k])^2)``
    in ``[0, 2]``, the multi-class definition (which for two classes would be
    twice the binary value).

    Parameters
    ----------
    y_true : array-like
        ``(n,)`` labels; ``-1`` (unlabelled) is left out.
    y_prob : array-like
        ``(n,)`` positive-class probabilities or ``(n, C)`` probabilities.

    Returns
    -------
    float

    Examples
    --------
    >>> brier_score([0, 1], [0.3, 0.8])  # (0.3^2 + 0.2^2) / 2
    0.065
    >>> round(brier_score([0, 2], [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]), 6)  # (0.38 + 0.24) / 2
    0.31
    """
    y, prob, _ = _labelled_matrix(y_true, y_prob)
    return _brier(y, prob)


def _nll(y: np.ndarray, prob: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(prob[np.arange(y.shape[0]), y], _NLL_EPS, 1.0))))


def negative_log_likelihood(y_true: Any, y_prob: Any) -> float:
    """Mean negative log-likelihood ``-mean(log p_y)`` of the true classes (log loss, natural log).

    Probabilities are clipped below at ``1e-12`` so a confident mistake costs
    about 27.6 instead of infinity.

    Parameters
    ----------
    y_true : array-like
        ``(n,)`` labels; ``-1`` (unlabelled) is left out.
    y_prob : array-like
        ``(n,)`` positive-class probabilities or ``(n, C)`` probabilities.

    Returns
    -------
    float

    Examples
    --------
    >>> round(negative_log_likelihood([0, 1], [0.2, 0.9]), 6)  # -(log 0.8 + log 0.9) / 2
    0.164252
    """
    y, prob, _ = _labelled_matrix(y_true, y_prob)
    return _nll(y, prob)


def _calibration_scalars(
    y: np.ndarray, prob: np.ndarray, n_bins: int, strategy: str, mode: str
) -> dict[str, float]:
    ece, mce = _calibration_errors(y, prob, n_bins, strategy, mode)
    classwise = _calibration_errors(y, prob, n_bins, strategy, "classwise")[0]
    return {
        "ece": ece,
        "mce": mce,
        "classwise_ece": classwise,
        "brier": _brier(y, prob),
        "nll": _nll(y, prob),
    }


@dataclass(frozen=True)
class CalibrationReport:
    """Calibration metrics of predicted probabilities.

    Attributes
    ----------
    ece, mce : float
        Expected and maximum calibration error in ``mode`` (binary for two
        classes, else top-label, by default).
    classwise_ece : float
        Mean over classes of the ECE of each class's probability.
    brier, nll : float
        Brier score and mean negative log-likelihood.
    n_bins, strategy, mode : int, str, str
        The binning used.
    n_samples, n_unlabelled : int
        Labelled samples scored and unlabelled samples left out.
    ci : dict of str to (float, float)
        Bootstrap percentile confidence intervals, empty without bootstrap.

    Examples
    --------
    >>> r = calibration_report([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.4], n_bins=2)
    >>> round(r.ece, 3), r.as_dict()["n_samples"]
    (0.2, 4.0)
    """

    ece: float
    mce: float
    classwise_ece: float
    brier: float
    nll: float
    n_bins: int
    strategy: str
    mode: str
    n_samples: int
    n_unlabelled: int
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Flat ``name -> float``: the five metrics, ``n_samples``, ``n_unlabelled`` and CI bounds.

        Examples
        --------
        >>> sorted(calibration_report([0, 1], [0.3, 0.8]).as_dict())[:3]
        ['brier', 'classwise_ece', 'ece']
        """
        out = {name: float(getattr(self, name)) for name in _CALIBRATION_SCALARS}
        out.update(n_samples=float(self.n_samples), n_unlabelled=float(self.n_unlabelled))
        out.update(_ci_dict(self.ci))
        return out


def calibration_report(
    y_true: Any,
    y_prob: Any,
    *,
    n_bins: int = 15,
    strategy: str = "uniform",
    mode: str = "auto",
    n_bootstrap: int = 0,
    ci: float = 0.95,
    seed: int | None = 0,
) -> CalibrationReport:
    """ECE, MCE, class-wise ECE, Brier score and NLL, with bootstrap confidence intervals.

    Parameters
    ----------
    y_true : array-like
        ``(n,)`` labels in ``0..C-1``; ``-1`` (unlabelled) is left out.
    y_prob : array-like
        ``(n,)`` positive-class probabilities or ``(n, C)`` probabilities.
    n_bins, strategy, mode
        Binning, as :func:`expected_calibration_error` (``mode`` sets
        ``ece``/``mce``; ``classwise_ece`` is always reported).
    n_bootstrap : int, default 0
        Bootstrap resamples (over the labelled samples) for percentile
        intervals; 0 disables them.
    ci : float, default 0.95
        Coverage of the intervals.
    seed : int or None, default 0
        Seed of the resampling generator.

    Returns
    -------
    CalibrationReport

    Raises
    ------
    DataError, ConfigError
        As :func:`calibration_bins`, and for bad bootstrap settings.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> p = rng.uniform(size=200)
    >>> y = (rng.uniform(size=200) < p).astype(int)  # calibrated by construction
    >>> r = calibration_report(y, p, n_bins=10, n_bootstrap=100)
    >>> r.ece < 0.1, r.ci["ece"][0] <= r.ece <= r.ci["ece"][1]
    (True, True)
    """
    n_bins, strategy = _check_bins(n_bins, strategy)
    _check_bootstrap(n_bootstrap, ci)
    y, prob, n_unlabelled = _labelled_matrix(y_true, y_prob)
    mode = _resolve_mode(mode, prob.shape[1])
    values = _calibration_scalars(y, prob, n_bins, strategy, mode)
    intervals: dict[str, tuple[float, float]] = {}
    if n_bootstrap:
        intervals = _bootstrap(
            lambda yy, pp: _calibration_scalars(yy, pp, n_bins, strategy, mode),
            y,
            prob,
            int(n_bootstrap),
            float(ci),
            seed,
        )
    return CalibrationReport(
        **values,
        n_bins=n_bins,
        strategy=strategy,
        mode=mode,
        n_samples=int(y.shape[0]),
        n_unlabelled=n_unlabelled,
        ci=intervals,
    )


# --------------------------------------------------------------------------- selective prediction


@dataclass(frozen=True)
class RiskCoverage:
    """A risk-coverage curve: the error rate among the patients answered, as fewer are answered.

    Attributes
    ----------
    coverage : numpy.ndarray
        ``(m,)`` fraction of patients kept (answered), decreasing from 1.
    risk : numpy.ndarray
        ``(m,)`` mean loss (error rate by default) of the kept patients.
    threshold : numpy.ndarray
        ``(m,)`` confidence at or above which a patient is kept at that point.
    aurc : float
        Area under the curve: the mean of ``risk`` over coverages ``k / n``.

    Examples
    --------
    >>> rc = risk_coverage_curve([1, 0, 1, 0], [0.9, 0.8, 0.6, 0.7])
    >>> rc.coverage.tolist(), rc.risk.tolist()
    ([1.0, 0.75, 0.5, 0.25], [0.5, 0.666..., 0.5, 0.0])
    """

    coverage: np.ndarray
    risk: np.ndarray
    threshold: np.ndarray
    aurc: float


def risk_coverage_curve(correct: Any, confidence: Any) -> RiskCoverage:
    """Risk-coverage curve of selective prediction: keep the most confident patients, refer the rest.

    The patients are sorted by decreasing ``confidence``; keeping the top
    ``k`` gives coverage ``k / n`` and risk = their error rate. Ties in
    confidence are kept or referred together (one point per distinct
    confidence). The area under it (AURC; lower is better) is the mean
    risk over ``k = 1..n``, ties taking the risk of their group.

    Parameters
    ----------
    correct : array-like
        ``(n,)`` bool or 0/1: whether each prediction is right (e.g.
        ``probabilities.argmax(1) == labels``); or a float loss in
        ``[0, 1]`` per patient (the risk is then the mean loss).
    confidence : array-like
        ``(n,)`` confidence (higher = more certain), e.g. the largest
        probability, or minus an uncertainty score.

    Returns
    -------
    RiskCoverage

    Raises
    ------
    DataError
        Shapes that differ, non-finite values, or no patient.

    Examples
    --------
    >>> rc = risk_coverage_curve([1, 1, 0, 1], [0.9, 0.8, 0.6, 0.7])
    >>> rc.risk.tolist(), round(rc.aurc, 4)  # the error is the least confident
    ([0.25, 0.0, 0.0, 0.0], 0.0625)
    """
    ok = np.asarray(correct, dtype=np.float64)
    conf = np.asarray(confidence, dtype=np.float64)
    if ok.ndim != 1 or conf.shape != ok.shape or ok.size == 0:
        raise DataError(
            f"correct and confidence must be non-empty (n,) arrays of one length, got shapes "
            f"{ok.shape} and {conf.shape}"
        )
    if not (np.all(np.isfinite(ok)) and np.all(np.isfinite(conf))):
        raise DataError("correct and confidence must be finite")
    if ok.min() < 0.0 or ok.max() > 1.0:
        raise DataError("correct must hold 0/1 (or a loss in [0, 1]) per patient")
    loss = 1.0 - ok
    order = np.argsort(-conf, kind="stable")
    loss, conf = loss[order], conf[order]
    n = loss.shape[0]
    risk_at_k = np.cumsum(loss) / np.arange(1, n + 1)
    # The last position of each group of tied confidences: a group is kept or referred as a whole.
    last = np.r_[np.nonzero(np.diff(conf))[0], n - 1]
    group_risk = risk_at_k[last]
    sizes = np.diff(np.r_[-1, last])
    aurc_value = float(np.sum(group_risk * sizes) / n)
    return RiskCoverage(
        coverage=((last + 1) / n)[::-1].copy(),
        risk=group_risk[::-1].copy(),
        threshold=conf[last][::-1].copy(),
        aurc=aurc_value,
    )


def aurc(correct: Any, confidence: Any) -> float:
    """Area under the risk-coverage curve (lower is better); see :func:`risk_coverage_curve`.

    Examples
    --------
    >>> aurc([1, 0, 1, 1], [0.9, 0.8, 0.6, 0.7])  # mean of 0, 1/2, 1/3, 1/4
    0.2708...
    """
    return risk_coverage_curve(correct, confidence).aurc


# --------------------------------------------------------------------------- folds


def summarize_folds(folds: Iterable[Mapping[str, float]], ddof: int = 1) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation of each metric over cross-validation folds.

    Parameters
    ----------
    folds : iterable of mapping
        One ``name -> value`` dict per fold (e.g. ``report.as_dict()``). A
        metric missing from a fold, or ``nan`` there, is averaged over the
        folds that have it.
    ddof : int, default 1
        Delta degrees of freedom of the standard deviation (1 = sample std).

    Returns
    -------
    dict of str to (float, float)
        ``name -> (mean, std)`` in first-seen order; ``std`` is ``nan`` with
        fewer than ``ddof + 1`` finite values.

    Raises
    ------
    DataError
        If ``folds`` is empty or a value is not a number.

    Examples
    --------
    >>> summary = summarize_folds([{"auc": 0.9}, {"auc": 0.8}, {"auc": 1.0}])
    >>> summary["auc"]
    (0.9, 0.1)
    """
    folds = list(folds)
    if not folds:
        raise DataError("summarize_folds: got no folds")
    values: dict[str, list[float]] = {}
    for i, fold in enumerate(folds):
        for name, value in fold.items():
            try:
                values.setdefault(name, []).append(float(value))
            except (TypeError, ValueError) as exc:
                raise DataError(
                    f"summarize_folds: fold {i} metric {name!r} is not a number: {value!r}"
                ) from exc
    out: dict[str, tuple[float, float]] = {}
    for name, vals in values.items():
        arr = np.asarray(vals, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        mean = float(arr.mean()) if arr.size else math.nan
        std = float(arr.std(ddof=ddof)) if arr.size > ddof else math.nan
        out[name] = (round(mean, 12), round(std, 12))
    return out


def format_mean_std(mean: float, std: float, digits: int = 2) -> str:
    """Format ``mean ± std`` the way papers report cross-validation results.

    Examples
    --------
    >>> format_mean_std(0.9134, 0.0472)
    '0.91 ± 0.05'
    >>> format_mean_std(0.9134, float("nan"), digits=3)
    '0.913'
    """
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_summary(
    summary: Mapping[str, tuple[float, float]], names: Sequence[str] | None = None, digits: int = 2
) -> str:
    """Render :func:`summarize_folds` output as an aligned two-column text table.

    Parameters
    ----------
    summary : mapping of str to (float, float)
        ``name -> (mean, std)``.
    names : sequence of str, optional
        Metrics to show, in this order (default: all).
    digits : int, default 2
        Decimals.

    Raises
    ------
    ConfigError
        If a requested name is not in ``summary``.

    Examples
    --------
    >>> s = summarize_folds([{"auc": 0.9, "f1": 0.7}, {"auc": 0.8, "f1": 0.9}])
    >>> print(format_summary(s))
    auc  0.85 ± 0.07
    f1   0.80 ± 0.14
    """
    chosen = list(summary) if names is None else list(names)
    unknown = [n for n in chosen if n not in summary]
    if unknown:
        raise ConfigError(f"format_summary: unknown metrics {unknown}; available: {sorted(summary)}")
    if not chosen:
        return ""
    width = max(len(n) for n in chosen)
    return "\n".join(f"{n.ljust(width)}  {format_mean_std(*summary[n], digits=digits)}" for n in chosen)
