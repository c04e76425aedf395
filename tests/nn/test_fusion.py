"""Tests of milcell.nn.fusion: shapes per head and input mode, gradients, validation, a gated-training run."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from milcell.exceptions import ConfigError, DataError, ShapeError
from milcell.nn.fusion import (
    ClinicalMLP,
    ConcatFusion,
    FusionOutput,
    GatedFusion,
    create_fusion,
    list_fusions,
)
from milcell.nn.pooling import _renamed_kwargs

D, FC, C, B = 6, 3, 3, 4
MODES = {"both": (True, True), "image": (True, False), "clinical": (False, True)}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry() -> None:
    assert list_fusions() == ["concat", "gated", "linear", "moe"]
    with pytest.raises(ConfigError, match="unknown fusion 'mix'"):
        create_fusion("mix", D, FC, C)
    with pytest.raises(ConfigError, match="fusion 'concat' does not take"):
        create_fusion("concat", D, FC, C, gate_hidden=(3,))


@pytest.mark.parametrize("name", ["concat", "moe", "gated"])
@pytest.mark.parametrize("mode", list(MODES))
def test_shapes_per_mode(name: str, mode: str) -> None:
    use_image, use_clinical = MODES[mode]
    head = create_fusion(name, D, FC, C, use_image=use_image, use_clinical=use_clinical)
    assert (head.use_image, head.use_clinical) == (use_image, use_clinical)
    image = torch.randn(B, D) if use_image else None
    clinical = torch.rand(B, FC) if use_clinical else None
    out = head(image, clinical)
    assert isinstance(out, FusionOutput) and out.logits.shape == (B, C)
    assert torch.isfinite(out.logits).all()
    if name == "concat":
        assert out.experts == {}
    else:
        expected = ({"image"} if use_image else set()) | ({"clinical"} if use_clinical else set())
        assert set(out.experts) == expected
        assert all(v.shape == (B, C) for v in out.experts.values())
    if name == "gated" and mode == "both":
        assert out.gate is not None and out.gate.shape == (B, 1)
        assert ((out.gate > 0) & (out.gate < 1)).all()
        torch.testing.assert_close(out.logits.exp().sum(1), torch.ones(B))
    else:
        assert out.gate is None
    # a switched-off input is ignored, whatever is passed
    out2 = head(torch.randn(B, D) if use_image else None, torch.rand(B, FC) if use_clinical else None)
    assert out2.logits.shape == (B, C)
    if not use_clinical:
        torch.testing.assert_close(head(image, torch.full((B, FC), float("nan"))).logits, out.logits)


def test_linear_head_and_clinical_dim_zero() -> None:
    head = create_fusion("linear", 512, 3, 2, hidden=(512,), dropout=0.1)
    linears = [(m.in_features, m.out_features) for m in head.net if isinstance(m, torch.nn.Linear)]
    assert linears == [(512, 512), (512, 2)]
    assert not head.use_clinical
    assert head(torch.randn(2, 512), None).logits.shape == (2, 2)
    for name in ("concat", "moe", "gated"):
        h = create_fusion(name, D, 0, C)
        assert h.use_image and not h.use_clinical
        assert h(torch.randn(B, D), None).logits.shape == (B, C)


def test_clinical_mlp_and_moe_architecture() -> None:
    mlp = ClinicalMLP(3)
    assert [(m.in_features, m.out_features) for m in mlp.net if isinstance(m, torch.nn.Linear)] == [
        (3, 10),
        (10, 2),
    ]
    assert mlp(torch.rand(5, 3, dtype=torch.float64)).shape == (5, 2)
    with pytest.raises(DataError, match="clinical holds NaN or inf in bag 0"):
        mlp(torch.tensor([[float("inf"), 0.0, 0.0]]))
    with pytest.raises(ShapeError, match=r"clinical must have shape \(B, 3\)"):
        mlp(torch.rand(5, 4))
    moe = create_fusion("moe", 512, 3, 2, image_hidden=(512,))
    assert moe.combiner[0].in_features == 4 and moe.combiner[0].out_features == 10
    assert moe.clinical_expert is not None and moe.clinical_expert.net[0].out_features == 10


@pytest.mark.parametrize("name", ["moe", "gated"])
def test_detach_experts_stops_gradients(name: str) -> None:
    image, clinical, y = torch.randn(B, D), torch.rand(B, FC), torch.tensor([0, 1, 2, 0])
    for detach in (True, False):
        head = create_fusion(name, D, FC, C, detach_experts=detach)
        out = head(image, clinical)
        F.cross_entropy(out.logits, y).backward(retain_graph=True)
        expert_grads = [p.grad for e in (head.image_expert, head.clinical_expert) for p in e.parameters()]
        if detach:
            assert all(g is None for g in expert_grads)
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in expert_grads)
        fuser = head.combiner if name == "moe" else head.gate
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fuser.parameters())
        # the experts' own logits keep their graph, for auxiliary losses
        head.zero_grad(set_to_none=True)
        F.cross_entropy(out.experts["clinical"], y).backward()
        assert all(p.grad is not None for p in head.clinical_expert.parameters())


@pytest.mark.parametrize("name", ["linear", "concat", "moe", "gated"])
def test_input_validation(name: str) -> None:
    head = create_fusion(name, D, FC, C)
    image, clinical = torch.randn(B, D), torch.rand(B, FC)
    with pytest.raises(ShapeError, match="image is required"):
        head(None, clinical)
    with pytest.raises(ShapeError, match=rf"image must have shape \(B, {D}\)"):
        head(torch.randn(B, D + 1), clinical)
    with pytest.raises(ShapeError, match="image must be a floating-point"):
        head(torch.ones(B, D, dtype=torch.long), clinical)
    if name == "linear":
        return
    with pytest.raises(ShapeError, match="clinical is required .*use_clinical=False"):
        head(image, None)
    with pytest.raises(ShapeError, match=rf"clinical must have shape \(B, {FC}\)"):
        head(image, torch.rand(B, FC + 2))
    with pytest.raises(ShapeError, match=f"clinical has 2 rows but the batch has {B} bags"):
        head(image, torch.rand(2, FC))
    bad = clinical.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(DataError, match="clinical holds NaN or inf in bag 2"):
        head(image, bad)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="has no input"):
        create_fusion("concat", D, FC, C, use_image=False, use_clinical=False)
    with pytest.raises(ConfigError, match="has no input"):
        create_fusion("gated", D, 0, C, use_image=False)
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 2, got 1"):
        create_fusion("moe", D, FC, 1)
    with pytest.raises(ConfigError, match=r"combiner_hidden\[0\] must be an integer"):
        create_fusion("moe", D, FC, C, combiner_hidden=(0,))
    with pytest.raises(ConfigError, match="LinearHead has no input"):
        create_fusion("linear", 0, FC, C)


def test_dtype_follows_inputs_and_autocast() -> None:
    for name in ("concat", "moe", "gated"):
        head = create_fusion(name, D, FC, C).double()
        assert head(torch.randn(B, D, dtype=torch.float64), torch.rand(B, FC)).logits.shape == (B, C)
        head = create_fusion(name, D, FC, C)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(torch.randn(B, D), torch.rand(B, FC))
        assert torch.isfinite(out.logits).all()


# ----------------------------------------------------------------------------- gated training


def _flag_problem(n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """clinical[:, 0] is a flag: 1 -> the image carries the label, 0 -> clinical[:, 1] carries it."""
    y = torch.randint(0, 2, (n,), generator=g)
    flag = torch.randint(0, 2, (n,), generator=g).float()
    sign = 2.0 * y - 1.0
    image = torch.randn(n, 8, generator=g)
    image[:, 0] += 3.0 * sign * flag
    rest = torch.randn(n, 2, generator=g)
    rest[:, 0] += 3.0 * sign * (1.0 - flag)
    return image, torch.cat([flag[:, None], rest], dim=1), y, flag


def _train(head: GatedFusion, data: tuple[torch.Tensor, ...], steps: int = 300) -> float:
    """Adam on the mixture's cross-entropy plus auxiliary cross-entropy of each expert; final loss."""
    image, clinical, y, _ = data
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        out = head(image, clinical)
        loss = F.cross_entropy(out.logits, y) + sum(F.cross_entropy(e, y) for e in out.experts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def _accuracy(head: GatedFusion, data: tuple[torch.Tensor, ...]) -> tuple[float, torch.Tensor | None]:
    head.eval()
    with torch.no_grad():
        out = head(data[0], data[1])
    return float((out.logits.argmax(1) == data[2]).float().mean()), out.gate


@pytest.mark.slow
def test_gated_fusion_learns_to_follow_the_flag() -> None:
    g = torch.Generator().manual_seed(0)
    train, test = _flag_problem(512, g), _flag_problem(1024, g)
    # two restarts of the gated model, keep the lower training loss (a standard guard against a bad start)
    candidates = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        head = GatedFusion(8, 3, 2, detach_experts=True)
        candidates.append((_train(head, train), head))
    gated = min(candidates, key=lambda c: c[0])[1]
    torch.manual_seed(0)
    image_only = GatedFusion(8, 3, 2, use_clinical=False)
    _train(image_only, train)
    torch.manual_seed(0)
    clinical_only = GatedFusion(8, 3, 2, use_image=False)
    _train(clinical_only, train)

    acc_gated, gate = _accuracy(gated, test)
    acc_image, _ = _accuracy(image_only, test)
    acc_clinical, _ = _accuracy(clinical_only, test)
    # each single expert is right on its half only (about 0.75); the gated model routes (about 0.99)
    assert acc_gated > max(acc_image, acc_clinical) + 0.15, (acc_gated, acc_image, acc_clinical)
    assert gate is not None
    flag = test[3].bool()
    gate = gate.squeeze(1)
    assert gate[flag].mean() > 0.8 and gate[~flag].mean() < 0.2, (gate[flag].mean(), gate[~flag].mean())


def test_gated_fusion_trains_without_detach() -> None:
    """Default settings, mixture loss only: the gated head still beats both single experts."""
    g = torch.Generator().manual_seed(1)
    train, test = _flag_problem(512, g), _flag_problem(1024, g)
    torch.manual_seed(0)
    gated = GatedFusion(8, 3, 2)
    image, clinical, y, _ = train
    opt = torch.optim.Adam(gated.parameters(), lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(gated(image, clinical).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc, gate = _accuracy(gated, test)
    assert acc > 0.9, acc
    # where the image is uninformative the gate hands over to the clinical expert
    assert gate is not None and gate.squeeze(1)[~test[3].bool()].mean() < 0.2


def _deprecations(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DeprecationWarning)]


def test_image_dim_is_the_old_spelling_of_in_dim() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        by_factory = create_fusion("concat", image_dim=D, clinical_dim=FC, num_classes=C)
        by_class = ConcatFusion(image_dim=D, clinical_dim=FC, num_classes=C)
    assert by_factory.in_dim == by_class.in_dim == D
    # Each old spelling warns once, naming the new one.
    expected = ["create_fusion: image_dim= is deprecated, use in_dim="]
    assert _deprecations(record)[: len(expected)] == expected
    assert len(_deprecations(record)) == 2
    with pytest.raises(ConfigError, match=r"create_fusion: pass in_dim= only \(image_dim= is its deprecated"):
        create_fusion("concat", image_dim=D, in_dim=D, clinical_dim=FC, num_classes=C)
    with pytest.warns(
        DeprecationWarning, match=r"ConcatFusion\.image_dim is deprecated, use \.in_dim"
    ) as rec:
        assert by_class.image_dim == D
    assert rec[0].filename == __file__  # the warning points at the caller


def test_renamed_keyword_warns_naming_the_new_spelling() -> None:
    @_renamed_kwargs(old="new")
    def f(new: int) -> int:
        return new

    with pytest.warns(DeprecationWarning, match="f: old= is deprecated, use new=") as rec:
        assert f(old=3) == 3
    assert rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f(new=4) == f(4) == 4


def test_fusion_hidden_is_an_int_or_a_tuple() -> None:
    for name, key in (
        ("linear", "hidden"),
        ("concat", "hidden"),
        ("moe", "combiner_hidden"),
        ("gated", "gate_hidden"),
    ):
        by_int = create_fusion(name, D, 0 if name == "linear" else FC, C, **{key: 7})
        by_tuple = create_fusion(name, D, 0 if name == "linear" else FC, C, **{key: (7,)})
        assert str(by_int) == str(by_tuple)
    assert [m.out_features for m in ClinicalMLP(FC, hidden=5).net if isinstance(m, torch.nn.Linear)] == [5, 2]


# --------------------------------------------------------------------------- one-logit heads (issue 15)


@pytest.mark.parametrize(
    ("name", "mode"),
    [("linear", "image")] + [(n, m) for n in ("concat", "moe", "gated") for m in MODES],
)
def test_one_logit_heads_return_zero_then_z(name: str, mode: str) -> None:
    use_image, use_clinical = MODES[mode]
    kwargs = {} if name == "linear" else {"use_image": use_image, "use_clinical": use_clinical}
    torch.manual_seed(0)
    head = create_fusion(name, D, FC, 2, one_logit=True, **kwargs)
    assert head.one_logit and head.out_features == 1
    image = torch.randn(B, D, requires_grad=True)
    out = head(image if use_image else None, torch.rand(B, FC))
    assert out.logits.shape == (B, 2)
    assert torch.equal(out.logits[:, 0], torch.zeros(B))
    for scores in out.experts.values():  # experts are one-logit too: [0, z_e]
        assert scores.shape == (B, 2) and torch.equal(scores[:, 0], torch.zeros(B))
    out.logits[:, 1].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_one_logit_last_layers_have_one_output() -> None:
    assert create_fusion("linear", D, 0, 2, one_logit=True, hidden=(5,)).net[-1].out_features == 1
    assert create_fusion("concat", D, FC, 2, one_logit=True).net[-1].out_features == 1
    moe = create_fusion("moe", D, FC, 2, one_logit=True)
    assert moe.combiner[0].in_features == 2 and moe.combiner[-1].out_features == 1
    assert moe.image_expert[-1].out_features == 1 and moe.clinical_expert.num_classes == 1
    gated = create_fusion("gated", D, FC, 2, one_logit=True)
    assert gated.image_expert[-1].out_features == 1


def test_one_logit_gated_is_the_log_odds_of_the_mixture() -> None:
    torch.manual_seed(1)
    head = create_fusion("gated", D, FC, 2, one_logit=True)
    image, clinical = torch.randn(B, D), torch.rand(B, FC)
    out = head(image, clinical)
    p = out.gate[:, 0]
    mixed = p * torch.sigmoid(out.experts["image"][:, 1]) + (1 - p) * torch.sigmoid(
        out.experts["clinical"][:, 1]
    )
    torch.testing.assert_close(torch.softmax(out.logits, dim=1)[:, 1], mixed)


def test_one_logit_is_for_two_classes_only() -> None:
    with pytest.raises(ConfigError, match="one_logit=True is for binary problems"):
        create_fusion("concat", D, FC, 3, one_logit=True)
    with pytest.raises(ConfigError, match="one_logit must be a bool"):
        create_fusion("concat", D, FC, 2, one_logit="yes")
    assert "one_logit=True" in repr(create_fusion("linear", D, 0, 2, one_logit=True))


def test_two_logits() -> None:
    from milcell.nn.fusion import two_logits

    z = torch.tensor([[0.3], [-2.0]])
    assert two_logits(z).tolist() == [[0.0, pytest.approx(0.3)], [0.0, -2.0]]
    pair = torch.randn(2, 2)
    assert two_logits(pair) is pair
    with pytest.raises(ShapeError, match=r"\(B, 1\)"):
        two_logits(torch.randn(2, 3))
