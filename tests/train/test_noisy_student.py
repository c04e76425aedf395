"""Tests of milcell.train.noisy_student: pseudo-labelling bookkeeping, soft labels, determinism."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from milcell.data import Bag, FeatureBagDataset, collate_bags
from milcell.exceptions import ConfigError, DataError
from milcell.nn.model import create_mil_model
from milcell.train.distributed import make_loader
from milcell.train.ensemble import predict_ensemble
from milcell.train.noisy_student import NoisyStudentResult, PseudoLabelledDataset, noisy_student
from tests._factories import make_bags

D = 6
FAST = {"max_epochs": 3, "lr": 0.05}


def _bags(
    n: int, seed: int, hide: bool = False, n_instances: int = 4, prefix: str = "B"
) -> FeatureBagDataset:
    bags = make_bags([n_instances] * n, dim=D, seed=seed, prefix=prefix, signal=1.0)
    labels = [-1 if hide else b.label for b in bags]
    return FeatureBagDataset([b.instances for b in bags], labels=labels, ids=[b.id for b in bags])


def _teacher() -> Any:
    return create_mil_model(None, pooling="mean", in_dim=D)


def _student() -> Any:  # larger, with dropout noise
    return create_mil_model(None, pooling="mean", in_dim=D, fusion_kwargs={"hidden": (16,), "dropout": 0.2})


def test_bookkeeping_with_threshold() -> None:
    labelled, unlabelled, val = _bags(8, 0), _bags(20, 1, hide=True, prefix="U"), _bags(10, 2, prefix="V")
    threshold = 0.6
    result = noisy_student(
        _teacher,
        _student,
        labelled,
        unlabelled,
        val,
        iterations=2,
        threshold=threshold,
        batch_size=4,
        trainer_kwargs=FAST,
    )
    assert isinstance(result, NoisyStudentResult)
    assert [int(r["iteration"]) for r in result.iterations] == [0, 1, 2]
    assert len(result.models) == 3 and len(result.histories) == 3 and len(result.pseudo_label_stats) == 2
    assert result.iterations[0]["n_pseudo"] == 0 and result.iterations[0]["n_train"] == 8
    for row in result.iterations:
        assert {"val_balanced_accuracy", "val_auc", "val_loss", "best_epoch"} <= set(row)
    loader = make_loader(unlabelled, 4, shuffle=False)
    for it, stat in enumerate(result.pseudo_label_stats, start=1):
        # The teacher of iteration `it` is model it-1: recount what it keeps.
        probs = predict_ensemble([result.models[it - 1]], loader).probabilities
        conf, hard = probs.max(1)
        kept = conf >= threshold
        assert stat["n_unlabelled"] == 20
        assert stat["n_kept"] == int(kept.sum())
        assert stat["kept_fraction"] == pytest.approx(int(kept.sum()) / 20)
        assert stat["n_class_0"] == int((hard[kept] == 0).sum())
        assert stat["n_class_0"] + stat["n_class_1"] == stat["n_kept"]
        assert stat["mean_confidence"] == pytest.approx(float(conf[kept].mean()), abs=1e-5)
        assert "pseudo_accuracy" not in stat  # the unlabelled set carries no labels
        row = result.iterations[it]
        assert row["n_pseudo"] == stat["n_kept"] and row["n_train"] == 8 + stat["n_kept"]
    assert result.final_metrics is result.iterations[-1]


@pytest.mark.slow
def test_pseudo_labelling_helps_with_few_labels() -> None:
    # 4 labelled bags, 48 unlabelled (true labels carried only to score the pseudo-labels).
    labelled = _bags(4, 10)
    pool = _bags(48, 11, prefix="U")
    val = _bags(40, 12, prefix="V")
    result = noisy_student(
        _teacher,
        _teacher,
        labelled,
        pool,
        val,
        iterations=2,
        batch_size=4,
        trainer_kwargs={"max_epochs": 4, "lr": 0.05, "monitor": "val_loss"},
    )
    teacher, last = result.iterations[0], result.iterations[-1]
    assert result.pseudo_label_stats[0]["pseudo_accuracy"] > 0.6
    assert result.iterations[1]["n_train"] == 52
    assert last["val_loss"] < teacher["val_loss"]
    assert last["val_balanced_accuracy"] >= teacher["val_balanced_accuracy"]


def test_soft_labels_reach_the_loss() -> None:
    labelled, unlabelled = _bags(6, 3), _bags(6, 4, hide=True, prefix="U")
    seen: list[bool] = []

    def build() -> Any:
        model = _teacher()
        original = model.loss

        def loss(output: Any, batch: Any, class_weights: Any = None) -> torch.Tensor:
            if model.training:
                seen.append(batch.soft_labels is not None)
            return original(output, batch, class_weights=class_weights)

        model.loss = loss  # type: ignore[method-assign]
        return model

    result = noisy_student(
        build, build, labelled, unlabelled, iterations=1, soft=True, batch_size=3, trainer_kwargs=FAST
    )
    n_teacher_batches = 3 * 2  # 3 epochs x 2 batches of labelled bags, hard labels
    assert seen[:n_teacher_batches] == [False] * n_teacher_batches
    assert all(seen[n_teacher_batches:]) and len(seen) == n_teacher_batches + 3 * 4
    assert result.pseudo_label_stats[0]["n_kept"] == 6
    assert "val_loss" not in result.iterations[0]  # no validation set


def test_deterministic_with_seed() -> None:
    args = (_teacher, _student, _bags(6, 5), _bags(8, 6, hide=True, prefix="U"), _bags(6, 7, prefix="V"))
    a = noisy_student(*args, iterations=1, batch_size=2, trainer_kwargs=FAST, seed=3)
    b = noisy_student(*args, iterations=1, batch_size=2, trainer_kwargs=FAST, seed=3)
    assert a.iterations == b.iterations and a.pseudo_label_stats == b.pseudo_label_stats
    for m1, m2 in zip(a.models, b.models, strict=True):
        for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
            assert torch.equal(p1, p2)


def test_single_cells_and_eval_copy() -> None:
    # Bags of one (single cells); the teacher labels a clean copy, the student trains on a noisy one.
    labelled = _bags(8, 8, n_instances=1)
    clean = _bags(10, 9, hide=True, n_instances=1, prefix="U")
    g = torch.Generator().manual_seed(0)
    noisy = FeatureBagDataset(
        [f + 0.1 * torch.randn(f.shape, generator=g) for f in clean.features],
        labels=clean.labels,
        ids=clean.ids,
    )
    result = noisy_student(
        _teacher, _student, labelled, noisy, None, iterations=1, unlabelled_eval=clean, trainer_kwargs=FAST
    )
    probs = predict_ensemble([result.models[0]], make_loader(clean, 1, shuffle=False)).probabilities
    hard = probs.argmax(1)
    assert result.pseudo_label_stats[0]["n_class_1"] == int((hard == 1).sum())


def test_pseudo_labelled_dataset() -> None:
    source = [
        Bag(torch.zeros(2, 3), id="u0"),
        Bag(torch.ones(1, 3), label=1, id="u1"),
        Bag(torch.ones(3, 3), id="u2"),
    ]
    hard = PseudoLabelledDataset(source, [2, 0], labels=[1, 0])
    assert len(hard) == 2 and hard.labels.tolist() == [1, 0]
    assert hard[0].id == "u2" and hard[0].label == 1 and hard[0].soft_label is None
    soft = PseudoLabelledDataset(source, np.array([1]), soft_labels=torch.tensor([[0.7, 0.3]]))
    batch = collate_bags([soft[0]])
    assert batch.labels.tolist() == [0] and torch.allclose(batch.soft_labels, torch.tensor([[0.7, 0.3]]))
    with pytest.raises(ConfigError, match="exactly one of labels and soft_labels"):
        PseudoLabelledDataset(source, [0])
    with pytest.raises(ConfigError, match="2 labels for 1 indices"):
        PseudoLabelledDataset(source, [0], labels=[0, 1])
    with pytest.raises(ConfigError, match=r"soft_labels must be \(1, C\)"):
        PseudoLabelledDataset(source, [0], soft_labels=torch.ones(2, 2) / 2)


def test_bad_arguments() -> None:
    lab, unl = _bags(4, 0), _bags(4, 1, hide=True, prefix="U")
    with pytest.raises(ConfigError, match="iterations must be an integer >= 1"):
        noisy_student(_teacher, _student, lab, unl, iterations=0)
    with pytest.raises(ConfigError, match="threshold must be a finite number >= 0.0 and <= 1.0"):
        noisy_student(_teacher, _student, lab, unl, threshold=1.5)
    with pytest.raises(ConfigError, match="may not set"):
        noisy_student(_teacher, _student, lab, unl, trainer_kwargs={"output_dir": "x"})
    with pytest.raises(DataError, match="unlabelled_eval has 2 items"):
        noisy_student(_teacher, _student, lab, unl, unlabelled_eval=_bags(2, 1, hide=True))
    with pytest.raises(DataError, match="other bag ids"):
        noisy_student(
            _teacher,
            _student,
            lab,
            unl,
            iterations=1,
            unlabelled_eval=_bags(4, 1, hide=True, prefix="X"),
            trainer_kwargs={"max_epochs": 1},
        )
    with pytest.raises(DataError, match="no unlabelled item reaches threshold"):
        noisy_student(
            _teacher, _student, lab, unl, iterations=1, threshold=1.0, trainer_kwargs={"max_epochs": 1}
        )
    partly = FeatureBagDataset(lab.features, labels=[0, 1, 0, -1], ids=lab.ids)
    with pytest.raises(DataError, match="has label -1, outside 0..1"):
        noisy_student(
            _teacher,
            _student,
            partly,
            unl,
            iterations=1,
            soft=True,
            batch_size=4,
            trainer_kwargs={"max_epochs": 1},
        )


def test_scheduler_is_built_for_every_model_and_stepped() -> None:
    built: list[Any] = []

    def scheduler(optimizer: torch.optim.Optimizer) -> Any:
        sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        built.append(sched)
        return sched

    labelled, unlabelled = _bags(8, 0), _bags(8, 1, hide=True, prefix="U")
    kwargs = {**FAST, "max_epochs": 2}
    noisy_student(
        _teacher,
        _student,
        labelled,
        unlabelled,
        iterations=1,
        batch_size=4,
        trainer_kwargs=kwargs,
        build_scheduler=scheduler,
        drop_last=True,
    )
    assert len(built) == 2  # teacher + one student
    assert all(s.last_epoch == 2 for s in built)
    with pytest.raises(ConfigError, match="scheduler"):
        noisy_student(_teacher, _student, labelled, unlabelled, trainer_kwargs={"scheduler": built[0]})
