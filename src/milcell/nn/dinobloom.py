"""DinoBloom blood-cell foundation encoders and the DINOv2 checkpoint layout.

DinoBloom (Koch et al. 2024, "DinoBloom: A Foundation Model for Generalizable
Cell Embeddings in Hematology", MICCAI 2024) continues DINOv2 self-supervised
training on single blood cells from 13 public datasets. The four released
models are DINOv2 vision transformers with 14 px patches at 224 px input:

=============  ==============================  ===========
preset         timm architecture               embedding
=============  ==============================  ===========
dinobloom_s    ``vit_small_patch14_dinov2``    384
dinobloom_b    ``vit_base_patch14_dinov2``     768
dinobloom_l    ``vit_large_patch14_dinov2``    1024
dinobloom_g    ``vit_giant_patch14_dinov2``    1536
=============  ==============================  ===========

The presets are registered in :mod:`milcell.nn.backbones` and built with
:func:`~milcell.nn.backbones.create_backbone` (``img_size=224``, the CLS
token after the final norm as the instance embedding, ImageNet mean and std,
bicubic resizing to 224 px). The weights are not on a model hub that timm
knows: download the file from Zenodo (:data:`DINOBLOOM_URLS`) and pass it with
``checkpoint_path=`` (``--checkpoint-path`` on the command line).

The released files are DINOv2 *training* checkpoints: a ``{"teacher": state}``
dictionary whose backbone keys start with ``backbone.`` and which also holds
the self-supervised projection heads (``dino_head.*``, ``ibot_head.*``).
:func:`dinov2_to_timm` maps that layout (and the plain DINOv2 layout of
``dinov2_vit*14_pretrain.pth``) to timm's key names:

- the ``backbone.`` prefix and the projection heads are dropped, as is
  ``mask_token`` (used only by the iBOT masked-token loss);
- chunked blocks (``blocks.<chunk>.<i>.``, DINOv2's FSDP ``block_chunks``)
  become ``blocks.<i>.``;
- the SwiGLU feed-forward of ViT-G (``mlp.w12`` packed, ``mlp.w3``) becomes
  timm's packed ``mlp.fc1`` / ``mlp.fc2``;
- register tokens (``register_tokens``, DINOv2 "with registers") become
  timm's ``reg_token``; timm keeps these models' position embedding for the
  patches only, so the CLS position is folded into ``cls_token`` and the
  model is built with ``reg_tokens=R, no_embed_class=True``.

Attention (``attn.qkv``, ``attn.proj``), norms and layer scales
(``ls1.gamma``, ``ls2.gamma``) already carry timm's names. A position
embedding for another grid (e.g. DINOv2's 518 px, 37 × 37 patches) is
resampled to the model's grid when the weights are loaded.

Examples
--------
>>> import torch
>>> state = {"backbone.cls_token": torch.zeros(1, 1, 8), "backbone.mask_token": torch.zeros(1, 8),
...          "backbone.blocks.0.mlp.w12.weight": torch.zeros(4, 8),
...          "dino_head.last_layer.weight": torch.zeros(2, 8)}
>>> converted, extra = dinov2_to_timm({"teacher": state})
>>> sorted(converted), extra
(['blocks.0.mlp.fc1.weight', 'cls_token'], {})
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from milcell.exceptions import CheckpointError

__all__ = ["DINOBLOOM_MODELS", "DINOBLOOM_URLS", "dinov2_to_timm", "is_dinov2_layout"]

#: Preset name -> (timm architecture, embedding width, paper name).
DINOBLOOM_MODELS: dict[str, tuple[str, int, str]] = {
    "dinobloom_s": ("vit_small_patch14_dinov2", 384, "DinoBloom-S"),
    "dinobloom_b": ("vit_base_patch14_dinov2", 768, "DinoBloom-B"),
    "dinobloom_l": ("vit_large_patch14_dinov2", 1024, "DinoBloom-L"),
    "dinobloom_g": ("vit_giant_patch14_dinov2", 1536, "DinoBloom-G"),
}

#: Preset name -> where the released checkpoint file is published (Zenodo record 10908163).
DINOBLOOM_URLS: dict[str, str] = {
    name: f"https://zenodo.org/records/10908163/files/{paper}.pth"
    for name, (_, _, paper) in DINOBLOOM_MODELS.items()
}

# Projection heads of DINOv2 training (self-supervised losses only, not part of the encoder).
_HEAD_PREFIXES = ("dino_head.", "ibot_head.", "head.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_SWIGLU = re.compile(r"^(blocks\.\d+\.mlp\.)(w12|w3)\.")


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The teacher's (or model's) state dict inside a DINOv2 training checkpoint."""
    for key in ("teacher", "model", "state_dict"):
        inner = state.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            return inner
    return state


def is_dinov2_layout(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is a DINOv2-style checkpoint (not timm's key names).

    True for a ``{"teacher": ...}`` training checkpoint, ``backbone.``-prefixed
    keys, or DINOv2-only keys (``mask_token``, ``register_tokens``,
    ``mlp.w12``, chunked ``blocks.<c>.<i>.``).

    Parameters
    ----------
    state : mapping
        A loaded checkpoint (a state dict or a dictionary wrapping one).

    Returns
    -------
    bool

    Examples
    --------
    >>> import torch
    >>> is_dinov2_layout({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 4)}})
    True
    >>> is_dinov2_layout({"cls_token": torch.zeros(1, 1, 4), "blocks.0.mlp.fc1.weight": torch.zeros(2, 4)})
    False
    """
    if isinstance(state.get("teacher"), Mapping):
        return True
    keys = [k for k in _unwrap(state) if isinstance(k, str)]
    return any(
        k.startswith("backbone.")
        or k in ("mask_token", "register_tokens")
        or _SWIGLU.match(k)
        or _CHUNKED_BLOCK.match(k)
        for k in keys
    )


def dinov2_to_timm(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Map a DINOv2 / DinoBloom checkpoint to timm's ``VisionTransformer`` key names.

    Parameters
    ----------
    state : mapping
        The loaded file: ``{"teacher": {...}}`` (a DINOv2 training checkpoint,
        as DinoBloom is released), or a DINOv2 backbone state dict, with or
        without the ``backbone.`` prefix.

    Returns
    -------
    state : dict of str to Tensor
        The encoder's tensors under timm's names (see the module docstring).
    timm_kwargs : dict
        Architecture settings the file implies: ``{"reg_tokens": R,
        "no_embed_class": True}`` when it has register tokens, else empty.

    Raises
    ------
    CheckpointError
        When a value is not a tensor, or the register tokens come without a
        position embedding.

    Examples
    --------
    >>> import torch
    >>> state = {"cls_token": torch.zeros(1, 1, 4), "pos_embed": torch.ones(1, 5, 4),
    ...          "register_tokens": torch.zeros(1, 2, 4)}
    >>> converted, extra = dinov2_to_timm(state)
    >>> extra, tuple(converted["pos_embed"].shape), converted["cls_token"].sum().item()
    ({'reg_tokens': 2, 'no_embed_class': True}, (1, 4, 4), 4.0)
    """
    inner = dict(_unwrap(state))
    out: dict[str, Tensor] = {}
    for key, value in inner.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"DINOv2 checkpoint: {key!r} is a {type(value).__name__}, not a tensor")
        name = key[len("backbone.") :] if key.startswith("backbone.") else key
        if key.startswith(_HEAD_PREFIXES) or name == "mask_token":
            continue
        chunked = _CHUNKED_BLOCK.match(name)
        if chunked:
            name = f"blocks.{chunked.group(2)}." + name[chunked.end() :]
        name = _SWIGLU.sub(lambda m: m.group(1) + ("fc1." if m.group(2) == "w12" else "fc2."), name)
        out[name] = value
    extra: dict[str, Any] = {}
    registers = out.pop("register_tokens", None)
    if registers is not None:
        if "pos_embed" not in out or "cls_token" not in out:
            raise CheckpointError("DINOv2 checkpoint: register_tokens without cls_token and pos_embed")
        pos = out["pos_embed"]
        out["reg_token"] = registers
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
        extra = {"reg_tokens": int(registers.shape[1]), "no_embed_class": True}
    return out, extra
