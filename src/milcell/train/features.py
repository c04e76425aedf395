"""Frozen-backbone feature cache: embed every cell once, train heads on the features.

When the backbone is frozen (``trainable="head"``, as in the 2024
lymphocytosis report's best model), its outputs never change, so
:func:`extract_features` runs it once over every instance of a dataset and
returns a :class:`~milcell.data.FeatureBagDataset`. A head model
(``create_mil_model(backbone=None, in_dim=D, ...)``) then trains on the
features through the same collate and pooling, for as many folds and epochs
as wanted, at the cost of about one backbone pass over the images.

The cache
---------
``cache_dir`` holds ``features.safetensors`` and ``manifest.json``. The
manifest records the cache *key*: the backbone's name, a SHA-256 of its
state-dict tensors, the preprocessing (the dataset's ``transform`` repr, the
backbone's ``data_config``, the instance cap), the precision, and the list of
``(bag id, file names)``, and the size and SHA-256 digest of the features
file. It is written last, atomically, after the features file (itself written
to a temporary name and renamed), while the folder is locked against other
processes (:func:`milcell._locks.folder_lock`; a process that finds the lock
taken keeps its features without writing them). A later call reuses the cache
when the manifest is readable, its key equals the current key, the features
file has the recorded size and digest, and the key embedded in the features
file (its safetensors metadata) is the current key too; otherwise it logs why
on the ``"milcell"`` logger and rebuilds (or, with ``recompute=False``, raises
:class:`~milcell.exceptions.CacheError`). Labels and clinical attributes are not
part of the key: they are taken from the dataset on every call.

Clinical attributes and folds
-----------------------------
The returned dataset carries ``dataset.clinical`` as it is. Build the image
dataset *without* a clinical scaler, so the cache holds raw values, and scale
per fold in ``make_datasets`` with a scaler fitted on the training rows
(:func:`~milcell.train.crossval.feature_subset` does it).

What invalidates the cache
--------------------------
Images changed in place under the same file names are not detected (pass
``key_extra``, e.g. a data version, or delete the cache). A transform without
a stable ``repr`` (a lambda) gives a key that changes every run. Random
augmentation would be frozen into the features: use the evaluation transform.

Examples
--------
>>> import tempfile, torch
>>> from milcell.data import Bag
>>> bags = [Bag(torch.rand(3, 3, 8, 8), label=i % 2, id=f"P{i}") for i in range(4)]
>>> net = torch.nn.Sequential(torch.nn.Flatten(1), torch.nn.Linear(192, 5))
>>> cache = tempfile.mkdtemp()
>>> ds = extract_features(net, bags, cache, progress=False)
>>> ds.ids, ds[0].instances.shape, ds.labels.tolist()
(['P0', 'P1', 'P2', 'P3'], torch.Size([3, 5]), [0, 1, 0, 1])
>>> torch.equal(extract_features(net, bags, cache, progress=False)[0].instances, ds[0].instances)
True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from milcell._locks import folder_lock
from milcell._utils import atomic_path, json_safe
from milcell._validation import check_int
from milcell.data.bag import Bag, BagBatch, collate_bags
from milcell.data.datasets import BagDataset, FeatureBagDataset, InstanceDataset, select_instances
from milcell.exceptions import CacheError, ConfigError, DataError, LockError, ShapeError
from milcell.nn.encoder import encode_in_chunks
from milcell.train.inference import _check_precision, autocast

__all__ = [
    "FEATURES_NAME",
    "MANIFEST_NAME",
    "FeatureCache",
    "cache_key",
    "extract_features",
    "read_feature_cache",
    "state_dict_hash",
]

logger = logging.getLogger("milcell")

FEATURES_NAME = "features.safetensors"
MANIFEST_NAME = "manifest.json"
_CACHE_VERSION = 1
_PRECISIONS = ("32", "bf16")  # fp16 features would lose range for nothing: the cache stores float32


def state_dict_hash(module: nn.Module) -> str:
    """SHA-256 over a module's state-dict tensors (names, dtypes, shapes and bytes).

    Parameters
    ----------
    module : nn.Module

    Returns
    -------
    str
        64 hexadecimal characters; equal for modules with equal weights and buffers.

    Examples
    --------
    >>> import torch
    >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> state_dict_hash(a) == state_dict_hash(a), state_dict_hash(a) == state_dict_hash(b)
    (True, False)
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _items(dataset: Dataset[Bag]) -> tuple[list[str], list[list[str]], bool]:
    """Bag ids and instance (file) names, without reading images where the dataset allows it.

    Returns the ids, the names per bag, and whether the listing came from records.
    """
    if isinstance(dataset, BagDataset):
        if dataset.max_instances is not None and dataset.train:
            raise ConfigError(
                "extract_features: the BagDataset draws random instance subsets (train=True with "
                "max_instances); use train=False (deterministic subsets) or max_instances=None"
            )
        ids, names = [], []
        for i, record in enumerate(dataset.cohort):
            keep = select_instances(record.num_instances, dataset.max_instances, train=False, index=i)
            ids.append(record.id)
            names.append([record.instance_names[int(k)] for k in keep])
        return ids, names, True
    if isinstance(dataset, InstanceDataset):
        ids = [r.id for r in dataset.cells]
        names = [[r.instance_name] for r in dataset.cells]
        return ids, names, True
    ids, names = [], []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        bag = dataset[i]
        ids.append(bag.id or str(i))
        names.append(list(bag.instance_names) if bag.instance_names else [f"#{j}" for j in range(len(bag))])
    return ids, names, False


def _preprocessing(backbone: nn.Module, dataset: Dataset[Bag]) -> dict[str, Any]:
    transform = getattr(dataset, "transform", None)
    text = repr(transform) if transform is not None else None
    if text is not None and "Random" in text:
        logger.warning(
            "extract_features: the dataset's transform looks random (%s...); its augmentation is frozen "
            "into the cached features: use the evaluation transform",
            text[:80],
        )
    if text is not None and " at 0x" in text:
        logger.warning(
            "extract_features: the transform's repr holds a memory address (%s); the cache key will "
            "change from run to run",
            text[:80],
        )
    return {
        "dataset": type(dataset).__name__,
        "transform": text,
        "max_instances": getattr(dataset, "max_instances", None),
        "apply_mask": getattr(dataset, "apply_mask", None),
        "data_config": json_safe(getattr(backbone, "data_config", None)),
    }


def cache_key(
    backbone: nn.Module,
    dataset: Dataset[Bag],
    precision: str = "32",
    key_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The key a cache of ``backbone`` features of ``dataset`` is stored under.

    Parameters
    ----------
    backbone : nn.Module
        The feature extractor (its ``name`` attribute, else its class name).
    dataset : Dataset of Bag
        :class:`~milcell.data.BagDataset` and :class:`~milcell.data.InstanceDataset`
        are listed from their records; another dataset is read once (images
        loaded, no backbone call) to list its bag ids and instance names.
    precision : {"32", "bf16"}, default "32"
    key_extra : mapping, optional
        Extra JSON-serialisable entries (e.g. a data version).

    Returns
    -------
    dict
        JSON-serialisable: ``backbone``, ``weights`` (:func:`state_dict_hash`),
        ``preprocessing``, ``precision``, ``items`` (``[id, [names]]`` per bag), ``extra``.

    Raises
    ------
    ConfigError
        A dataset drawing random instance subsets.

    Examples
    --------
    >>> import torch
    >>> from milcell.data import Bag
    >>> key = cache_key(torch.nn.Flatten(1), [Bag(torch.rand(2, 4), id="P1")])
    >>> key["backbone"], key["items"]
    ('Flatten', [['P1', ['#0', '#1']]])
    """
    ids, names, _ = _items(dataset)
    key = {
        "version": _CACHE_VERSION,
        "backbone": str(getattr(backbone, "name", type(backbone).__name__)),
        "weights": state_dict_hash(backbone),
        "preprocessing": _preprocessing(backbone, dataset),
        "precision": str(precision),
        "items": [[i, n] for i, n in zip(ids, names, strict=True)],
        "extra": dict(key_extra or {}),
    }
    try:
        return json.loads(json.dumps(key))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cache_key: key_extra must be JSON-serialisable: {exc}") from exc


def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_manifest(cache_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The cache's manifest (with ``key``, ``digest``, ``size``), or None and why not."""
    manifest_path = cache_dir / MANIFEST_NAME
    features_path = cache_dir / FEATURES_NAME
    if not manifest_path.is_file():
        if features_path.exists():
            return None, f"no manifest (interrupted while writing?) beside {features_path}"
        return None, "empty"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(manifest["key"], dict) or not isinstance(manifest["digest"], str):
            raise TypeError("'key' must be an object and 'digest' a string")
        manifest["size"] = int(manifest["size"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable manifest {manifest_path} ({exc})"
    return manifest, ""


def _read_features(cache_dir: Path, manifest: Mapping[str, Any]) -> tuple[FeatureBagDataset | None, str]:
    """The features file if it is the one ``manifest`` describes (size, SHA-256, key, ids)."""
    manifest_path = cache_dir / MANIFEST_NAME
    features_path = cache_dir / FEATURES_NAME
    size = manifest["size"]
    if not features_path.is_file() or features_path.stat().st_size != size:
        found = features_path.stat().st_size if features_path.is_file() else "no file"
        return None, f"{FEATURES_NAME} has size {found}, the manifest says {size} (truncated?)"
    recorded = manifest.get("sha256")
    if not isinstance(recorded, str):
        return None, f"{manifest_path} records no digest of {FEATURES_NAME} (written by an older milcell)"
    actual = _file_sha256(features_path)
    if actual != recorded:
        return None, (
            f"{features_path} is corrupt or was replaced: its SHA-256 {actual[:12]}... differs from the "
            f"{recorded[:12]}... in {manifest_path}"
        )
    try:
        cached = FeatureBagDataset.from_safetensors(features_path)
    except DataError as exc:
        return None, f"unreadable features {features_path} ({exc})"
    # The file carries its own key: a concurrent writer with another backbone may have replaced it
    # between the checks above and the read.
    digest = manifest["digest"]
    embedded = cached.metadata.get("cache_key")
    if embedded != digest:
        return None, (
            f"{features_path} holds features of another cache key ({str(embedded)[:12]}..., not "
            f"{digest[:12]}...; written concurrently by another process?)"
        )
    expected_ids = [item[0] for item in manifest["key"].get("items", [])]
    if cached.ids != expected_ids:
        return None, f"bag ids of {features_path} differ from the manifest"
    return cached, ""


def _load_valid(cache_dir: Path, key: Mapping[str, Any]) -> tuple[FeatureBagDataset | None, str]:
    """The cached features if the cache is complete, intact and matches ``key``; else None and why."""
    manifest, reason = _read_manifest(cache_dir)
    if manifest is None:
        return None, reason
    saved_key = manifest["key"]
    if manifest["digest"] != _digest(key) or saved_key != key:
        differ = sorted(k for k in set(key) | set(saved_key) if saved_key.get(k) != key.get(k))
        return None, f"key mismatch in {differ or ['digest']}"
    cached, reason = _read_features(cache_dir, manifest)
    if cached is not None:
        logger.info("feature cache %s: reused (%d bags, D=%d)", cache_dir, len(cached), cached.dim)
    return cached, reason


@dataclass(frozen=True)
class FeatureCache:
    """A feature cache read back from its folder: the features and the key they were made with.

    Attributes
    ----------
    path : Path
        The cache folder.
    key : dict
        The cache key (:func:`cache_key`): backbone name and weights hash,
        preprocessing, precision, and the ``[bag id, [instance names]]`` items.
    digest : str
        SHA-256 of the key.
    dataset : FeatureBagDataset
        One ``(N_i, D)`` float32 matrix per bag, in the cache's order (no
        labels or clinical attributes: they belong to the samples, not the cache).
    """

    path: Path
    key: dict[str, Any]
    digest: str
    dataset: FeatureBagDataset

    @property
    def backbone(self) -> str:
        """The name of the backbone that made the features."""
        return str(self.key.get("backbone"))

    @property
    def dim(self) -> int:
        """``D``, the width of the features."""
        return int(self.dataset.dim)

    @property
    def identity(self) -> dict[str, Any]:
        """What a model trained on these features depends on: backbone, weights, preprocessing, precision.

        Two caches with the same identity hold comparable features (of possibly different bags).
        """
        return {k: self.key.get(k) for k in ("version", "backbone", "weights", "preprocessing", "precision")}

    def instance_names(self) -> dict[str, list[str]]:
        """``bag id -> the names of the instances`` the cache holds for it."""
        return {str(item[0]): [str(n) for n in item[1]] for item in self.key.get("items", [])}


def read_feature_cache(cache_dir: str | os.PathLike[str]) -> FeatureCache:
    """Read a cache written by :func:`extract_features` (or ``milcell extract-features``).

    The manifest must be readable, the features file must have the recorded
    size and SHA-256 and carry the manifest's key digest, and its bag ids
    must be the manifest's: a cache that is incomplete, corrupt or replaced
    is refused, never read.

    Parameters
    ----------
    cache_dir : path-like
        The cache folder.

    Returns
    -------
    FeatureCache

    Raises
    ------
    CacheError
        The folder holds no usable cache; the message says why and names the file.

    Examples
    --------
    >>> import tempfile, torch
    >>> from milcell.data import Bag
    >>> folder = tempfile.mkdtemp()
    >>> _ = extract_features(torch.nn.Flatten(1), [Bag(torch.rand(2, 3, 4, 4), id="P1")], folder,
    ...                      progress=False)
    >>> cache = read_feature_cache(folder)
    >>> cache.backbone, cache.dim, cache.instance_names()
    ('Flatten', 48, {'P1': ['#0', '#1']})
    >>> read_feature_cache(tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    milcell.exceptions.CacheError: feature cache ...: empty (no manifest.json: ...)
    """
    directory = Path(cache_dir)
    manifest, reason = _read_manifest(directory)
    if manifest is None:
        if reason == "empty":
            reason = f"empty (no {MANIFEST_NAME}: write one with extract_features)"
        raise CacheError(f"feature cache {directory}: {reason}")
    if manifest["digest"] != _digest(manifest["key"]):
        raise CacheError(
            f"feature cache {directory}: the digest in {directory / MANIFEST_NAME} does not match its key "
            "(edited by hand?)"
        )
    cached, reason = _read_features(directory, manifest)
    if cached is None:
        raise CacheError(f"feature cache {directory}: {reason}")
    return FeatureCache(directory, dict(manifest["key"]), str(manifest["digest"]), cached)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _embed(
    backbone: nn.Module,
    dataset: Dataset[Bag],
    batch_size: int,
    chunk_size: int,
    precision: str,
    device: torch.device,
    progress: bool,
    num_workers: int,
) -> tuple[list[Tensor], list[str], list[tuple[str, ...]] | None]:
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_bags, num_workers=num_workers
    )
    features: list[Tensor] = []
    ids: list[str] = []
    names: list[tuple[str, ...]] | None = []
    with torch.inference_mode():
        for batch in tqdm(loader, desc="extracting features", disable=not progress, dynamic_ncols=True):
            if not isinstance(batch, BagBatch):  # pragma: no cover - collate_bags always gives BagBatch
                raise DataError("extract_features: the dataset must yield Bag objects")
            x = batch.instances
            if x.ndim != 4:
                raise ShapeError(
                    f"extract_features: instances must be images (T, C, H, W), got {tuple(x.shape)} "
                    f"in bags {batch.ids[:3]}"
                )
            try:
                with autocast(device, precision):
                    packed = encode_in_chunks(backbone, x, chunk_size, device=device).float().cpu()
            except ShapeError as exc:
                raise ShapeError(f"extract_features: {exc} (bags {batch.ids[:3]})") from exc
            features.extend(part.clone() for part in batch.split(packed))
            ids.extend(batch.ids)
            if names is not None and batch.instance_names is not None:
                names.extend(batch.instance_names)
            else:
                names = None
    return features, ids, names


def extract_features(
    backbone: nn.Module,
    dataset: Dataset[Bag],
    cache_dir: str | os.PathLike[str] | None,
    batch_size: int = 8,
    chunk_size: int = 256,
    precision: str = "32",
    device: str | torch.device | None = None,
    progress: bool = True,
    *,
    num_workers: int = 0,
    key_extra: Mapping[str, Any] | None = None,
    recompute: bool = True,
) -> FeatureBagDataset:
    """Embed every instance of ``dataset`` once with a frozen ``backbone``, with an on-disk cache.

    Parameters
    ----------
    backbone : nn.Module
        Maps images ``(n, C, H, W)`` to features ``(n, D)``, e.g. a
        :class:`~milcell.nn.backbones.Backbone`. Run in eval mode under
        ``torch.inference_mode``; its train/eval mode and device are restored.
    dataset : Dataset of Bag
        Image bags ``(N_i, C, H, W)``: a :class:`~milcell.data.BagDataset`
        (with the *evaluation* transform, ``max_instances=None`` or
        ``train=False``, and no clinical scaler), an
        :class:`~milcell.data.InstanceDataset` (cells as bags of one), or
        any map-style dataset of bags with unique ids.
    cache_dir : path-like or None
        Folder of the cache (created). ``None``: no cache, always embed.
    batch_size : int, default 8
        Bags per DataLoader batch.
    chunk_size : int, default 256
        Instances per backbone call (bounds memory for large bags).
    precision : {"32", "bf16"}, default "32"
        ``"bf16"`` runs the backbone under :func:`torch.autocast` (where the
        device supports it); features are stored as float32.
    device : str or torch.device, optional
        Where the backbone runs; default its current device.
    progress : bool, default True
        Show a tqdm bar over the batches.
    num_workers : int, default 0
        DataLoader workers reading the images.
    key_extra : mapping, optional
        Extra entries of the cache key (see :func:`cache_key`).
    recompute : bool, default True
        When the cache is missing, incomplete, corrupt (its SHA-256 differs
        from the manifest's) or holds another key, embed again (the reason is
        logged). ``False`` raises :class:`~milcell.exceptions.CacheError`
        naming the file instead.

    Returns
    -------
    FeatureBagDataset
        One ``(N_i, D)`` matrix per bag, in the dataset's order, with the
        dataset's labels, ids, instance names, and clinical attributes (as
        the dataset holds them) and ``metadata`` ``{"backbone", "cache_key"}``.

    Raises
    ------
    ConfigError
        Bad arguments, or a dataset drawing random instance subsets.
    ShapeError
        Non-image instances or a backbone that does not return ``(n, D)``.
    CacheError
        If the cache folder cannot be written, or (``recompute=False``) the
        cache cannot be used.

    Examples
    --------
    >>> import torch
    >>> from milcell.data import Bag
    >>> extract_features(torch.nn.Flatten(1), [Bag(torch.rand(2, 3, 4, 4))], None, precision="16")
    Traceback (most recent call last):
    ...
    milcell.exceptions.ConfigError: extract_features: precision must be one of '32', 'bf16', got '16'
    """
    if not isinstance(backbone, nn.Module):
        raise ConfigError(f"extract_features: backbone must be an nn.Module, got {type(backbone).__name__}")
    precision = _check_precision(precision, "extract_features: precision", _PRECISIONS)
    batch_size = check_int(batch_size, "extract_features: batch_size", low=1)
    chunk_size = check_int(chunk_size, "extract_features: chunk_size", low=1)
    num_workers = check_int(num_workers, "extract_features: num_workers", low=0)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("extract_features: the dataset is empty")
    key = cache_key(backbone, dataset, precision, key_extra)
    digest = _digest(key)
    directory = None if cache_dir is None else Path(cache_dir)
    cached = None
    if directory is not None:
        cached, reason = _load_valid(directory, key)
        if cached is None and not recompute:
            raise CacheError(f"feature cache {directory} cannot be used and recompute=False: {reason}")
        if cached is None and reason == "empty":
            logger.info("feature cache %s: empty; building", directory)
        elif cached is None:
            logger.warning("feature cache %s: %s; rebuilding", directory, reason)
    if cached is not None:
        features, names_out = cached.features, cached.instance_names
    else:
        first = next(iter(backbone.parameters()), None)
        original = first.device if first is not None else torch.device("cpu")
        target = torch.device(device) if device is not None else original
        was_training = backbone.training
        backbone.to(target).eval()
        try:
            features, ids, names_out = _embed(
                backbone, dataset, batch_size, chunk_size, precision, target, progress, num_workers
            )
        finally:
            backbone.to(original).train(was_training)
        expected = [item[0] for item in key["items"]]
        if ids != expected:
            raise DataError(
                f"extract_features: the dataset yielded bags {ids[:3]}... but lists {expected[:3]}...; "
                "bag ids must be unique and stable"
            )
        if directory is not None:
            _write_cache(directory, key, digest, features, ids, names_out, backbone)
    labels = getattr(dataset, "labels", None)
    ids_out = [item[0] for item in key["items"]]
    if labels is None:
        labels = [dataset[i].label for i in range(len(dataset))]  # type: ignore[arg-type]
    clinical = getattr(dataset, "clinical", None)
    clinical_names: Sequence[str] = ()
    if isinstance(dataset, BagDataset) and clinical is not None:
        clinical_names = dataset.cohort.clinical_names
    return FeatureBagDataset(
        features,
        np.asarray(labels, dtype=np.int64),
        ids_out,
        clinical if isinstance(clinical, Tensor) else None,
        clinical_names=clinical_names,
        instance_names=names_out,
        metadata={"backbone": key["backbone"], "cache_key": digest},
    )


def _write_cache(
    directory: Path,
    key: Mapping[str, Any],
    digest: str,
    features: list[Tensor],
    ids: list[str],
    names: list[tuple[str, ...]] | None,
    backbone: nn.Module,
) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with folder_lock(directory, what="feature cache"):
            # Remove the manifest first: until the new one is written the cache reads as incomplete.
            (directory / MANIFEST_NAME).unlink(missing_ok=True)
            store = FeatureBagDataset(
                features,
                None,
                ids,
                instance_names=names,
                metadata={"backbone": key["backbone"], "cache_key": digest},
            )
            path = store.save_safetensors(directory / FEATURES_NAME)
            manifest = {
                "key": key,
                "digest": digest,
                "size": path.stat().st_size,
                "sha256": _file_sha256(path),
                "bags": len(ids),
            }
            with atomic_path(directory / MANIFEST_NAME) as tmp:
                tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    except LockError as exc:
        # The features in memory are right; only the cache is left to the other writer.
        logger.warning("feature cache %s: not written: %s", directory, exc)
        return
    except OSError as exc:
        raise CacheError(f"feature cache {directory}: cannot write: {exc}") from exc
    logger.info(
        "feature cache %s: wrote %d bags (%s, D=%d)",
        directory,
        len(ids),
        getattr(backbone, "name", type(backbone).__name__),
        int(features[0].shape[1]),
    )
