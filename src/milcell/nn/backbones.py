"""Backbone factory: any timm (or torchvision) image model as an instance feature extractor.

:func:`create_backbone` builds a model with ``timm.create_model(...,
num_classes=0)`` and wraps it in a :class:`Backbone` that maps a packed stack
of cell images ``(T, C, H, W)`` to features ``(T, D)``. The wrapper exposes
``num_features`` (``D``), ``in_chans``, ``name`` and ``data_config`` (input
size, mean, std, interpolation, crop_pct, as resolved by timm) for the data
transforms.

**Names.** Any timm model name works (``timm.list_models()``), as does any torchvision
classification model through the ``"torchvision/"`` prefix (e.g.
``"torchvision/googlenet"``, which timm lacks). :func:`list_backbones` lists
the presets used by the reproduced reports, including the K-scaled
mini-ResNet (:mod:`milcell.nn.mini_resnet`).

**Weights.** ``pretrained=True`` uses timm's (or torchvision's) normal download. Offline
(``HF_HUB_OFFLINE=1``), or when a short probe cannot open a connection to the
weights' host (or to the https proxy) within a few seconds, it fails at once
with a :class:`~milcell.exceptions.CheckpointError` that says how to pass a
local file, instead of waiting for the hub's retries. ``checkpoint_path``
(safetensors or a torch state dict, read with ``weights_only=True``) always
works and never unpickles code; torchvision's GoogLeNet and Inception-v3
ImageNet files load as they are (their auxiliary-classifier keys are dropped,
and ``transform_input=True`` is set as torchvision does for these weights).

**Presets with their own weights.** A preset registered with
:func:`register_backbone_preset` (a name for a timm architecture, its keyword
arguments, its data config and, optionally, a local weights file) is built by
:func:`create_backbone` like a built-in name; ``pretrained=True`` then loads the
preset's file. The DinoBloom blood-cell encoders (``"dinobloom_s"``, ``_b``,
``_l``, ``_g``; :mod:`milcell.nn.dinobloom`) are registered this way; their
released files (DINOv2 training checkpoints) are passed with
``checkpoint_path``. A DINOv2-layout checkpoint (``{"teacher": ...}``,
``backbone.`` prefix) loads into any timm DINOv2 ViT, its keys mapped to timm's.

**Trainable parts.** ``trainable="all"`` trains everything; ``trainable="head"`` freezes every
backbone parameter (a frozen feature extractor: only the pooling and head on
top train, and features may be cached); an int ``k`` leaves only the last
``k`` stages (plus any final norm or head convolution after them) trainable,
using timm's ``group_matcher`` to find the stages.

Examples
--------
>>> import torch
>>> from milcell.nn.backbones import create_backbone
>>> net = create_backbone("milcell_mini_resnet_k8")
>>> net(torch.rand(5, 3, 32, 32)).shape, net.num_features
(torch.Size([5, 64]), 64)
>>> net.data_config["mean"]
(0.485, 0.456, 0.406)
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
from timm.models import group_parameters
from torch import Tensor, nn

import milcell.nn.mini_resnet  # noqa: F401  (registers the mini-ResNet models with timm)
from milcell._validation import check_choice, check_int, constraint_error
from milcell.exceptions import CheckpointError, ConfigError
from milcell.nn.dinobloom import DINOBLOOM_MODELS, DINOBLOOM_URLS, dinov2_to_timm, is_dinov2_layout

__all__ = [
    "BACKBONE_PRESETS",
    "NETWORK_PROBE_TIMEOUT_S",
    "Backbone",
    "BackbonePreset",
    "backbone_stages",
    "create_backbone",
    "get_backbone_preset",
    "list_backbones",
    "load_backbone_weights",
    "register_backbone_preset",
    "set_trainable",
]

logger = logging.getLogger("milcell")

TORCHVISION_PREFIX = "torchvision/"

#: Preset names and what they reproduce. Any other timm name works as well.
BACKBONE_PRESETS: dict[str, str] = {
    "resnet18": "ResNet-18 (white-cell types with the last two stages trainable; lymphocytosis 2024)",
    "efficientnet_b0": "EfficientNet-B0 (leukaemia C-NMC, Noisy Student and backbone comparison)",
    "efficientnet_b3": "EfficientNet-B3 (leukaemia backbone comparison)",
    "vit_base_patch16_224": "ViT-B/16 vision transformer",
    "vgg16": "VGG-16 (leukaemia backbone comparison; white-cell pseudo-labels)",
    "densenet169": "DenseNet-169 (leukaemia backbone comparison)",
    "resnet152": "ResNet-152 (leukaemia backbone comparison)",
    "torchvision/googlenet": "GoogLeNet from torchvision (leukaemia backbone comparison)",
    "milcell_mini_resnet": "K-scaled mini-ResNet, width=K (lymphocytosis 2021)",
    "milcell_mini_resnet_k8": "tiny K=8 mini-ResNet for tests and tours",
    "milcell_mini_resnet_k32": "mini-ResNet K=32 (lymphocytosis 2021)",
    "milcell_mini_resnet_k64": "mini-ResNet K=64 (lymphocytosis 2021)",
}

_IMAGENET_CONFIG: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": timm.data.IMAGENET_DEFAULT_MEAN,
    "std": timm.data.IMAGENET_DEFAULT_STD,
    "crop_pct": 0.875,
    "crop_mode": "center",
}
# Classifier prefixes that a checkpoint may carry and a feature extractor does not need.
_CLASSIFIER_PREFIXES = ("fc", "classifier", "head", "heads", "last_linear", "head_dist")
# Auxiliary classifiers of torchvision's GoogLeNet / Inception-v3 (training aids, not features).
_AUX_PREFIXES = ("aux1", "aux2", "AuxLogits")
# torchvision models whose ImageNet weights expect transform_input=True (torchvision sets it for them).
_TRANSFORM_INPUT_ARCHS = ("googlenet", "inception_v3")
_IMAGENET_CLASSES = 1000
_OFFLINE_HINT = (
    "download pretrained weights where the network is reachable, or pass a local weights file with "
    "checkpoint_path='model.safetensors' (safetensors or a torch state dict), or set HF_HUB_OFFLINE=1 "
    "to use only weights already in the local cache"
)
#: Seconds the connectivity probe waits before ``pretrained=True`` gives up (DNS and TCP connect).
NETWORK_PROBE_TIMEOUT_S = 5.0


def list_backbones() -> list[str]:
    """Sorted preset names, registered ones included (any timm name or ``"torchvision/<name>"`` works too).

    Returns
    -------
    list of str

    Examples
    --------
    >>> "resnet18" in list_backbones() and "milcell_mini_resnet_k32" in list_backbones()
    True
    """
    return sorted(BACKBONE_PRESETS)


class Backbone(nn.Module):
    """A feature extractor mapping images ``(T, C, H, W)`` to features ``(T, D)``.

    Built by :func:`create_backbone`; wraps a timm or torchvision model whose
    classifier has been removed.

    Parameters
    ----------
    model : nn.Module
        Classifier-free network; its output is flattened to ``(T, D)``.
    name : str
        The name it was created from.
    num_features : int
        ``D``, the output width.
    data_config : dict
        ``input_size`` ``(C, H, W)``, ``mean``, ``std``, ``interpolation``,
        ``crop_pct`` (and ``crop_mode``) for the data transforms.
    in_chans : int, default 3
        Input channels ``C``.

    Attributes
    ----------
    trainable : str or int
        What :func:`set_trainable` last left trainable ("all", "head" or k).

    Examples
    --------
    >>> import torch
    >>> bb = Backbone(torch.nn.Flatten(1), name="flat", num_features=12, data_config={})
    >>> bb(torch.rand(2, 3, 2, 2)).shape
    torch.Size([2, 12])
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        num_features: int,
        data_config: Mapping[str, Any],
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.num_features = int(num_features)
        self.data_config = dict(data_config)
        self.in_chans = int(in_chans)
        self.trainable: str | int = "all"

    def forward(self, x: Tensor) -> Tensor:
        """``(T, C, H, W)`` → ``(T, D)``."""
        y = self.model(x)
        if isinstance(y, (tuple, list)):  # e.g. torchvision models returning auxiliary outputs
            y = y[0]
        return y.flatten(1) if y.ndim != 2 else y

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_features={self.num_features}, trainable={self.trainable!r}"


# ---------------------------------------------------------------------------------------------- names
def _suggest(name: str) -> str:
    all_names = timm.list_models()
    stem = name.split("/")[-1].split(".")[0]
    found = timm.list_models(f"*{stem}*")[:8] if stem else []
    close = difflib.get_close_matches(stem, all_names + list(BACKBONE_PRESETS), n=5, cutoff=0.6)
    suggestions = list(dict.fromkeys(close + found))[:8]
    return ", ".join(suggestions) if suggestions else ", ".join(list_backbones())


def _check_timm_name(name: str) -> None:
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise ConfigError(
            f"create_backbone: unknown backbone name {name!r}; did you mean one of: {_suggest(name)} "
            "(timm.list_models() lists all; torchvision models take the 'torchvision/' prefix)"
        )


# --------------------------------------------------------------------------------------------- presets
_LAYOUTS = ("auto", "timm", "dinov2")
_DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


@dataclass(frozen=True)
class BackbonePreset:
    """A named backbone: a timm architecture, its keyword arguments, data config and weights file.

    Made by :func:`register_backbone_preset` (and, for the DinoBloom encoders,
    by milcell itself); read with :func:`get_backbone_preset`.

    Attributes
    ----------
    name : str
        The preset's name, as given to :func:`create_backbone`.
    architecture : str
        The timm model it builds (e.g. ``"vit_small_patch14_dinov2"``).
    timm_kwargs : dict
        Keyword arguments for ``timm.create_model`` (those given to
        :func:`create_backbone` take precedence).
    data_config : dict
        Overrides of timm's data config (``input_size``, ``mean``, ``std``,
        ``interpolation``, ``crop_pct``, ``crop_mode``).
    checkpoint_path : str or None
        The local weights file that ``pretrained=True`` loads.
    layout : {"auto", "timm", "dinov2"}
        Key layout of weights files (``"auto"`` detects a DINOv2 checkpoint).
    description : str
        One line for :func:`list_backbones` / ``milcell info``.
    download : str or None
        Where the weights are published (named when ``pretrained=True`` has no file).

    Examples
    --------
    >>> get_backbone_preset("dinobloom_s").architecture
    'vit_small_patch14_dinov2'
    """

    name: str
    architecture: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    data_config: dict[str, Any] = field(default_factory=dict)
    checkpoint_path: str | None = None
    layout: str = "auto"
    description: str = ""
    download: str | None = None


_PRESETS: dict[str, BackbonePreset] = {}


def get_backbone_preset(name: str) -> BackbonePreset | None:
    """The registered preset called ``name``, or None for a plain timm / torchvision name.

    Parameters
    ----------
    name : str

    Returns
    -------
    BackbonePreset or None

    Examples
    --------
    >>> get_backbone_preset("dinobloom_b").timm_kwargs["img_size"], get_backbone_preset("resnet18")
    (224, None)
    """
    return _PRESETS.get(name) if isinstance(name, str) else None


def _check_preset_data_config(name: str, data_config: Mapping[str, Any] | None) -> dict[str, Any]:
    from milcell.data.transforms import resolve_data_config

    config = dict(data_config or {})
    unknown = sorted(set(config) - set(_DATA_CONFIG_KEYS))
    if unknown:
        raise ConfigError(
            f"register_backbone_preset({name!r}): unknown data_config keys {unknown}; "
            f"allowed: {', '.join(_DATA_CONFIG_KEYS)}"
        )
    for key in ("input_size", "mean", "std"):
        if key in config:
            config[key] = tuple(config[key])
    probe = dict(config)  # mean and std are per channel: 3 unless input_size says otherwise
    probe.pop("crop_mode", None)
    try:
        resolve_data_config(probe)
    except ConfigError as exc:
        raise ConfigError(f"register_backbone_preset({name!r}): {exc}") from None
    return config


def register_backbone_preset(
    name: str,
    architecture: str,
    checkpoint_path: str | os.PathLike[str] | None = None,
    *,
    data_config: Mapping[str, Any] | None = None,
    description: str | None = None,
    layout: str = "auto",
    overwrite: bool = False,
    **timm_kwargs: Any,
) -> BackbonePreset:
    """Register a timm architecture (and optionally a local checkpoint of it) under a name.

    The name then works wherever a backbone name does: :func:`create_backbone`,
    :func:`~milcell.nn.model.create_mil_model`, :func:`list_backbones` (and
    ``milcell info``), and ``--backbone`` of the command when it runs in the
    same process (``milcell.cli.main([...])`` after registering). Presets live
    in the process: register them again (e.g. in a module your scripts import)
    before loading a saved run that uses one.

    Parameters
    ----------
    name : str
        The new name. It must not be a timm model name, start with
        ``"torchvision/"``, or be registered already (unless ``overwrite``).
    architecture : str
        A timm model name (``timm.list_models()``), e.g. ``"vit_small_patch14_dinov2"``.
    checkpoint_path : path or None, default None
        Local weights that ``create_backbone(name, pretrained=True)`` loads
        (safetensors, or a torch file read with ``weights_only=True``; timm
        key names, or a DINOv2 checkpoint, see ``layout``). It must exist now.
        A ``checkpoint_path`` given to :func:`create_backbone` replaces it.
    data_config : mapping or None, default None
        Preprocessing of the weights, overriding timm's defaults for the
        architecture: ``input_size`` ``(C, H, W)``, ``mean``, ``std``,
        ``interpolation``, ``crop_pct``, ``crop_mode``.
    description : str or None, default None
        One line for :func:`list_backbones` / ``milcell info``.
    layout : {"auto", "timm", "dinov2"}, default "auto"
        Key layout of the weights: ``"timm"`` as they are, ``"dinov2"``
        through :func:`~milcell.nn.dinobloom.dinov2_to_timm`, ``"auto"``
        detects a DINOv2 checkpoint.
    overwrite : bool, default False
        Replace a preset registered earlier under ``name``.
    **timm_kwargs
        Keyword arguments for ``timm.create_model`` (``img_size=224``,
        ``embed_dim=...``); checked now by building the model on the ``meta``
        device (no memory, no weights).

    Returns
    -------
    BackbonePreset

    Raises
    ------
    ConfigError
        A bad name, architecture, keyword argument, data config or layout.
    CheckpointError
        ``checkpoint_path`` is not a file.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> from safetensors.torch import save_file
    >>> src = create_backbone("milcell_mini_resnet", width=4)
    >>> path = os.path.join(tempfile.mkdtemp(), "lab_encoder.safetensors")
    >>> save_file(src.model.state_dict(), path)
    >>> _ = register_backbone_preset("lab_cells_v1", "milcell_mini_resnet", path, width=4,
    ...                              data_config={"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    >>> net = create_backbone("lab_cells_v1", pretrained=True)
    >>> net.name, net.num_features, net.data_config["std"], "lab_cells_v1" in list_backbones()
    ('lab_cells_v1', 32, (0.25, 0.25, 0.25), True)
    >>> torch.equal(net.model.conv1.weight, src.model.conv1.weight)
    True
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise constraint_error("register_backbone_preset: name", "a non-empty string without spaces", name)
    if name.startswith(TORCHVISION_PREFIX) or name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise ConfigError(f"register_backbone_preset: name {name!r} uses a reserved prefix")
    if timm.is_model(name.split(".")[0]):
        raise ConfigError(
            f"register_backbone_preset: {name!r} is a timm model name; choose another name for the preset"
        )
    overwrite = bool(check_choice(overwrite, "register_backbone_preset: overwrite", (True, False)))
    if name in _PRESETS and not overwrite:
        raise ConfigError(
            f"register_backbone_preset: {name!r} is registered already; pass overwrite=True to replace it"
        )
    if name in BACKBONE_PRESETS and name not in _PRESETS:
        raise ConfigError(f"register_backbone_preset: {name!r} is a built-in backbone name")
    if not isinstance(architecture, str) or architecture.startswith(TORCHVISION_PREFIX):
        raise constraint_error("register_backbone_preset: architecture", "a timm model name", architecture)
    if architecture in _PRESETS:
        raise ConfigError(
            f"register_backbone_preset: architecture {architecture!r} is itself a preset; "
            "name its timm architecture instead"
        )
    _check_timm_name(architecture)
    layout = str(check_choice(layout, "register_backbone_preset: layout", _LAYOUTS))
    config = _check_preset_data_config(name, data_config)
    path = None
    if checkpoint_path is not None:
        file = Path(checkpoint_path).expanduser()
        if not file.is_file():
            raise CheckpointError(
                f"register_backbone_preset({name!r}): checkpoint file {str(file)!r} does not exist"
            )
        path = str(file.resolve())
    kwargs = dict(timm_kwargs)
    if "num_classes" in kwargs:
        raise ConfigError(
            "register_backbone_preset: num_classes does not apply (a backbone has no classifier)"
        )
    with torch.device("meta"):  # validates the keyword arguments without allocating the weights
        _create_timm(architecture, False, 3, dict(kwargs))
    preset = BackbonePreset(
        name=name,
        architecture=architecture,
        timm_kwargs=kwargs,
        data_config=config,
        checkpoint_path=path,
        layout=layout,
        description=description or f"registered preset: {architecture}" + (f" with {path}" if path else ""),
    )
    _PRESETS[name] = preset
    BACKBONE_PRESETS[name] = preset.description
    logger.info("registered backbone preset %r (%s)", name, architecture)
    return preset


def _register_dinobloom() -> None:
    for name, (architecture, width, paper) in DINOBLOOM_MODELS.items():
        description = (
            f"{paper} blood-cell encoder (Koch et al. 2024), DINOv2 {architecture.split('_')[1]} ViT/14 "
            f"at 224 px, {width}-d; weights: checkpoint_path={paper}.pth"
        )
        _PRESETS[name] = BackbonePreset(
            name=name,
            architecture=architecture,
            timm_kwargs={"img_size": 224, "global_pool": "token"},
            data_config={
                "input_size": (3, 224, 224),
                "mean": timm.data.IMAGENET_DEFAULT_MEAN,
                "std": timm.data.IMAGENET_DEFAULT_STD,
                "interpolation": "bicubic",
                "crop_pct": 1.0,
                "crop_mode": "center",
            },
            layout="auto",
            description=description,
            download=DINOBLOOM_URLS[name],
        )
        BACKBONE_PRESETS[name] = description


_register_dinobloom()


def _create_preset(
    preset: BackbonePreset,
    pretrained: bool,
    checkpoint_path: str | os.PathLike[str] | None,
    in_chans: int,
    timm_kwargs: dict[str, Any],
) -> tuple[Backbone, dict[str, Tensor] | None, Path | None]:
    """Build a preset's network (weights not loaded yet): the backbone, the state to load, its file."""
    kwargs = {**preset.timm_kwargs, **timm_kwargs}
    path: Path | None = None
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
    elif pretrained:
        if preset.checkpoint_path is None:
            where = f"download it from {preset.download}" if preset.download else "get the weights file"
            stem = (
                Path(urllib.parse.urlsplit(preset.download).path).name if preset.download else "weights.pth"
            )
            raise CheckpointError(
                f"create_backbone: the preset {preset.name!r} has no weights milcell can download "
                f"(timm does not host them); {where} and pass the local file: "
                f"create_backbone({preset.name!r}, checkpoint_path='{stem}') in Python, "
                f"--backbone {preset.name} --checkpoint-path {stem} on the command line"
            )
        path = Path(preset.checkpoint_path)
    state = None
    if path is not None:
        state, implied = _state_from(_read_checkpoint(path), path, preset.layout)
        for key, value in implied.items():
            kwargs.setdefault(key, value)
    model, num_features, data_config = _create_timm(preset.architecture, False, in_chans, kwargs)
    for key, value in preset.data_config.items():
        if key == "input_size" and "img_size" in timm_kwargs:
            continue  # the caller's img_size sets the input size
        if key in ("mean", "std") and len(value) != in_chans:
            value = (sum(value) / len(value),) * in_chans
        if key == "input_size":
            value = (in_chans, *tuple(value)[1:])
        data_config[key] = value
    backbone = Backbone(
        model, name=preset.name, num_features=num_features, data_config=data_config, in_chans=in_chans
    )
    return backbone, state, path


# -------------------------------------------------------------------------------------------- building
def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _probe_target(url: str) -> tuple[str, int]:
    """``(host, port)`` a download of ``url`` connects to first: the proxy for it, if any."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_url.hostname:
            return proxy_url.hostname, proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
    return host, port


def _check_reachable(url: str, what: str, timeout: float | None = None) -> None:
    """Raise :class:`CheckpointError` unless a TCP connection to ``url``'s host opens in time.

    A download without network would otherwise wait for the hub's retries (about
    a minute), or longer where packets are silently dropped. Name resolution has
    no timeout of its own, so the probe runs in a daemon thread that is
    abandoned when ``timeout`` (default :data:`NETWORK_PROBE_TIMEOUT_S`) passes.
    """
    limit = NETWORK_PROBE_TIMEOUT_S if timeout is None else float(timeout)
    host, port = _probe_target(url)
    if not host:
        return
    failure: list[str] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=limit).close()
        except Exception as exc:  # any failure to connect means: no usable network
            failure.append(f"{type(exc).__name__}: {exc}")

    start = time.monotonic()
    thread = threading.Thread(target=probe, name="milcell-network-probe", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        failure.append(f"no answer within {limit:g} s")
    if failure:
        raise CheckpointError(
            f"create_backbone: cannot reach {host}:{port} to download pretrained weights for {what} "
            f"({failure[0][:200]}, after {time.monotonic() - start:.1f} s); {_OFFLINE_HINT}"
        )


def _weights_cached(cfg: Any) -> bool:
    """Whether timm would find the pretrained weights of ``cfg`` without the network."""
    if getattr(cfg, "file", None):
        return Path(cfg.file).is_file()
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = [getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"]
        repo, _, revision = str(hub_id).partition("@")
        for filename in filter(None, names):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return True
        return False
    url = getattr(cfg, "url", None)
    if url:
        return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(url))).is_file()
    return False


def _create_timm(
    name: str, pretrained: bool, in_chans: int, timm_kwargs: dict[str, Any]
) -> tuple[nn.Module, int, dict[str, Any]]:
    _check_timm_name(name)
    if pretrained and not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not cfg.has_weights:
            raise ConfigError(
                f"create_backbone: timm has no pretrained weights for {name!r}; use pretrained=False "
                "or pass checkpoint_path='weights.safetensors'"
            )
        if not _weights_cached(cfg):
            if _is_offline():
                raise CheckpointError(
                    f"create_backbone: the hub is offline (HF_HUB_OFFLINE=1) and pretrained weights for "
                    f"{name!r} are not in the local cache; {_OFFLINE_HINT}"
                )
            source = f"{_hf_endpoint()}/" if getattr(cfg, "hf_hub_id", None) else str(cfg.url or "")
            _check_reachable(source, repr(name))
    elif pretrained and name.startswith(("hf-hub:", "hf_hub:")) and not _is_offline():
        from huggingface_hub import try_to_load_from_cache

        repo = name.split(":", 1)[1].split("@")[0]
        if not isinstance(try_to_load_from_cache(repo, "config.json"), str):  # timm fetches it first
            _check_reachable(f"{_hf_endpoint()}/", repr(name))
    start = time.monotonic()
    try:
        model = timm.create_model(
            name, pretrained=pretrained, num_classes=0, in_chans=in_chans, **timm_kwargs
        )
    except TypeError as exc:
        raise ConfigError(f"create_backbone: bad keyword argument for {name!r}: {exc}") from exc
    except Exception as exc:
        if not pretrained:
            raise
        raise CheckpointError(
            f"create_backbone: could not get pretrained weights for {name!r} after "
            f"{time.monotonic() - start:.1f} s ({type(exc).__name__}: {str(exc)[:200]}); {_OFFLINE_HINT}"
        ) from exc
    hidden: Any = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    num_features = int(hidden)
    data_config = dict(timm.data.resolve_model_data_config(model))
    if data_config["input_size"][0] != in_chans:
        data_config["input_size"] = (in_chans, *data_config["input_size"][1:])
    for key in ("mean", "std"):
        values = tuple(data_config[key])
        if len(values) != in_chans:
            data_config[key] = (sum(values) / len(values),) * in_chans
    img_size = timm_kwargs.get("img_size")
    if img_size is not None:
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        data_config["input_size"] = (in_chans, *hw)
    return model, num_features, data_config


def _holds_imagenet_classifier(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` carries a 1000-class ``fc`` (an ImageNet classification checkpoint)."""
    for prefix in ("", "module.", "model."):
        weight = state.get(f"{prefix}fc.weight")
        if weight is not None and weight.ndim == 2 and weight.shape[0] == _IMAGENET_CLASSES:
            return True
    return False


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    found = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (module_name, module)
    return found


def _create_torchvision(
    arch: str,
    pretrained: bool,
    in_chans: int,
    kwargs: dict[str, Any],
    checkpoint: Mapping[str, Tensor] | None = None,
) -> tuple[nn.Module, int, dict[str, Any]]:
    """Build ``torchvision.models.<arch>`` without its classifier.

    ``checkpoint`` is the state dict about to be loaded (its weights replace
    the initialisation, which is then skipped); when it is torchvision's own
    ImageNet file (a 1000-class ``fc``), the model is configured as torchvision
    configures it for those weights (``transform_input=True`` for GoogLeNet
    and Inception-v3, and the weights' input size).
    """
    import torchvision

    classification = set(torchvision.models.list_models(module=torchvision.models))
    if arch not in classification:
        close = difflib.get_close_matches(arch, sorted(classification), n=5, cutoff=0.5)
        raise ConfigError(
            f"create_backbone: unknown torchvision classification model {arch!r}; "
            f"did you mean one of: {', '.join(close) or ', '.join(sorted(classification)[:10])}"
        )
    if in_chans != 3:
        raise ConfigError(
            f"create_backbone: torchvision models take in_chans=3 only, got in_chans={in_chans}"
        )
    kwargs = dict(kwargs)
    imagenet_file = checkpoint is not None and _holds_imagenet_classifier(checkpoint)
    if arch in _TRANSFORM_INPUT_ARCHS and not pretrained:
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", checkpoint is None)  # loaded weights replace the init
        if imagenet_file and "transform_input" not in kwargs:
            kwargs["transform_input"] = True
            logger.info(
                "create_backbone(torchvision/%s): ImageNet weights file, so transform_input=True "
                "(as torchvision sets it for these weights)",
                arch,
            )
    weights = None
    if pretrained:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if not cached.exists():
            if _is_offline():
                raise CheckpointError(
                    f"create_backbone: the hub is offline (HF_HUB_OFFLINE=1) and torchvision weights for "
                    f"{arch!r} are not cached at {cached}; {_OFFLINE_HINT}"
                )
            _check_reachable(str(weights.url), f"torchvision/{arch}")
    try:
        model = torchvision.models.get_model(arch, weights=weights, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"create_backbone: bad keyword argument for torchvision/{arch}: {exc}") from exc
    except Exception as exc:
        if not pretrained:
            raise
        raise CheckpointError(
            f"create_backbone: could not get pretrained weights for torchvision/{arch} "
            f"({type(exc).__name__}: {str(exc)[:200]}); {_OFFLINE_HINT}"
        ) from exc
    if getattr(model, "aux_logits", False):  # auxiliary classifiers are training aids, not features
        model.aux_logits = False
        for aux in _AUX_PREFIXES:
            if hasattr(model, aux):
                setattr(model, aux, None)
    found = _last_linear(model)
    if found is None:
        raise ConfigError(f"create_backbone: torchvision/{arch} has no linear classifier to remove")
    path, linear = found
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    setattr(parent, path.rpartition(".")[2], nn.Identity())
    data_config = dict(_IMAGENET_CONFIG)
    if weights is None and imagenet_file:
        # the input size of torchvision's ImageNet weights (299 px for Inception-v3); no download
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    if weights is not None:
        size = getattr(weights.transforms(), "crop_size", None)
        if size:
            data_config["input_size"] = (3, *size) if len(size) == 2 else (3, size[0], size[0])
    return model, int(linear.in_features), data_config


def create_backbone(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike[str] | None = None,
    trainable: str | int = "all",
    in_chans: int = 3,
    **timm_kwargs: Any,
) -> Backbone:
    """Build a feature extractor ``(T, C, H, W)`` → ``(T, D)`` by name.

    Parameters
    ----------
    name : str
        A timm model name (see :func:`list_backbones` for presets, e.g.
        ``"resnet18"``, ``"efficientnet_b0"``, ``"vit_base_patch16_224"``,
        ``"milcell_mini_resnet_k32"``) or ``"torchvision/<name>"`` for a
        torchvision classification model (e.g. ``"torchvision/googlenet"``).
    pretrained : bool, default False
        Download ImageNet weights through timm/torchvision (or use them from
        the local cache). Without network it raises :class:`CheckpointError`
        within seconds: at once when ``HF_HUB_OFFLINE=1``, otherwise after a
        connectivity probe of at most :data:`NETWORK_PROBE_TIMEOUT_S` seconds;
        pass ``checkpoint_path`` instead.
    checkpoint_path : path or None, default None
        Local weights (``.safetensors`` or a torch state dict). Backbone keys
        must match exactly; classifier keys (``fc.*``, ``classifier.*``,
        ``head.*``) and the auxiliary classifiers of torchvision's GoogLeNet
        and Inception-v3 (``aux1.*``, ``aux2.*``, ``AuxLogits.*``) are dropped
        with a logged note. A torchvision GoogLeNet / Inception-v3 ImageNet file
        (1000-class ``fc``) also sets ``transform_input=True``, as torchvision
        does for those weights (pass ``transform_input=False`` to override).
        Takes precedence over ``pretrained``.
    trainable : {"all", "head"} or int, default "all"
        ``"all"``: every parameter trains. ``"head"`` (or ``0``): no backbone
        parameter trains (a frozen feature extractor). ``k``: only the last
        ``k`` stages (and whatever follows them, such as a final norm) train.
        A numpy integer is accepted.
    in_chans : int, default 3
        Input channels ``C`` (a numpy integer is accepted).
    **timm_kwargs
        Passed to ``timm.create_model`` (e.g. ``img_size=32`` for a ViT,
        ``global_pool="flatten"`` or ``norm_layer="groupnorm"`` for the
        mini-ResNet) or to ``torchvision.models.get_model``. ``num_classes``
        is ignored (the classifier is always removed; it must be an integer
        ``>= 0``).

    Returns
    -------
    Backbone
        With ``num_features`` (``D``), ``data_config``, ``in_chans``, ``name``.

    Raises
    ------
    ConfigError
        Unknown name (with suggestions), bad ``trainable`` or keyword argument,
        or a model without pretrained weights.
    CheckpointError
        Weights that cannot be downloaded or a bad ``checkpoint_path``.

    Examples
    --------
    >>> from milcell.nn.backbones import create_backbone
    >>> bb = create_backbone("resnet18", trainable=2)
    >>> sorted({n.split(".")[1] for n, p in bb.named_parameters() if p.requires_grad})
    ['layer3', 'layer4']
    >>> create_backbone("resnet_18")
    Traceback (most recent call last):
    ...
    milcell.exceptions.ConfigError: create_backbone: unknown backbone name 'resnet_18'; did you mean ...
    """
    if not isinstance(name, str) or not name:
        raise constraint_error("create_backbone: name", "a non-empty string", name)
    in_chans = check_int(in_chans, "create_backbone: in_chans", low=1)
    trainable = _check_trainable(trainable)
    pretrained = bool(check_choice(pretrained, "create_backbone: pretrained", (True, False)))
    if "num_classes" in timm_kwargs:
        ignored = check_int(timm_kwargs.pop("num_classes"), "create_backbone: num_classes", low=0)
        if ignored:
            logger.warning(
                "create_backbone(%s): num_classes=%d ignored; a backbone has no classifier "
                "(the MIL model's head sets the classes)",
                name,
                ignored,
            )
    download = pretrained and checkpoint_path is None
    if pretrained and checkpoint_path is not None:
        logger.info("create_backbone(%s): checkpoint_path given, not downloading pretrained weights", name)
    preset = _PRESETS.get(name)
    if preset is not None:
        backbone, preset_state, preset_path = _create_preset(
            preset, pretrained, checkpoint_path, in_chans, timm_kwargs
        )
        if preset_state is not None and preset_path is not None:
            _load_state(backbone.model, preset_state, preset_path)
        set_trainable(backbone, trainable)
        return backbone
    path = None if checkpoint_path is None else Path(checkpoint_path)
    state = None  # read before building: it may configure the model
    if path is not None:
        state, implied = _state_from(_read_checkpoint(path), path, "auto")
        if not name.startswith(TORCHVISION_PREFIX):
            for key, value in implied.items():
                timm_kwargs.setdefault(key, value)
    if name.startswith(TORCHVISION_PREFIX):
        model, num_features, data_config = _create_torchvision(
            name[len(TORCHVISION_PREFIX) :], download, in_chans, timm_kwargs, checkpoint=state
        )
    else:
        model, num_features, data_config = _create_timm(name, download, in_chans, timm_kwargs)
    backbone = Backbone(
        model, name=name, num_features=num_features, data_config=data_config, in_chans=in_chans
    )
    if path is not None and state is not None:
        _load_state(backbone.model, state, path)
    set_trainable(backbone, trainable)
    return backbone


# ------------------------------------------------------------------------------------------- weights
def _read_checkpoint(path: Path) -> Any:
    """The object in a weights file (safetensors, or torch with ``weights_only=True``)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is not a valid safetensors file: {exc}"
            ) from exc
    else:
        import pickle

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            detail = str(exc)
            if "GLOBAL" in detail or "global" in detail:
                reason = next((ln for ln in detail.splitlines() if "GLOBAL" in ln or "global" in ln), "")
                raise CheckpointError(
                    f"checkpoint file {str(path)!r} is not a weights-only torch file (it would need to run "
                    f"code to load, which milcell refuses): {reason.strip()[:200]}"
                ) from exc
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is corrupt or not a torch state dict (unreadable pickle)"
            ) from exc
        except Exception as exc:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is corrupt or not a torch state dict: "
                f"{type(exc).__name__}: {str(exc)[:200]}"
            ) from exc
    return state


def _state_from(state: Any, path: Path, layout: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A file's state dict in timm's key layout, and the model settings it implies.

    ``layout`` "dinov2" (or "auto" on a DINOv2 checkpoint) maps the keys with
    :func:`~milcell.nn.dinobloom.dinov2_to_timm`; otherwise a
    ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is unwrapped.
    """
    implied: dict[str, Any] = {}
    if isinstance(state, Mapping) and (layout == "dinov2" or (layout == "auto" and is_dinov2_layout(state))):
        try:
            state, implied = dinov2_to_timm(state)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint file {str(path)!r}: {exc}") from None
        logger.info("checkpoint %s: DINOv2 layout, keys mapped to timm's", path)
    elif isinstance(state, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = state.get(key)
            if isinstance(inner, Mapping) and len(state) <= 3:
                state = inner
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"checkpoint file {str(path)!r} does not hold a state dict of named tensors")
    return dict(state), implied


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """The state dict in ``path``, in timm's key layout (a DINOv2 checkpoint is mapped)."""
    return _state_from(_read_checkpoint(path), path, "auto")[0]


def load_backbone_weights(model: nn.Module, checkpoint_path: str | os.PathLike[str]) -> None:
    """Load local weights into a classifier-free backbone, strictly.

    Parameters
    ----------
    model : nn.Module
        The network (``Backbone.model`` or a :class:`Backbone`, whose
        ``model.`` prefix is handled).
    checkpoint_path : path
        ``.safetensors`` file, or a torch state dict (loaded with
        ``torch.load(..., weights_only=True)``; a ``{"state_dict": ...}`` or
        ``{"model": ...}`` wrapper and a ``module.`` prefix are accepted).
        Classifier keys (``fc.*``, ``classifier.*``, ``head.*`` ...) and the
        auxiliary-classifier keys of torchvision's GoogLeNet / Inception-v3
        (``aux1.*``, ``aux2.*``, ``AuxLogits.*``) that the model lacks are
        dropped with a logged note; every other key must match.

    Raises
    ------
    CheckpointError
        Missing file, corrupt file, a pickle that is not weights-only, missing
        or unexpected backbone keys, or shape mismatches; the message names the file.

    Examples
    --------
    >>> import tempfile, os, torch
    >>> from safetensors.torch import save_file
    >>> from milcell.nn.backbones import create_backbone, load_backbone_weights
    >>> src, dst = create_backbone("milcell_mini_resnet_k8"), create_backbone("milcell_mini_resnet_k8")
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save_file(src.model.state_dict(), path)
    >>> load_backbone_weights(dst, path)
    >>> torch.equal(dst.model.conv1.weight, src.model.conv1.weight)
    True
    """
    path = Path(checkpoint_path)
    if isinstance(model, Backbone):
        model = model.model
    _load_state(model, _read_state_dict(path), path)


def _load_state(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """Strictly load ``state`` (read from ``path``) into the classifier-free ``model``."""
    expected = model.state_dict()
    state = dict(state)
    for prefix in ("module.", "model."):
        if not (state.keys() & expected.keys()) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    ignored = [k for k in state if k not in expected and k.split(".")[0] in _CLASSIFIER_PREFIXES]
    auxiliary = [k for k in state if k not in expected and k.split(".")[0] in _AUX_PREFIXES]
    for k in ignored + auxiliary:
        del state[k]
    _resample_pos_embed(model, state, path)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} does not match the backbone: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint file {str(path)!r}: shape mismatch for {'; '.join(mismatched[:5])}"
        )
    model.load_state_dict(state, strict=True)
    if ignored:
        logger.info("loaded %s, ignoring classifier keys %s", path, ignored[:5])
    if auxiliary:
        heads = sorted({k.split(".")[0] for k in auxiliary})
        logger.info(
            "loaded %s, dropping %d keys of the auxiliary classifiers %s (training aids the backbone "
            "does not have)",
            path,
            len(auxiliary),
            heads,
        )


def _resample_pos_embed(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Resample a ViT's absolute position embedding in ``state`` to ``model``'s patch grid, in place."""
    pos = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not isinstance(pos, Tensor) or not isinstance(target, Tensor) or grid is None:
        return
    if pos.ndim != 3 or target.ndim != 3 or pos.shape == target.shape or pos.shape[-1] != target.shape[-1]:
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    from timm.layers import resample_abs_pos_embed

    patches = pos.shape[1] - prefix
    side = math.isqrt(patches)
    if side * side != patches:
        return  # not a square grid: left to the shape check, which names it
    state["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=prefix)
    logger.info(
        "checkpoint %s: position embedding resampled from a %dx%d to a %dx%d patch grid",
        path,
        side,
        side,
        *grid,
    )


# ----------------------------------------------------------------------------------------- trainable
def _check_trainable(trainable: Any) -> str | int:
    """``trainable`` validated and canonical: ``"all"``, ``"head"`` (also for 0) or an int ``k >= 1``."""
    constraint = "'all', 'head' or a number of last stages (an integer >= 0)"
    try:
        if isinstance(trainable, str):
            value: str | int = check_choice(trainable, "trainable", ("all", "head"))
        else:
            value = check_int(trainable, "trainable", low=0)
    except ConfigError:
        raise constraint_error("trainable", constraint, trainable) from None
    return "head" if value == 0 else value


def _patterns(spec: Any) -> list[re.Pattern[str]]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [re.compile(spec)]
    return [re.compile(s[0] if isinstance(s, (tuple, list)) else s) for s in spec]


def backbone_stages(model: nn.Module) -> tuple[list[str], list[list[str]], list[str]]:
    """Split a network's parameter names into stem, ordered stages, and tail.

    Uses the model's timm ``group_matcher(coarse=True)`` where it has one
    (the ``stem`` group, then each stage, then unmatched parameters such as a
    final norm as the tail); otherwise every top-level child with
    parameters counts as a stage.

    Parameters
    ----------
    model : nn.Module
        A timm model, a torchvision model, or a :class:`Backbone`.

    Returns
    -------
    stem : list of str
    stages : list of list of str
    tail : list of str

    Examples
    --------
    >>> from milcell.nn.backbones import create_backbone
    >>> stem, stages, tail = backbone_stages(create_backbone("milcell_mini_resnet_k8"))
    >>> stem[0], len(stages), stages[-1][0], tail
    ('conv1.weight', 4, 'layer4.0.conv1.weight', [])
    """
    if isinstance(model, Backbone):
        model = model.model
    names = [n for n, _ in model.named_parameters()]
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        spec = matcher(coarse=True)
        stem_patterns = _patterns(spec.get("stem"))
        other_patterns = [p for key, s in spec.items() if key != "stem" for p in _patterns(s)]
        group_of = group_parameters(model, spec, reverse=True)
        stem = [n for n in names if any(p.match(n) for p in stem_patterns)]
        tail = [n for n in names if n not in stem and not any(p.match(n) for p in other_patterns)]
        stem_ids = {group_of[n] for n in stem}
        tail_set = set(tail) | set(stem)
        ordered: dict[int, list[str]] = {}
        for n in names:
            if n not in tail_set and group_of[n] not in stem_ids:
                ordered.setdefault(group_of[n], []).append(n)
        stages = [ordered[i] for i in sorted(ordered)]
        return stem, stages, tail
    stages = []
    for child_name, child in model.named_children():
        params = [f"{child_name}.{n}" for n, _ in child.named_parameters()]
        if params:
            stages.append(params)
    return [], stages, []


def set_trainable(model: nn.Module, trainable: str | int) -> None:
    """Set ``requires_grad`` on a backbone's parameters.

    Parameters
    ----------
    model : nn.Module
        A :class:`Backbone` (records ``trainable``, ``"head"`` for 0) or a bare network.
    trainable : {"all", "head"} or int (numpy integers accepted)
        ``"all"``: everything trains; ``"head"`` (or 0): nothing in the backbone
        trains, it is a frozen feature extractor; ``k``: the last ``k`` stages
        and the tail after them train, the stem and earlier stages are frozen.

    Raises
    ------
    ConfigError
        For an invalid value or more stages than the network has.

    Examples
    --------
    >>> from milcell.nn.backbones import create_backbone
    >>> bb = create_backbone("milcell_mini_resnet_k8")
    >>> set_trainable(bb, "head")
    >>> any(p.requires_grad for p in bb.parameters())
    False
    """
    trainable = _check_trainable(trainable)
    net = model.model if isinstance(model, Backbone) else model
    params = dict(net.named_parameters())
    if trainable == "all":
        keep: Iterable[str] = params
    elif trainable == "head":
        keep = ()
        logger.info("backbone frozen (trainable='head'): it is a fixed feature extractor")
    else:
        _, stages, tail = backbone_stages(net)
        k = int(trainable)
        if k > len(stages):
            raise ConfigError(
                f"trainable={k} but {type(net).__name__} has only {len(stages)} stages "
                "(use 'all', 'head' or a smaller int)"
            )
        keep = [n for stage in stages[len(stages) - k :] for n in stage] + tail
    keep_set = set(keep)
    for n, p in params.items():
        p.requires_grad_(n in keep_set)
    if isinstance(model, Backbone):
        model.trainable = trainable
