"""Noisy Student self-training for bags and single cells.

The loop of the leukaemia report, with the noise it lacked:

1. a *teacher* trains on the labelled data;
2. it predicts the unlabelled data *without* noise (evaluation transform,
   dropout off) and gives each item a pseudo-label: the most probable class
   (``soft=False``) or the whole probability vector (``soft=True``),
   optionally keeping only items whose top probability reaches ``threshold``;
3. a *student* (same size or larger) trains on labelled + pseudo-labelled
   data *with* noise: data augmentation from the training dataset, dropout and
   stochastic depth built in by ``build_student`` (e.g.
   ``create_mil_model("efficientnet_b0", backbone_kwargs={"drop_path_rate": 0.2},
   fusion_kwargs={"dropout": 0.3})``);
4. the student becomes the next teacher; repeat ``iterations`` times.

Datasets and noise
------------------
Pass ``unlabelled`` with the *training* transform (its pseudo-labelled copy is
what the student trains on) and, for images, ``unlabelled_eval``: the same
items, same order, with the *evaluation* transform, which the teacher labels.
Without ``unlabelled_eval`` the teacher labels ``unlabelled`` itself (right
for feature bags, which carry no augmentation). Bags of one
(:class:`~milcell.data.InstanceDataset`) make it single-cell self-training.
Whatever labels the unlabelled items carry are replaced; when they are known
(``>= 0``, e.g. in a simulation) the agreement of the pseudo-labels with them
is reported as ``pseudo_accuracy``.

With ``soft=True`` every training bag needs a soft target (the collate
requires all or none), so labelled bags get their one-hot label as
``soft_label``; :func:`~milcell.nn.model.mil_loss` then uses the soft
cross-entropy for the whole batch.

Reproducibility: the global torch generator is seeded with ``seed + i``
before model ``i`` is built, and each trainer shuffles with that seed.

Examples
--------
>>> import torch
>>> from milcell.data import FeatureBagDataset
>>> from milcell.nn.model import create_mil_model
>>> g = torch.Generator().manual_seed(0)
>>> def bags(n, hidden):
...     y = [i % 2 for i in range(n)]
...     feats = [torch.randn(4, 6, generator=g) + 1.5 * c for c in y]
...     return FeatureBagDataset(feats, labels=[-1] * n if hidden else y)
>>> build = lambda: create_mil_model(None, pooling="mean", in_dim=6)
>>> result = noisy_student(build, build, bags(8, False), bags(16, True), bags(8, False), iterations=2,
...                        threshold=0.6, batch_size=4, trainer_kwargs={"max_epochs": 2, "lr": 0.05})
>>> [int(row["iteration"]) for row in result.iterations], len(result.models)
([0, 1, 2], 3)
>>> "val_balanced_accuracy" in result.iterations[-1], result.pseudo_label_stats[0]["n_unlabelled"]
(True, 16.0)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from milcell._validation import check_int, check_real
from milcell.data.bag import Bag
from milcell.exceptions import ConfigError, DataError
from milcell.train.distributed import make_loader
from milcell.train.fit import fit_model
from milcell.train.loggers import finish_on_error
from milcell.train.trainer import Trainer

__all__ = ["NoisyStudentResult", "PseudoLabelledDataset", "noisy_student"]

logger = logging.getLogger("milcell")

_RESERVED = ("optimizer", "scheduler", "callbacks", "output_dir")


class PseudoLabelledDataset(Dataset[Bag]):
    """Some items of a dataset, each with a new hard label or soft label.

    Parameters
    ----------
    dataset : Dataset of Bag
        The source (e.g. the unlabelled set with its training transform).
    indices : sequence of int
        ``(k,)`` positions of the source items to keep.
    labels : sequence of int, optional
        ``(k,)`` hard labels given to the kept items.
    soft_labels : Tensor, optional
        ``(k, C)`` probability targets; the item's ``label`` becomes their argmax.

    Raises
    ------
    ConfigError
        Neither or both of ``labels`` and ``soft_labels``, or lengths that differ.

    Examples
    --------
    >>> import torch
    >>> from milcell.data import Bag
    >>> source = [Bag(torch.zeros(2, 3), id="u0"), Bag(torch.ones(1, 3), id="u1")]
    >>> ds = PseudoLabelledDataset(source, [1], soft_labels=torch.tensor([[0.2, 0.8]]))
    >>> len(ds), ds[0].id, ds[0].label, ds[0].soft_label.tolist()
    (1, 'u1', 1, [0.2, 0.8])
    """

    def __init__(
        self,
        dataset: Dataset[Bag],
        indices: Any,
        labels: Any | None = None,
        soft_labels: Tensor | None = None,
    ) -> None:
        if (labels is None) == (soft_labels is None):
            raise ConfigError("PseudoLabelledDataset: give exactly one of labels and soft_labels")
        self.dataset = dataset
        self.indices = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        self.soft_labels = None if soft_labels is None else torch.as_tensor(soft_labels, dtype=torch.float32)
        if self.soft_labels is not None:
            if self.soft_labels.ndim != 2 or self.soft_labels.shape[0] != len(self.indices):
                raise ConfigError(
                    f"PseudoLabelledDataset: soft_labels must be ({len(self.indices)}, C), "
                    f"got {tuple(self.soft_labels.shape)}"
                )
            self._labels = self.soft_labels.argmax(dim=1).numpy().astype(np.int64)
        else:
            self._labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if self._labels.shape[0] != len(self.indices):
                raise ConfigError(
                    f"PseudoLabelledDataset: {self._labels.shape[0]} labels for {len(self.indices)} indices"
                )

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        """``(k,)`` int64 (hard or argmax of soft) pseudo-labels."""
        return self._labels.copy()

    def __getitem__(self, index: int) -> Bag:
        bag = self.dataset[self.indices[index]]
        soft = None if self.soft_labels is None else self.soft_labels[index]
        return dataclasses.replace(bag, label=int(self._labels[index]), soft_label=soft)


class _OneHot(Dataset[Bag]):
    """Labelled bags with their one-hot label as soft label (to batch with soft pseudo-labels)."""

    def __init__(self, dataset: Dataset[Bag], num_classes: int) -> None:
        self.dataset = dataset
        self.num_classes = num_classes
        # An item-for-item view: bag_sizes (the sharded samplers under torchrun) reads the
        # sizes of ``dataset`` through these, as through a Subset.
        self.indices = range(len(dataset))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Bag:
        bag = self.dataset[index]
        if not 0 <= bag.label < self.num_classes:
            raise DataError(
                f"noisy_student: labelled bag {bag.id!r} has label {bag.label}, "
                f"outside 0..{self.num_classes - 1}"
            )
        soft = torch.zeros(self.num_classes)
        soft[bag.label] = 1.0
        return dataclasses.replace(bag, soft_label=soft)


@dataclass
class NoisyStudentResult:
    """What :func:`noisy_student` returns.

    Attributes
    ----------
    iterations : list of dict
        One row per model, the teacher first (``iteration`` 0, then 1 ..
        ``iterations``): ``iteration``, ``n_train`` (bags trained on),
        ``n_pseudo`` (pseudo-labelled bags among them), ``best_epoch``, and
        the validation metrics prefixed ``val_`` when ``val`` was given.
    models : list of nn.Module
        The teacher and every student (best weights when ``val`` was given).
    pseudo_label_stats : list of dict
        One row per student: ``iteration``, ``n_unlabelled``, ``n_kept``,
        ``kept_fraction``, ``mean_confidence`` (of the kept items),
        ``n_class_<c>`` and, when the unlabelled items carried labels,
        ``pseudo_accuracy``.
    histories : list of list of dict
        The trainer's epoch logs of each model.

    Examples
    --------
    >>> NoisyStudentResult([{"iteration": 0}], [], [], []).final_metrics
    {'iteration': 0}
    """

    iterations: list[dict[str, float]]
    models: list[nn.Module]
    pseudo_label_stats: list[dict[str, float]]
    histories: list[list[dict[str, float]]] = field(default_factory=list)

    @property
    def final_metrics(self) -> dict[str, float]:
        """The last row of :attr:`iterations`."""
        return self.iterations[-1]


def _fit(
    build: Callable[[], nn.Module],
    seed: int,
    train: Dataset[Bag],
    val: Dataset[Bag] | None,
    batch_size: int,
    num_workers: int,
    kwargs: Mapping[str, Any],
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None,
    build_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    drop_last: bool = False,
    callbacks: Sequence[Any] = (),
) -> tuple[nn.Module, Trainer, list[dict[str, float]], dict[str, float]]:
    torch.manual_seed(seed)
    model = build()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"noisy_student: a model builder returned {type(model).__name__}, not an nn.Module")
    train_loader = make_loader(
        train, batch_size, shuffle=True, seed=seed, num_workers=num_workers, drop_last=drop_last
    )
    val_loader = None if val is None else make_loader(val, batch_size, shuffle=False, num_workers=num_workers)
    # Without validation data the last weights are kept (the monitor would be the training loss).
    model, trainer, history = fit_model(
        model,
        train_loader,
        val_loader,
        trainer_kwargs={"seed": seed, "progress": False, **kwargs},
        build_optimizer=build_optimizer,
        build_scheduler=build_scheduler,
        restore_best=val_loader is not None,
        callbacks=callbacks,
    )
    metrics: dict[str, float] = {}
    if val_loader is not None:
        metrics = {f"val_{k}": float(v) for k, v in trainer.evaluate(val_loader).items()}
    return model, trainer, history, metrics


def noisy_student(
    build_teacher: Callable[[], nn.Module],
    build_student: Callable[[], nn.Module],
    labelled: Dataset[Bag],
    unlabelled: Dataset[Bag],
    val: Dataset[Bag] | None = None,
    *,
    iterations: int = 3,
    soft: bool = False,
    threshold: float | None = None,
    unlabelled_eval: Dataset[Bag] | None = None,
    batch_size: int = 1,
    num_workers: int = 0,
    trainer_kwargs: Mapping[str, Any] | None = None,
    build_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    build_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    drop_last: bool = False,
    seed: int = 0,
    loggers: Sequence[Any] = (),
) -> NoisyStudentResult:
    """Teacher → pseudo-labels → noisy student → new teacher, ``iterations`` times.

    Parameters
    ----------
    build_teacher : callable
        ``() -> nn.Module`` (a :class:`~milcell.train.trainer.MILModelLike`), the first teacher.
    build_student : callable
        ``() -> nn.Module``, called once per iteration; the same size or
        larger than the teacher, with its noise (dropout, stochastic depth)
        built in.
    labelled : Dataset of Bag
        Labelled bags (with the training transform).
    unlabelled : Dataset of Bag
        Bags whose labels are ignored (``-1``), with the training transform:
        the student trains on its pseudo-labelled copy.
    val : Dataset of Bag, optional
        Labelled validation bags: every model is restored to its best epoch
        on the trainer's monitor and evaluated there.
    iterations : int, default 3
        Number of students.
    soft : bool, default False
        Pseudo-label with the teacher's probabilities instead of its argmax.
    threshold : float, optional
        Keep only unlabelled items whose top teacher probability is at least
        this (in ``[0, 1]``); ``None`` keeps all.
    unlabelled_eval : Dataset of Bag, optional
        The unlabelled items (same order and ids) with the evaluation
        transform, labelled by the teacher; default ``unlabelled``.
    batch_size, num_workers : int
        Loader settings (training, prediction and validation).
    trainer_kwargs : mapping, optional
        Forwarded to :class:`~milcell.train.trainer.Trainer` (``max_epochs``,
        ``lr``, ``monitor``, ``device``, ``precision``...; ``progress``
        defaults to False). ``optimizer``, ``scheduler``, ``callbacks`` and
        ``output_dir`` may not appear. Every model is trained by
        :func:`~milcell.train.fit.fit_model`.
    build_optimizer : callable, optional
        ``model -> optimizer`` for every model.
    build_scheduler : callable, optional
        ``optimizer -> scheduler`` for every model (e.g. the report's step
        decay ×0.1 every 7 epochs), given to the trainer at construction.
    drop_last : bool, default False
        Drop the last incomplete training batch.
    seed : int, default 0
        Base seed.
    loggers : sequence of RunLogger, optional
        Experiment loggers (:mod:`milcell.train.loggers`): each is the parent
        run (started and finished here unless already started) of one child
        run per model, ``teacher`` then ``student_<i>``, with its epochs, its
        row of :attr:`NoisyStudentResult.iterations` and (students) the
        pseudo-label statistics; the parent gets the final row.

    Returns
    -------
    NoisyStudentResult

    Raises
    ------
    ConfigError
        Bad arguments.
    DataError
        ``unlabelled_eval`` not matching ``unlabelled``, no unlabelled item
        passing the threshold, or labelled bags without a valid label.
    """
    iterations = check_int(iterations, "noisy_student: iterations", low=1)
    batch_size = check_int(batch_size, "noisy_student: batch_size", low=1)
    num_workers = check_int(num_workers, "noisy_student: num_workers", low=0)
    seed = check_int(seed, "noisy_student: seed", low=0)
    if threshold is not None:
        threshold = check_real(threshold, "noisy_student: threshold", low=0.0, high=1.0)
    kwargs = dict(trainer_kwargs or {})
    reserved = [k for k in _RESERVED if k in kwargs]
    if reserved:
        raise ConfigError(f"noisy_student: trainer_kwargs may not set {reserved}")
    if len(unlabelled) == 0:  # type: ignore[arg-type]
        raise DataError("noisy_student: the unlabelled dataset is empty")
    eval_source = unlabelled if unlabelled_eval is None else unlabelled_eval
    if len(eval_source) != len(unlabelled):  # type: ignore[arg-type]
        raise DataError(
            f"noisy_student: unlabelled_eval has {len(eval_source)} items but unlabelled has "  # type: ignore[arg-type]
            f"{len(unlabelled)}; they must hold the same items in the same order"  # type: ignore[arg-type]
        )

    started = [not lg.active for lg in loggers]
    # The runs opened here end FAILED (KILLED on an interrupt) when training raises; the error propagates.
    with finish_on_error(*(lg for lg, mine in zip(loggers, started, strict=True) if mine)) as opened:
        for lg in loggers:
            lg.start(
                {
                    "noisy_student": {
                        "iterations": iterations,
                        "soft": soft,
                        "threshold": threshold,
                        "batch_size": batch_size,
                        "seed": seed,
                    }
                }
            )

        def fit_child(
            build: Callable[[], nn.Module], fit_seed: int, train_set: Dataset[Bag], name: str, it: int
        ) -> tuple[list[Any], nn.Module, Trainer, list[dict[str, float]], dict[str, float]]:
            """One model of the loop, logged as the child run ``name`` of every logger."""
            children = [lg.child(name, {"iteration": it}) for lg in loggers]
            opened.extend(children)
            fitted = _fit(
                build,
                fit_seed,
                train_set,
                val,
                batch_size,
                num_workers,
                kwargs,
                build_optimizer,
                build_scheduler,
                drop_last,
                children,
            )
            return (children, *fitted)

        children, teacher, trainer, history, metrics = fit_child(build_teacher, seed, labelled, "teacher", 0)
        rows = [
            {
                "iteration": 0.0,
                "n_train": float(_size(labelled)),
                "n_pseudo": 0.0,
                "best_epoch": float(trainer.best_epoch),
                **metrics,
            }
        ]
        _finish_children(children, rows[-1])
        models, histories, stats = [teacher], [history], []
        logger.info("noisy_student: teacher trained; %s", _brief(metrics))
        for it in range(1, iterations + 1):
            preds = trainer.predict(
                make_loader(eval_source, batch_size, shuffle=False, num_workers=num_workers)
            )
            if unlabelled_eval is not None:
                own_ids = _ids(unlabelled)
                if own_ids is not None and own_ids != list(preds.ids):
                    raise DataError(
                        "noisy_student: unlabelled_eval yields other bag ids than unlabelled "
                        f"({preds.ids[:3]}... vs {own_ids[:3]}...); they must list the same items in order"
                    )
            probs = preds.probabilities.float()
            confidence, hard = probs.max(dim=1)
            keep = (
                torch.ones_like(confidence, dtype=torch.bool)
                if threshold is None
                else confidence >= float(threshold)
            )
            kept = keep.nonzero().flatten()
            stat: dict[str, float] = {
                "iteration": float(it),
                "n_unlabelled": float(len(probs)),
                "n_kept": float(len(kept)),
                "kept_fraction": float(len(kept)) / max(1, len(probs)),
                "mean_confidence": float(confidence[kept].mean()) if len(kept) else math.nan,
            }
            for c in range(probs.shape[1]):
                stat[f"n_class_{c}"] = float((hard[kept] == c).sum())
            truth = preds.labels
            known = truth[kept] >= 0
            if bool(known.any()):
                stat["pseudo_accuracy"] = float((hard[kept][known] == truth[kept][known]).float().mean())
            stats.append(stat)
            logger.info("noisy_student: iteration %d pseudo-labels: %s", it, _brief(stat))
            if len(kept) == 0:
                raise DataError(
                    f"noisy_student: iteration {it}: no unlabelled item reaches threshold={threshold} "
                    f"(top teacher confidence {float(confidence.max()):.3f}); lower the threshold"
                )
            if soft:
                pseudo: Dataset[Bag] = PseudoLabelledDataset(
                    unlabelled, kept.numpy(), soft_labels=probs[kept]
                )
                train: Dataset[Bag] = ConcatDataset([_OneHot(labelled, probs.shape[1]), pseudo])
            else:
                pseudo = PseudoLabelledDataset(unlabelled, kept.numpy(), labels=hard[kept].numpy())
                train = ConcatDataset([labelled, pseudo])
            children, student, trainer, history, metrics = fit_child(
                build_student, seed + it, train, f"student_{it}", it
            )
            rows.append(
                {
                    "iteration": float(it),
                    "n_train": float(_size(train)),
                    "n_pseudo": float(_size(pseudo)),
                    "best_epoch": float(trainer.best_epoch),
                    **metrics,
                }
            )
            _finish_children(children, {**rows[-1], **{f"pseudo_{k}": v for k, v in stat.items()}})
            models.append(student)
            histories.append(history)
            logger.info("noisy_student: student %d trained; %s", it, _brief(metrics))
        for lg, mine in zip(loggers, started, strict=True):
            lg.log_metrics(rows[-1])
            if mine:
                lg.finish()
    return NoisyStudentResult(rows, models, stats, histories)


def _finish_children(children: Sequence[Any], row: Mapping[str, float]) -> None:
    for child in children:
        child.log_metrics(row)
        child.finish()


def _size(dataset: Dataset[Bag]) -> int:
    return len(cast(Sized, dataset))


def _ids(dataset: Dataset[Bag]) -> list[str] | None:
    ids = getattr(dataset, "ids", None)
    return list(ids) if isinstance(ids, list) else None


def _brief(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items()) or "no validation set"
