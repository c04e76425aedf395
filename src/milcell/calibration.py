"""Calibrated probabilities, uncertainty scores and referral of uncertain patients.

A model's softmax is rarely calibrated: among patients given 0.9, far fewer
or far more than 90 % may be ill. :class:`Calibrator` re-maps held-out logits
``(B, C)`` to calibrated probabilities with one of three small maps fitted by
minimising the negative log-likelihood (NLL):

- ``"temperature"``: ``softmax(z / T)``, one parameter; keeps the argmax, so
  accuracy, sensitivity and AUC do not change (binary and multi-class);
- ``"vector"``: ``softmax(w * z + b)`` with per-class ``w`` and ``b``
  (``2 C`` parameters; may change the argmax);
- ``"platt"``: two classes only, ``P(1) = sigmoid(a (z_1 - z_0) + b)``.

Fit a calibrator on data the model did not train on and that is not the data
you report on: a validation split, or the out-of-fold predictions of
:func:`~milcell.train.crossval.cross_validate`. Logits may be replaced by
log-probabilities (the softmax ignores a per-row constant), which is how
probabilities saved by a run are calibrated. A *fold ensemble* is calibrated
after averaging: fit on ``log(mean_m p_m)``, the log of the ensemble's
averaged probabilities (:func:`ensemble_log_probabilities`), and apply the
calibrator to the same quantity at prediction time.

The calibrator is plain JSON (:meth:`Calibrator.to_dict`): it saves with a
run and loads without pickle.

Uncertainty and referral: per-patient scores (:func:`uncertainty_scores`:
largest probability, entropy, margin, ensemble disagreement; and
:func:`mc_dropout` samples), and a :class:`ReferralRule` that refers the
fewest patients such that the sensitivity (or accuracy) on the rest reaches
a target on calibration data (:func:`fit_referral`); report what it achieves
on evaluation data with :meth:`ReferralRule.evaluate`.

Examples
--------
>>> import numpy as np
>>> from milcell.calibration import Calibrator
>>> rng = np.random.default_rng(0)
>>> s = rng.normal(size=400)
>>> y = (rng.uniform(size=400) < 1 / (1 + np.exp(-s))).astype(int)  # P(1) = sigmoid(s)
>>> logits = np.stack([np.zeros(400), 4.0 * s], axis=1)  # four times over-confident
>>> cal = Calibrator("temperature").fit(logits, y)
>>> 3.0 < cal.temperature < 5.5
True
>>> cal.transform(logits).shape, cal.nll_after <= cal.nll_before
((400, 2), True)
>>> Calibrator.from_dict(cal.to_dict()).temperature == cal.temperature
True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from milcell._validation import check_choice, check_int, check_real
from milcell.exceptions import ConfigError, DataError, ShapeError

__all__ = [
    "CALIBRATION_METHODS",
    "UNCERTAINTY_SCORES",
    "CalibrationError",
    "Calibrator",
    "ReferralRule",
    "RunCalibration",
    "ensemble_log_probabilities",
    "entropy",
    "fit_referral",
    "fit_run_calibration",
    "format_calibration",
    "margin",
    "max_probability",
    "mc_dropout",
    "mutual_information",
    "uncertainty_scores",
    "vote_disagreement",
]

logger = logging.getLogger("milcell")

CALIBRATION_METHODS = ("temperature", "vector", "platt")
"""The maps :class:`Calibrator` fits."""
UNCERTAINTY_SCORES = ("max_probability", "entropy", "margin")
"""Scores :func:`fit_referral` can rank patients by (ensemble scores need the members)."""
_FORMAT = "milcell-calibrator"
_VERSION = 1
_REFERRAL_FORMAT = "milcell-referral"
_LOG_BOUND = 7.0  # log-scale parameters stay in [-7, 7] (temperature between 1e-3 and 1e3)


class CalibrationError(ConfigError):
    """Calibration cannot be fitted (too few samples, one class) or a calibrator record is invalid.

    A :class:`~milcell.exceptions.ConfigError` (and so a ``ValueError``).

    Examples
    --------
    >>> issubclass(CalibrationError, ConfigError)
    True
    """


# --------------------------------------------------------------------------- inputs


def _as_logits(logits: Any, what: str = "logits") -> np.ndarray:
    """``(B, C)`` float64 logits; ``(B,)`` or ``(B, 1)`` is one class-1 logit, expanded to ``(0, z)``."""
    if isinstance(logits, Tensor):
        logits = logits.detach().float().cpu().numpy()
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[1] < 1:
        raise ShapeError(
            f"{what} must be (B, C) class logits (or (B,) one binary logit), got shape {z.shape}"
        )
    if z.shape[1] == 1:
        z = np.concatenate([np.zeros_like(z), z], axis=1)
    if not np.all(np.isfinite(z)):
        raise DataError(f"{what} contains NaN or infinite values")
    return z


def _as_probabilities(probabilities: Any, what: str = "probabilities") -> np.ndarray:
    if isinstance(probabilities, Tensor):
        probabilities = probabilities.detach().float().cpu().numpy()
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ShapeError(f"{what} must be a (B, C) probability matrix with C >= 2, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or (p.size and (p.min() < 0.0 or p.max() > 1.0)):
        raise DataError(f"{what} must hold probabilities in [0, 1] (apply softmax to logits first)")
    if p.shape[0] and not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise DataError(f"{what} rows must sum to 1 (probabilities, not logits)")
    return p


def _as_labels(labels: Any, n: int, n_classes: int, what: str = "labels") -> np.ndarray:
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ShapeError(f"{what} must be ({n},), one label per row, got shape {y.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.number) or not np.all(np.mod(y, 1) == 0)):
        raise DataError(f"{what} must hold integer class indices")
    y = y.astype(np.int64)
    bad = (y < -1) | (y >= n_classes)
    if bad.any():
        raise DataError(
            f"{what} holds {sorted(set(y[bad].tolist()))[:5]} outside 0..{n_classes - 1} (-1 = unlabelled)"
        )
    return y


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _nll(z: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(_log_softmax(z)[np.arange(y.shape[0]), y]))


def ensemble_log_probabilities(member_probabilities: Any) -> np.ndarray:
    """``log(mean_m p_m)``: what a fold ensemble is calibrated on (``(M, B, C) -> (B, C)``).

    Parameters
    ----------
    member_probabilities : array-like or Tensor
        ``(M, B, C)`` class probabilities of ``M`` members for ``B`` patients.

    Returns
    -------
    numpy.ndarray
        ``(B, C)`` float64 log of the averaged probabilities (``-inf`` avoided
        by a floor of ``1e-12``); pass it to :meth:`Calibrator.fit` and
        :meth:`Calibrator.transform` as logits.

    Examples
    --------
    >>> import numpy as np
    >>> members = np.array([[[0.2, 0.8]], [[0.6, 0.4]]])
    >>> np.exp(ensemble_log_probabilities(members)).round(3).tolist()
    [[0.4, 0.6]]
    """
    p = _members(member_probabilities)
    return np.log(np.clip(p.mean(axis=0), 1e-12, 1.0))


def _members(member_probabilities: Any) -> np.ndarray:
    if isinstance(member_probabilities, Tensor):
        member_probabilities = member_probabilities.detach().float().cpu().numpy()
    p = np.asarray(member_probabilities, dtype=np.float64)
    if p.ndim != 3 or p.shape[0] < 1 or p.shape[2] < 2:
        raise ShapeError(
            f"member probabilities must be (M, B, C) with M >= 1 and C >= 2, got shape {p.shape}"
        )
    _as_probabilities(p.reshape(-1, p.shape[2]), "member probabilities")
    return p


# --------------------------------------------------------------------------- calibrator


def _unpack(method: str, theta: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class scale ``w`` and shift ``b`` of ``w * z + b`` from the optimiser's parameters."""
    if method == "temperature":
        return np.full(n_classes, math.exp(theta[0])), np.zeros(n_classes)
    if method == "vector":
        return theta[:n_classes].copy(), theta[n_classes:].copy()
    # platt on the logit difference d = z1 - z0: sigmoid(a d + b) == softmax of (0, a d + b)
    return np.array([0.0, 0.0]), np.array([theta[0], theta[1]])


class Calibrator:
    """A map from logits ``(B, C)`` to calibrated probabilities, fitted by minimising the NLL.

    Parameters
    ----------
    method : {"temperature", "vector", "platt"}, default "temperature"
        See the module docstring. ``"platt"`` needs two classes.
    min_samples : int, default 10
        Fewest labelled samples :meth:`fit` accepts.

    Attributes
    ----------
    temperature : float
        ``T`` of temperature scaling (``nan`` for the other methods).
    weight, bias : numpy.ndarray
        ``(C,)`` scale and shift of vector scaling, or ``(2,)`` ``(a, b)`` of
        Platt scaling; for temperature scaling ``1 / T`` and zeros.
    nll_before, nll_after : float
        NLL on the fitting data before and after calibration. The fit starts
        at the identity and keeps it if the optimiser ends no lower, so
        ``nll_after <= nll_before`` always.
    n_samples : int
        Labelled samples the calibrator was fitted on.

    Examples
    --------
    >>> import numpy as np
    >>> cal = Calibrator("temperature")
    >>> cal.fitted
    False
    >>> z = np.array([[2.0, 0.0], [0.0, 1.0]])
    >>> Calibrator.identity(2).transform(z).round(4).tolist()
    [[0.8808, 0.1192], [0.2689, 0.7311]]
    """

    def __init__(self, method: str = "temperature", *, min_samples: int = 10) -> None:
        self.method = check_choice(method, "method", CALIBRATION_METHODS)
        self.min_samples = check_int(min_samples, "min_samples", low=2)
        self.num_classes: int | None = None
        self._theta: np.ndarray | None = None
        self.nll_before = math.nan
        self.nll_after = math.nan
        self.n_samples = 0

    # ------------------------------------------------------------------ construction

    @classmethod
    def identity(cls, num_classes: int, method: str = "temperature") -> Calibrator:
        """A fitted calibrator that changes nothing (temperature 1, or unit scale and zero shift).

        Examples
        --------
        >>> Calibrator.identity(3).temperature
        1.0
        """
        cal = cls(method)
        cal.num_classes = check_int(num_classes, "num_classes", low=2)
        if cal.method == "platt" and cal.num_classes != 2:
            raise ConfigError(f"method='platt' needs two classes, got num_classes={num_classes}")
        cal._theta = cal._start(cal.num_classes)
        return cal

    def _start(self, n_classes: int) -> np.ndarray:
        if self.method == "temperature":
            return np.zeros(1)  # log(1 / T) = 0
        if self.method == "vector":
            return np.concatenate([np.ones(n_classes), np.zeros(n_classes)])
        return np.array([1.0, 0.0])

    @property
    def fitted(self) -> bool:
        """Whether the calibrator has parameters (fitted or loaded)."""
        return self._theta is not None

    def _parameters(self) -> tuple[np.ndarray, np.ndarray]:
        if self._theta is None or self.num_classes is None:
            raise CalibrationError("the calibrator is not fitted: call fit(logits, labels) first")
        return _unpack(self.method, self._theta, self.num_classes)

    @property
    def temperature(self) -> float:
        """``T`` of temperature scaling; ``nan`` for vector and Platt scaling."""
        if self.method != "temperature":
            return math.nan
        self._parameters()
        assert self._theta is not None
        return float(math.exp(-self._theta[0]))

    @property
    def weight(self) -> np.ndarray:
        """Scale parameters (see the class docstring)."""
        w, _ = self._parameters()
        assert self._theta is not None
        return np.array(self._theta[:1] if self.method == "platt" else w)

    @property
    def bias(self) -> np.ndarray:
        """Shift parameters (see the class docstring)."""
        _, b = self._parameters()
        assert self._theta is not None
        return np.array(self._theta[1:2] if self.method == "platt" else b)

    # ------------------------------------------------------------------ maps

    def _apply(self, theta: np.ndarray, z: np.ndarray) -> np.ndarray:
        assert self.num_classes is not None
        if self.method == "platt":
            d = z[:, 1] - z[:, 0]
            return np.stack([np.zeros_like(d), theta[0] * d + theta[1]], axis=1)
        w, b = _unpack(self.method, theta, self.num_classes)
        return z * w + b

    def _loss_and_grad(self, theta: np.ndarray, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        out = self._apply(theta, z)
        n = y.shape[0]
        logp = _log_softmax(out)
        loss = float(-np.mean(logp[np.arange(n), y]))
        grad_out = np.exp(logp)
        grad_out[np.arange(n), y] -= 1.0
        grad_out /= n  # dNLL / d out, (B, C)
        if self.method == "temperature":
            grad = np.array([math.exp(theta[0]) * float(np.sum(grad_out * z))])
        elif self.method == "vector":
            grad = np.concatenate([np.sum(grad_out * z, axis=0), np.sum(grad_out, axis=0)])
        else:
            d = z[:, 1] - z[:, 0]
            grad = np.array([float(np.sum(grad_out[:, 1] * d)), float(np.sum(grad_out[:, 1]))])
        return loss, grad

    def fit(self, logits: Any, labels: Any) -> Calibrator:
        """Fit the map on held-out logits by minimising the NLL (scipy's L-BFGS-B).

        Parameters
        ----------
        logits : array-like or Tensor
            ``(B, C)`` logits (or log-probabilities; ``(B,)``/``(B, 1)``: one
            class-1 logit) of patients the model did not train on.
        labels : array-like or Tensor
            ``(B,)`` true classes; ``-1`` (unlabelled) rows are left out.

        Returns
        -------
        Calibrator
            ``self``, fitted.

        Raises
        ------
        CalibrationError
            Fewer than ``min_samples`` labelled rows, a single class among
            the labels, or ``method="platt"`` with more than two classes.
        ShapeError, DataError
            Malformed logits or labels.

        Examples
        --------
        >>> import numpy as np
        >>> Calibrator().fit(np.zeros((3, 2)), [0, 1, 1])
        Traceback (most recent call last):
        ...
        milcell.calibration.CalibrationError: Calibrator.fit: labels has 3 labelled samples; ...
        """
        from scipy.optimize import minimize

        z = _as_logits(logits)
        y = _as_labels(labels, z.shape[0], z.shape[1])
        keep = y >= 0
        z, y = z[keep], y[keep]
        n_classes = z.shape[1]
        if y.shape[0] < self.min_samples:
            raise CalibrationError(
                f"Calibrator.fit: labels has {y.shape[0]} labelled samples; at least min_samples="
                f"{self.min_samples} are needed to fit {self.method} scaling"
            )
        present = np.unique(y)
        if present.size < 2:
            raise CalibrationError(
                f"Calibrator.fit: labels holds a single class ({present.tolist()}); calibration needs "
                "samples of at least two classes"
            )
        if self.method == "platt" and n_classes != 2:
            raise CalibrationError(
                f"Calibrator.fit: method='platt' needs two classes, logits have {n_classes}"
            )
        self.num_classes = n_classes
        start = self._start(n_classes)
        before, _ = self._loss_and_grad(start, z, y)
        bounds = [(-_LOG_BOUND, _LOG_BOUND)] if self.method == "temperature" else None
        result = minimize(self._loss_and_grad, start, args=(z, y), jac=True, method="L-BFGS-B", bounds=bounds)
        theta = np.asarray(result.x, dtype=np.float64)
        after, _ = self._loss_and_grad(theta, z, y)
        if not math.isfinite(after) or after > before:
            logger.info("Calibrator.fit: the optimiser did not improve on the identity; keeping it")
            theta, after = start, before
        self._theta = theta
        self.nll_before, self.nll_after, self.n_samples = before, after, int(y.shape[0])
        logger.info(
            "Calibrator.fit: %s scaling on %d samples, NLL %.4f -> %.4f",
            self.method,
            y.shape[0],
            before,
            after,
        )
        return self

    def calibrated_logits(self, logits: Any) -> np.ndarray:
        """``(B, C)`` calibrated logits (softmax gives :meth:`transform`)."""
        z = _as_logits(logits)
        self._parameters()
        assert self._theta is not None and self.num_classes is not None
        if z.shape[1] != self.num_classes:
            raise ShapeError(
                f"logits have {z.shape[1]} classes, the calibrator was fitted on {self.num_classes}"
            )
        return self._apply(self._theta, z)

    def transform(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities ``(B, C)`` float64 of logits ``(B, C)``.

        Raises
        ------
        CalibrationError
            If the calibrator is not fitted.
        ShapeError
            Logits with another number of classes than at fit time.

        Examples
        --------
        >>> import numpy as np
        >>> cal = Calibrator.from_dict({"format": "milcell-calibrator", "version": 1,
        ...                             "method": "temperature", "num_classes": 2, "temperature": 2.0})
        >>> cal.transform(np.array([[0.0, 2.0]])).round(4).tolist()  # softmax([0, 1])
        [[0.2689, 0.7311]]
        """
        return _softmax(self.calibrated_logits(logits))

    def transform_probabilities(self, probabilities: Any) -> np.ndarray:
        """Calibrated probabilities from uncalibrated probabilities ``(B, C)`` (through their logs).

        Examples
        --------
        >>> import numpy as np
        >>> Calibrator.identity(2).transform_probabilities(np.array([[0.3, 0.7]])).round(6).tolist()
        [[0.3, 0.7]]
        """
        p = _as_probabilities(probabilities)
        return self.transform(np.log(np.clip(p, 1e-12, 1.0)))

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """The fitted calibrator as plain JSON values (what ``run.json`` stores).

        Examples
        --------
        >>> d = Calibrator.identity(2).to_dict()
        >>> d["method"], d["temperature"]
        ('temperature', 1.0)
        """
        self._parameters()
        assert self._theta is not None
        out: dict[str, Any] = {
            "format": _FORMAT,
            "version": _VERSION,
            "method": self.method,
            "num_classes": self.num_classes,
        }
        if self.method == "temperature":
            out["temperature"] = self.temperature
        else:
            out["weight"] = [float(v) for v in self.weight]
            out["bias"] = [float(v) for v in self.bias]
        for name in ("nll_before", "nll_after"):
            value = getattr(self, name)
            out[name] = None if not math.isfinite(value) else float(value)
        out["n_samples"] = self.n_samples
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Calibrator:
        """Rebuild a calibrator from :meth:`to_dict`.

        Raises
        ------
        CalibrationError
            A record of another format, a newer version, or missing or malformed parameters.
        """
        if not isinstance(record, Mapping) or record.get("format") != _FORMAT:
            raise CalibrationError(f"not a milcell calibrator record (format must be {_FORMAT!r})")
        version = record.get("version")
        if not isinstance(version, int) or version > _VERSION:
            raise CalibrationError(f"calibrator record version {version!r} is not one this milcell reads")
        try:
            cal = cls(record["method"])
            n_classes = check_int(record["num_classes"], "num_classes", low=2)
            if cal.method == "temperature":
                t = check_real(record["temperature"], "temperature", low=0.0, low_open=True)
                theta = np.array([-math.log(t)])
            else:
                w = np.asarray(record["weight"], dtype=np.float64)
                b = np.asarray(record["bias"], dtype=np.float64)
                size = 1 if cal.method == "platt" else n_classes
                if w.shape != (size,) or b.shape != (size,) or not np.all(np.isfinite(np.r_[w, b])):
                    raise CalibrationError(f"calibrator weight and bias must be {size} finite numbers each")
                theta = np.array([w[0], b[0]]) if cal.method == "platt" else np.concatenate([w, b])
        except KeyError as exc:
            raise CalibrationError(f"calibrator record lacks the key {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"malformed calibrator record: {exc}") from exc
        cal.num_classes = n_classes
        cal._theta = theta
        for name in ("nll_before", "nll_after"):
            value = record.get(name)
            setattr(cal, name, math.nan if value is None else float(value))
        cal.n_samples = int(record.get("n_samples", 0) or 0)
        return cal

    def __repr__(self) -> str:
        if not self.fitted:
            return f"Calibrator(method={self.method!r}, unfitted)"
        if self.method == "temperature":
            return f"Calibrator(method='temperature', temperature={self.temperature:.4g})"
        return f"Calibrator(method={self.method!r}, num_classes={self.num_classes})"


# --------------------------------------------------------------------------- uncertainty


def max_probability(probabilities: Any) -> np.ndarray:
    """``(B,)`` largest class probability of each patient (confidence; higher = more certain).

    Examples
    --------
    >>> max_probability([[0.2, 0.8], [0.5, 0.5]]).tolist()
    [0.8, 0.5]
    """
    return _as_probabilities(probabilities).max(axis=1)


def entropy(probabilities: Any) -> np.ndarray:
    """``(B,)`` Shannon entropy ``-sum p log p`` (nats) of each row; 0 = certain, ``log C`` = uniform.

    Examples
    --------
    >>> entropy([[1.0, 0.0], [0.5, 0.5]]).round(4).tolist()
    [0.0, 0.6931]
    """
    p = _as_probabilities(probabilities)
    return _entropy(p)


def _entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.asarray(-terms.sum(axis=-1))


def margin(probabilities: Any) -> np.ndarray:
    """``(B,)`` difference between the two largest probabilities (higher = more certain).

    Examples
    --------
    >>> margin([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0]]).round(4).tolist()
    [0.5, 0.0]
    """
    p = np.sort(_as_probabilities(probabilities), axis=1)
    return p[:, -1] - p[:, -2]


def mutual_information(member_probabilities: Any) -> np.ndarray:
    """``(B,)`` disagreement of ensemble (or MC-dropout) members: the mutual information.

    ``H(mean_m p_m) - mean_m H(p_m)`` (nats, the BALD score): 0 when all
    members agree, large when each is confident about a different class.

    Parameters
    ----------
    member_probabilities : array-like or Tensor
        ``(M, B, C)`` probabilities of ``M`` members.

    Examples
    --------
    >>> agree = [[[0.9, 0.1]], [[0.9, 0.1]]]
    >>> disagree = [[[0.9, 0.1]], [[0.1, 0.9]]]
    >>> mutual_information(agree).round(4).tolist(), mutual_information(disagree).round(4).tolist()
    ([0.0], [0.368])
    """
    p = _members(member_probabilities)
    return np.clip(_entropy(p.mean(axis=0)) - _entropy(p).mean(axis=0), 0.0, None)


def vote_disagreement(member_probabilities: Any) -> np.ndarray:
    """``(B,)`` fraction of members whose argmax differs from the ensemble's (mean probability) argmax.

    Examples
    --------
    >>> vote_disagreement([[[0.9, 0.1]], [[0.8, 0.2]], [[0.3, 0.7]]]).round(4).tolist()
    [0.3333]
    """
    p = _members(member_probabilities)
    ensemble = p.mean(axis=0).argmax(axis=1)
    return np.asarray((p.argmax(axis=2) != ensemble[None, :]).mean(axis=0))


def uncertainty_scores(probabilities: Any, member_probabilities: Any | None = None) -> dict[str, np.ndarray]:
    """All per-patient uncertainty scores at once.

    Parameters
    ----------
    probabilities : array-like or Tensor
        ``(B, C)`` (ensemble or calibrated) probabilities.
    member_probabilities : array-like or Tensor, optional
        ``(M, B, C)`` probabilities of fold-ensemble members or MC-dropout
        samples; adds ``mutual_information`` and ``vote_disagreement``.

    Returns
    -------
    dict of str to numpy.ndarray
        ``(B,)`` arrays: ``max_probability``, ``margin`` (higher = more
        certain), ``entropy`` and the member scores (higher = less certain).

    Examples
    --------
    >>> sorted(uncertainty_scores([[0.2, 0.8]], [[[0.1, 0.9]], [[0.3, 0.7]]]))
    ['entropy', 'margin', 'max_probability', 'mutual_information', 'vote_disagreement']
    """
    p = _as_probabilities(probabilities)
    out = {"max_probability": max_probability(p), "entropy": _entropy(p), "margin": margin(p)}
    if member_probabilities is not None:
        members = _members(member_probabilities)
        if members.shape[1:] != p.shape:
            raise ShapeError(f"member probabilities {members.shape} do not match probabilities {p.shape}")
        out["mutual_information"] = mutual_information(members)
        out["vote_disagreement"] = vote_disagreement(members)
    return out


_DROPOUT_TYPES = (nn.modules.dropout._DropoutNd,)


def mc_dropout(model: nn.Module, batch: Any, n_samples: int = 20, *, seed: int | None = None) -> Tensor:
    """Monte-Carlo dropout: ``K`` stochastic forward passes with only the dropout layers in train mode.

    Everything else stays in eval mode (BatchNorm uses its running
    statistics); the model's modes are restored afterwards, also on error.

    Parameters
    ----------
    model : nn.Module
        A model whose forward takes ``batch`` and returns logits ``(B, C)``
        or an object with a ``logits`` attribute (a :class:`~milcell.nn.model.MILModel`
        output). It must contain at least one dropout layer.
    batch : Any
        What ``model`` takes (e.g. a :class:`~milcell.data.BagBatch` on the model's device).
    n_samples : int, default 20
        Number of passes ``K``.
    seed : int, optional
        Seeds the dropout masks (a forked torch generator; the global state is unchanged).

    Returns
    -------
    Tensor
        ``(K, B, C)`` float32 probabilities on the CPU; their mean is the
        MC-dropout prediction and :func:`mutual_information` their disagreement.

    Raises
    ------
    ConfigError
        A model without dropout layer, or a bad ``n_samples``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    >>> samples = mc_dropout(model, torch.randn(5, 4), n_samples=7, seed=0)
    >>> samples.shape, model.training
    (torch.Size([7, 5, 3]), True)
    """
    from milcell.train.inference import probabilities as to_probabilities

    n_samples = check_int(n_samples, "n_samples", low=1)
    dropouts = [m for m in model.modules() if isinstance(m, _DROPOUT_TYPES)]
    if not dropouts:
        raise ConfigError(
            f"mc_dropout: model {type(model).__name__} has no dropout layer; MC-dropout needs one "
            "(e.g. a fusion head with dropout > 0)"
        )
    modes = {m: m.training for m in model.modules()}
    devices = [p.device for p in model.parameters() if p.device.type != "cpu"]
    try:
        model.eval()
        for m in dropouts:
            m.train()
        with torch.random.fork_rng(devices=devices[:1]), torch.no_grad():
            if seed is not None:
                torch.manual_seed(check_int(seed, "seed", low=0))
            samples = []
            for _ in range(n_samples):
                out = model(batch)
                logits = out.logits if hasattr(out, "logits") else out
                samples.append(to_probabilities(logits.float()).cpu())
    finally:
        for module, mode in modes.items():
            module.train(mode)
    return torch.stack(samples)


# --------------------------------------------------------------------------- referral


def _confidence(p: np.ndarray, score: str) -> np.ndarray:
    if score == "max_probability":
        return p.max(axis=1)
    if score == "margin":
        s = np.sort(p, axis=1)
        return s[:, -1] - s[:, -2]
    return -_entropy(p)


def _kept_metric(p: np.ndarray, y: np.ndarray, keep: np.ndarray, metric: str, positive: int) -> float:
    if metric == "accuracy":
        return float((p[keep].argmax(axis=1) == y[keep]).mean()) if keep.any() else math.nan
    pos = keep & (y == positive)
    if not pos.any():
        return math.nan
    return float((p[pos].argmax(axis=1) == positive).mean())


@dataclass(frozen=True)
class ReferralRule:
    """Refer a patient to a human when its confidence is below ``threshold``.

    Attributes
    ----------
    threshold : float
        Patients with confidence ``< threshold`` are referred (``inf``: all).
    score : str
        Confidence score: ``"max_probability"``, ``"margin"`` or ``"entropy"`` (as ``-entropy``).
    metric : str
        ``"sensitivity"`` (recall of ``positive_class``) or ``"accuracy"``.
    target : float
        What ``metric`` on the kept patients had to reach on the calibration data.
    positive_class : int
        The class whose sensitivity is targeted.
    calibration : dict of str to float
        What the rule achieved on the calibration data (see :meth:`evaluate`).

    Examples
    --------
    >>> rule = ReferralRule(0.7, "max_probability", "accuracy", 0.9, 1, {})
    >>> rule.refer([[0.6, 0.4], [0.1, 0.9]]).tolist()
    [True, False]
    """

    threshold: float
    score: str
    metric: str
    target: float
    positive_class: int
    calibration: dict[str, float]

    def refer(self, probabilities: Any) -> np.ndarray:
        """``(B,)`` bool: which patients to refer."""
        p = _as_probabilities(probabilities)
        return np.asarray(_confidence(p, self.score) < self.threshold)

    def evaluate(self, probabilities: Any, labels: Any) -> dict[str, float]:
        """What the rule achieves on labelled data.

        Returns
        -------
        dict of str to float
            ``referred`` (fraction referred), ``n_kept``, ``metric`` (its value
            on the kept patients, ``nan`` if undefined), ``accuracy_kept``,
            ``sensitivity_kept``, ``metric_all`` (the metric with no referral).

        Examples
        --------
        >>> rule = ReferralRule(0.7, "max_probability", "accuracy", 0.9, 1, {})
        >>> rule.evaluate([[0.6, 0.4], [0.1, 0.9], [0.8, 0.2]], [1, 1, 0])["accuracy_kept"]
        1.0
        """
        p = _as_probabilities(probabilities)
        y = _as_labels(labels, p.shape[0], p.shape[1])
        keep_labelled = y >= 0
        p, y = p[keep_labelled], y[keep_labelled]
        if y.size == 0:
            raise DataError("ReferralRule.evaluate: no labelled patient")
        keep = ~self.refer(p)
        everyone = np.ones_like(keep)
        return {
            "referred": float(1.0 - keep.mean()),
            "n_kept": float(keep.sum()),
            "metric": _kept_metric(p, y, keep, self.metric, self.positive_class),
            "accuracy_kept": _kept_metric(p, y, keep, "accuracy", self.positive_class),
            "sensitivity_kept": _kept_metric(p, y, keep, "sensitivity", self.positive_class),
            "metric_all": _kept_metric(p, y, everyone, self.metric, self.positive_class),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (``threshold`` ``inf`` written as ``None``)."""
        return {
            "format": _REFERRAL_FORMAT,
            "threshold": self.threshold if math.isfinite(self.threshold) else None,
            "score": self.score,
            "metric": self.metric,
            "target": self.target,
            "positive_class": self.positive_class,
            "calibration": {k: (v if math.isfinite(v) else None) for k, v in self.calibration.items()},
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ReferralRule:
        """Rebuild a rule from :meth:`to_dict`.

        Examples
        --------
        >>> rule = ReferralRule(0.7, "margin", "accuracy", 0.9, 1, {"referred": 0.2})
        >>> ReferralRule.from_dict(rule.to_dict()) == rule
        True
        """
        if not isinstance(record, Mapping) or record.get("format") != _REFERRAL_FORMAT:
            raise CalibrationError(f"not a milcell referral record (format must be {_REFERRAL_FORMAT!r})")
        try:
            threshold = math.inf if record["threshold"] is None else float(record["threshold"])
            return cls(
                threshold=threshold,
                score=check_choice(record["score"], "score", UNCERTAINTY_SCORES),
                metric=check_choice(record["metric"], "metric", ("sensitivity", "accuracy")),
                target=float(record["target"]),
                positive_class=int(record["positive_class"]),
                calibration={
                    k: (math.nan if v is None else float(v)) for k, v in record["calibration"].items()
                },
            )
        except KeyError as exc:
            raise CalibrationError(f"referral record lacks the key {exc.args[0]!r}") from exc


def fit_referral(
    probabilities: Any,
    labels: Any,
    *,
    target: float = 0.95,
    metric: str = "sensitivity",
    score: str = "max_probability",
    positive_class: int = 1,
) -> ReferralRule:
    """Choose, on calibration data, the referral rule that refers the fewest patients meeting a target.

    The patients are ranked by confidence; the rule keeps the largest group of
    most confident patients (tied confidences together) on which ``metric``
    is ``>= target``, and refers the rest. When even the most confident
    group misses the target, every patient is referred (``threshold = inf``)
    and a warning is logged. The target is met *on the calibration data*;
    on new patients it holds only approximately (check with
    :meth:`ReferralRule.evaluate` on evaluation data).

    Parameters
    ----------
    probabilities : array-like or Tensor
        ``(B, C)`` (preferably calibrated) probabilities of held-out patients.
    labels : array-like or Tensor
        ``(B,)`` true classes; ``-1`` rows are left out.
    target : float, default 0.95
        Required value of ``metric`` on the kept patients, in ``(0, 1]``.
    metric : {"sensitivity", "accuracy"}, default "sensitivity"
        Sensitivity = recall of ``positive_class`` among the kept patients.
    score : {"max_probability", "margin", "entropy"}, default "max_probability"
        Confidence to rank by.
    positive_class : int, default 1
        Class whose sensitivity is targeted.

    Returns
    -------
    ReferralRule

    Raises
    ------
    ConfigError
        Bad ``target``, ``metric``, ``score`` or ``positive_class``.
    DataError
        No labelled patient.

    Examples
    --------
    >>> p = [[0.05, 0.95], [0.1, 0.9], [0.45, 0.55], [0.6, 0.4], [0.9, 0.1]]
    >>> rule = fit_referral(p, [1, 1, 1, 1, 0], target=1.0, metric="sensitivity")
    >>> rule.refer(p).tolist()  # the missed positive (0.6) is the least confident but one
    [False, False, True, True, False]
    >>> rule.calibration["referred"]
    0.4
    """
    target = check_real(target, "target", low=0.0, high=1.0, low_open=True)
    metric = check_choice(metric, "metric", ("sensitivity", "accuracy"))
    score = check_choice(score, "score", UNCERTAINTY_SCORES)
    p = _as_probabilities(probabilities)
    positive_class = check_int(positive_class, "positive_class", low=0, high=p.shape[1] - 1)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    keep_labelled = y >= 0
    p, y = p[keep_labelled], y[keep_labelled]
    if y.size == 0:
        raise DataError("fit_referral: no labelled patient in labels")
    conf = _confidence(p, score)
    candidates = np.unique(conf)  # ascending: keeping conf >= t, largest kept set first
    chosen = math.inf
    for t in candidates:
        value = _kept_metric(p, y, conf >= t, metric, positive_class)
        if math.isfinite(value) and value >= target:
            chosen = float(t)
            break
    rule = ReferralRule(chosen, score, metric, target, positive_class, {})
    achieved = rule.evaluate(p, y)
    if not math.isfinite(chosen):
        logger.warning(
            "fit_referral: no group of most confident patients reaches %s >= %.3f on the calibration data; "
            "the rule refers every patient",
            metric,
            target,
        )
    return ReferralRule(chosen, score, metric, target, positive_class, achieved)


# --------------------------------------------------------------------------- saved runs


_RUN_FORMAT = "milcell-run-calibration"


@dataclass
class RunCalibration:
    """What a saved run stores to calibrate its vote, build prediction sets and refer patients.

    The calibrator is fitted on held-out predictions (a run: its out-of-fold
    predictions, one row per patient, each by the fold model that did not
    train on it) and applied to the fold models' averaged probabilities
    (:func:`ensemble_log_probabilities`). The calibrated held-out
    probabilities are kept as the calibration set of
    :class:`~milcell.conformal.ConformalPredictor` and :func:`fit_referral`.

    Caveat: new patients are predicted by the vote of all fold models, the
    held-out ones by a single fold model each, so they are not exactly
    exchangeable: the conformal guarantee and the referral target hold only
    approximately (an ensemble is usually at least as accurate as a fold
    model, which tends to make sets conservative). For the exact guarantee,
    fit on the vote's predictions of a labelled set none of the fold models
    trained on (:func:`fit_run_calibration` on those).

    Attributes
    ----------
    calibrator : Calibrator
        The fitted map.
    probabilities : numpy.ndarray
        ``(n, C)`` calibrated probabilities of the ``n`` held-out patients.
    labels : numpy.ndarray
        ``(n,)`` their labels.
    fitted_on : str
        Where the held-out predictions come from (for the record).
    metrics : dict of str to float or None
        Honest before/after metrics on the held-out patients when
        :func:`fit_run_calibration` was given their folds (cross-fitted:
        each fold calibrated by a map fitted on the other folds): ``ece``,
        ``brier``, ``nll`` and ``*_calibrated``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> p1 = rng.uniform(0.05, 0.95, size=50)
    >>> y = (rng.uniform(size=50) < p1).astype(int)
    >>> rc = fit_run_calibration(np.stack([1 - p1, p1], 1), y, "temperature", fitted_on="demo")
    >>> rows = rc.rows(["P1"], np.array([[0.3, 0.7]]), ["healthy", "ill"], alpha=0.2, target=0.9)
    >>> sorted(rows[0])
    ['calprob_healthy', 'calprob_ill', 'id', 'predicted', 'prediction_set', 'prob_healthy', 'prob_ill',
     'refer']
    """

    calibrator: Calibrator
    probabilities: np.ndarray
    labels: np.ndarray
    fitted_on: str = "held-out predictions"
    metrics: dict[str, float] | None = None

    def conformal(self, alpha: float, *, score: str = "lac", mondrian: bool = False) -> Any:
        """A :class:`~milcell.conformal.ConformalPredictor` fitted on the held-out patients at ``alpha``."""
        from milcell.conformal import ConformalPredictor

        return ConformalPredictor(score, mondrian=mondrian).fit(self.probabilities, self.labels, alpha)

    def referral(
        self, target: float = 0.95, *, metric: str = "sensitivity", score: str = "max_probability"
    ) -> ReferralRule:
        """The :func:`fit_referral` rule chosen on the held-out patients."""
        positive = 1 if self.probabilities.shape[1] == 2 else 0
        return fit_referral(
            self.probabilities,
            self.labels,
            target=target,
            metric=metric,
            score=score,
            positive_class=positive,
        )

    def rows(
        self,
        ids: Any,
        probabilities: Any,
        class_names: Any,
        *,
        alpha: float | None = None,
        score: str = "lac",
        mondrian: bool = False,
        target: float | None = None,
        metric: str = "sensitivity",
    ) -> list[dict[str, Any]]:
        """One row per patient: probabilities, calibrated probabilities, prediction set and referral flag.

        Parameters
        ----------
        ids : sequence of str
            ``B`` patient identifiers.
        probabilities : array-like
            ``(B, C)`` uncalibrated (averaged) probabilities.
        class_names : sequence of str
            ``C`` class names.
        alpha : float, optional
            Error rate of the prediction sets (column ``prediction_set``, class
            names joined by ``|``; empty when no class is plausible); none without it.
        score, mondrian
            As :class:`~milcell.conformal.ConformalPredictor`.
        target : float, optional
            Target of the referral rule (column ``refer``, 1 = refer to a human).
        metric : {"sensitivity", "accuracy"}, default "sensitivity"
            What ``target`` constrains.

        Returns
        -------
        list of dict
            ``id``, ``predicted`` (class name, from the calibrated
            probabilities), ``prob_<class>``, ``calprob_<class>`` (6 decimals),
            and ``prediction_set`` / ``refer`` when asked for.
        """
        names = [str(c) for c in class_names]
        raw = _as_probabilities(probabilities)
        calibrated = self.calibrator.transform_probabilities(raw)
        sets = (
            None
            if alpha is None
            else self.conformal(alpha, score=score, mondrian=mondrian).predict_sets(calibrated)
        )
        refer = None if target is None else self.referral(target, metric=metric).refer(calibrated)
        out = []
        for b, sample_id in enumerate(ids):
            row: dict[str, Any] = {"id": str(sample_id), "predicted": names[int(calibrated[b].argmax())]}
            row.update({f"prob_{c}": f"{v:.6f}" for c, v in zip(names, raw[b], strict=True)})
            row.update({f"calprob_{c}": f"{v:.6f}" for c, v in zip(names, calibrated[b], strict=True)})
            if sets is not None:
                row["prediction_set"] = "|".join(
                    n for n, inside in zip(names, sets[b], strict=True) if inside
                )
            if refer is not None:
                row["refer"] = int(refer[b])
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (what ``run.json`` stores under ``calibration``)."""
        return {
            "format": _RUN_FORMAT,
            "calibrator": self.calibrator.to_dict(),
            "fitted_on": self.fitted_on,
            "metrics": None
            if self.metrics is None
            else {k: _finite_or_none(v) for k, v in self.metrics.items()},
            "labels": [int(v) for v in self.labels],
            "probabilities": [[round(float(v), 6) for v in row] for row in self.probabilities],
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> RunCalibration:
        """Rebuild from :meth:`to_dict`.

        Raises
        ------
        CalibrationError
            A record of another format or with missing or malformed fields.
        """
        if not isinstance(record, Mapping) or record.get("format") != _RUN_FORMAT:
            raise CalibrationError(f"not a milcell run calibration record (format must be {_RUN_FORMAT!r})")
        try:
            calibrator = Calibrator.from_dict(record["calibrator"])
            probabilities = np.asarray(record["probabilities"], dtype=np.float64)
            labels = np.asarray(record["labels"], dtype=np.int64)
        except KeyError as exc:
            raise CalibrationError(f"run calibration record lacks the key {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"malformed run calibration record: {exc}") from exc
        if probabilities.ndim != 2 or labels.shape != (probabilities.shape[0],):
            raise CalibrationError("run calibration record: probabilities (n, C) and labels (n,) disagree")
        metrics = record.get("metrics")
        if metrics is not None:
            metrics = {str(k): math.nan if v is None else float(v) for k, v in dict(metrics).items()}
        return cls(calibrator, probabilities, labels, str(record.get("fitted_on", "")), metrics)

    def report(
        self, probabilities: Any, labels: Any, *, target: float = 0.95, metric: str = "sensitivity"
    ) -> dict[str, float]:
        """Calibration before/after and the referral rule's result on labelled (evaluation) data.

        Parameters
        ----------
        probabilities : array-like
            ``(B, C)`` uncalibrated (averaged) probabilities of labelled patients.
        labels : array-like
            ``(B,)`` labels; ``-1`` rows are left out.
        target, metric
            The referral rule, chosen on the held-out patients (:meth:`referral`).

        Returns
        -------
        dict of str to float
            ``ece``, ``brier``, ``nll`` and ``*_calibrated``, then ``referred``,
            ``referral_metric`` (on the kept patients), ``referral_metric_all``
            and ``referral_target``.
        """

        raw = _as_probabilities(probabilities)
        y = _as_labels(labels, raw.shape[0], raw.shape[1])
        keep = y >= 0
        raw, y = raw[keep], y[keep]
        if y.size == 0:
            raise DataError("RunCalibration.report: no labelled patient")
        calibrated = self.calibrator.transform_probabilities(raw)
        out = _before_after(y, raw, calibrated)
        achieved = self.referral(target, metric=metric).evaluate(calibrated, y)
        out.update(
            referred=achieved["referred"],
            referral_metric=achieved["metric"],
            referral_metric_all=achieved["metric_all"],
            referral_target=float(target),
        )
        return out


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _before_after(y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray) -> dict[str, float]:
    from milcell.metrics import calibration_report

    before = calibration_report(y, raw)
    after = calibration_report(y, calibrated)
    return {
        "ece": before.ece,
        "brier": before.brier,
        "nll": before.nll,
        "ece_calibrated": after.ece,
        "brier_calibrated": after.brier,
        "nll_calibrated": after.nll,
    }


def format_calibration(metrics: Mapping[str, float], metric: str = "sensitivity") -> str:
    """Calibration before/after and (when present) referral as a short text table.

    Examples
    --------
    >>> print(format_calibration({"ece": 0.12, "brier": 0.2, "nll": 0.6, "ece_calibrated": 0.04,
    ...                           "brier_calibrated": 0.18, "nll_calibrated": 0.5}))
    calibration   ECE    Brier  NLL
    before        0.120  0.200  0.600
    after         0.040  0.180  0.500
    """
    lines = [
        "calibration   ECE    Brier  NLL",
        f"before        {metrics['ece']:.3f}  {metrics['brier']:.3f}  {metrics['nll']:.3f}",
        f"after         {metrics['ece_calibrated']:.3f}  {metrics['brier_calibrated']:.3f}  "
        f"{metrics['nll_calibrated']:.3f}",
    ]
    if "referred" in metrics:
        lines += [
            "",
            f"referral (target {metric} >= {metrics['referral_target']:.2f}, chosen on held-out patients)",
            f"referred      {100 * metrics['referred']:.1f} %",
            f"{metric} on the rest  {metrics['referral_metric']:.3f}  (no referral: "
            f"{metrics['referral_metric_all']:.3f})",
        ]
    return "\n".join(lines)


def fit_run_calibration(
    probabilities: Any,
    labels: Any,
    method: str = "temperature",
    *,
    fitted_on: str = "held-out predictions",
    folds: Any | None = None,
) -> RunCalibration:
    """Fit a :class:`RunCalibration` on held-out probabilities ``(n, C)`` and labels ``(n,)``.

    The calibrator is fitted on the log-probabilities; unlabelled rows are
    left out. With ``folds`` (``(n,)`` fold of each row, e.g. out-of-fold
    predictions' folds), the before/after metrics are also measured honestly
    by cross-fitting: each fold's rows calibrated by a map fitted on the
    other folds (:attr:`RunCalibration.metrics`).

    Raises
    ------
    CalibrationError
        As :meth:`Calibrator.fit`.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[0.9, 0.1], [0.2, 0.8]] * 6)
    >>> rc = fit_run_calibration(p, [0, 1] * 5 + [1, 0], "temperature")
    >>> rc.probabilities.shape, rc.calibrator.temperature > 1.0
    ((12, 2), True)
    """
    p = _as_probabilities(probabilities)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    keep = y >= 0
    p, y = p[keep], y[keep]
    log_p = np.log(np.clip(p, 1e-12, 1.0))
    calibrator = Calibrator(method).fit(log_p, y)
    metrics = None
    if folds is not None:
        fold_of = np.asarray(folds).reshape(-1)
        if fold_of.shape[0] != keep.shape[0]:
            raise ShapeError(f"folds must be ({keep.shape[0]},), one fold per row, got shape {fold_of.shape}")
        fold_of = fold_of[keep]
        crossed = np.empty_like(p)
        try:
            for k in np.unique(fold_of):
                inside = fold_of == k
                crossed[inside] = Calibrator(method).fit(log_p[~inside], y[~inside]).transform(log_p[inside])
        except CalibrationError as exc:
            logger.warning("fit_run_calibration: no cross-fitted before/after metrics: %s", exc)
        else:
            metrics = _before_after(y, p, crossed)
    return RunCalibration(calibrator, calibrator.transform_probabilities(p), y, fitted_on, metrics)
