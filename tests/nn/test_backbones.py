"""Backbone factory: names, presets, trainable parts, local weights and offline failure."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from milcell.data.bag import Bag, collate_bags
from milcell.exceptions import CheckpointError, ConfigError
from milcell.nn import backbones
from milcell.nn.backbones import (
    Backbone,
    backbone_stages,
    create_backbone,
    list_backbones,
    load_backbone_weights,
    set_trainable,
)
from milcell.nn.model import create_mil_model


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


def test_pretrained_unreachable_host_fails_within_the_probe_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hang(*args: object, **kwargs: object) -> None:  # a network that silently drops packets
        release.wait(60)
        raise OSError("released")

    monkeypatch.setattr(backbones.socket, "create_connection", hang)
    start = time.monotonic()
    try:
        with pytest.raises(CheckpointError, match=r"cannot reach example\.org:443.*no answer within 0\.3 s"):
            backbones._check_reachable("https://example.org/w.pth", "'resnet18'", timeout=0.3)
    finally:
        release.set()
    assert time.monotonic() - start < 5.0


def test_probe_goes_to_the_https_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    assert backbones._probe_target("https://huggingface.co/") == ("proxy.example", 3128)
    monkeypatch.setenv("no_proxy", "huggingface.co")
    assert backbones._probe_target("https://huggingface.co/") == ("huggingface.co", 443)
    monkeypatch.delenv("https_proxy")
    monkeypatch.delenv("no_proxy")
    assert backbones._probe_target("http://download.pytorch.org/x.pth") == ("download.pytorch.org", 80)


_NO_NETWORK_SCRIPT = """
import socket, sys, threading, time

if sys.argv[2] == "hang":  # every connection and name lookup blocks forever (dropped packets)
    def hang(*args, **kwargs):
        threading.Event().wait()
    socket.getaddrinfo = socket.create_connection = socket.socket.connect = hang

from milcell.exceptions import CheckpointError
from milcell.nn.backbones import create_backbone

start = time.monotonic()
try:
    create_backbone(sys.argv[1], pretrained=True)
except CheckpointError as exc:
    print("CheckpointError:", exc)
print(f"ELAPSED {time.monotonic() - start:.1f}")
"""


NO_NETWORK = "test_pretrained_without_network_fails_fast_without_hf_hub_offline"


@pytest.fixture(scope="module")
def no_network_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[tuple[str, str], subprocess.Popen[str]]]:
    """The selected cases of the test below, each a fresh interpreter, all started at once.

    Each spends seconds importing torch and timm and then waiting for the probe's timeout: started
    together, they wait together. Per case: no HF_HUB_OFFLINE, no proxy, empty weight caches.
    """
    cases = {
        (item.callspec.params["name"], item.callspec.params["network"])
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.originalname == NO_NETWORK
    }
    proxies = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")
    drop = {"HF_HUB_OFFLINE", *proxies}
    procs = {}
    for name, network in sorted(cases):
        tmp = tmp_path_factory.mktemp("no_network")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env["HF_HOME"] = str(tmp / "hf")  # an empty cache: weights must be downloaded
        env["TORCH_HOME"] = str(tmp / "torch")
        if network == "refused":  # the real socket stack, pointed at a closed local port
            env["HF_ENDPOINT"] = "http://127.0.0.1:9"
        script = tmp / "pretrained.py"
        script.write_text(textwrap.dedent(_NO_NETWORK_SCRIPT))
        procs[name, network] = subprocess.Popen(
            [sys.executable, str(script), name, network],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize(
    ("name", "network"),
    [
        pytest.param("resnet18", "hang", marks=pytest.mark.slow),
        pytest.param("torchvision/resnet18", "hang", marks=pytest.mark.slow),
        ("resnet18", "refused"),
    ],
)
def test_pretrained_without_network_fails_fast_without_hf_hub_offline(
    name: str, network: str, no_network_runs: dict[tuple[str, str], subprocess.Popen[str]]
) -> None:
    proc = no_network_runs[name, network]
    try:
        stdout, stderr = proc.communicate(timeout=120)  # the import of torch and timm included
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"create_backbone({name!r}, pretrained=True) hung without network: {exc}")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CheckpointError:" in done.stdout and "checkpoint_path" in done.stdout, done.stdout
    assert "HF_HUB_OFFLINE" in done.stdout
    elapsed = float(done.stdout.rsplit("ELAPSED", 1)[1])
    assert elapsed < 30.0, done.stdout


# ----------------------------------------------------------------------------- torchvision ImageNet files
def _torchvision_imagenet_file(arch: str, path: Path) -> nn.Module:
    """Save a state dict laid out as torchvision's ImageNet file (aux heads, 1000-class fc); no download."""
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.get_model(
        arch, weights=None, aux_logits=True, init_weights=False, transform_input=True
    )
    with torch.no_grad():  # BatchNorm statistics that differ from the defaults
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(ref.state_dict(), path)
    ref.fc = nn.Identity()
    return ref.eval()


@pytest.mark.parametrize(
    ("arch", "dim", "size", "input_size"),
    [
        ("googlenet", 1024, 64, (3, 224, 224)),
        pytest.param("inception_v3", 2048, 80, (3, 299, 299), marks=pytest.mark.slow),
    ],
)
def test_torchvision_imagenet_file_with_aux_heads_loads(
    arch: str,
    dim: int,
    size: int,
    input_size: tuple[int, int, int],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / f"{arch}.pth"
    ref = _torchvision_imagenet_file(arch, path)
    keys = torch.load(path, weights_only=True).keys()
    assert any(k.split(".")[0] in ("aux1", "aux2", "AuxLogits") for k in keys)
    with caplog.at_level(logging.INFO, logger="milcell"):
        bb = create_backbone(f"torchvision/{arch}", checkpoint_path=path).eval()
    assert "auxiliary classifiers" in caplog.text and "transform_input=True" in caplog.text
    assert bb.model.transform_input is True and bb.num_features == dim
    assert bb.data_config["input_size"] == input_size
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        out = bb(x)
        torch.testing.assert_close(out, ref(x))
        plain = create_backbone(f"torchvision/{arch}", checkpoint_path=path, transform_input=False).eval()
        assert plain.model.transform_input is False
        assert not torch.allclose(plain(x), out)  # the input transform really is applied


def test_torchvision_own_file_keeps_transform_input_off(tmp_path: Path) -> None:
    source = create_backbone("torchvision/googlenet", init_weights=False)
    path = tmp_path / "mine.safetensors"
    save_file(source.model.state_dict(), str(path))  # a backbone saved by milcell: no aux heads, no fc
    loaded = create_backbone("torchvision/googlenet", checkpoint_path=path)
    assert loaded.model.transform_input is False
    assert _same_weights(source, loaded)


def test_aux_keys_are_dropped_but_other_mismatches_still_fail(tmp_path: Path) -> None:
    path = tmp_path / "googlenet.pth"
    _torchvision_imagenet_file("googlenet", path)
    state = torch.load(path, weights_only=True)
    state["inception9.conv.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"extra\.pth.*0 missing keys.*1 unexpected keys.*inception9"):
        create_backbone("torchvision/googlenet", checkpoint_path=tmp_path / "extra.pth")
    del state["inception9.conv.weight"], state["conv1.conv.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth.*1 missing keys \['conv1\.conv\.weight'\]"):
        create_backbone("torchvision/googlenet", checkpoint_path=tmp_path / "missing.pth")


# ----------------------------------------------------------------------------- trainable=0 and numpy
def _bn_batch() -> object:
    torch.manual_seed(0)
    return collate_bags([Bag(torch.rand(3, 3, 32, 32) + 1.0, label=k % 2) for k in range(2)])


@pytest.mark.parametrize("trainable", ["head", 0, np.int64(0)])
def test_trainable_zero_freezes_batchnorm_statistics_like_head(trainable: object) -> None:
    model = create_mil_model("milcell_mini_resnet_k8", pooling="mean", trainable=trainable).train()
    backbone = model.encoder.backbone
    assert backbone.trainable == "head" and not any(p.requires_grad for p in backbone.parameters())
    before = backbone.model.bn1.running_mean.clone()
    model(_bn_batch())
    assert torch.equal(backbone.model.bn1.running_mean, before)


def test_trainable_stages_still_update_batchnorm_statistics() -> None:
    model = create_mil_model("milcell_mini_resnet_k8", pooling="mean", trainable=1).train()
    before = model.encoder.backbone.model.bn1.running_mean.clone()
    model(_bn_batch())
    assert not torch.equal(model.encoder.backbone.model.bn1.running_mean, before)


def test_numpy_integer_arguments() -> None:
    bb = create_backbone(
        "milcell_mini_resnet_k8", in_chans=np.int64(1), trainable=np.int64(2), num_classes=np.int64(0)
    )
    assert bb.in_chans == 1 and type(bb.in_chans) is int
    assert bb.trainable == 2 and type(bb.trainable) is int
    assert _trainable_prefixes(bb) == {"layer3", "layer4"}
    set_trainable(bb, np.int32(1))
    assert _trainable_prefixes(bb) == {"layer4"} and bb.trainable == 1
    set_trainable(bb, np.uint8(0))
    assert bb.trainable == "head" and not _trainable_prefixes(bb)


def test_num_classes_is_validated_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="milcell"):
        bb = create_backbone("milcell_mini_resnet_k8", num_classes=5)
    assert bb.num_features == 64 and "num_classes=5 ignored" in caplog.text
    for bad in (-1, 2.0, "2"):
        with pytest.raises(ConfigError, match="num_classes"):
            create_backbone("milcell_mini_resnet_k8", num_classes=bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_chans": np.float64(1.0)}, "in_chans"),
        ({"in_chans": True}, "in_chans"),
        ({"trainable": np.int64(-1)}, "trainable"),
        ({"trainable": "frozen"}, "trainable.*'all', 'head'"),
        ({"pretrained": "yes"}, "pretrained"),
    ],
)
def test_bad_factory_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_backbone("milcell_mini_resnet_k8", **kwargs)
