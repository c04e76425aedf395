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


# ----------------------------------------------------------------------------- bag-level augmentation


def test_bag_augment_flips_each_instance_independently_and_exactly() -> None:
    from milcell.data.transforms import BagAugment

    torch.manual_seed(0)
    bag = torch.rand(64, 3, 8, 8)
    out = BagAugment(hflip=True)(bag)
    same = [torch.allclose(o, b, atol=1e-6) for o, b in zip(out, bag, strict=True)]
    mirrored = [torch.allclose(o, b.flip(-1), atol=1e-6) for o, b in zip(out, bag, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))  # each one or the other, exactly
    assert 10 < sum(mirrored) < 54  # per instance, not one coin for the whole bag


def test_bag_augment_rotation_keeps_the_centre_and_fills_corners_black() -> None:
    from milcell.data.transforms import BagAugment

    torch.manual_seed(1)
    white = torch.ones(32, 3, 9, 9)
    out = BagAugment(rotation=180.0)(white)
    assert torch.allclose(out[:, :, 4, 4], torch.ones(32, 3), atol=1e-5)  # the centre pixel stays
    corners = out[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners < 0.5).any()  # rotated corners are filled with black, as v2.RandomRotation does
    angles_differ = not torch.allclose(out[0], out[1])
    assert angles_differ


def test_bag_augment_matches_the_per_image_pipeline_without_augmentation() -> None:
    from milcell.data.transforms import build_bag_transforms

    cfg = {"input_size": (3, 16, 16), "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.3, 0.4)}
    per_image, per_bag = build_bag_transforms(cfg, train=False)
    images = [Image.new("RGB", (20 + i, 18), (10 * i, 100, 200 - i)) for i in range(3)]
    bagged = per_bag(torch.stack([per_image(im) for im in images]))
    reference = torch.stack([build_transforms(cfg, train=False)(im) for im in images])
    torch.testing.assert_close(bagged, reference)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rotation": 200}, "rotation must be"),
        ({"mean": (0.5,)}, "both mean and std"),
        ({"mean": (0.5,), "std": (0.0,)}, "std must be positive"),
    ],
)
def test_bag_augment_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    from milcell.data.transforms import BagAugment

    with pytest.raises(ConfigError, match=match):
        BagAugment(**kwargs)


def test_bag_augment_quarter_turns_are_the_eight_symmetries_of_the_square() -> None:
    from milcell.data.transforms import BagAugment

    torch.manual_seed(2)
    bag = torch.rand(1, 3, 6, 6).expand(48, -1, -1, -1).contiguous()
    out = BagAugment(hflip=True, vflip=True, quarter_turns=True)(bag)
    image = bag[0]
    symmetries = [torch.rot90(im, k, dims=(-2, -1)) for im in (image, image.flip(-1)) for k in range(4)]
    seen = set()
    for o in out:
        matches = [i for i, s in enumerate(symmetries) if torch.allclose(o, s, atol=1e-5)]
        assert matches, "a quarter-turn augmentation must be exact (no interpolation, no black corners)"
        seen.add(matches[0])
    assert len(seen) >= 6  # per instance, all symmetries reachable
