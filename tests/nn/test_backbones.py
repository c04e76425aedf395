"""Backbone factory: names, presets, trainable parts, local weights and offline failure."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from milcell.exceptions import CheckpointError, ConfigError
from milcell.nn.backbones import (
    Backbone,
    backbone_stages,
    create_backbone,
    list_backbones,
    load_backbone_weights,
    set_trainable,
)


def _trainable_prefixes(bb: Backbone, depth: int = 1) -> set[str]:
    return {".".join(n.split(".")[:depth]) for n, p in bb.model.named_parameters() if p.requires_grad}


def test_list_backbones_has_presets() -> None:
    names = list_backbones()
    for preset in ("resnet18", "efficientnet_b0", "vit_base_patch16_224", "milcell_mini_resnet_k32"):
        assert preset in names
    assert names == sorted(names)


@pytest.mark.parametrize(
    ("name", "dim"), [("resnet18", 512), ("efficientnet_b0", 1280), ("milcell_mini_resnet_k8", 64)]
)
def test_presets_map_images_to_features(name: str, dim: int) -> None:
    bb = create_backbone(name).eval()
    with torch.no_grad():
        out = bb(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, dim) and bb.num_features == dim and bb.name == name
    cfg = bb.data_config
    assert {"input_size", "mean", "std", "interpolation", "crop_pct"} <= set(cfg)
    assert cfg["input_size"][0] == 3 and len(cfg["mean"]) == 3


@pytest.mark.slow
def test_vit_preset_with_small_img_size() -> None:
    bb = create_backbone("vit_base_patch16_224", img_size=32).eval()
    with torch.no_grad():
        assert bb(torch.rand(2, 3, 32, 32)).shape == (2, 768)
    assert bb.data_config["input_size"] == (3, 32, 32)
    assert bb.data_config["mean"] == (0.5, 0.5, 0.5)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "dim"), [("vgg11", 4096), ("efficientnet_b3", 1536)])
def test_other_timm_names(name: str, dim: int) -> None:
    bb = create_backbone(name).eval()
    with torch.no_grad():
        assert bb(torch.rand(2, 3, 64, 64)).shape == (2, dim)


@pytest.mark.slow
def test_torchvision_prefix_googlenet() -> None:
    bb = create_backbone("torchvision/googlenet", init_weights=False)
    assert bb.num_features == 1024
    assert bb.data_config["input_size"] == (3, 224, 224)
    assert bb.data_config["mean"] == (0.485, 0.456, 0.406)
    for mode in (True, False):  # no auxiliary outputs in either mode
        bb.train(mode)
        assert bb(torch.rand(2, 3, 64, 64)).shape == (2, 1024)
    set_trainable(bb, 2)  # top-level children are the stages
    assert _trainable_prefixes(bb) == {"inception5a", "inception5b"}


def test_torchvision_bad_names_and_channels() -> None:
    with pytest.raises(ConfigError, match="googlenet"):
        create_backbone("torchvision/googlenot")
    with pytest.raises(ConfigError, match="in_chans"):
        create_backbone("torchvision/resnet18", in_chans=1)


def test_in_chans_is_passed_to_timm() -> None:
    bb = create_backbone("milcell_mini_resnet_k8", in_chans=1)
    assert bb.in_chans == 1 and bb.model.conv1.in_channels == 1
    assert bb.data_config["input_size"][0] == 1 and len(bb.data_config["mean"]) == 1


@pytest.mark.parametrize(
    ("name", "suggestion"), [("resnet_18", "resnet18"), ("efficientnet-b0", "efficientnet_b0")]
)
def test_unknown_name_lists_suggestions(name: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown backbone name '{name}'.*{suggestion}"):
        create_backbone(name)


@pytest.mark.parametrize("bad", ["some", -1, 1.5, True, None])
def test_bad_trainable(bad: object) -> None:
    with pytest.raises(ConfigError, match="trainable"):
        create_backbone("milcell_mini_resnet_k8", trainable=bad)


def test_bad_name_and_kwargs() -> None:
    with pytest.raises(ConfigError, match="name"):
        create_backbone("")
    with pytest.raises(ConfigError, match="in_chans"):
        create_backbone("resnet18", in_chans=0)


def test_resnet18_last_two_stages_trainable() -> None:
    bb = create_backbone("resnet18", trainable=2)
    assert _trainable_prefixes(bb) == {"layer3", "layer4"}
    frozen = {n.split(".")[0] for n, p in bb.model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1", "layer2"}
    assert bb.trainable == 2


def test_efficientnet_b0_last_stage_and_head_conv_trainable() -> None:
    bb = create_backbone("efficientnet_b0", trainable=1)
    assert _trainable_prefixes(bb, 2) == {"blocks.6", "conv_head.weight", "bn2.weight", "bn2.bias"}
    _, stages, _ = backbone_stages(bb)
    assert len(stages) == 7


def test_mini_resnet_trainable_options() -> None:
    bb = create_backbone("milcell_mini_resnet_k8", trainable=1)
    assert _trainable_prefixes(bb) == {"layer4"}
    set_trainable(bb, "head")
    assert not any(p.requires_grad for p in bb.parameters())
    set_trainable(bb, "all")
    assert all(p.requires_grad for p in bb.parameters())
    set_trainable(bb, 4)
    assert _trainable_prefixes(bb) == {"layer1", "layer2", "layer3", "layer4"}
    with pytest.raises(ConfigError, match="only 4 stages"):
        set_trainable(bb, 5)


def test_frozen_backbone_gets_no_gradient() -> None:
    bb = create_backbone("milcell_mini_resnet_k8", trainable="head")
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    bb(x).sum().backward()
    assert all(p.grad is None for p in bb.parameters())
    assert x.grad is not None


def test_tail_after_stages_counts_as_trainable() -> None:
    stem, stages, tail = backbone_stages(create_backbone("densenet121"))
    assert tail == ["features.norm5.weight", "features.norm5.bias"]
    assert stem[0] == "features.conv0.weight" and len(stages) == 4


# ----------------------------------------------------------------------------- local weights
@pytest.fixture
def source() -> Backbone:
    torch.manual_seed(1)
    return create_backbone("milcell_mini_resnet_k8")


def _same_weights(a: Backbone, b: Backbone) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_safetensors(tmp_path: Path, source: Backbone) -> None:
    path = tmp_path / "w.safetensors"
    save_file(source.model.state_dict(), str(path))
    loaded = create_backbone("milcell_mini_resnet_k8", checkpoint_path=path)
    assert _same_weights(source, loaded)


def test_checkpoint_torch_state_dict_ignores_classifier(tmp_path: Path, source: Backbone) -> None:
    state = dict(source.model.state_dict())
    state["fc.weight"] = torch.zeros(2, 64)
    state["fc.bias"] = torch.zeros(2)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": state}, path)
    loaded = create_backbone("milcell_mini_resnet_k8", checkpoint_path=path, trainable=1)
    assert _same_weights(source, loaded)
    assert _trainable_prefixes(loaded) == {"layer4"}


def test_checkpoint_with_module_prefix(tmp_path: Path, source: Backbone) -> None:
    path = tmp_path / "w.pt"
    torch.save({f"module.{k}": v for k, v in source.model.state_dict().items()}, path)
    target = create_backbone("milcell_mini_resnet_k8")
    load_backbone_weights(target, path)
    assert _same_weights(source, target)


def test_checkpoint_wins_over_pretrained(tmp_path: Path, source: Backbone) -> None:
    path = tmp_path / "w.safetensors"
    save_file(source.model.state_dict(), str(path))
    loaded = create_backbone("milcell_mini_resnet_k8", pretrained=True, checkpoint_path=path)
    assert _same_weights(source, loaded)


def test_checkpoint_missing_and_unexpected_keys(tmp_path: Path, source: Backbone) -> None:
    state = dict(source.model.state_dict())
    del state["conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        CheckpointError, match=r"partial\.safetensors.*missing keys \['conv1\.weight'\].*extra"
    ):
        create_backbone("milcell_mini_resnet_k8", checkpoint_path=path)


def test_checkpoint_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "k16.safetensors"
    save_file(create_backbone("milcell_mini_resnet", width=16).model.state_dict(), str(path))
    with pytest.raises(CheckpointError, match=r"k16\.safetensors.*shape mismatch"):
        create_backbone("milcell_mini_resnet_k8", checkpoint_path=path)


def test_checkpoint_corrupt_and_missing_files(tmp_path: Path) -> None:
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        create_backbone("milcell_mini_resnet_k8", checkpoint_path=bad_st)
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"bad\.pt.*corrupt"):
        create_backbone("milcell_mini_resnet_k8", checkpoint_path=bad_pt)
    with pytest.raises(CheckpointError, match="nope.pt.*does not exist"):
        create_backbone("milcell_mini_resnet_k8", checkpoint_path=tmp_path / "nope.pt")
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(CheckpointError, match="state dict"):
        create_backbone("milcell_mini_resnet_k8", checkpoint_path=not_a_dict)


class _Exploit:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"conv1.weight": _Exploit(marker)}, fh, protocol=2)
    with pytest.raises(CheckpointError, match=r"evil\.pth.*not a weights-only"):
        create_backbone("milcell_mini_resnet_k8", checkpoint_path=path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- pretrained
def test_pretrained_offline_fails_fast_with_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="resnet18.*checkpoint_path"):
        create_backbone("resnet18", pretrained=True)
    assert time.monotonic() - start < 5.0


def test_pretrained_torchvision_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="googlenet.*checkpoint_path"):
        create_backbone("torchvision/googlenet", pretrained=True)
    assert time.monotonic() - start < 5.0


def test_pretrained_without_weights_is_config_error() -> None:
    with pytest.raises(ConfigError, match="no pretrained weights.*milcell_mini_resnet_k8"):
        create_backbone("milcell_mini_resnet_k8", pretrained=True)
