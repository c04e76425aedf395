"""Ensembles of models (typically the fold models of a cross-validation): hard and soft votes.

:func:`vote` combines the class probabilities ``(n, C)`` of ``M`` models;
:func:`predict_ensemble` runs every model over one loader and votes. Both work
the same for bags of cells and for single cells (bags of one).

Soft vote
    The mean of the models' probabilities.
Hard (majority) vote
    Each model votes for its most probable class. The returned score of class
    ``c`` is ``(votes_c + mean_probability_c) / (M + 1)``: rows still sum to 1,
    the class with the most votes always scores highest, and among classes
    tied on votes the one with the highest mean probability wins (a tie on
    both is resolved to the lowest class index, as :func:`torch.argmax` does).
    So ``argmax`` of the score is the tie-broken majority vote, and for two
    classes ``score[:, 1] >= 0.5`` is the same decision (an even split goes to
    the class with the higher mean probability). The score stays continuous,
    so an AUC of a hard vote is still meaningful.

Examples
--------
>>> import torch
>>> a = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
>>> b = torch.tensor([[0.2, 0.8], [0.3, 0.7]])
>>> vote([a, b], method="soft")
tensor([[0.5500, 0.4500],
        [0.3500, 0.6500]])
>>> vote([a, b], method="hard").argmax(dim=1)   # row 0: one vote each, mean probability decides
tensor([0, 1])
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from milcell._validation import check_choice
from milcell.data.bag import BagBatch
from milcell.exceptions import ConfigError, DataError, ShapeError
from milcell.train.inference import Predictions, _check_precision, _model_device, predict

__all__ = ["predict_ensemble", "vote"]

logger = logging.getLogger("milcell")


def _as_probabilities(values: Sequence[Tensor | np.ndarray]) -> Tensor:
    if isinstance(values, (Tensor, np.ndarray)) or not isinstance(values, Sequence):
        raise ConfigError(
            "vote: probabilities must be a sequence (one (n, C) tensor per model), "
            f"got {type(values).__name__}"
        )
    if len(values) == 0:
        raise ConfigError("vote: got no model probabilities (empty sequence)")
    tensors = [torch.as_tensor(v).detach().float().cpu() for v in values]
    first = tuple(tensors[0].shape)
    for i, t in enumerate(tensors):
        if t.ndim != 2 or t.shape[1] < 2:
            raise ShapeError(
                f"vote: model {i} probabilities must have shape (n, C >= 2), got {tuple(t.shape)}"
            )
        if tuple(t.shape) != first:
            raise ShapeError(
                f"vote: model {i} probabilities have shape {tuple(t.shape)}, model 0 has {first}"
            )
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise DataError(f"vote: model {i} probabilities hold negative, NaN or inf values")
        if t.shape[0] and not torch.allclose(t.sum(dim=1), torch.ones(t.shape[0]), atol=1e-3):
            raise DataError(
                f"vote: model {i} rows do not sum to 1 (pass probabilities, not logits); "
                f"row sums {t.sum(dim=1)[:3].tolist()}..."
            )
    return torch.stack(tensors)


def vote(probabilities: Sequence[Tensor | np.ndarray], method: str = "soft") -> Tensor:
    """Combine the class probabilities of several models.

    Parameters
    ----------
    probabilities : sequence of Tensor or ndarray
        ``M >= 1`` tensors ``(n, C)``, one per model, rows summing to 1, for
        the same ``n`` samples in the same order.
    method : {"soft", "hard"}, default "soft"
        ``"soft"``: mean probability. ``"hard"``: majority vote with ties
        broken by mean probability; see the module docstring for the score.

    Returns
    -------
    Tensor
        ``(n, C)`` float32 scores, rows summing to 1; ``argmax`` gives the
        ensemble's class.

    Raises
    ------
    ConfigError
        An unknown ``method`` or an empty sequence.
    ShapeError
        Tensors that are not ``(n, C)`` or differ in shape.
    DataError
        Values that are not probabilities (negative, NaN, rows not summing to 1).

    Examples
    --------
    >>> import torch
    >>> p = [torch.tensor([[0.6, 0.4]]), torch.tensor([[0.6, 0.4]]), torch.tensor([[0.0, 1.0]])]
    >>> vote(p, "hard")                          # 2 votes to 1 for class 0
    tensor([[0.6000, 0.4000]])
    >>> vote(p, "soft")
    tensor([[0.4000, 0.6000]])
    >>> vote(p, "median")
    Traceback (most recent call last):
    ...
    milcell.exceptions.ConfigError: vote: method must be 'soft' or 'hard', got 'median'
    """
    if method not in ("soft", "hard"):
        raise ConfigError(f"vote: method must be 'soft' or 'hard', got {method!r}")
    stacked = _as_probabilities(probabilities)  # (M, n, C)
    mean = stacked.mean(dim=0)
    if method == "soft":
        return mean
    n_models, _, n_classes = stacked.shape
    votes = torch.nn.functional.one_hot(stacked.argmax(dim=2), n_classes).sum(dim=0).float()  # (n, C)
    return (votes + mean) / (n_models + 1)


def _predict_one(
    model: nn.Module, loader: Iterable[BagBatch], device: torch.device, precision: str
) -> Predictions:
    try:
        preds = predict(model, loader, device=device, precision=precision)
    except DataError as exc:
        raise DataError(f"predict_ensemble: {exc}") from exc
    if not preds.ids:
        raise DataError("predict_ensemble: the loader yielded no batch")
    return preds


def predict_ensemble(
    models: Sequence[nn.Module],
    loader: Iterable[BagBatch],
    method: str = "soft",
    device: str | torch.device | None = None,
    precision: str = "32",
) -> Predictions:
    """Predict every bag of ``loader`` with each model and vote.

    Parameters
    ----------
    models : sequence of nn.Module
        ``M >= 1`` models mapping a :class:`~milcell.data.BagBatch` to an
        output with ``logits (B, C)`` (``C = 1``: one sigmoid logit), e.g. the
        fold models of :func:`~milcell.train.crossval.cross_validate`.
    loader : iterable of BagBatch
        Iterated once per model; it must yield the bags in the same order each
        time (do not shuffle). Bags of one (single cells) work the same.
    method : {"soft", "hard"}, default "soft"
        See :func:`vote`.
    device : str or torch.device, optional
        Where each model runs (moved there and back); default the first
        model's device.
    precision : {"32", "bf16", "fp16"}, default "32"
        Autocast dtype of the forward pass.

    Returns
    -------
    Predictions
        ``ids``, ``probabilities (n, C)`` (the vote's scores), ``labels (n,)``
        and ``attention=None`` (attention maps of different models are not
        averaged).

    Raises
    ------
    ConfigError
        No model, an unknown ``method`` or ``precision``.
    DataError
        A loader that yields other bags (or another order) for another model.

    Examples
    --------
    >>> import torch
    >>> from milcell.data import Bag
    >>> from milcell.nn.model import create_mil_model
    >>> from milcell.train.distributed import make_loader
    >>> models = [create_mil_model(None, pooling="mean", in_dim=4) for _ in range(3)]
    >>> bags = [Bag(torch.randn(3, 4), label=i % 2, id=f"P{i}") for i in range(5)]
    >>> preds = predict_ensemble(models, make_loader(bags, 2, shuffle=False), method="hard")
    >>> preds.ids, preds.probabilities.shape
    (['P0', 'P1', 'P2', 'P3', 'P4'], torch.Size([5, 2]))
    """
    method = check_choice(method, "predict_ensemble: method", ("soft", "hard"))
    precision = _check_precision(precision, "predict_ensemble: precision")
    models = list(models)
    if not models:
        raise ConfigError("predict_ensemble: got no model")
    target = torch.device(device) if device is not None else _model_device(models[0])
    ids: list[str] | None = None
    labels: Tensor | None = None
    all_probs: list[Tensor] = []
    for i, model in enumerate(models):
        m_ids, m_probs, m_labels, _ = _predict_one(model, loader, target, precision)
        if ids is None:
            ids, labels = m_ids, m_labels
        elif m_ids != ids:
            raise DataError(
                f"predict_ensemble: model {i} saw bags {m_ids[:3]}... but model 0 saw {ids[:3]}...; "
                "the loader must yield the same bags in the same order every pass (shuffle=False)"
            )
        all_probs.append(m_probs)
    assert ids is not None and labels is not None
    logger.debug("predict_ensemble: %s vote of %d models over %d bags", method, len(models), len(ids))
    return Predictions(ids, vote(all_probs, method), labels, None)
