"""The K-scaled mini-ResNet behaves like any timm model."""

from __future__ import annotations

import pytest
import timm
import torch
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
