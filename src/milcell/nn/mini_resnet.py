"""The K-scaled mini-ResNet of the 2021 lymphocytosis report, registered with timm.

A 7×7 stride-2 stem convolution with ``K`` channels, a 3×3 stride-2 max-pool,
then four stages of residual basic blocks with ``K, 2K, 4K, 8K`` channels and
strides ``1, 2, 2, 2`` (overall stride 32), then either global average pooling
(the default) or a flattening of the final map (``global_pool="flatten"``: at
a 224 px input the map is ``7 × 7 × 8K``).

Importing this module registers the architectures in timm's model registry,
so :func:`timm.create_model` builds them and they behave like any timm model
(``forward_features``, ``forward_head``, ``reset_classifier``,
``set_grad_checkpointing``, ``group_matcher``, ``feature_info`` and
``features_only=True``):

- ``milcell_mini_resnet`` (``width=K`` argument, default 32),
- ``milcell_mini_resnet_k8`` (tiny, for tests and tours),
- ``milcell_mini_resnet_k32`` and ``milcell_mini_resnet_k64`` (the report's two widths).

No pretrained weights exist for these models (``pretrained=True`` raises in
timm); train from scratch or load a local file through
:func:`milcell.nn.backbones.create_backbone` with ``checkpoint_path``.

Examples
--------
>>> import timm, torch
>>> import milcell.nn.mini_resnet  # registers the models
>>> net = timm.create_model("milcell_mini_resnet_k8", num_classes=2)
>>> net(torch.rand(3, 3, 32, 32)).shape
torch.Size([3, 2])
>>> net.forward_features(torch.rand(1, 3, 64, 64)).shape   # (B, 8K, H/32, W/32)
torch.Size([1, 64, 2, 2])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, create_classifier, get_act_layer, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock
from torch import Tensor, nn

from milcell.exceptions import ConfigError, ShapeError

__all__ = ["MiniResNet"]

_STAGE_STRIDES = (1, 2, 2, 2)
_STAGE_MULTS = (1, 2, 4, 8)


def _group_norm_factory(max_groups: int = 32) -> Callable[..., nn.Module]:
    """A ``norm_layer(num_channels)`` building GroupNorm with gcd(max_groups, C) groups."""

    def make(num_channels: int, **kwargs: Any) -> nn.Module:
        return nn.GroupNorm(math.gcd(max_groups, num_channels), num_channels, **kwargs)

    return make


def _resolve_norm_layer(norm_layer: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if callable(norm_layer):
        return norm_layer
    key = str(norm_layer).lower().replace("_", "")
    if key in ("groupnorm", "gn"):
        # timm's "groupnorm" fixes 32 groups, which K=8 stems cannot divide.
        return _group_norm_factory(32)
    try:
        return get_norm_layer(norm_layer)
    except Exception as exc:  # timm raises AssertionError/KeyError for unknown names
        raise ConfigError(
            f"mini-ResNet: unknown norm_layer {norm_layer!r} (try 'batchnorm', 'groupnorm', 'layernorm2d')"
        ) from exc


def _feature_map_size(img_size: int | Sequence[int]) -> tuple[int, int]:
    """Final map size: stem conv, max-pool and three stride-2 stages each halve with ceil."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"mini-ResNet: img_size must be an int or (H, W), got {img_size!r}")
    out = []
    for s in size:
        for _ in range(5):
            s = (s + 1) // 2
        out.append(s)
    return out[0], out[1]


class MiniResNet(nn.Module):
    """K-scaled residual network: stem (K) → max-pool → stages K, 2K, 4K, 8K.

    Build it with ``timm.create_model("milcell_mini_resnet", width=K, ...)``
    (or one of the ``_k8``/``_k32``/``_k64`` names) so that timm's
    ``features_only=True`` and pretrained-config handling apply.

    Parameters
    ----------
    width : int, default 32
        ``K``, the number of stem channels; stage ``i`` has ``K * 2**i`` channels.
    depths : sequence of 4 int, default (1, 1, 1, 1)
        Residual basic blocks per stage (``(2, 2, 2, 2)`` with ``K=64`` is ResNet-18).
    num_classes : int, default 1000
        Size of the linear classifier; 0 gives an identity head (features).
    in_chans : int, default 3
        Input channels.
    global_pool : str, default "avg"
        A timm pooling type ("avg", "max", "avgmax", "catavgmax") or "flatten",
        which flattens the final ``(8K, h, w)`` map into ``8K·h·w`` features
        (``h = w = 7`` at ``img_size=224``; inputs must then have that size).
    img_size : int or (int, int), default 224
        Input size; only used to size the flattened head.
    norm_layer : str or callable, default "batchnorm2d"
        Normalisation, any timm norm name, ``"groupnorm"`` (``gcd(32, C)`` groups)
        or a callable ``norm_layer(num_channels)``.
    act_layer : str or callable, default "relu"
        Activation (timm name or class).
    drop_rate : float, default 0.0
        Dropout before the classifier.
    drop_path_rate : float, default 0.0
        Stochastic depth: the largest probability of dropping a residual
        branch, rising linearly from 0 over the blocks (as timm's ResNets do);
        the "noise" of a Noisy Student student.
    zero_init_last : bool, default True
        Zero-initialise the last norm of each residual branch.

    Attributes
    ----------
    num_features : int
        Channels of the final map (``8K``), as in timm.
    head_hidden_size : int
        Size of the pooled (or flattened) features fed to the classifier.
    feature_info : list of dict
        ``num_chs``, ``reduction`` and ``module`` of the stem and of each stage.

    Examples
    --------
    >>> import torch
    >>> net = MiniResNet(width=8, num_classes=0, global_pool="flatten", img_size=64)
    >>> net(torch.rand(2, 3, 64, 64)).shape       # 8K * 2 * 2
    torch.Size([2, 256])
    >>> [f["num_chs"] for f in net.feature_info]
    [8, 8, 16, 32, 64]
    """

    def __init__(
        self,
        width: int = 32,
        depths: Sequence[int] = (1, 1, 1, 1),
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        img_size: int | Sequence[int] = 224,
        norm_layer: str | Callable[..., nn.Module] = "batchnorm2d",
        act_layer: str | Callable[..., nn.Module] = "relu",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if int(width) < 1:
            raise ConfigError(f"mini-ResNet: width (K) must be >= 1, got {width!r}")
        depths = tuple(int(d) for d in depths)
        if len(depths) != 4 or min(depths) < 1:
            raise ConfigError(f"mini-ResNet: depths must be 4 positive ints, got {depths!r}")
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ConfigError(f"mini-ResNet: drop_path_rate must lie in [0, 1), got {drop_path_rate!r}")
        n_blocks = sum(depths)
        drop_paths = [float(drop_path_rate) * b / max(n_blocks - 1, 1) for b in range(n_blocks)]
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.width = int(width)
        self.depths = depths
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.img_size = img_size
        self.grad_checkpointing = False
        norm = _resolve_norm_layer(norm_layer)
        act = get_act_layer(act_layer)

        k = self.width
        self.conv1 = nn.Conv2d(in_chans, k, kernel_size=7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = norm(k, **dd)
        self.act1 = act(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info: list[dict[str, Any]] = [dict(num_chs=k, reduction=2, module="act1")]

        inplanes, reduction = k, 4
        for i, (mult, stride, depth) in enumerate(zip(_STAGE_MULTS, _STAGE_STRIDES, depths, strict=True)):
            planes = k * mult
            blocks = []
            for j in range(depth):
                s = stride if j == 0 else 1
                downsample = None
                if s != 1 or inplanes != planes:
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes, kernel_size=1, stride=s, bias=False, **dd),
                        norm(planes, **dd),
                    )
                blocks.append(
                    BasicBlock(
                        inplanes,
                        planes,
                        stride=s,
                        downsample=downsample,
                        act_layer=act,
                        norm_layer=norm,
                        drop_path=DropPath(drop_paths.pop(0)) if drop_path_rate > 0 else None,
                        **dd,
                    )
                )
                inplanes = planes
            reduction *= stride
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=planes, reduction=reduction, module=f"layer{i + 1}"))

        self.num_features = inplanes
        self._build_head(global_pool, **dd)
        self._init_weights(zero_init_last)

    # ------------------------------------------------------------------ head
    def _build_head(self, global_pool: str, **dd: Any) -> None:
        if global_pool == "flatten":
            h, w = _feature_map_size(self.img_size)
            self.global_pool: nn.Module = nn.Flatten(1)
            self.head_hidden_size = self.num_features * h * w
            self.fc: nn.Module = (
                nn.Linear(self.head_hidden_size, self.num_classes, **dd)
                if self.num_classes > 0
                else nn.Identity()
            )
        else:
            try:
                self.global_pool, self.fc = create_classifier(
                    self.num_features, self.num_classes, pool_type=global_pool, **dd
                )
            except Exception as exc:
                raise ConfigError(
                    f"mini-ResNet: unknown global_pool {global_pool!r} (use 'avg', 'max', 'avgmax', "
                    "'catavgmax' or 'flatten')"
                ) from exc
            self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self._pool_type = global_pool

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    m.zero_init_last()

    # ------------------------------------------------------------ timm API
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Regexes grouping parameters into the stem and the stages (blocks when not ``coarse``)."""
        return dict(stem=r"^conv1|^bn1|^maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """The classifier module (``"fc"`` when ``name_only``)."""
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a new one of ``num_classes`` outputs (0 = identity).

        Parameters
        ----------
        num_classes : int
            New number of outputs.
        global_pool : str or None, default None
            New pooling type; ``None`` keeps the current one.
        """
        param = next(self.parameters())
        self.num_classes = num_classes
        self._build_head(self._pool_type if global_pool is None else global_pool)
        self.global_pool.to(device=param.device)
        self.fc.to(device=param.device, dtype=param.dtype)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → final map ``(B, 8K, ceil(H/32), ceil(W/32))``."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = timm.models.checkpoint_seq(stages, x, flatten=True)
        else:
            for stage in stages:
                x = stage(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool (or flatten) the map ``(B, 8K, h, w)`` → ``(B, head_hidden_size)``, then classify."""
        x = self.global_pool(x)
        if self._pool_type == "flatten" and x.shape[-1] != self.head_hidden_size:
            raise ShapeError(
                f"mini-ResNet with global_pool='flatten' was built for img_size={self.img_size!r} "
                f"({self.head_hidden_size} features) but the input gives {x.shape[-1]}"
            )
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → logits ``(B, num_classes)`` (features when ``num_classes=0``)."""
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "milcell_mini_resnet": _cfg(),
        "milcell_mini_resnet_k8": _cfg(),
        "milcell_mini_resnet_k32": _cfg(),
        "milcell_mini_resnet_k64": _cfg(),
    }
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> MiniResNet:
    return build_model_with_cfg(
        MiniResNet,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3, 4), feature_cls="list"),
        **kwargs,
    )


@register_model
def milcell_mini_resnet(pretrained: bool = False, width: int = 32, **kwargs: Any) -> MiniResNet:
    """Mini-ResNet with ``width=K`` stem channels (stages K, 2K, 4K, 8K).

    Examples
    --------
    >>> import timm, torch
    >>> timm.create_model("milcell_mini_resnet", width=4, num_classes=0)(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 32])
    """
    return _create("milcell_mini_resnet", pretrained, width=width, **kwargs)


@register_model
def milcell_mini_resnet_k8(pretrained: bool = False, **kwargs: Any) -> MiniResNet:
    """Tiny mini-ResNet, K = 8 (64 output features), for tests and quick tours."""
    return _create("milcell_mini_resnet_k8", pretrained, width=8, **kwargs)


@register_model
def milcell_mini_resnet_k32(pretrained: bool = False, **kwargs: Any) -> MiniResNet:
    """Mini-ResNet of the 2021 lymphocytosis report with K = 32 (256 output features)."""
    return _create("milcell_mini_resnet_k32", pretrained, width=32, **kwargs)


@register_model
def milcell_mini_resnet_k64(pretrained: bool = False, **kwargs: Any) -> MiniResNet:
    """Mini-ResNet of the 2021 lymphocytosis report with K = 64 (512 output features)."""
    return _create("milcell_mini_resnet_k64", pretrained, width=64, **kwargs)
