"""The backbone-comparison example asks only for backbones that exist (with weights under --pretrained)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torchvision

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def zoo() -> ModuleType:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLES))  # the example imports its sibling _common ...
        mp.delitem(sys.modules, "_common", raising=False)  # ... which must not outlive this module
        spec = importlib.util.spec_from_file_location(
            "_milcell_all_backbone_zoo", EXAMPLES / "all_backbone_zoo.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["smoke", "quick", "full"])
def test_pretrained_names_have_timm_weights(zoo: ModuleType, mode: str) -> None:
    available = set(timm.list_pretrained())
    names = zoo.backbone_names(mode, pretrained=True)
    assert names
    for name in names:
        if name.startswith("torchvision/"):
            weights = torchvision.models.get_model_weights(name.split("/", 1)[1])
            assert weights.DEFAULT.meta["num_params"] > 0, name
            continue
        # the tag timm.create_model(name, pretrained=True) resolves to must be a pretrained one
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg is not None and f"{name}.{cfg.tag}" in available, f"{name!r} has no pretrained weights"


@pytest.mark.parametrize("mode", ["smoke", "quick", "full"])
def test_from_scratch_names_exist(zoo: ModuleType, mode: str) -> None:
    for name in zoo.backbone_names(mode, pretrained=False):
        assert name.startswith("torchvision/") or timm.is_model(name), name


def test_main_uses_the_checked_names(zoo: ModuleType) -> None:
    assert "backbone_names(mode, args.pretrained)" in inspect.getsource(zoo.main)
    assert "efficientnet_b7" not in zoo.FULL_BACKBONES  # timm has no weights for it
    assert len(zoo.FULL_BACKBONES) == 12  # the report's twelve
