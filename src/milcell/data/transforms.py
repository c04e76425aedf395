"""Image transforms derived from a backbone's data configuration.

A *data config* is the small dict timm attaches to every model (what
``timm.data.resolve_model_data_config`` returns): ``input_size`` ``(C, H, W)``,
``mean``, ``std``, ``interpolation`` and ``crop_pct``. :func:`build_transforms`
turns it into a callable ``PIL.Image -> Tensor (C, H, W)`` built with
``torchvision.transforms.v2``, adding the augmentations of the blood-cell
reports for training: horizontal and vertical flips, rotation up to 180°, an
optional centre crop and optional colour jitter. The evaluation transform is
deterministic.

Random augmentations draw from torch's global generator; a
:class:`~torch.utils.data.DataLoader` seeds it in each worker from its own
base seed, so seed the loader (``generator=``) for repeatable runs.

Examples
--------
>>> from PIL import Image
>>> cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
>>> tf = build_transforms(cfg, train=True)
>>> tf(Image.new("RGB", (48, 40), "white")).shape
torch.Size([3, 32, 32])
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from milcell.exceptions import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BagAugment",
    "CenterCropFraction",
    "build_bag_transforms",
    "build_transforms",
    "default_transform",
    "resolve_data_config",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""ImageNet channel means, the default ``mean`` of a data config."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet channel standard deviations, the default ``std`` of a data config."""

# torchvision is imported by the functions that build transforms, not by ``import milcell``.
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def resolve_data_config(config: Mapping[str, Any] | nn.Module) -> dict[str, Any]:
    """Validate a data config and fill in defaults.

    Parameters
    ----------
    config : mapping or nn.Module
        A dict with some of ``input_size`` ``(C, H, W)``, ``mean``, ``std``,
        ``interpolation`` (``"nearest"``, ``"bilinear"`` or ``"bicubic"``) and
        ``crop_pct``; or a timm model, whose config is read with
        ``timm.data.resolve_model_data_config``.

    Returns
    -------
    dict
        ``input_size`` (tuple of 3 ints), ``mean`` and ``std`` (tuples of C
        floats), ``interpolation`` (str) and ``crop_pct`` (float in (0, 1]).
        Missing keys default to ``(3, 224, 224)``, ImageNet statistics,
        ``"bilinear"`` and ``1.0``.

    Raises
    ------
    ConfigError
        If a value has the wrong length, type or range; the message names the key.

    Examples
    --------
    >>> resolve_data_config({"input_size": (3, 64, 64)})["mean"]
    (0.485, 0.456, 0.406)
    >>> resolve_data_config({"input_size": (1, 64, 64), "mean": (0.5,), "std": (0.2,)})["std"]
    (0.2,)
    """
    if isinstance(config, nn.Module):
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(config)
    if not isinstance(config, Mapping):
        raise ConfigError(f"data config must be a mapping or an nn.Module, got {type(config).__name__}")
    size = config.get("input_size", (3, 224, 224))
    if (
        not isinstance(size, Sequence)
        or len(size) != 3
        or not all(isinstance(s, numbers.Integral) and int(s) > 0 for s in size)
    ):
        raise ConfigError(f"data config 'input_size' must be three positive ints (C, H, W), got {size!r}")
    channels = int(size[0])
    if channels not in (1, 3):
        raise ConfigError(f"data config 'input_size' must have 1 or 3 channels, got {channels}")
    default_mean = IMAGENET_MEAN if channels == 3 else (0.5,)
    default_std = IMAGENET_STD if channels == 3 else (0.5,)
    stats: dict[str, tuple[float, ...]] = {}
    for key, default in (("mean", default_mean), ("std", default_std)):
        value = config.get(key, default)
        if isinstance(value, numbers.Real):
            value = (float(value),) * channels
        if not isinstance(value, Sequence) or len(value) != channels:
            raise ConfigError(
                f"data config {key!r} must have {channels} values (one per channel), got {value!r}"
            )
        stats[key] = tuple(float(v) for v in value)
    if any(s <= 0 for s in stats["std"]):
        raise ConfigError(f"data config 'std' must be positive, got {stats['std']}")
    interpolation = config.get("interpolation", "bilinear") or "bilinear"
    if interpolation not in _INTERPOLATIONS:
        raise ConfigError(
            f"data config 'interpolation' must be one of {sorted(_INTERPOLATIONS)}, got {interpolation!r}"
        )
    crop_pct = config.get("crop_pct", 1.0)
    crop_pct = 1.0 if crop_pct is None else crop_pct
    if not isinstance(crop_pct, numbers.Real) or not 0.0 < float(crop_pct) <= 1.0:
        raise ConfigError(f"data config 'crop_pct' must be in (0, 1], got {crop_pct!r}")
    return {
        "input_size": tuple(int(s) for s in size),
        "mean": stats["mean"],
        "std": stats["std"],
        "interpolation": str(interpolation),
        "crop_pct": float(crop_pct),
    }


class CenterCropFraction(nn.Module):
    """Crop the centre of an image, keeping a fraction of each side.

    Parameters
    ----------
    fraction : float
        In (0, 1]; ``0.875`` keeps the central 87.5 % of the height and of the width.

    Examples
    --------
    >>> import torch
    >>> CenterCropFraction(0.5)(torch.zeros(3, 40, 20)).shape
    torch.Size([3, 20, 10])
    """

    def __init__(self, fraction: float) -> None:
        super().__init__()
        if not isinstance(fraction, numbers.Real) or not 0.0 < float(fraction) <= 1.0:
            raise ConfigError(f"center_crop fraction must be in (0, 1], got {fraction!r}")
        self.fraction: float = float(fraction)

    def forward(self, image: Any) -> Any:
        """Crop ``image`` (a tensor ``(C, H, W)`` or a PIL image)."""
        from torchvision.transforms.v2 import functional as F

        height, width = F.get_size(image)
        size = [max(1, round(height * self.fraction)), max(1, round(width * self.fraction))]
        return F.center_crop(image, size)

    def extra_repr(self) -> str:
        return f"fraction={self.fraction}"


def _center_crop(center_crop: int | float | Sequence[int] | str | None, crop_pct: float) -> nn.Module | None:
    from torchvision.transforms import v2

    if center_crop is None:
        return None
    if center_crop == "config":
        return CenterCropFraction(crop_pct) if crop_pct < 1.0 else None
    if isinstance(center_crop, bool):
        raise ConfigError(
            f"center_crop must be None, 'config', a fraction, or a pixel size, got {center_crop!r}"
        )
    if isinstance(center_crop, numbers.Integral):
        if center_crop <= 0:
            raise ConfigError(f"center_crop pixel size must be positive, got {center_crop}")
        return v2.CenterCrop(int(center_crop))
    if isinstance(center_crop, numbers.Real):
        return CenterCropFraction(float(center_crop))
    if (
        isinstance(center_crop, Sequence)
        and not isinstance(center_crop, str)
        and len(center_crop) == 2
        and all(isinstance(s, numbers.Integral) and s > 0 for s in center_crop)
    ):
        return v2.CenterCrop([int(s) for s in center_crop])
    raise ConfigError(f"center_crop must be None, 'config', a fraction, or a pixel size, got {center_crop!r}")


def _to_size_steps(
    cfg: Mapping[str, Any], center_crop: int | float | Sequence[int] | str | None
) -> list[Any]:
    """The deterministic start of every pipeline: image to tensor, optional centre crop, resize."""
    from torchvision.transforms import InterpolationMode, v2

    _, height, width = cfg["input_size"]
    steps: list[Any] = [v2.ToImage()]
    crop = _center_crop(center_crop, cfg["crop_pct"])
    if crop is not None:
        steps.append(crop)
    steps.append(
        v2.Resize((height, width), interpolation=InterpolationMode(cfg["interpolation"]), antialias=True)
    )
    return steps


def build_transforms(
    data_config: Mapping[str, Any] | nn.Module,
    train: bool,
    *,
    hflip: bool = True,
    vflip: bool = True,
    rotation: float = 180.0,
    center_crop: int | float | Sequence[int] | str | None = None,
    color_jitter: float = 0.0,
    normalize: bool = True,
) -> Callable[[Image.Image], Tensor]:
    """Training or evaluation transform for a backbone's data config.

    The pipeline is: image to tensor, optional centre crop (on the original
    image), resize to ``(H, W)`` of ``input_size`` with the config's
    interpolation, then for training only random horizontal/vertical flips,
    random rotation and colour jitter, then conversion to float in [0, 1] and
    normalisation with ``mean``/``std``. The whole cell is kept: images are
    resized, not randomly cropped.

    Parameters
    ----------
    data_config : mapping or nn.Module
        See :func:`resolve_data_config`.
    train : bool
        Add the random augmentations. ``False`` gives a deterministic transform.
    hflip, vflip : bool, default True
        Random horizontal / vertical flip with probability 0.5 (training only).
    rotation : float, default 180.0
        Random rotation in ``[-rotation, rotation]`` degrees (training only);
        corners are filled with black. ``0`` disables it.
    center_crop : None, int, (int, int), float or "config", default None
        Centre crop applied before resizing, in training and evaluation: a pixel
        size, a fraction of each side in (0, 1], or ``"config"`` to use the
        config's ``crop_pct``. ``None`` keeps the whole image.
    color_jitter : float, default 0.0
        Strength of a random brightness/contrast/saturation change (training
        only); ``0`` disables it.
    normalize : bool, default True
        Subtract ``mean`` and divide by ``std``. Without it the output is in [0, 1].

    Returns
    -------
    callable
        ``PIL.Image (or uint8 tensor (C, H, W)) -> float32 Tensor (C, H, W)``.

    Raises
    ------
    ConfigError
        If an argument or the data config is invalid; the message names it.

    Examples
    --------
    >>> import torch
    >>> from PIL import Image
    >>> cfg = {"input_size": (3, 16, 16), "mean": (0.0,) * 3, "std": (1.0,) * 3}
    >>> tf = build_transforms(cfg, train=False)
    >>> x = tf(Image.new("RGB", (40, 30), (255, 0, 0)))
    >>> x.shape, x.dtype, x[0].mean().item(), x[1].max().item()
    (torch.Size([3, 16, 16]), torch.float32, 1.0, 0.0)
    >>> torch.equal(tf(Image.new("RGB", (40, 30))), tf(Image.new("RGB", (40, 30))))
    True
    """
    from torchvision.transforms import v2

    cfg = resolve_data_config(data_config)
    if not isinstance(rotation, numbers.Real) or isinstance(rotation, bool) or not 0 <= rotation <= 180:
        raise ConfigError(f"rotation must be a number of degrees in [0, 180], got {rotation!r}")
    if not isinstance(color_jitter, numbers.Real) or isinstance(color_jitter, bool) or color_jitter < 0:
        raise ConfigError(f"color_jitter must be a non-negative number, got {color_jitter!r}")
    channels = cfg["input_size"][0]
    steps = _to_size_steps(cfg, center_crop)
    if train:
        if hflip:
            steps.append(v2.RandomHorizontalFlip(0.5))
        if vflip:
            steps.append(v2.RandomVerticalFlip(0.5))
        if rotation > 0:
            steps.append(v2.RandomRotation(float(rotation)))
        if color_jitter > 0:
            steps.append(
                v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
            )
    if channels == 1:
        steps.append(v2.Grayscale(1))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if normalize:
        steps.append(v2.Normalize(mean=list(cfg["mean"]), std=list(cfg["std"])))
    return v2.Compose(steps)


class BagAugment:
    """Flips, rotation and normalisation of every instance of a bag in one call.

    ``(N, C, H, W) -> (N, C, H, W)`` float32. Each instance gets its own random
    horizontal/vertical flip (probability 0.5 each) and rotation angle, uniform in
    ``[-rotation, rotation]`` degrees, applied together as one affine resampling
    (bilinear, corners filled with black) of the whole bag: the same augmentation
    as :func:`build_transforms` per image, about 15 times cheaper for small cells.
    ``uint8`` input is scaled to [0, 1] first; then ``mean``/``std`` normalise.
    Random numbers come from torch's global generator, as for the per-image
    transforms.

    Parameters
    ----------
    hflip, vflip : bool, default False
        Random horizontal / vertical flips.
    rotation : float, default 0.0
        Largest rotation in degrees, in [0, 180]; ``0`` disables it.
    quarter_turns : bool, default False
        Rotate by a random multiple of 90° instead (lossless on square images:
        with both flips, the eight symmetries of the square); ``rotation`` is
        then ignored.
    mean, std : sequence of float or None
        Per-channel normalisation; ``None`` leaves values in [0, 1].

    Examples
    --------
    >>> import torch
    >>> bag = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    >>> BagAugment(mean=(0.5,) * 3, std=(0.5,) * 3)(bag)[0, 0, 0, 0].item()  # (0 - 0.5) / 0.5
    -1.0
    >>> BagAugment(hflip=True, vflip=True, rotation=180.0)(bag.float()).shape
    torch.Size([4, 3, 8, 8])
    """

    def __init__(
        self,
        *,
        hflip: bool = False,
        vflip: bool = False,
        rotation: float = 0.0,
        quarter_turns: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if not isinstance(rotation, numbers.Real) or isinstance(rotation, bool) or not 0 <= rotation <= 180:
            raise ConfigError(f"rotation must be a number of degrees in [0, 180], got {rotation!r}")
        if (mean is None) != (std is None):
            raise ConfigError("BagAugment: pass both mean and std, or neither")
        self.hflip: bool = bool(hflip)
        self.vflip: bool = bool(vflip)
        self.rotation: float = float(rotation)
        self.quarter_turns: bool = bool(quarter_turns)
        self.mean: Tensor | None = (
            None if mean is None else torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1)
        )
        self.std: Tensor | None = (
            None if std is None else torch.tensor([float(v) for v in std]).view(1, -1, 1, 1)
        )
        if self.std is not None and not bool((self.std > 0).all()):
            raise ConfigError(f"BagAugment: std must be positive, got {list(std or ())}")

    @property
    def random(self) -> bool:
        """Whether the augmentation draws random numbers (any flip or a rotation)."""
        return self.hflip or self.vflip or self.rotation > 0 or self.quarter_turns

    def __repr__(self) -> str:
        return (
            f"BagAugment(hflip={self.hflip}, vflip={self.vflip}, rotation={self.rotation}, "
            f"quarter_turns={self.quarter_turns}, normalize={self.mean is not None})"
        )

    def __call__(self, instances: Tensor) -> Tensor:
        import math

        import torch.nn.functional as F

        if instances.ndim != 4:
            raise ConfigError(
                f"BagAugment expects (N, C, H, W) instances, got shape {tuple(instances.shape)}"
            )
        x = instances.float() / 255.0 if instances.dtype == torch.uint8 else instances.float()
        n = x.shape[0]
        if self.random and n > 0:
            if self.quarter_turns:
                angle = torch.randint(0, 4, (n,)).float() * (math.pi / 2.0)
            else:
                angle = (torch.rand(n) * 2.0 - 1.0) * (self.rotation * math.pi / 180.0)
            flip_x = torch.where(torch.rand(n) < 0.5, -1.0, 1.0) if self.hflip else torch.ones(n)
            flip_y = torch.where(torch.rand(n) < 0.5, -1.0, 1.0) if self.vflip else torch.ones(n)
            cos, sin = torch.cos(angle), torch.sin(angle)
            zero = torch.zeros(n)
            # output pixel (u, v) samples input R(angle) @ diag(flip_x, flip_y) @ (u, v)
            theta = torch.stack(
                [
                    torch.stack([cos * flip_x, -sin * flip_y, zero], 1),
                    torch.stack([sin * flip_x, cos * flip_y, zero], 1),
                ],
                1,
            ).to(x.device)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x


def build_bag_transforms(
    data_config: Mapping[str, Any] | nn.Module,
    train: bool,
    *,
    hflip: bool = True,
    vflip: bool = True,
    rotation: float = 180.0,
    quarter_turns: bool = False,
    center_crop: int | float | Sequence[int] | str | None = None,
) -> tuple[Callable[[Image.Image], Tensor], BagAugment]:
    """The transforms of :func:`build_transforms`, split into a per-image and a per-bag part.

    The per-image part is deterministic (image to ``uint8`` tensor, optional centre crop,
    resize), so a dataset may cache its output
    (:class:`~milcell.data.BagDataset` ``cache_images=True``); the per-bag part
    (:class:`BagAugment`) adds the random flips and rotation for training and normalises.
    Together they give what :func:`build_transforms` gives (without colour jitter);
    ``quarter_turns=True`` rotates by multiples of 90° instead (see :class:`BagAugment`).

    Returns
    -------
    instance_transform : callable
        ``PIL.Image -> uint8 Tensor (C, H, W)``.
    bag_transform : BagAugment
        ``(N, C, H, W) -> float32 (N, C, H, W)``.

    Examples
    --------
    >>> import torch
    >>> from PIL import Image
    >>> cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    >>> per_image, per_bag = build_bag_transforms(cfg, train=False)
    >>> img = Image.new("RGB", (40, 30), (255, 0, 0))
    >>> x = per_bag(torch.stack([per_image(img)]))
    >>> torch.allclose(x[0], build_transforms(cfg, train=False)(img))
    True
    """
    from torchvision.transforms import v2

    cfg = resolve_data_config(data_config)
    channels = cfg["input_size"][0]
    steps = _to_size_steps(cfg, center_crop)
    if channels == 1:
        steps.append(v2.Grayscale(1))
    augment = BagAugment(
        hflip=train and hflip,
        vflip=train and vflip,
        rotation=float(rotation) if train else 0.0,
        quarter_turns=train and quarter_turns,
        mean=cfg["mean"],
        std=cfg["std"],
    )
    return v2.Compose(steps), augment


def default_transform() -> Callable[[Image.Image], Tensor]:
    """The transform datasets use when none is given: image to float32 in [0, 1].

    No resizing and no normalisation; the output keeps the image size.

    Returns
    -------
    callable
        ``PIL.Image -> float32 Tensor (C, H, W)`` with values in [0, 1].

    Examples
    --------
    >>> from PIL import Image
    >>> x = default_transform()(Image.new("RGB", (5, 4), (255, 255, 255)))
    >>> x.shape, x.max().item()
    (torch.Size([3, 4, 5]), 1.0)
    """
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
