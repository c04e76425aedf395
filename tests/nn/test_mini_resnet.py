"""The K-scaled mini-ResNet behaves like any timm model."""

from __future__ import annotations

import copy
import inspect
import typing
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.fx
from torch import nn

import milcell.nn.mini_resnet  # noqa: F401  (registration)
from milcell.exceptions import ConfigError, ShapeError
from milcell.nn.mini_resnet import MiniResNet


@pytest.mark.parametrize(
    ("name", "width"),
    [("milcell_mini_resnet_k8", 8), ("milcell_mini_resnet_k32", 32), ("milcell_mini_resnet_k64", 64)],
)
def test_registered_names_build_through_timm(name: str, width: int) -> None:
    assert name in timm.list_models("milcell_*")
    net = timm.create_model(name, num_classes=0)
    assert isinstance(net, MiniResNet)
    assert net.conv1.out_channels == width and net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert [f["num_chs"] for f in net.feature_info] == [width, width, 2 * width, 4 * width, 8 * width]
    assert net.num_features == 8 * width
    assert net.pretrained_cfg["input_size"] == (3, 224, 224)
    assert net.pretrained_cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN


def test_width_argument_and_stage_strides() -> None:
    net = timm.create_model("milcell_mini_resnet", width=4, num_classes=0).eval()
    x = torch.rand(2, 3, 64, 64)
    assert net.forward_features(x).shape == (2, 32, 2, 2)
    strides = [blocks[0].conv1.stride[0] for blocks in (net.layer1, net.layer2, net.layer3, net.layer4)]
    assert strides == [1, 2, 2, 2]
    assert isinstance(net.maxpool, nn.MaxPool2d)


def test_flatten_head_is_7x7x8k_at_224() -> None:
    net = timm.create_model("milcell_mini_resnet", width=2, num_classes=0, global_pool="flatten").eval()
    assert net.head_hidden_size == 7 * 7 * 16
    with torch.no_grad():
        assert net(torch.rand(1, 3, 224, 224)).shape == (1, 7 * 7 * 16)
        with pytest.raises(ShapeError, match="img_size"):
            net(torch.rand(1, 3, 64, 64))


def test_classifier_reset_and_get_classifier() -> None:
    net = timm.create_model("milcell_mini_resnet_k8", num_classes=10).eval()
    assert net.get_classifier().out_features == 10 and net.get_classifier(name_only=True) == "fc"
    x = torch.rand(2, 3, 32, 32)
    net.reset_classifier(3)
    assert net(x).shape == (2, 3)
    net.reset_classifier(0)
    assert net(x).shape == (2, 64)
    assert torch.allclose(net(x), net.forward_head(net.forward_features(x), pre_logits=True))
    net.reset_classifier(4, global_pool="catavgmax")
    assert net(x).shape == (2, 4) and net.head_hidden_size == 128
    net.reset_classifier(2, global_pool="flatten")
    assert net.head_hidden_size == 64 * 7 * 7


def test_features_only_output_shapes() -> None:
    net = timm.create_model("milcell_mini_resnet_k8", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    outs = net(torch.rand(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    assert net.feature_info.channels() == [8, 16, 32, 64]
    assert net.feature_info.reduction() == [4, 8, 16, 32]


def test_grad_checkpointing_gives_same_output_and_grads() -> None:
    net = timm.create_model("milcell_mini_resnet_k8", num_classes=3, norm_layer="groupnorm")
    x = torch.rand(3, 3, 32, 32)
    out = net(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.set_grad_checkpointing(True)
    out_ckpt = net(x)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out)
    for g, p in zip(grads, net.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)


def test_group_matcher_groups_stem_and_stages() -> None:
    net = timm.create_model("milcell_mini_resnet_k8")
    groups = timm.models.group_parameters(net, net.group_matcher(coarse=True))
    assert groups[0] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert all(n.startswith("layer4") for n in groups[4])


def test_groupnorm_and_batchnorm_norm_layers() -> None:
    gn = timm.create_model("milcell_mini_resnet_k8", norm_layer="groupnorm")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    assert isinstance(gn.bn1, nn.GroupNorm) and gn.bn1.num_groups == 8
    bn = timm.create_model("milcell_mini_resnet_k8")
    assert isinstance(bn.bn1, nn.BatchNorm2d)
    custom = MiniResNet(width=8, norm_layer=lambda c, **kw: nn.GroupNorm(1, c, **kw))
    assert custom.bn1.num_groups == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, "width"),
        ({"depths": (1, 1, 1)}, "depths"),
        ({"global_pool": "median"}, "global_pool"),
        ({"norm_layer": "no_such_norm"}, "norm_layer"),
        ({"global_pool": "flatten", "img_size": (1, 2, 3)}, "img_size"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MiniResNet(**kwargs)


def test_no_pretrained_weights_exist() -> None:
    assert not timm.models.get_pretrained_cfg("milcell_mini_resnet_k32").has_weights


def test_depths_and_dtype_follow() -> None:
    net = MiniResNet(width=4, depths=(2, 1, 1, 2), num_classes=2).double().eval()
    assert len(net.layer1) == 2 and len(net.layer4) == 2
    assert net(torch.rand(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_drop_path_rate_gives_stochastic_depth() -> None:
    import timm
    import torch

    # zero_init_last=False: zero-initialised branches would make dropping them invisible.
    net = timm.create_model("milcell_mini_resnet_k8", num_classes=0, drop_path_rate=0.5, zero_init_last=False)
    rates = [m.drop_prob for m in net.modules() if type(m).__name__ == "DropPath"]
    assert rates == pytest.approx([0.0, 0.5 / 3, 1.0 / 3, 0.5])
    x = torch.rand(4, 3, 32, 32)
    net.eval()
    assert torch.equal(net(x), net(x))  # no noise at evaluation
    net.train()
    torch.manual_seed(0)
    a = net(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, net(x))


def test_bad_drop_path_rate() -> None:
    import timm

    with pytest.raises(ConfigError, match="drop_path_rate"):
        timm.create_model("milcell_mini_resnet_k8", drop_path_rate=1.5)


# ------------------------------------------------------------------ TorchScript and FX
def _script(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        # torch's own GraphModule.__init__ trips TorchScript's annotation checker
        warnings.filterwarnings("ignore", "The TorchScript type system", UserWarning)
        return torch.jit.script(module)


def test_module_has_no_string_annotations() -> None:
    import milcell.nn.mini_resnet as module

    assert "from __future__ import annotations" not in inspect.getsource(module)
    for fn in (MiniResNet.forward, MiniResNet.forward_features, MiniResNet.forward_head):
        assert fn.__annotations__ and not any(isinstance(a, str) for a in fn.__annotations__.values())
        typing.get_type_hints(fn)  # resolvable, real types


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"global_pool": "flatten", "img_size": 64, "num_classes": 3},
        {"global_pool": "max", "num_classes": 0, "drop_rate": 0.3},
        {"norm_layer": "groupnorm", "depths": (2, 1, 1, 1), "drop_path_rate": 0.2, "num_classes": 5},
    ],
)
def test_script_and_fx_give_the_eager_outputs(kwargs: dict) -> None:
    net = timm.create_model("milcell_mini_resnet_k8", **kwargs).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        eager = net(x)
        scripted = _script(net)
        traced = torch.fx.symbolic_trace(net)
        traced_scripted = _script(traced)
        for out in (scripted(x), traced(x), traced_scripted(x)):
            torch.testing.assert_close(out, eager, rtol=0, atol=0)
        torch.testing.assert_close(scripted.forward_features(x), net.forward_features(x), rtol=0, atol=0)


def test_scripted_model_trains_like_the_eager_one() -> None:
    torch.manual_seed(0)
    net = timm.create_model("milcell_mini_resnet_k8", num_classes=2).train()
    scripted = _script(copy.deepcopy(net))
    x = torch.rand(4, 3, 32, 32)
    eager_out, script_out = net(x), scripted(x)
    torch.testing.assert_close(script_out, eager_out)
    eager_out.sum().backward()
    script_out.sum().backward()
    torch.testing.assert_close(scripted.conv1.weight.grad, net.conv1.weight.grad)
    torch.testing.assert_close(scripted.bn1.running_mean, net.bn1.running_mean)


def test_flatten_size_check_survives_script_and_fx() -> None:
    net = timm.create_model("milcell_mini_resnet_k8", global_pool="flatten", img_size=64).eval()
    small = torch.rand(1, 3, 32, 32)
    traced = torch.fx.symbolic_trace(net)
    with pytest.raises(ShapeError, match="img_size=64"):
        traced(small)
    for compiled in (_script(net), _script(traced)):
        with pytest.raises(torch.jit.Error, match="ShapeError.*img_size=64"):
            compiled(small)


# ------------------------------------------------------------------ forward_intermediates
def _expected_shapes(batch: int, size: int) -> list[tuple[int, int, int, int]]:
    return [(batch, 8, size // 2, size // 2)] + [
        (batch, 8 * m, size // r, size // r) for m, r in ((1, 4), (2, 8), (4, 16), (8, 32))
    ]


@pytest.mark.parametrize(
    ("indices", "taken"),
    [(None, [0, 1, 2, 3, 4]), (2, [3, 4]), ([0, 2], [0, 2]), ((-1, 1), [4, 1]), (np.int64(1), [4])],
)
def test_forward_intermediates_shapes_and_final_map(indices: object, taken: list[int]) -> None:
    net = timm.create_model("milcell_mini_resnet_k8", num_classes=4).eval()
    x = torch.rand(2, 3, 64, 64)
    shapes = _expected_shapes(2, 64)
    with torch.no_grad():
        final, maps = net.forward_intermediates(x, indices=indices)
        assert [tuple(m.shape) for m in maps] == [shapes[i] for i in sorted(taken)]
        torch.testing.assert_close(final, net.forward_features(x), rtol=0, atol=0)
        only = net.forward_intermediates(x, indices=indices, intermediates_only=True)
        assert isinstance(only, list) and len(only) == len(maps)
        for a, b in zip(only, maps, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        # the stem tap is taken before the max-pool, the stage taps are the stage outputs
        stem = net.act1(net.bn1(net.conv1(x)))
        every = net.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(every[0], stem, rtol=0, atol=0)
        torch.testing.assert_close(every[1], net.layer1(net.maxpool(stem)), rtol=0, atol=0)
        torch.testing.assert_close(every[-1], net.forward_features(x), rtol=0, atol=0)


@pytest.mark.parametrize("indices", [None, 1, 3, 5, [0], [2, 3], [-1, 1], [0, -5]])
@pytest.mark.parametrize("stop_early", [False, True])
def test_intermediates_and_pruning_follow_timm_resnet(indices: object, stop_early: bool) -> None:
    ours = timm.create_model("milcell_mini_resnet_k8").eval()
    ref = timm.create_model("resnet10t").eval()  # timm's own ResNet: same five taps and strides
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a_final, a_maps = ours.forward_intermediates(x, indices=indices, stop_early=stop_early)
        b_final, b_maps = ref.forward_intermediates(x, indices=indices, stop_early=stop_early)
    assert [m.shape[-2:] for m in a_maps] == [m.shape[-2:] for m in b_maps]
    assert a_final.shape[-2:] == b_final.shape[-2:]
    assert ours.prune_intermediate_layers(indices or 5) == ref.prune_intermediate_layers(indices or 5)
    assert [len(getattr(ours, f"layer{i}")) == 0 for i in range(1, 5)] == [
        len(getattr(ref, f"layer{i}")) == 0 for i in range(1, 5)
    ]
    assert type(ours.maxpool) is type(ref.maxpool)
    assert (ours.num_classes, ours.global_pool.is_identity()) == (
        ref.num_classes,
        ref.global_pool.is_identity(),
    )


def test_forward_intermediates_stop_early_and_norm() -> None:
    net = timm.create_model("milcell_mini_resnet_k8").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        final, maps = net.forward_intermediates(x, indices=[1, 2], stop_early=True, norm=True)
        full = net.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    assert final.shape == (1, 16, 8, 8)  # the map at the last requested tap, not the final one
    torch.testing.assert_close(final, maps[-1], rtol=0, atol=0)
    for a, b in zip(maps, full, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_forward_intermediates_with_grad_checkpointing() -> None:
    net = timm.create_model("milcell_mini_resnet_k8", norm_layer="groupnorm")
    x = torch.rand(2, 3, 32, 32)
    plain = net.forward_intermediates(x, intermediates_only=True)
    net.set_grad_checkpointing(True)
    ckpt = net.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(ckpt, plain, strict=True):
        torch.testing.assert_close(a, b)
    sum(m.sum() for m in ckpt).backward()
    assert net.layer4[0].conv1.weight.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"output_fmt": "NHWC"}, "output_fmt"),
        ({"indices": 6}, "indices"),
        ({"indices": 0}, "indices"),
        ({"indices": [5]}, "indices"),
        ({"indices": [-6]}, "indices"),
        ({"indices": []}, "indices"),
        ({"indices": "all"}, "indices"),
    ],
)
def test_forward_intermediates_bad_arguments(kwargs: dict, match: str) -> None:
    net = timm.create_model("milcell_mini_resnet_k8")
    with pytest.raises(ConfigError, match=match):
        net.forward_intermediates(torch.rand(1, 3, 32, 32), **kwargs)


def test_features_only_getter_uses_forward_intermediates() -> None:
    getter = timm.create_model(
        "milcell_mini_resnet_k8", features_only=True, feature_cls="getter", out_indices=(1, 3)
    ).eval()
    net = timm.create_model("milcell_mini_resnet_k8").eval()
    net.load_state_dict(getter.model.state_dict(), strict=False)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        outs = getter(x)
        ref = net.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert getter.feature_info.channels() == [8, 32]
    for a, b in zip(outs, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ prune_intermediate_layers
def test_prune_keeps_forward_intermediates_working() -> None:
    net = timm.create_model("milcell_mini_resnet_k8", num_classes=3).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = net.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        assert net.prune_intermediate_layers([0, 2]) == [0, 2]
        assert len(net.layer3) == 0 and len(net.layer4) == 0 and len(net.layer2) == 1
        assert net.num_features == net.head_hidden_size == 16 and net.num_classes == 0
        final, after = net.forward_intermediates(x, indices=[0, 2])
        for a, b in zip(after, before, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(final, before[-1], rtol=0, atol=0)
        torch.testing.assert_close(net.forward_features(x), before[-1], rtol=0, atol=0)
        assert net(x).shape == (2, 16, 8, 8)  # head removed: pooling too ("")
        torch.testing.assert_close(_script(net)(x), net(x), rtol=0, atol=0)


def test_prune_stem_only_and_keep_head() -> None:
    net = timm.create_model("milcell_mini_resnet_k8", num_classes=3).eval()
    assert net.prune_intermediate_layers(1, prune_head=False) == [4]
    assert net.num_classes == 3 and net(torch.rand(1, 3, 32, 32)).shape == (1, 3)  # nothing pruned
    assert net.prune_intermediate_layers(1, prune_head=True, prune_norm=True) == [4]
    assert net.num_classes == 0 and net.num_features == 64
    stem = timm.create_model("milcell_mini_resnet_k8").eval()
    assert stem.prune_intermediate_layers([0]) == [0]
    assert isinstance(stem.maxpool, nn.Identity) and stem.num_features == 8
    assert stem(torch.rand(1, 3, 32, 32)).shape == (1, 8, 16, 16)


# ------------------------------------------------------------------ init_weights and arguments
@torch.no_grad()
def test_init_weights_like_timm_resnet() -> None:
    net = MiniResNet(width=8, num_classes=0)
    for p in net.parameters():
        p.zero_()
    net.init_weights(zero_init_last=False)
    assert net.conv1.weight.std() > 0 and net.layer2[0].downsample[0].weight.std() > 0
    assert float(net.layer1[0].bn2.weight.abs().sum()) == 0.0  # norms untouched
    net.layer1[0].bn2.weight.fill_(1.0)
    net.init_weights()
    assert float(net.layer1[0].bn2.weight.abs().sum()) == 0.0  # zero_init_last=True by default
    fan_out = net.conv1.out_channels * 7 * 7
    assert abs(float(net.conv1.weight.std()) - (2.0 / fan_out) ** 0.5) < 0.03


def test_numpy_integer_arguments() -> None:
    net = MiniResNet(
        width=np.int64(4), depths=np.array([1, 2, 1, 1]), num_classes=np.int32(2), in_chans=np.int64(1)
    )
    assert net.width == 4 and type(net.width) is int and net.depths == (1, 2, 1, 1)
    assert net.eval()(torch.rand(1, 1, 32, 32)).shape == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 2.5}, "width"),
        ({"depths": (1, 0, 1, 1)}, "depths"),
        ({"depths": "1111"}, "depths"),
        ({"num_classes": -1}, "num_classes"),
        ({"in_chans": True}, "in_chans"),
        ({"drop_rate": 1.0}, "drop_rate"),
    ],
)
def test_more_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MiniResNet(**kwargs)
