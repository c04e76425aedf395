"""Split conformal prediction sets at patient level, with a finite-sample coverage guarantee.

Given probabilities of ``n`` held-out *calibration* patients with known
labels, :class:`ConformalPredictor` returns for each new patient a *set* of
plausible classes such that, if the calibration patients and the new patient
are exchangeable (drawn from the same population, in no particular order),

    P(true class in set) >= 1 - alpha,

averaged over the draw of the calibration set and of the new patient. With
continuous scores the coverage is also at most ``1 - alpha + 1 / (n + 1)``.

Non-conformity scores (higher = the class fits the patient less):

- ``"lac"`` (least ambiguous set-valued classifier): ``1 - p_y``. Smallest
  sets on average; a set may be empty when no class is plausible enough.
- ``"aps"`` (adaptive prediction sets): the probability mass of the classes
  at least as probable as ``y``, i.e. ``sum_j p_j 1[p_j > p_y] + p_y``;
  sets grow with the patient's uncertainty; the most probable class is
  always included, so sets are never empty (non-randomised version:
  coverage may exceed ``1 - alpha``).

The threshold is the ``k``-th smallest calibration score with
``k = ceil((n + 1)(1 - alpha))``; when ``k > n`` (``alpha < 1 / (n + 1)``:
too few calibration patients for that error rate) the threshold is
``+inf`` and every set holds every class, which is the only set that keeps
the guarantee. With ``mondrian=True`` a threshold is computed per class from
the calibration patients of that class, so the guarantee holds *within*
each true class (``P(y in set | Y = y) >= 1 - alpha``), which matters when the
malignant patients are a minority; it needs enough calibration patients of
every class.

What it does not promise: coverage for a single patient, or for a subgroup
(sex, age, site) other than the Mondrian classes; anything under a shift
between the calibration and the new patients (another hospital, scanner,
prevalence). The unit is the patient: calibrate and predict with one row
per patient, never per cell.

Examples
--------
>>> import numpy as np
>>> from milcell.conformal import ConformalPredictor
>>> rng = np.random.default_rng(0)
>>> p = rng.dirichlet([1, 1, 1], size=500)
>>> y = np.array([rng.choice(3, p=row) for row in p])  # calibrated by construction
>>> cp = ConformalPredictor("aps").fit(p[:300], y[:300], alpha=0.1)
>>> sets = cp.predict_sets(p[300:])
>>> sets.shape, sets.dtype
((200, 3), dtype('bool'))
>>> coverage = float(sets[np.arange(200), y[300:]].mean())
>>> 0.8 < coverage <= 1.0
True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from milcell._validation import check_choice, check_real
from milcell.calibration import CalibrationError, _as_labels, _as_probabilities

__all__ = ["CONFORMAL_SCORES", "ConformalPredictor", "conformal_quantile", "conformal_scores"]

logger = logging.getLogger("milcell")

CONFORMAL_SCORES = ("lac", "aps")
"""The non-conformity scores :class:`ConformalPredictor` offers."""
_FORMAT = "milcell-conformal"


def conformal_scores(probabilities: Any, score: str = "lac") -> np.ndarray:
    """``(B, C)`` non-conformity score of every class for every patient (see the module docstring).

    Examples
    --------
    >>> conformal_scores([[0.6, 0.3, 0.1]], "lac").round(3).tolist()
    [[0.4, 0.7, 0.9]]
    >>> conformal_scores([[0.6, 0.3, 0.1]], "aps").round(3).tolist()
    [[0.6, 0.9, 1.0]]
    """
    score = check_choice(score, "score", CONFORMAL_SCORES)
    p = _as_probabilities(probabilities)
    if score == "lac":
        return 1.0 - p
    # Mass of the classes strictly more probable than y, plus p_y (ties do not count each other).
    greater = p[:, None, :] > p[:, :, None]  # (B, C_y, C_j): p_j > p_y
    return np.asarray(np.einsum("byj,bj->by", greater, p) + p)


def conformal_quantile(scores: Any, alpha: float) -> float:
    """The split-conformal threshold: the ``ceil((n + 1)(1 - alpha))``-th smallest score.

    Returns ``+inf`` when that rank exceeds ``n`` (too few scores for
    ``alpha``): the prediction sets then hold every class.

    Parameters
    ----------
    scores : array-like
        ``(n,)`` calibration scores of the true classes.
    alpha : float
        Error rate in ``(0, 1)``.

    Examples
    --------
    >>> conformal_quantile([0.1, 0.2, 0.3, 0.4], alpha=0.4)  # ceil(5 * 0.6) = 3rd smallest
    0.3
    >>> conformal_quantile([0.1, 0.2, 0.3, 0.4], alpha=0.1)  # ceil(4.5) = 5 > 4
    inf
    """
    alpha = check_real(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    n = s.shape[0]
    # The small epsilon keeps (n + 1)(1 - alpha) = 9.000000000000002 from rounding up to 10.
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    if k > n or n == 0:
        return math.inf
    return float(s[max(k, 1) - 1])


class ConformalPredictor:
    """Split conformal prediction sets over patients' class probabilities.

    Parameters
    ----------
    score : {"lac", "aps"}, default "lac"
        Non-conformity score (see the module docstring).
    mondrian : bool, default False
        One threshold per class (class-conditional coverage).

    Attributes
    ----------
    thresholds : numpy.ndarray
        ``(C,)`` threshold of each class (all equal without Mondrian); class
        ``y`` is in a patient's set when its score is ``<= thresholds[y]``.
    alpha : float
        The error rate the thresholds were fitted for.
    n_calibration : numpy.ndarray
        ``(C,)`` calibration patients per class.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]] * 5)
    >>> cp = ConformalPredictor("lac").fit(p, [0, 1, 0, 1] * 5, alpha=0.2)
    >>> cp.thresholds.tolist()  # the ceil(21 * 0.8) = 17th smallest of the scores 1 - p_y
    [0.4, 0.4]
    >>> cp.predict_sets([[0.65, 0.35], [0.05, 0.95], [0.55, 0.45]]).tolist()  # LAC sets may be empty
    [[True, False], [False, True], [False, False]]
    """

    def __init__(self, score: str = "lac", *, mondrian: bool = False) -> None:
        self.score = check_choice(score, "score", CONFORMAL_SCORES)
        self.mondrian = bool(mondrian)
        self.thresholds: np.ndarray | None = None
        self.alpha = math.nan
        self.n_calibration: np.ndarray | None = None

    def fit(self, probabilities_cal: Any, labels_cal: Any, alpha: float = 0.1) -> ConformalPredictor:
        """Compute the thresholds from held-out calibration patients.

        Parameters
        ----------
        probabilities_cal : array-like or Tensor
            ``(n, C)`` probabilities of calibration patients (not used for
            training, and not the patients you will evaluate on).
        labels_cal : array-like or Tensor
            ``(n,)`` their true classes; ``-1`` rows are left out.
        alpha : float, default 0.1
            Tolerated error rate in ``(0, 1)``: sets miss the true class of at
            most a fraction ``alpha`` of patients, on average.

        Returns
        -------
        ConformalPredictor
            ``self``.

        Raises
        ------
        CalibrationError
            No labelled calibration patient. (Too few patients for ``alpha``
            is not an error: the thresholds are ``inf`` and a warning is logged.)
        ConfigError
            ``alpha`` outside ``(0, 1)``.
        """
        alpha = check_real(alpha, "alpha", low=0.0, high=1.0, low_open=True, high_open=True)
        p = _as_probabilities(probabilities_cal, "probabilities_cal")
        y = _as_labels(labels_cal, p.shape[0], p.shape[1], "labels_cal")
        keep = y >= 0
        p, y = p[keep], y[keep]
        if y.size == 0:
            raise CalibrationError("ConformalPredictor.fit: labels_cal has no labelled patient")
        true_scores = conformal_scores(p, self.score)[np.arange(y.shape[0]), y]
        n_classes = p.shape[1]
        counts = np.bincount(y, minlength=n_classes)
        if self.mondrian:
            thresholds = np.array([conformal_quantile(true_scores[y == c], alpha) for c in range(n_classes)])
        else:
            thresholds = np.full(n_classes, conformal_quantile(true_scores, alpha))
        if np.isinf(thresholds).any():
            where = (
                f"classes {np.nonzero(np.isinf(thresholds))[0].tolist()} (counts {counts.tolist()})"
                if self.mondrian
                else f"{y.shape[0]} patients"
            )
            logger.warning(
                "ConformalPredictor.fit: too few calibration patients for alpha=%g in %s "
                "(need n >= 1/alpha - 1 = %d); those classes are always in the sets",
                alpha,
                where,
                math.ceil(1.0 / alpha - 1.0),
            )
        self.thresholds, self.alpha, self.n_calibration = thresholds, alpha, counts
        return self

    @property
    def fitted(self) -> bool:
        """Whether the thresholds are set."""
        return self.thresholds is not None

    def predict_sets(self, probabilities: Any) -> np.ndarray:
        """``(B, C)`` bool prediction sets: ``[b, c]`` is True when class ``c`` is plausible for ``b``.

        Parameters
        ----------
        probabilities : array-like or Tensor
            ``(B, C)`` probabilities of new patients (the same model and
            calibration map as the calibration patients).

        Raises
        ------
        CalibrationError
            If not fitted.
        """
        if self.thresholds is None:
            raise CalibrationError(
                "ConformalPredictor is not fitted: call fit(probabilities_cal, labels_cal)"
            )
        p = _as_probabilities(probabilities)
        if p.shape[1] != self.thresholds.shape[0]:
            raise CalibrationError(
                f"probabilities have {p.shape[1]} classes, the predictor was fitted on "
                f"{self.thresholds.shape[0]}"
            )
        sets = conformal_scores(p, self.score) <= self.thresholds[None, :]
        if self.score == "aps":  # the most probable class is always kept: sets only grow, coverage holds
            sets[np.arange(p.shape[0]), p.argmax(axis=1)] = True
        return np.asarray(sets)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (``inf`` thresholds written as ``None``).

        Examples
        --------
        >>> cp = ConformalPredictor("aps", mondrian=True).fit([[0.7, 0.3]] * 3 + [[0.2, 0.8]] * 3,
        ...                                                   [0, 0, 0, 1, 1, 1], alpha=0.5)
        >>> ConformalPredictor.from_dict(cp.to_dict()).thresholds.tolist() == cp.thresholds.tolist()
        True
        """
        if self.thresholds is None or self.n_calibration is None:
            raise CalibrationError("ConformalPredictor is not fitted: nothing to save")
        return {
            "format": _FORMAT,
            "score": self.score,
            "mondrian": self.mondrian,
            "alpha": self.alpha,
            "thresholds": [None if math.isinf(t) else float(t) for t in self.thresholds],
            "n_calibration": [int(c) for c in self.n_calibration],
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ConformalPredictor:
        """Rebuild a fitted predictor from :meth:`to_dict`."""
        if not isinstance(record, Mapping) or record.get("format") != _FORMAT:
            raise CalibrationError(f"not a milcell conformal record (format must be {_FORMAT!r})")
        try:
            cp = cls(record["score"], mondrian=bool(record["mondrian"]))
            cp.alpha = float(record["alpha"])
            cp.thresholds = np.array([math.inf if t is None else float(t) for t in record["thresholds"]])
            cp.n_calibration = np.asarray(record["n_calibration"], dtype=np.int64)
        except KeyError as exc:
            raise CalibrationError(f"conformal record lacks the key {exc.args[0]!r}") from exc
        return cp

    def __repr__(self) -> str:
        state = "unfitted" if self.thresholds is None else f"alpha={self.alpha:g}"
        return f"ConformalPredictor(score={self.score!r}, mondrian={self.mondrian}, {state})"
