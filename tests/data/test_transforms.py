"""Tests for milcell.data.transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from milcell.data.transforms import (
    IMAGENET_MEAN,
    CenterCropFraction,
    build_transforms,
    default_transform,
    resolve_data_config,
)
from milcell.exceptions import ConfigError


def _gradient(width: int = 48, height: int = 40) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def test_resolve_data_config_defaults_and_timm_model() -> None:
    cfg = resolve_data_config({})
    assert cfg == {
        "input_size": (3, 224, 224),
        "mean": IMAGENET_MEAN,
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    assert resolve_data_config({"mean": 0.5, "input_size": [3, 8, 8]})["mean"] == (0.5, 0.5, 0.5)
    model = torch.nn.Linear(2, 2)
    model.pretrained_cfg = {"input_size": (3, 64, 64), "interpolation": "bicubic", "crop_pct": 0.9}  # as timm
    from_model = resolve_data_config(model)
    assert from_model["crop_pct"] == 0.9 and from_model["mean"] == IMAGENET_MEAN
    assert from_model["interpolation"] == "bicubic" and from_model["input_size"] == (3, 64, 64)


def test_eval_transform_is_deterministic_and_normalised() -> None:
    cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    tf = build_transforms(cfg, train=False)
    img = _gradient()
    x = tf(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, tf(img))
    raw = build_transforms(cfg, train=False, normalize=False)(img)
    assert float(raw.min()) >= 0.0 and float(raw.max()) <= 1.0
    torch.testing.assert_close(x, (raw - 0.5) / 0.25)


def test_train_transform_randomness_follows_torch_seed() -> None:
    cfg = {"input_size": (3, 32, 32)}
    tf = build_transforms(cfg, train=True, color_jitter=0.2)
    img = _gradient()
    torch.manual_seed(1)
    a = tf(img)
    torch.manual_seed(1)
    b = tf(img)
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    outs = {tf(img).sum().item() for _ in range(6)}
    assert len(outs) > 1


def test_flips_only_produce_flipped_versions() -> None:
    cfg = {"input_size": (3, 16, 16), "mean": (0.0,) * 3, "std": (1.0,) * 3}
    tf = build_transforms(cfg, train=True, rotation=0)
    base = build_transforms(cfg, train=False)(_gradient())
    allowed = [base, base.flip(-1), base.flip(-2), base.flip(-1).flip(-2)]
    seen = set()
    for _ in range(30):
        x = tf(_gradient())
        match = [i for i, ref in enumerate(allowed) if torch.equal(x, ref)]
        assert match
        seen.add(match[0])
    assert len(seen) == 4
    no_aug = build_transforms(cfg, train=True, hflip=False, vflip=False, rotation=0)
    assert torch.equal(no_aug(_gradient()), base)


def test_center_crop_options() -> None:
    img = Image.new("RGB", (40, 40), (0, 0, 0))
    img.paste((255, 255, 255), (10, 10, 30, 30))  # white centre 20x20
    cfg = {"input_size": (3, 8, 8), "mean": (0.0,) * 3, "std": (1.0,) * 3, "crop_pct": 0.5}
    for crop in (20, (20, 20), 0.5, "config"):
        x = build_transforms(cfg, train=False, center_crop=crop)(img)
        assert x.shape == (3, 8, 8) and x.min().item() == pytest.approx(1.0), crop
    whole = build_transforms(cfg, train=False)(img)
    assert whole.min().item() == pytest.approx(0.0)
    assert CenterCropFraction(0.25)(torch.zeros(3, 8, 4)).shape == (3, 2, 1)


def test_grayscale_config_and_default_transform() -> None:
    x = build_transforms({"input_size": (1, 12, 12)}, train=True)(_gradient())
    assert x.shape == (1, 12, 12)
    y = default_transform()(_gradient(7, 5))
    assert y.shape == (3, 5, 7) and y.dtype == torch.float32 and float(y.max()) <= 1.0


def test_transform_errors() -> None:
    with pytest.raises(ConfigError, match="data config must be a mapping or an nn.Module, got int"):
        resolve_data_config(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'input_size' must be three positive ints"):
        resolve_data_config({"input_size": (224, 224)})
    with pytest.raises(ConfigError, match="'input_size' must have 1 or 3 channels, got 4"):
        resolve_data_config({"input_size": (4, 8, 8)})
    with pytest.raises(ConfigError, match="'mean' must have 3 values"):
        resolve_data_config({"mean": (0.5, 0.5)})
    with pytest.raises(ConfigError, match="'std' must be positive"):
        resolve_data_config({"std": (0.0, 1.0, 1.0)})
    with pytest.raises(ConfigError, match="'interpolation' must be one of"):
        resolve_data_config({"interpolation": "lanczos"})
    with pytest.raises(ConfigError, match=r"'crop_pct' must be in \(0, 1\]"):
        resolve_data_config({"crop_pct": 1.5})
    cfg = {"input_size": (3, 8, 8)}
    with pytest.raises(ConfigError, match=r"rotation must be a number of degrees in \[0, 180\]"):
        build_transforms(cfg, train=True, rotation=270)
    with pytest.raises(ConfigError, match="color_jitter must be a non-negative number"):
        build_transforms(cfg, train=True, color_jitter=-0.1)
    with pytest.raises(ConfigError, match="center_crop must be None, 'config'"):
        build_transforms(cfg, train=False, center_crop="middle")
    with pytest.raises(ConfigError, match="center_crop must be None, 'config'"):
        build_transforms(cfg, train=False, center_crop=True)
    with pytest.raises(ConfigError, match="center_crop pixel size must be positive"):
        build_transforms(cfg, train=False, center_crop=0)
    with pytest.raises(ConfigError, match=r"center_crop fraction must be in \(0, 1\]"):
        build_transforms(cfg, train=False, center_crop=1.5)


@pytest.mark.parametrize("name", ["nearest", "bilinear", "bicubic"])
def test_interpolation_name_selects_the_torchvision_mode(name: str) -> None:
    from torchvision.transforms import InterpolationMode, v2

    tf = build_transforms({"input_size": (3, 8, 8), "interpolation": name}, train=False)
    (resize,) = [t for t in tf.transforms if isinstance(t, v2.Resize)]
    assert resize.interpolation is getattr(InterpolationMode, name.upper())
    assert resize.size == [8, 8]


def test_unhashable_interpolation_is_a_config_error() -> None:
    # It used to escape as a TypeError from the dict lookup of the interpolation modes.
    with pytest.raises(ConfigError, match="'interpolation' must be one of"):
        resolve_data_config({"interpolation": ["bilinear"]})
