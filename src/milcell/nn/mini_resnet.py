"""The K-scaled mini-ResNet of the 2021 lymphocytosis report, registered with timm.

A 7×7 stride-2 stem convolution with ``K`` channels, a 3×3 stride-2 max-pool,
then four stages of residual basic blocks with ``K, 2K, 4K, 8K`` channels and
strides ``1, 2, 2, 2`` (overall stride 32), then either global average pooling
(the default) or a flattening of the final map (``global_pool="flatten"``: at
a 224 px input the map is ``7 × 7 × 8K``).

Importing this module registers the architectures in timm's model registry,
so :func:`timm.create_model` builds them and they behave like any timm model
(``forward_features``, ``forward_head``, ``forward_intermediates``,
``prune_intermediate_layers``, ``reset_classifier``, ``init_weights``,
``set_grad_checkpointing``, ``group_matcher``, ``feature_info`` and
``features_only=True``), and they compile with :func:`torch.jit.script` and
trace with :func:`torch.fx.symbolic_trace` (whose graph scripts as well):

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
>>> net = timm.create_model("milcell_mini_resnet_k8", num_classes=2).eval()
>>> net(torch.rand(3, 3, 32, 32)).shape
torch.Size([3, 2])
>>> net.forward_features(torch.rand(1, 3, 64, 64)).shape   # (B, 8K, H/32, W/32)
torch.Size([1, 64, 2, 2])
>>> x = torch.rand(2, 3, 64, 64)
>>> torch.equal(torch.jit.script(net)(x), net(x))
True
"""

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.fx
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, create_classifier, get_act_layer, get_norm_layer
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock
from torch import Tensor, nn

from milcell._validation import check_int, check_real
from milcell.exceptions import ConfigError, ShapeError

__all__ = ["MiniResNet"]

_STAGE_STRIDES = (1, 2, 2, 2)
_STAGE_MULTS = (1, 2, 4, 8)
_STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")


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
        return cast(Callable[..., nn.Module], get_norm_layer(norm_layer))
    except Exception as exc:  # timm raises AssertionError/KeyError for unknown names
        raise ConfigError(
            f"mini-ResNet: unknown norm_layer {norm_layer!r} (try 'batchnorm', 'groupnorm', 'layernorm2d')"
        ) from exc


def _feature_map_size(img_size: int | Sequence[int]) -> tuple[int, int]:
    """Final map size: stem conv, max-pool and three stride-2 stages each halve with ceil."""
    if isinstance(img_size, numbers.Integral) and not isinstance(img_size, bool):
        size: tuple[int, ...] = (int(img_size), int(img_size))
    elif isinstance(img_size, Sequence) and all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in img_size
    ):
        size = tuple(int(s) for s in img_size)
    else:
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"mini-ResNet: img_size must be an int or (H, W), got {img_size!r}")
    out = []
    for s in size:
        for _ in range(5):
            s = (s + 1) // 2
        out.append(s)
    return out[0], out[1]


@torch.fx.wrap
def _check_flat_features(x: Tensor, expected: int, img_size: str) -> Tensor:
    """Raise :class:`ShapeError` unless the flattened map ``x`` has ``expected`` features.

    Wrapped for FX (kept as one call in a traced graph) and scriptable.
    """
    if x.shape[-1] != expected:
        raise ShapeError(
            f"mini-ResNet with global_pool='flatten' was built for img_size={img_size} "
            f"({expected} features) but the input gives {x.shape[-1]}"
        )
    return x


class MiniResNet(nn.Module):
    """K-scaled residual network: stem (K) → max-pool → stages K, 2K, 4K, 8K.

    Build it with ``timm.create_model("milcell_mini_resnet", width=K, ...)``
    (or one of the ``_k8``/``_k32``/``_k64`` names) so that timm's
    ``features_only=True`` and pretrained-config handling apply.

    The model is TorchScript- and FX-compatible: ``torch.jit.script(net)``,
    ``torch.fx.symbolic_trace(net)`` and scripting the traced graph all give
    the eager outputs.

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
        A timm pooling type ("avg", "max", "avgmax", "catavgmax", or "" for
        none: the head then returns the map) or "flatten", which flattens the
        final ``(8K, h, w)`` map into ``8K·h·w`` features (``h = w = 7`` at
        ``img_size=224``; inputs must then have that size).
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
    device, dtype : optional
        Where and in which dtype to create the parameters.

    Attributes
    ----------
    num_features : int
        Channels of the final map (``8K``), as in timm.
    head_hidden_size : int
        Size of the pooled (or flattened) features fed to the classifier.
    feature_info : list of dict
        ``num_chs``, ``reduction`` and ``module`` of the stem and of each stage
        (the five taps of :meth:`forward_intermediates`).

    Examples
    --------
    >>> import torch
    >>> net = MiniResNet(width=8, num_classes=0, global_pool="flatten", img_size=64)
    >>> net(torch.rand(2, 3, 64, 64)).shape       # 8K * 2 * 2
    torch.Size([2, 256])
    >>> [f["num_chs"] for f in net.feature_info]
    [8, 8, 16, 32, 64]
    """

    grad_checkpointing: bool
    num_classes: int
    num_features: int
    head_hidden_size: int
    drop_rate: float
    feature_info: list[dict[str, Any]]

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
        width = check_int(width, "mini-ResNet width (K)", low=1)
        try:
            items = () if isinstance(depths, (str, bytes)) else tuple(depths)
        except TypeError:
            items = ()
        if len(items) != 4:
            raise ConfigError(f"mini-ResNet: depths must be 4 positive ints, got {depths!r}")
        stage_depths = tuple(check_int(d, "mini-ResNet depths[i]", low=1) for d in items)
        num_classes = check_int(num_classes, "mini-ResNet num_classes", low=0)
        in_chans = check_int(in_chans, "mini-ResNet in_chans", low=1)
        drop_rate = check_real(drop_rate, "mini-ResNet drop_rate", low=0.0, high=1.0, high_open=True)
        drop_path_rate = check_real(
            drop_path_rate, "mini-ResNet drop_path_rate", low=0.0, high=1.0, high_open=True
        )
        n_blocks = sum(stage_depths)
        drop_paths = [drop_path_rate * b / max(n_blocks - 1, 1) for b in range(n_blocks)]
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        self.width = width
        self.depths = stage_depths
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
        self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=k, reduction=2, module="act1")]

        inplanes, reduction = k, 4
        stages = []
        for i, (mult, stride, depth) in enumerate(
            zip(_STAGE_MULTS, _STAGE_STRIDES, stage_depths, strict=True)
        ):
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
                rate = drop_paths.pop(0)
                blocks.append(
                    BasicBlock(
                        inplanes,
                        planes,
                        stride=s,
                        downsample=downsample,
                        act_layer=act,
                        # timm annotates a class; any callable norm_layer(num_channels) works
                        norm_layer=cast(type[nn.Module], norm),
                        drop_path=DropPath(rate) if drop_path_rate > 0 else None,
                        **dd,
                    )
                )
                inplanes = planes
            reduction *= stride
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=planes, reduction=reduction, module=_STAGE_NAMES[i]))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.num_features = inplanes
        self._build_head(global_pool, **dd)
        self.init_weights(zero_init_last=zero_init_last)

    # ------------------------------------------------------------------ head
    def _build_head(
        self, global_pool: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
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
                pool, self.fc = create_classifier(
                    self.num_features, self.num_classes, pool_type=global_pool, **dd
                )
            except Exception as exc:
                raise ConfigError(
                    f"mini-ResNet: unknown global_pool {global_pool!r} (use 'avg', 'max', 'avgmax', "
                    "'catavgmax', 'flatten' or '' for none)"
                ) from exc
            self.global_pool = pool
            self.head_hidden_size = self.num_features * int(pool.feat_mult())
        self._pool_type = global_pool
        # read by forward_head: plain attributes keep it scriptable and FX-traceable
        self._flatten = global_pool == "flatten"
        self._img_size_text = repr(self.img_size)

    def init_weights(self, zero_init_last: bool = True) -> None:
        """(Re-)initialise the weights as timm's ResNet does.

        Convolutions get Kaiming-normal weights (``fan_out``, ReLU gain); norm
        layers and the classifier keep their PyTorch defaults.

        Parameters
        ----------
        zero_init_last : bool, default True
            Zero the last norm of each residual branch, so each block starts as
            the identity.

        Examples
        --------
        >>> import torch
        >>> net = MiniResNet(width=4, num_classes=0)
        >>> net.init_weights(zero_init_last=True)
        >>> bool((net.layer1[0].bn2.weight == 0).all())
        True
        """
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
        self.num_classes = check_int(num_classes, "num_classes", low=0)
        self._build_head(self._pool_type if global_pool is None else global_pool)
        self.global_pool.to(device=param.device)
        self.fc.to(device=param.device, dtype=param.dtype)
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Forward features and return the intermediate maps, as timm's ResNet does.

        The five taps are those of ``feature_info``: the stem activation
        (index 0, before the max-pool, stride 2) and the outputs of the four
        stages (indices 1-4, strides 4, 8, 16, 32).

        Parameters
        ----------
        x : Tensor
            Images ``(B, C, H, W)``.
        indices : int, sequence of int or None, default None
            ``None``: all five taps; an int ``n``: the last ``n``; a sequence:
            those indices (negative ones count from the end).
        norm : bool, default False
            Accepted for timm compatibility; the network has no final norm.
        stop_early : bool, default False
            Stop after the last requested tap (the returned final map is then
            that tap, not ``forward_features(x)``).
        output_fmt : {"NCHW"}, default "NCHW"
            Layout of the intermediates.
        intermediates_only : bool, default False
            Return only the list of intermediates.

        Returns
        -------
        (Tensor, list of Tensor) or list of Tensor
            The final map ``(B, 8K, h, w)`` and the intermediates, each
            ``(B, feature_info[i]["num_chs"], H / reduction, W / reduction)``
            (sizes rounded up); only the list when ``intermediates_only``.

        Raises
        ------
        ConfigError
            For an ``output_fmt`` other than "NCHW" or out-of-range ``indices``.

        Examples
        --------
        >>> import timm, torch
        >>> net = timm.create_model("milcell_mini_resnet_k8", num_classes=0).eval()
        >>> final, maps = net.forward_intermediates(torch.rand(1, 3, 64, 64))
        >>> [tuple(m.shape) for m in maps]
        [(1, 8, 32, 32), (1, 8, 16, 16), (1, 16, 8, 8), (1, 32, 4, 4), (1, 64, 2, 2)]
        >>> torch.equal(final, maps[-1])
        True
        """
        if output_fmt != "NCHW":
            raise ConfigError(f"forward_intermediates: output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = self._take_indices(indices)
        intermediates: list[Tensor] = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stage_names = _STAGE_NAMES[:max_index] if stop_early else _STAGE_NAMES
        for feat_idx, stage_name in enumerate(stage_names, start=1):
            stage = getattr(self, stage_name)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def _take_indices(self, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
        n_taps = len(self.feature_info)
        if indices is not None and not (
            isinstance(indices, numbers.Integral) and not isinstance(indices, bool)
        ):
            if not isinstance(indices, (list, tuple)) or not indices:
                raise ConfigError(
                    f"indices must be None, an int or a non-empty list of ints, got {indices!r}"
                )
            indices = [check_int(i, "indices[i]", low=-n_taps, high=n_taps - 1) for i in indices]
        elif indices is not None:
            indices = check_int(indices, "indices (the last n taps)", low=1, high=n_taps)
        # the rule of timm's feature_take_indices: None = all, n = the last n, negatives from the end
        if indices is None:
            take_indices = list(range(n_taps))
        elif isinstance(indices, int):
            take_indices = list(range(n_taps - indices, n_taps))
        else:
            take_indices = [i + n_taps if i < 0 else i for i in indices]
        return take_indices, max(take_indices)

    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the layers that the requested intermediates do not need, as timm's ResNet does.

        Stages after the last requested tap become empty ``nn.Sequential``;
        if that tap is not the last stage, ``num_features`` and
        ``head_hidden_size`` become its channels and the head is removed.

        Parameters
        ----------
        indices : int or sequence of int, default 1
            The taps to keep, as in :meth:`forward_intermediates`.
        prune_norm : bool, default False
            Accepted for timm compatibility; the network has no final norm.
        prune_head : bool, default True
            Remove the classifier and pooling (``reset_classifier(0, "")``).

        Returns
        -------
        list of int
            The absolute indices kept.

        Examples
        --------
        >>> import timm, torch
        >>> net = timm.create_model("milcell_mini_resnet_k8").eval()
        >>> net.prune_intermediate_layers([1, 2])
        [1, 2]
        >>> net.layer3, net.num_features
        (Sequential(), 16)
        >>> [tuple(m.shape) for m in net.forward_intermediates(torch.rand(1, 3, 64, 64), [1, 2])[1]]
        [(1, 8, 16, 16), (1, 16, 8, 8)]
        """
        take_indices, max_index = self._take_indices(indices)
        for stage_name in _STAGE_NAMES[max_index:]:
            setattr(self, stage_name, nn.Sequential())  # empty, so checkpoint_seq can still iterate
        if max_index == 0:
            self.maxpool = nn.Identity()
        prune_end = max_index < len(_STAGE_NAMES)
        if prune_end:
            self.num_features = self.head_hidden_size = int(self.feature_info[max_index]["num_chs"])
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → final map ``(B, 8K, ceil(H/32), ceil(W/32))``."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.maxpool(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool (or flatten) the map ``(B, 8K, h, w)`` → ``(B, head_hidden_size)``, then classify."""
        x = self.global_pool(x)
        if self._flatten:
            x = _check_flat_features(x, self.head_hidden_size, self._img_size_text)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` → logits ``(B, num_classes)`` (features when ``num_classes=0``)."""
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


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
