"""Bad model inputs meet a clear milcell error before any computation, and never a NaN output.

For every registered pooling crossed with the fusion heads, on the image-backbone path (mini-ResNet
k8) and on the feature-bag path, each malformed :class:`~milcell.data.bag.BagBatch` (wrong rank,
wrong channel count, mismatched clinical width, NaN/inf in clinical attributes or instances, an
empty batch, a bag without instances, non-float data, inconsistent sizes) must raise a
:class:`~milcell.exceptions.MilcellError` that names the argument or bag, and a forward pre-hook
checks that the backbone (or, without one, the pooling) was never called. Inputs a model ignores
(clinical values of an image-only model) and legal oddities (float64 or float16 data, bags of one,
1-pixel images) must give finite outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from milcell.data.bag import Bag, BagBatch, collate_bags
from milcell.exceptions import DataError, MilcellError, ShapeError
from milcell.nn.model import MILModel, create_mil_model
from milcell.nn.pooling import list_poolings

BUILTIN_POOLINGS = ["mean", "max", "lse", "attention", "gated_attention", "conv", "instance_mean"]
FUSIONS = ["linear", "concat", "moe", "gated"]
F = 3  # clinical width
PX = 16
NAN, INF = float("nan"), float("inf")

COMBOS = [(p, f) for p in BUILTIN_POOLINGS if p != "instance_mean" for f in FUSIONS]
COMBOS += [("instance_mean", None), ("instance_mean", "clinical")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _build(pooling: str, fusion: str | None, backbone: str | None = "milcell_mini_resnet_k8") -> MILModel:
    kwargs: dict = {"in_dim": 8} if backbone is None else {"chunk_size": 4}
    if fusion == "clinical":  # instance_mean with per-instance clinical concatenation
        return create_mil_model(backbone, pooling=pooling, fusion=None, clinical_dim=F, **kwargs).eval()
    clinical_dim = 0 if fusion in (None, "linear") else F
    return create_mil_model(
        backbone, pooling=pooling, fusion=fusion, clinical_dim=clinical_dim, **kwargs
    ).eval()


def _batch(sizes: tuple[int, ...] = (3, 1, 2), *, clinical: int = F, in_dim: int | None = None) -> BagBatch:
    g = torch.Generator().manual_seed(0)
    bags = []
    for i, n in enumerate(sizes):
        shape = (n, in_dim) if in_dim else (n, 3, PX, PX)
        x = torch.rand(shape, generator=g)
        clin = torch.randn(clinical, generator=g) if clinical else None
        bags.append(Bag(x, label=i % 2, clinical=clin, id=f"P{i}"))
    return collate_bags(bags)


class _Calls:
    """Counts the calls of a module through a forward pre-hook."""

    def __init__(self, module: nn.Module) -> None:
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.n += 1


def _first_stage(model: MILModel) -> nn.Module:
    """The module that does the first computation: the backbone, or the pooling for feature bags."""
    return model.encoder.backbone if model.encoder is not None else model.pooling


def _set(batch: BagBatch, **fields: object) -> BagBatch:
    return replace(batch, **fields)


def _poison(value: float, where: str) -> Callable[[BagBatch], BagBatch]:
    def make(batch: BagBatch) -> BagBatch:
        if where == "clinical":
            clinical = batch.clinical.clone()
            clinical[1, -1] = value
            return _set(batch, clinical=clinical)
        x = batch.instances.clone()
        x[3].view(-1)[-1] = value  # the only instance of bag P1 (sizes 3, 1, 2)
        return _set(batch, instances=x)

    return make


def _image_cases(needs_clinical: bool) -> list[tuple[str, Callable[[BagBatch], BagBatch], type, str]]:
    """(name, corruption of a valid image batch, exception, regex the message must match)."""
    cases: list[tuple[str, Callable[[BagBatch], BagBatch], type, str]] = [
        ("rank 3", lambda b: _set(b, instances=b.instances[:, 0]), ShapeError, r"\(T, C, H, W\)"),
        ("rank 5", lambda b: _set(b, instances=b.instances[:, None]), ShapeError, r"\(T, C, H, W\)"),
        ("rank 2", lambda b: _set(b, instances=b.instances.flatten(1)), ShapeError, r"\(T, C, H, W\)"),
        ("1 channel", lambda b: _set(b, instances=b.instances[:, :1]), ShapeError, "1 channels.*in_chans=3"),
        (
            "4 channels",
            lambda b: _set(b, instances=torch.cat([b.instances, b.instances[:, :1]], 1)),
            ShapeError,
            "4 channels",
        ),
        (
            "integer pixels",
            lambda b: _set(b, instances=(b.instances * 255).to(torch.uint8)),
            ShapeError,
            "float",
        ),
        ("NaN pixel", _poison(NAN, "instances"), DataError, r"NaN or inf in bags \['P1'\]"),
        ("+inf pixel", _poison(INF, "instances"), DataError, r"NaN or inf in bags \['P1'\]"),
        ("-inf pixel", _poison(-INF, "instances"), DataError, r"NaN or inf in bags \['P1'\]"),
        (
            "empty batch",
            lambda b: BagBatch(
                b.instances[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), None, []
            ),
            ShapeError,
            "empty",
        ),
        (
            "all-masked bag",
            lambda b: _set(b, bag_sizes=torch.tensor([3, 0, 3])),
            DataError,
            r"bags \['P1'\] have no instance",
        ),
        (
            "negative bag size",
            lambda b: _set(b, bag_sizes=torch.tensor([4, -1, 3])),
            DataError,
            r"bags \['P1'\] have no instance",
        ),
        ("float bag sizes", lambda b: _set(b, bag_sizes=b.bag_sizes.float()), ShapeError, "bag_sizes"),
        ("rows != sizes", lambda b: _set(b, instances=b.instances[:-1]), ShapeError, "bag_sizes sum to 6"),
        ("not a batch", lambda b: b.instances, ShapeError, "BagBatch"),
    ]
    if needs_clinical:
        cases += [
            ("clinical missing", lambda b: _set(b, clinical=None), ShapeError, "clinical is missing"),
            (
                "clinical too wide",
                lambda b: _set(b, clinical=torch.zeros(3, F + 1)),
                ShapeError,
                rf"\(B, {F}\)",
            ),
            (
                "clinical too narrow",
                lambda b: _set(b, clinical=b.clinical[:, :1]),
                ShapeError,
                rf"\(B, {F}\)",
            ),
            ("clinical 1-D", lambda b: _set(b, clinical=b.clinical[0]), ShapeError, rf"\(B, {F}\)"),
            ("clinical rows", lambda b: _set(b, clinical=b.clinical[:2]), ShapeError, "2 rows for 3 bags"),
            ("clinical int", lambda b: _set(b, clinical=b.clinical.long()), ShapeError, "floating point"),
            ("clinical NaN", _poison(NAN, "clinical"), DataError, r"NaN or inf for bags \['P1'\]"),
            ("clinical inf", _poison(INF, "clinical"), DataError, r"NaN or inf for bags \['P1'\]"),
            ("clinical -inf", _poison(-INF, "clinical"), DataError, r"NaN or inf for bags \['P1'\]"),
        ]
    return cases


def test_the_table_covers_every_registered_pooling() -> None:
    assert set(BUILTIN_POOLINGS) <= set(list_poolings())


@pytest.mark.parametrize(("pooling", "fusion"), COMBOS, ids=[f"{p}-{f}" for p, f in COMBOS])
def test_image_model_rejects_bad_inputs_before_the_backbone(pooling: str, fusion: str | None) -> None:
    model = _build(pooling, fusion)
    calls = _Calls(_first_stage(model))
    needs = model.use_clinical
    good = _batch(clinical=F if needs else 0)
    for name, corrupt, error, match in _image_cases(needs):
        bad = corrupt(good)
        with pytest.raises(error, match=match) as info:
            model(bad)
        assert isinstance(info.value, MilcellError), name
        assert calls.n == 0, f"{name}: the backbone ran on a bad batch"
    with torch.no_grad():
        out = model(good)
    assert calls.n == 2  # 6 instances in chunks of 4: the hook does count real calls
    assert out.logits.shape == (3, 2) and bool(torch.isfinite(out.logits).all())


@pytest.mark.parametrize("pooling", BUILTIN_POOLINGS)
def test_feature_model_rejects_bad_inputs_before_the_pooling(pooling: str) -> None:
    model = _build(pooling, None if pooling == "instance_mean" else "concat", backbone=None)
    calls = _Calls(model.pooling)
    needs = model.use_clinical
    good = _batch(clinical=F if needs else 0, in_dim=8)
    cases = [
        (
            "wrong width",
            _set(good, instances=good.instances[:, :5]),
            ShapeError,
            "feature size 5 .* expects 8",
        ),
        ("images", _batch(clinical=F if needs else 0), ShapeError, r"features \(T, D\)"),
        ("rank 1", _set(good, instances=good.instances[:, 0]), ShapeError, r"features \(T, D\)"),
        ("NaN feature", _poison(NAN, "instances")(good), DataError, r"\['P1'\]"),
        ("inf feature", _poison(INF, "instances")(good), DataError, r"\['P1'\]"),
        ("zero bag", _set(good, bag_sizes=torch.tensor([3, 0, 3])), DataError, r"\['P1'\] have no instance"),
        (
            "empty batch",
            BagBatch(good.instances[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)),
            ShapeError,
            "empty",
        ),
        ("int features", _set(good, instances=good.instances.long()), ShapeError, "floating point"),
    ]
    if needs:
        cases.append(("clinical NaN", _poison(NAN, "clinical")(good), DataError, r"\['P1'\]"))
        cases.append(("clinical width", _set(good, clinical=good.clinical[:, :2]), ShapeError, r"\(B, 3\)"))
    for name, bad, error, match in cases:
        with pytest.raises(error, match=match):
            model(bad)
        assert calls.n == 0, name
    assert bool(torch.isfinite(model(good).logits).all())


@pytest.mark.parametrize("fusion", ["concat", "moe", "gated"])
def test_clinical_only_model_rejects_bad_clinical_and_empty_batches(fusion: str) -> None:
    model = create_mil_model(None, pooling="mean", fusion=fusion, clinical_dim=F, in_dim=8, use_image=False)
    calls = _Calls(model.head)
    good = _batch(in_dim=8)
    empty = BagBatch(good.instances[:0], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    for bad, error, match in [
        (_poison(INF, "clinical")(good), DataError, r"\['P1'\]"),
        (_set(good, clinical=None), ShapeError, "clinical is missing"),
        (replace(empty, clinical=torch.zeros(0, F)), ShapeError, "empty"),
    ]:
        with pytest.raises(error, match=match):
            model(bad)
    assert calls.n == 0
    # the instances are not read by a clinical-only model: garbage there is harmless
    out = model(_poison(NAN, "instances")(good))
    assert bool(torch.isfinite(out.logits).all())


@pytest.mark.parametrize("fusion", ["linear", None])
def test_ignored_clinical_values_do_not_leak_nan(fusion: str | None) -> None:
    """An image-only model is handed NaN clinical values: it ignores them and stays finite."""
    model = _build("gated_attention" if fusion else "instance_mean", fusion)
    assert not model.use_clinical
    batch = _poison(NAN, "clinical")(_batch())
    assert bool(torch.isfinite(model(batch).logits).all())


def test_legal_oddities_give_finite_outputs() -> None:
    model = _build("gated_attention", "moe")
    g = torch.Generator().manual_seed(3)
    batches = {
        "float64": _set(_batch(), instances=_batch().instances.double(), clinical=_batch().clinical.double()),
        "float16": _set(_batch(), instances=_batch().instances.half()),
        "bags of one": _batch((1, 1, 1)),
        "1-pixel images": collate_bags(
            [Bag(torch.rand(2, 3, 1, 1, generator=g), 0, clinical=torch.zeros(F), id="tiny")]
        ),
        "large finite clinical": _set(_batch(), clinical=torch.full((3, F), 1e6)),
    }
    for name, batch in batches.items():
        out = model(batch)
        assert bool(torch.isfinite(out.logits).all()), name
        assert out.logits.dtype == torch.float32, name


def test_huge_float64_values_overflowing_float32_are_reported() -> None:
    """Casting to the model's float32 must not let an overflow through as inf."""
    model = _build("mean", "concat", backbone=None)
    batch = _batch(in_dim=8)
    x = batch.instances.double()
    x[0, 0] = 1e300
    with pytest.raises(DataError, match=r"NaN or inf in bags \['P0'\]"):
        model(_set(batch, instances=x))


@settings(max_examples=60)
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    poison=st.lists(
        st.tuples(st.integers(0, 100), st.sampled_from([NAN, INF, -INF])), min_size=1, max_size=3
    ),
    pooling=st.sampled_from(BUILTIN_POOLINGS),
)
def test_nan_anywhere_names_exactly_the_poisoned_bags(
    sizes: list[int], poison: list[tuple[int, float]], pooling: str
) -> None:
    model = _FEATURE_MODELS[pooling]
    calls = _Calls(model.pooling)
    batch = _batch(tuple(sizes), clinical=0, in_dim=8)
    x = batch.instances.clone()
    flat = x.view(-1)
    hit = set()
    for position, value in poison:
        index = position % flat.numel()
        flat[index] = value
        hit.add(int(batch.bag_index[index // 8]))
    with pytest.raises(DataError) as info:
        model(_set(batch, instances=x))
    calls.handle.remove()
    assert calls.n == 0
    named = {i for i in range(len(sizes)) if repr(f"P{i}") in str(info.value)}
    assert named == hit


_FEATURE_MODELS = {
    p: _build(p, None if p == "instance_mean" else "linear", backbone=None) for p in BUILTIN_POOLINGS
}
