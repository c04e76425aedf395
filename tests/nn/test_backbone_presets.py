"""register_backbone_preset: local checkpoints of timm architectures as named backbones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from milcell.data.synthetic import make_cohort
from milcell.exceptions import CheckpointError, ConfigError
from milcell.nn import backbones
from milcell.nn.backbones import (
    BACKBONE_PRESETS,
    create_backbone,
    get_backbone_preset,
    list_backbones,
    register_backbone_preset,
)
from milcell.nn.model import MILModel, create_mil_model


@pytest.fixture
def forget() -> Iterator[list[str]]:
    """Names registered by a test, removed afterwards (the registry is process-wide)."""
    names: list[str] = []
    yield names
    for name in names:
        backbones._PRESETS.pop(name, None)
        BACKBONE_PRESETS.pop(name, None)


@pytest.fixture
def weights(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    source = create_backbone("milcell_mini_resnet", width=4)
    with torch.no_grad():
        for p in source.model.parameters():
            p.add_(torch.randn_like(p))
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    path = tmp_path / "lab.safetensors"
    save_file(state, str(path))
    return path, state


def test_registered_checkpoint_loads_exactly_with_its_config(
    weights: tuple[Path, dict[str, torch.Tensor]], forget: list[str]
) -> None:
    path, state = weights
    forget.append("lab_cells")
    preset = register_backbone_preset(
        "lab_cells",
        "milcell_mini_resnet",
        path,
        width=4,
        data_config={"input_size": (3, 48, 48), "mean": (0.6, 0.5, 0.4), "std": (0.2, 0.2, 0.2)},
        description="our lab's cell encoder",
    )
    assert get_backbone_preset("lab_cells") == preset
    assert "lab_cells" in list_backbones() and BACKBONE_PRESETS["lab_cells"] == "our lab's cell encoder"
    net = create_backbone("lab_cells", pretrained=True)
    assert net.name == "lab_cells" and net.num_features == 32
    got = net.model.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
    assert net.data_config["input_size"] == (3, 48, 48)
    assert net.data_config["mean"] == (0.6, 0.5, 0.4)
    # pretrained=False: the architecture without the file; grayscale input averages the statistics
    plain = create_backbone("lab_cells", in_chans=1)
    assert not torch.equal(plain.model.conv1.weight[:, :1], net.model.conv1.weight[:, :1])
    assert plain.data_config["mean"] == pytest.approx((0.5,)) and plain.data_config["input_size"] == (
        1,
        48,
        48,
    )


def test_create_mil_model_and_saved_config(
    weights: tuple[Path, dict[str, torch.Tensor]], forget: list[str]
) -> None:
    path, state = weights
    forget.append("lab_mil")
    register_backbone_preset("lab_mil", "milcell_mini_resnet", path, width=4)
    model = create_mil_model("lab_mil", pooling="mean", pretrained=True)
    assert torch.equal(model.encoder.backbone.model.conv1.weight, state["conv1.weight"])
    rebuilt = MILModel.from_config(model.config)  # never loads weights: they come from the saved run
    assert rebuilt.encoder.backbone.name == "lab_mil"
    assert rebuilt.encoder.backbone.num_features == 32


def test_checkpoint_path_argument_replaces_the_registered_file(
    weights: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, forget: list[str]
) -> None:
    path, _ = weights
    forget.append("lab_swap")
    register_backbone_preset("lab_swap", "milcell_mini_resnet", path, width=4)
    other = {
        k: torch.zeros_like(v)
        for k, v in create_backbone("milcell_mini_resnet", width=4).model.state_dict().items()
    }
    other_path = tmp_path / "other.pth"
    torch.save(other, other_path)
    net = create_backbone("lab_swap", checkpoint_path=other_path)
    assert not net.model.conv1.weight.detach().any()


def test_without_a_registered_file_pretrained_asks_for_one(forget: list[str]) -> None:
    forget.append("lab_nofile")
    register_backbone_preset("lab_nofile", "milcell_mini_resnet", width=4)
    with pytest.raises(CheckpointError, match=r"'lab_nofile' has no weights.*checkpoint_path="):
        create_backbone("lab_nofile", pretrained=True)


def test_dinov2_layout_for_a_registered_vit(tmp_path: Path, forget: list[str]) -> None:
    kwargs = {"img_size": 28, "embed_dim": 16, "depth": 1, "num_heads": 2}
    source = create_backbone("vit_small_patch14_dinov2", **kwargs)
    teacher = {f"backbone.{k}": v for k, v in source.model.state_dict().items()}
    teacher["backbone.mask_token"] = torch.zeros(1, 16)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    forget.append("lab_dino")
    register_backbone_preset("lab_dino", "vit_small_patch14_dinov2", path, layout="dinov2", **kwargs)
    net = create_backbone("lab_dino", pretrained=True)
    for key, value in source.model.state_dict().items():
        assert torch.equal(net.model.state_dict()[key], value), key
    # A plain timm name also accepts the DINOv2 file (the layout is detected).
    plain = create_backbone("vit_small_patch14_dinov2", checkpoint_path=path, **kwargs)
    assert torch.equal(plain.model.pos_embed, source.model.pos_embed)


@pytest.mark.parametrize(
    ("name", "architecture", "kwargs", "error", "match"),
    [
        ("resnet18", "milcell_mini_resnet", {}, ConfigError, "is a timm model name"),
        ("dinobloom_s", "milcell_mini_resnet", {}, ConfigError, "registered already"),
        ("torchvision/mine", "milcell_mini_resnet", {}, ConfigError, "reserved prefix"),
        ("mine", "not_a_model", {}, ConfigError, "unknown backbone name 'not_a_model'"),
        ("mine", "dinobloom_s", {}, ConfigError, "is itself a preset"),
        ("mine", "milcell_mini_resnet", {"no_such_kwarg": 1}, ConfigError, "bad keyword argument"),
        (
            "mine",
            "milcell_mini_resnet",
            {"data_config": {"size": 3}},
            ConfigError,
            "unknown data_config keys",
        ),
        ("mine", "milcell_mini_resnet", {"data_config": {"mean": (0.5,)}}, ConfigError, "mean"),
        ("mine", "milcell_mini_resnet", {"layout": "keras"}, ConfigError, "layout"),
        (
            "mine",
            "milcell_mini_resnet",
            {"checkpoint_path": "/no/such.pth"},
            CheckpointError,
            "does not exist",
        ),
        ("", "milcell_mini_resnet", {}, ConfigError, "name"),
    ],
)
def test_bad_registrations(
    name: str,
    architecture: str,
    kwargs: dict[str, object],
    error: type[Exception],
    match: str,
    forget: list[str],
) -> None:
    if name not in BACKBONE_PRESETS:
        forget.append(name)
    with pytest.raises(error, match=match):
        register_backbone_preset(name, architecture, **kwargs)  # type: ignore[arg-type]
    assert name not in backbones._PRESETS or name == "dinobloom_s"


def test_overwrite_replaces(forget: list[str]) -> None:
    forget.append("lab_twice")
    register_backbone_preset("lab_twice", "milcell_mini_resnet", width=4)
    with pytest.raises(ConfigError, match="overwrite=True"):
        register_backbone_preset("lab_twice", "milcell_mini_resnet", width=8)
    register_backbone_preset("lab_twice", "milcell_mini_resnet", width=8, overwrite=True)
    assert create_backbone("lab_twice").num_features == 64


def test_the_command_sees_registered_presets(
    weights: tuple[Path, dict[str, torch.Tensor]],
    tmp_path: Path,
    forget: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from milcell.cli import main
    from milcell.train.features import read_feature_cache

    path, _ = weights
    forget.append("lab_cli")
    register_backbone_preset("lab_cli", "milcell_mini_resnet", path, width=4, description="lab encoder v1")
    assert main(["info"]) == 0
    assert "lab_cli" in capsys.readouterr().out
    cohort = make_cohort(tmp_path / "dlmi", n_patients=4, seed=0, image_size=32, bag_size=(2, 3))
    out = tmp_path / "cache"
    args = ["extract-features", "--data-dir", str(cohort), "--format", "dlmi", "--image-size", "32"]
    args += [
        "--backbone",
        "lab_cli",
        "--pretrained",
        "--output-dir",
        str(out),
        "--no-progress",
        "--threads",
        "1",
    ]
    assert main(args) == 0
    cache = read_feature_cache(out)
    assert cache.backbone == "lab_cli" and cache.dim == 32
