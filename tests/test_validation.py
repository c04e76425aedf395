"""Declarative argument validation (milcell._validation) and the value-checks switch (milcell._checks).

Every public factory and constructor of the models, bags, splits and samplers accepts numpy integer
and real scalars, stores them as plain Python numbers, and refuses a bad value with one message
template that names the argument, the constraint and the value.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import milcell
from milcell._checks import CHECKS_ENV, checks, checks_enabled, set_checks
from milcell._validation import check_choice, check_int, check_real, constraint_error
from milcell.data.bag import Bag
from milcell.data.samplers import ClassBalancedSampler, MinorityOversampler
from milcell.data.splits import patient_holdout, patient_kfold
from milcell.exceptions import ConfigError, DataError, MilcellError
from milcell.nn.encoder import InstanceEncoder
from milcell.nn.fusion import (
    ClinicalMLP,
    ConcatFusion,
    GatedFusion,
    LinearHead,
    MoEFusion,
    create_fusion,
)
from milcell.nn.model import MILModel, create_mil_model
from milcell.nn.pooling import (
    AttentionPooling,
    ConvPooling,
    GatedAttentionPooling,
    InstanceMeanPooling,
    LSEPooling,
    MaxPooling,
    MeanPooling,
    create_pooling,
)

# ----------------------------------------------------------------------------- the helper


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), np.uint8(3), np.int16(3)])
def test_check_int_accepts_integers_and_returns_a_plain_int(value: Any) -> None:
    out = check_int(value, "n", low=1)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 3.0, np.float64(3.0), "3", None, [3]])
def test_check_int_refuses_non_integers(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"^n must be an integer, got "):
        check_int(value, "n")


def test_check_int_bounds_and_message() -> None:
    assert check_int(0, "n", low=0) == 0 and check_int(5, "n", high=5) == 5
    with pytest.raises(ConfigError, match=r"^in_dim must be an integer >= 1, got (np\.int64\()?0\)?$"):
        check_int(np.int64(0), "in_dim", low=1)
    with pytest.raises(ConfigError, match=r"^k must be an integer >= 1 and <= 3, got 4$"):
        check_int(4, "k", low=1, high=3)
    assert issubclass(ConfigError, MilcellError) and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("value", [0.5, np.float64(0.5), np.float32(0.5), 1, np.int64(1)])
def test_check_real_accepts_numbers_and_returns_a_plain_float(value: Any) -> None:
    out = check_real(value, "x", low=0.0, high=1.0)
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize("value", [True, "0.5", None, float("nan"), float("inf"), np.float64("-inf")])
def test_check_real_refuses_non_finite_and_non_numbers(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"^x must be a finite number, got "):
        check_real(value, "x")


def test_check_real_open_and_closed_bounds() -> None:
    assert check_real(0.0, "dropout", low=0.0, high=1.0, high_open=True) == 0.0
    with pytest.raises(ConfigError, match=r"^dropout must be a finite number >= 0.0 and < 1.0, got 1.0$"):
        check_real(1.0, "dropout", low=0.0, high=1.0, high_open=True)
    with pytest.raises(ConfigError, match=r"^r must be a finite number > 0.0, got 0$"):
        check_real(0, "r", low=0.0, low_open=True)


def test_check_choice_and_the_template() -> None:
    assert check_choice("max", "reduce", ("mean", "max")) == "max"
    with pytest.raises(ConfigError, match=r"^reduce must be one of 'mean', 'max', got 'sum'$"):
        check_choice("sum", "reduce", ("mean", "max"))
    with pytest.raises(ConfigError, match="got"):
        check_choice([1], "reduce", {"mean"})  # unhashable
    assert str(constraint_error("a", "odd", 2)) == "a must be odd, got 2"


# ----------------------------------------------------------------------------- the checks switch


def test_checks_follow_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    set_checks(None)
    for text, expected in [("1", True), ("true", True), (" On ", True), ("0", False), ("no", False)]:
        monkeypatch.setenv(CHECKS_ENV, text)
        assert checks_enabled() is expected
    monkeypatch.delenv(CHECKS_ENV)
    assert checks_enabled() is False  # off by default
    monkeypatch.setenv(CHECKS_ENV, "maybe")
    with pytest.raises(ConfigError, match="MILCELL_CHECKS must be one of .* got 'maybe'"):
        checks_enabled()


def test_set_checks_and_the_context_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CHECKS_ENV, "0")
    try:
        set_checks(True)
        assert checks_enabled()
        with checks(False):
            assert not checks_enabled()
            with checks():
                assert checks_enabled()
            assert not checks_enabled()
        assert checks_enabled()
        with pytest.raises(RuntimeError), checks(False):
            raise RuntimeError("restored even on error")
        assert checks_enabled()
    finally:
        set_checks(None)
    assert not checks_enabled()
    assert milcell.checks is checks and milcell.set_checks is set_checks
    with pytest.raises(ConfigError, match="enabled must be True, False or None, got 1"):
        set_checks(1)  # type: ignore[arg-type]
    refused = pytest.raises(ConfigError, match="enabled must be True or False, got 'yes'")
    with refused, checks("yes"):  # type: ignore[arg-type]
        pass


def test_checks_decorate_a_function() -> None:
    @checks(False)
    def inner() -> bool:
        return checks_enabled()

    with checks(True):
        assert inner() is False and checks_enabled()


# ----------------------------------------------------------------------------- every constructor


def _plain(value: Any) -> bool:
    """True when ``value`` holds only plain Python scalars (no numpy scalar leaked in)."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(v) for v in value.values())
    return value is None or type(value) in (bool, int, float, str)


def _model(**kwargs: Any) -> MILModel:
    return create_mil_model(None, pooling="mean", in_dim=4, **kwargs)


I64, I32, F64, F32 = np.int64, np.int32, np.float64, np.float32
LABELS = [0, 0, 0, 1, 1, 1]

# (id, builder, numpy-scalar arguments, attributes that must come back as plain Python numbers,
#  (argument, bad value) whose message must name the argument)
Case = tuple[str, Callable[..., Any], dict[str, Any], dict[str, Any], tuple[str, Any]]
CASES: list[Case] = [
    (
        "create_pooling",
        lambda **k: create_pooling("mean", **k),
        {"in_dim": I64(8)},
        {"in_dim": 8},
        ("in_dim", 0),
    ),
    ("MeanPooling", MeanPooling, {"in_dim": I32(3)}, {"in_dim": 3, "out_dim": 3}, ("in_dim", 2.0)),
    ("MaxPooling", MaxPooling, {"in_dim": I64(3)}, {"in_dim": 3}, ("in_dim", True)),
    ("LSEPooling", LSEPooling, {"in_dim": I64(3), "r": F32(2.0)}, {"r": 2.0}, ("r", F64(-1.0))),
    (
        "AttentionPooling",
        AttentionPooling,
        {"in_dim": I64(4), "hidden": I32(6), "dropout": F64(0.25)},
        {"hidden": 6},
        ("dropout", 1.5),
    ),
    (
        "GatedAttentionPooling",
        GatedAttentionPooling,
        {"in_dim": 4, "hidden": I64(6)},
        {"hidden": 6},
        ("hidden", 0),
    ),
    (
        "ConvPooling",
        ConvPooling,
        {"in_dim": I64(4), "out_dim": I64(5), "kernel_size": I32(3), "dropout": F32(0.0)},
        {"out_dim": 5, "kernel_size": 3},
        ("kernel_size", I64(-3)),
    ),
    (
        "InstanceMeanPooling",
        InstanceMeanPooling,
        {"in_dim": I64(4), "num_classes": I64(3), "hidden": (I64(8), I32(4)), "clinical_dim": I64(2)},
        {"num_classes": 3, "hidden": (8, 4), "clinical_dim": 2, "out_dim": 3},
        ("hidden[1]", None),
    ),
    (
        "create_fusion",
        lambda **k: create_fusion("concat", **k),
        {"in_dim": I64(8), "clinical_dim": I32(3), "num_classes": I64(2)},
        {"in_dim": 8, "clinical_dim": 3, "num_classes": 2},
        ("num_classes", I64(1)),
    ),
    (
        "ClinicalMLP",
        ClinicalMLP,
        {"in_dim": I64(3), "num_classes": I64(2), "hidden": I64(5), "dropout": F64(0.1)},
        {"in_dim": 3, "num_classes": 2},
        ("in_dim", "3"),
    ),
    (
        "LinearHead",
        LinearHead,
        {"in_dim": I64(8), "clinical_dim": I64(0), "num_classes": I64(4), "hidden": [I64(8)]},
        {"in_dim": 8, "num_classes": 4},
        ("in_dim", -1),
    ),
    (
        "ConcatFusion",
        ConcatFusion,
        {"in_dim": I64(8), "clinical_dim": I64(2), "num_classes": I64(2)},
        {"clinical_dim": 2},
        ("clinical_dim", -2),
    ),
    (
        "MoEFusion",
        MoEFusion,
        {"in_dim": I64(8), "clinical_dim": I64(2), "num_classes": I64(2), "combiner_hidden": (I32(4),)},
        {"num_classes": 2},
        ("combiner_hidden[0]", 0),
    ),
    (
        "GatedFusion",
        GatedFusion,
        {"in_dim": I64(8), "clinical_dim": I64(2), "num_classes": I64(2), "summary_dim": I64(3)},
        {"summary_dim": 3},
        ("summary_dim", 0),
    ),
    (
        "MILModel",
        lambda **k: MILModel(create_pooling("mean", 4), create_fusion("linear", 4, 0, 3), **k),
        {"num_classes": I64(3)},
        {"num_classes": 3},
        ("num_classes", 3.0),
    ),
    (
        "create_mil_model",
        _model,
        {
            "num_classes": I64(3),
            "clinical_dim": I32(2),
            "fusion": "concat",
            "fusion_kwargs": {"hidden": (I64(4),), "dropout": F64(0.1)},
        },
        {"num_classes": 3, "clinical_dim": 2, "config": None},
        ("clinical_dim", -1),
    ),
    (
        "create_mil_model(in_dim)",
        lambda **k: create_mil_model(None, pooling="attention", **k),
        {"in_dim": I64(4), "pooling_kwargs": {"hidden": I64(5)}},
        {"in_dim": 4, "config": None},
        ("in_dim", 0),
    ),
    (
        "create_mil_model(backbone)",
        lambda **k: create_mil_model("milcell_mini_resnet", backbone_kwargs={"width": 4}, **k),
        {"chunk_size": I64(2), "trainable": I64(1), "checkpointing": np.bool_(True)},
        {"config": None},
        ("chunk_size", 0),
    ),
    (
        "InstanceEncoder",
        lambda **k: InstanceEncoder(torch.nn.Identity(), **k),
        {"chunk_size": I64(4)},
        {"chunk_size": 4},
        ("chunk_size", F64(4.0)),
    ),
]


def _bag(**kwargs: Any) -> Bag:
    return Bag(torch.zeros(2, 3), id="P7", **kwargs)


def _data_cases() -> list[Case]:
    return [
        (
            "Bag",
            _bag,
            {"label": I64(1)},
            {"label": 1},
            ("label", 1.5),
        ),
        (
            "ClassBalancedSampler",
            lambda **k: ClassBalancedSampler(LABELS, **k),
            {"num_samples": I64(10), "seed": I32(3)},
            {"num_samples": 10, "seed": 3},
            ("num_samples", 0),
        ),
        (
            "MinorityOversampler",
            lambda **k: MinorityOversampler([0, 0, 0, 1], **k),
            {"factor": F32(2.0), "seed": I64(1)},
            {"factor": 2.0, "seed": 1},
            ("factor", 0.5),
        ),
    ]


ALL_CASES = CASES + _data_cases()


@pytest.mark.parametrize(
    ("builder", "args", "expected"), [c[1:4] for c in ALL_CASES], ids=[c[0] for c in ALL_CASES]
)
def test_numpy_scalars_are_accepted_and_stored_as_plain_numbers(
    builder: Callable[..., Any], args: dict[str, Any], expected: dict[str, Any]
) -> None:
    obj = builder(**args)
    for attr, value in expected.items():
        got = getattr(obj, attr)
        assert _plain(got), (attr, type(got))
        if value is not None:
            assert got == value, attr
    if isinstance(obj, MILModel) and obj.config is not None:
        assert json.loads(json.dumps(obj.config)) == obj.config


@pytest.mark.parametrize(
    ("builder", "args", "bad"), [(c[1], c[2], c[4]) for c in ALL_CASES], ids=[c[0] for c in ALL_CASES]
)
def test_a_bad_value_is_refused_naming_the_argument(
    builder: Callable[..., Any], args: dict[str, Any], bad: tuple[str, Any]
) -> None:
    name, value = bad
    kwargs = dict(args)
    top = name.split("[")[0]
    if "[" in name:  # an element of a sequence argument: replace that element
        index = int(name.split("[")[1].rstrip("]"))
        seq = list(kwargs.get(top, [1, 1]))
        seq += [1] * (index + 1 - len(seq))
        seq[index] = value
        kwargs[top] = tuple(seq)
    else:
        kwargs[top] = value
    error = DataError if builder is _bag else ConfigError  # a Bag's bad field is a DataError
    with pytest.raises(error) as info:
        builder(**kwargs)
    message = str(info.value)
    assert f"{name} must be " in message and ", got " in message, message


def test_splits_accept_numpy_scalars() -> None:
    folds = patient_kfold(LABELS, n_splits=I64(2), n_repeats=I32(2), seed=I64(5))
    assert [(f.repeat, f.fold) for f in folds] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(type(f.repeat) is int and type(f.fold) is int for f in folds)
    assert patient_kfold(LABELS, n_splits=2, seed=5)[0].val.tolist() == folds[0].val.tolist()
    by_count = patient_holdout(LABELS, test_size=I64(2), seed=I32(0))
    by_fraction = patient_holdout(LABELS, test_size=F32(0.5), seed=I64(0))
    assert len(by_count.val) == 2 and len(by_fraction.val) == 3
    for kwargs, name in [
        ({"n_splits": I64(1)}, "n_splits"),
        ({"n_repeats": 0}, "n_repeats"),
        ({"seed": F64(1.0)}, "seed"),
    ]:
        with pytest.raises(ConfigError, match=rf"^{name} must be an integer >= \d, got "):
            patient_kfold(LABELS, **kwargs)
    with pytest.raises(ConfigError, match=r"^test_size must be a finite number > 0.0 and < 1.0, got "):
        patient_holdout(LABELS, test_size=F64(1.0))


def test_sampler_set_epoch_accepts_numpy() -> None:
    sampler = ClassBalancedSampler(LABELS, seed=0)
    first = list(sampler)
    sampler.set_epoch(I64(0))
    assert list(sampler) == first and type(sampler.epoch) is int
    with pytest.raises(ConfigError, match="^epoch must be an integer >= 0, got -1$"):
        sampler.set_epoch(-1)
