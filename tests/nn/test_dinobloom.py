"""DinoBloom presets: released DINOv2 checkpoints and timm-format ports load exactly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from milcell.exceptions import CheckpointError, ConfigError
from milcell.nn.backbones import create_backbone, get_backbone_preset, list_backbones
from milcell.nn.dinobloom import DINOBLOOM_MODELS, DINOBLOOM_URLS, dinov2_to_timm, is_dinov2_layout
from milcell.nn.model import create_mil_model

# A tiny DINOv2-style ViT (same block structure as the released models): 28 px, 2x2 patches of 14 px.
TINY = {"img_size": 28, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _reference(preset: str, **extra: object) -> torch.nn.Module:
    """A randomly initialised timm model of the preset's architecture, with non-trivial parameters."""
    torch.manual_seed(0)
    net = create_backbone(preset, **TINY, **extra)
    with torch.no_grad():
        for p in net.model.parameters():  # layer scales start at 1e-5: make every tensor distinctive
            p.copy_(torch.randn_like(p))
    return net.model


def _released_layout(
    timm_state: dict[str, torch.Tensor], *, chunks: int = 0, swiglu: bool = False
) -> dict[str, object]:
    """Write a timm state dict the way DINOv2 training saves the teacher (as DinoBloom is released)."""
    teacher: dict[str, torch.Tensor] = {}
    depth = 1 + max(int(k.split(".")[1]) for k in timm_state if k.startswith("blocks."))
    per_chunk = max(1, depth // chunks) if chunks else 0
    for key, value in timm_state.items():
        name = key
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            if swiglu:  # DINOv2's SwiGLU feed-forward (ViT-G): packed w12, then w3
                rest = rest.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3.")
            chunk = f"{int(index) // per_chunk}." if chunks else ""
            name = f"blocks.{chunk}{index}.{rest}"
        teacher[f"backbone.{name}"] = value.clone()
    dim = timm_state["cls_token"].shape[-1]
    teacher["backbone.mask_token"] = torch.zeros(1, dim)
    teacher["dino_head.mlp.0.weight"] = torch.randn(16, dim)
    teacher["dino_head.last_layer.weight_g"] = torch.randn(64, 1)
    teacher["ibot_head.mlp.0.weight"] = torch.randn(16, dim)
    return {"teacher": teacher}


def _assert_same(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    ref = reference.state_dict()
    got = loaded.state_dict()
    assert ref.keys() == got.keys()
    for key, value in ref.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("preset", ["dinobloom_s", "dinobloom_g"])
@pytest.mark.parametrize("chunks", [0, 2])
def test_released_teacher_checkpoint_loads_exactly(tmp_path: Path, preset: str, chunks: int) -> None:
    reference = _reference(preset)
    raw = _released_layout(reference.state_dict(), chunks=chunks, swiglu=preset == "dinobloom_g")
    if preset == "dinobloom_g":  # ViT-G's SwiGLU feed-forward is stored as DINOv2's w12 / w3
        assert any(k.endswith("mlp.w12.weight") for k in raw["teacher"])  # type: ignore[attr-defined]
        assert any(k.endswith("mlp.w3.weight") for k in raw["teacher"])  # type: ignore[attr-defined]
    path = tmp_path / "DinoBloom-tiny.pth"
    torch.save(raw, path)
    net = create_backbone(preset, checkpoint_path=path, **TINY)
    _assert_same(net.model, reference)
    assert net.num_features == 32 and net.name == preset
    x = torch.rand(3, 3, 28, 28)
    reference.eval()
    net.eval()
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        assert torch.equal(net(x), expected)
        # the CLS token after the final norm is the embedding
        assert torch.equal(net(x), reference.forward_features(x)[:, 0])


def test_timm_format_port_loads_exactly(tmp_path: Path) -> None:
    reference = _reference("dinobloom_b")
    path = tmp_path / "port.safetensors"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(path))
    assert not is_dinov2_layout(state)
    net = create_backbone("dinobloom_b", checkpoint_path=path, **TINY)
    _assert_same(net.model, reference)


def test_register_tokens_become_timm_reg_token(tmp_path: Path) -> None:
    """A DINOv2 'with registers' checkpoint: the model is built with reg_tokens, outputs match."""
    reference = _reference("dinobloom_s", reg_tokens=4, no_embed_class=True)
    timm_state = reference.state_dict()
    dinov2 = {k: v for k, v in timm_state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    cls_pos = torch.randn(1, 1, 32)
    dinov2["pos_embed"] = torch.cat([cls_pos, timm_state["pos_embed"]], dim=1)
    dinov2["cls_token"] = timm_state["cls_token"] - cls_pos
    dinov2["register_tokens"] = timm_state["reg_token"]
    path = tmp_path / "reg.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in dinov2.items()}}, path)
    net = create_backbone("dinobloom_s", checkpoint_path=path, **TINY)
    assert net.model.num_reg_tokens == 4
    for key, value in timm_state.items():
        assert torch.allclose(net.model.state_dict()[key], value, atol=1e-6), key


def test_position_embedding_for_another_grid_is_resampled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(1)
    source = create_backbone("dinobloom_s", **{**TINY, "img_size": 56})  # 4x4 patches (DINOv2's 518 px case)
    path = tmp_path / "grid.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.model.state_dict().items()}}, path)
    with caplog.at_level(logging.INFO, logger="milcell"):
        net = create_backbone("dinobloom_s", checkpoint_path=path, **TINY)
    assert net.model.pos_embed.shape == (1, 5, 32)
    assert "resampled from a 4x4 to a 2x2" in caplog.text
    assert torch.equal(net.model.blocks[1].attn.qkv.weight, source.model.blocks[1].attn.qkv.weight)


def test_unexpected_keys_are_named(tmp_path: Path) -> None:
    reference = _reference("dinobloom_s")
    raw = _released_layout(reference.state_dict())
    raw["teacher"]["backbone.blocks.0.attn.rel_pos_h"] = torch.zeros(3)  # type: ignore[index]
    path = tmp_path / "odd.pth"
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=r"odd\.pth.*unexpected keys \['blocks\.0\.attn\.rel_pos_h'\]"):
        create_backbone("dinobloom_s", checkpoint_path=path, **TINY)
    with pytest.raises(CheckpointError, match="missing keys"):
        create_backbone("dinobloom_s", checkpoint_path=path, **{**TINY, "depth": 3})


def test_pretrained_without_file_says_where_to_download() -> None:
    for name, url in DINOBLOOM_URLS.items():
        with pytest.raises(CheckpointError) as info:
            create_backbone(name, pretrained=True)
        message = str(info.value)
        assert url in message and "checkpoint_path=" in message and "--checkpoint-path" in message


def test_presets_report_released_widths_and_preprocessing() -> None:
    """ViT-S/B/L/G: 384/768/1024/1536, 224 px, ImageNet statistics (built on the meta device)."""
    widths = {"dinobloom_s": 384, "dinobloom_b": 768, "dinobloom_l": 1024, "dinobloom_g": 1536}
    for name, width in widths.items():
        assert name in list_backbones()
        assert DINOBLOOM_MODELS[name][1] == width
        with torch.device("meta"):
            net = create_backbone(name)
        assert net.num_features == width
        assert net.model.patch_embed.patch_size == (14, 14)
        assert tuple(net.model.pos_embed.shape) == (1, 257, width)  # 16 x 16 patches + CLS, as released
        assert net.data_config["input_size"] == (3, 224, 224)
        assert net.data_config["mean"] == (0.485, 0.456, 0.406)
        assert net.data_config["std"] == (0.229, 0.224, 0.225)
        assert get_backbone_preset(name).timm_kwargs["global_pool"] == "token"


def test_mil_model_on_dinobloom_preset(tmp_path: Path) -> None:
    reference = _reference("dinobloom_s")
    path = tmp_path / "w.pth"
    torch.save(_released_layout(reference.state_dict()), path)
    model = create_mil_model(
        "dinobloom_s",
        pooling="attention",
        backbone_kwargs={**TINY, "checkpoint_path": str(path)},
        trainable="head",
    )
    _assert_same(model.encoder.backbone.model, reference)
    from milcell.data import Bag, collate_bags

    out = model(
        collate_bags([Bag(torch.rand(3, 3, 28, 28), label=1), Bag(torch.rand(2, 3, 28, 28), label=0)])
    )
    assert out.logits.shape == (2, 2)


def test_dinov2_to_timm_rejects_non_tensors() -> None:
    with pytest.raises(CheckpointError, match="'backbone.pos_embed' is a str"):
        dinov2_to_timm({"teacher": {"backbone.pos_embed": "x"}})


def test_bad_preset_kwargs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="bad keyword argument"):
        create_backbone("dinobloom_s", not_an_option=3)
