"""Saved runs: cross-validate a model, save its fold models, load them back and predict.

A *run* is what ``milcell train`` produces, and what :func:`train_run` produces
from Python: the fold models of a patient-level cross-validation, with
everything needed to use them again — the options, the preprocessing (image
size and the backbone's own mean, std and interpolation), each fold's clinical
scaling, the class and clinical names, and the cross-validated metrics.
:func:`load_run` reads it back as a :class:`SavedRun` whose
:meth:`~SavedRun.predict` and :meth:`~SavedRun.evaluate` average the fold
models (a soft or hard vote), each seeing the data through its own clinical
scaling.

On disk a run is a folder::

    run/
      run.json                   format, classes, clinical names, preprocessing, options, CV summary
      models/fold_<r>_<k>/       one model per fold:
        model.safetensors          weights (no pickle)
        model.json                 create_mil_model arguments + the fold's clinical scaling
      cv/                        cross_validate's working folders (checkpoints; a rerun resumes)
      folds.csv, oof_predictions.csv, summary.txt, roc.png, training_curves.png

Models are rebuilt with :meth:`milcell.nn.model.MILModel.from_config` and
:func:`milcell.train.checkpoint.load_weights`, so loading a run never
unpickles anything. ``run.json`` carries ``format_version``; a run written by
a newer milcell is refused with a message saying so.

:func:`fold_datasets` is the one place where the datasets of a fold are put
together (subsets, transforms, clinical scaling, instance cap, image cache);
the command line, the demo and the example scripts all call it.

The user guide's page on runs trains, saves, loads and predicts with a tiny run.

Examples
--------
>>> prep = Preprocessing.from_backbone("milcell_mini_resnet_k8", image_size=32)
>>> prep.to_dict()
{'image_size': 32, 'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225], 'interpolation': 'bilinear'}
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from milcell._utils import atomic_path, json_safe, write_dict_csv
from milcell._validation import check_choice, check_int, check_real
from milcell.data.bag import Bag
from milcell.data.datasets import BagDataset, ImageCache, InstanceDataset
from milcell.data.records import BagCohort, CellSet, ClinicalScaler
from milcell.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from milcell.exceptions import CheckpointError, ConfigError, DataError

__all__ = [
    "RUN_FORMAT",
    "RUN_FORMAT_VERSION",
    "RUN_OUTPUTS",
    "TABLE_METRICS",
    "Preprocessing",
    "RunEvaluation",
    "RunPredictions",
    "SavedRun",
    "backbone_data_config",
    "cached_features",
    "data_fingerprint",
    "describe_data",
    "fit_clinical_scaler",
    "fold_datasets",
    "format_table",
    "load_run",
    "load_samples",
    "model_arguments",
    "run_figures",
    "save_run",
    "table_metrics",
    "train_run",
]

logger = logging.getLogger("milcell")

RUN_FORMAT = "milcell.run"
"""The ``format`` field of ``run.json``."""
RUN_FORMAT_VERSION = 1
"""The newest ``format_version`` of ``run.json`` this milcell writes and reads."""

#: Metrics of the binary tables, in order, with their column titles.
TABLE_METRICS: dict[str, str] = {
    "balanced_accuracy": "balanced acc.",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "auc": "AUC",
}
_MULTICLASS_METRICS: dict[str, str] = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced acc.",
    "f1_macro": "macro F1",
    "kappa": "kappa",
}
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
_LAYOUTS = ("dlmi", "cnmc", "imagefolder")
Samples = BagCohort | CellSet


# --------------------------------------------------------------------------- preprocessing


def backbone_data_config(name: str, **backbone_kwargs: Any) -> dict[str, Any]:
    """The data config (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``) of a backbone.

    It is what :func:`~milcell.nn.backbones.create_backbone` attaches to the
    backbone (timm's ``resolve_model_data_config`` of the model and its
    pretrained configuration), read without downloading weights or allocating
    them (the model is built on the ``meta`` device).

    Parameters
    ----------
    name : str
        A backbone name, as for :func:`~milcell.nn.backbones.create_backbone`.
    **backbone_kwargs
        Passed to :func:`~milcell.nn.backbones.create_backbone` (``img_size=``, ...).

    Returns
    -------
    dict

    Raises
    ------
    ConfigError
        An unknown backbone name.

    Examples
    --------
    >>> backbone_data_config("vit_base_patch16_224")["mean"]      # timm's config of its weights
    (0.5, 0.5, 0.5)
    >>> backbone_data_config("milcell_mini_resnet_k8")["mean"]
    (0.485, 0.456, 0.406)
    """
    from milcell.nn.backbones import create_backbone

    kwargs = {k: v for k, v in backbone_kwargs.items() if k not in ("pretrained", "checkpoint_path")}
    try:
        with torch.device("meta"):
            backbone = create_backbone(name, pretrained=False, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # a model that cannot be built on the meta device: build it for real
        logger.debug("backbone %s not buildable on the meta device (%s); building it on the CPU", name, exc)
        backbone = create_backbone(name, pretrained=False, **kwargs)
    return dict(backbone.data_config)


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a model: square resize, normalisation, interpolation.

    Parameters
    ----------
    image_size : int
        Images are resized to ``image_size x image_size``.
    mean, std : sequence of 3 float
        Normalisation (the backbone's own, see :meth:`from_backbone`).
    interpolation : {"nearest", "bilinear", "bicubic"}, default "bilinear"
        Resize interpolation.

    Examples
    --------
    >>> prep = Preprocessing.from_backbone("vit_base_patch16_224", image_size=32)
    >>> prep.mean, prep.interpolation
    ((0.5, 0.5, 0.5), 'bicubic')
    >>> from PIL import Image
    >>> prep.transform(train=False)(Image.new("RGB", (40, 50))).shape
    torch.Size([3, 32, 32])
    >>> Preprocessing.from_dict(prep.to_dict()) == prep
    True
    """

    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        from milcell.data.transforms import resolve_data_config

        object.__setattr__(self, "image_size", check_int(self.image_size, "image_size", low=1))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        check_choice(self.interpolation, "interpolation", _INTERPOLATIONS)
        resolve_data_config(self.data_config())  # validates mean and std

    @classmethod
    def from_backbone(
        cls, backbone: str, image_size: int | None = None, **backbone_kwargs: Any
    ) -> Preprocessing:
        """The backbone's own normalisation and interpolation (:func:`backbone_data_config`).

        Parameters
        ----------
        backbone : str
            Backbone name.
        image_size : int or None, default None
            Side of the resized images; ``None`` takes the backbone's input size.
        **backbone_kwargs
            Passed to :func:`backbone_data_config`.
        """
        return cls.from_data_config(backbone_data_config(backbone, **backbone_kwargs), image_size)

    @classmethod
    def from_data_config(cls, data_config: Mapping[str, Any], image_size: int | None = None) -> Preprocessing:
        """Read a timm data config (``mean``, ``std``, ``interpolation``, ``input_size``).

        An interpolation other than nearest, bilinear or bicubic becomes bilinear;
        ``image_size=None`` takes the config's input size.

        Examples
        --------
        >>> Preprocessing.from_data_config({"input_size": (3, 224, 224), "mean": (0.5,) * 3,
        ...                                 "std": (0.5,) * 3, "interpolation": "bicubic"}).image_size
        224
        """
        interpolation = data_config.get("interpolation") or "bilinear"
        if interpolation not in _INTERPOLATIONS:
            interpolation = "bilinear"
        size = int(data_config["input_size"][-1]) if image_size is None else image_size
        return cls(size, tuple(data_config["mean"]), tuple(data_config["std"]), interpolation)

    def data_config(self) -> dict[str, Any]:
        """A data config for :func:`~milcell.data.transforms.build_transforms`."""
        return {
            "input_size": (len(self.mean), self.image_size, self.image_size),
            "mean": self.mean,
            "std": self.std,
            "interpolation": self.interpolation,
        }

    def transform(self, train: bool, *, rotation: float = 180.0) -> Callable[[Any], Tensor]:
        """``PIL.Image -> Tensor (C, image_size, image_size)``; ``train`` adds flips and rotations.

        Parameters
        ----------
        train : bool
            Add random horizontal and vertical flips and a rotation up to ``rotation`` degrees.
        rotation : float, default 180.0
            Largest rotation of the training augmentation, in degrees.
        """
        from milcell.data.transforms import build_transforms

        return build_transforms(self.data_config(), train=train, rotation=rotation)

    def bag_transforms(
        self, train: bool, *, rotation: float = 180.0, quarter_turns: bool = False
    ) -> tuple[Callable[[Any], Tensor], Callable[[Tensor], Tensor]]:
        """The same preprocessing split into a deterministic per-image part and a per-bag part.

        See :func:`milcell.data.transforms.build_bag_transforms`: the per-image part
        (``PIL.Image -> uint8 (C, image_size, image_size)``) can be cached; the per-bag
        part adds, for ``train``, random flips and a rotation up to ``rotation`` degrees
        per instance (or by quarter turns), and normalises.
        """
        from milcell.data.transforms import build_bag_transforms

        return build_bag_transforms(
            self.data_config(), train=train, rotation=rotation, quarter_turns=quarter_turns
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (the keys ``run.json`` uses)."""
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        """Read :meth:`to_dict`'s keys (``interpolation`` defaults to ``"bilinear"``)."""
        return cls(
            int(values["image_size"]),
            tuple(values["mean"]),
            tuple(values["std"]),
            str(values.get("interpolation") or "bilinear"),
        )


# --------------------------------------------------------------------------- data


def load_samples(
    data_format: str,
    data_dir: str | os.PathLike[str],
    split: str = "train",
    class_names: Sequence[str] | None = None,
) -> BagCohort | CellSet:
    """Read ``data_dir`` in layout ``data_format``: a :class:`BagCohort` (dlmi) or a :class:`CellSet`.

    Parameters
    ----------
    data_format : {"dlmi", "cnmc", "imagefolder"}
        The on-disk layout (:mod:`milcell.data.formats`).
    data_dir : path-like
        The dataset folder.
    split : {"train", "test", "all"}, default "train"
        For ``dlmi``, ``trainset/`` / ``testset/``; for ``imagefolder`` a
        ``train/`` or ``val/``/``test/`` subfolder when one exists (else
        ``data_dir`` itself); ``cnmc`` reads the training folds plus the
        labelled prelim set whatever the split.
    class_names : sequence of str, optional
        For ``imagefolder``: the classes, in order (a run's classes).

    Returns
    -------
    BagCohort or CellSet

    Raises
    ------
    FileNotFoundError
        ``data_dir`` does not exist.
    ConfigError
        ``data_dir`` is not a folder, or an unknown layout.
    DataError
        The folder is not in that layout; the message names what is missing.

    Examples
    --------
    >>> import tempfile
    >>> from milcell.data.synthetic import make_cohort
    >>> root = make_cohort(tempfile.mkdtemp(), n_patients=4, seed=0, image_size=16, bag_size=(1, 2))
    >>> cohort = load_samples("dlmi", root, "train")
    >>> type(cohort).__name__, cohort.clinical_names
    ('BagCohort', ('age', 'lymph_count', 'sex'))
    """
    root = Path(data_dir)
    check_choice(data_format, "data_format", _LAYOUTS)
    check_choice(split, "split", ("train", "test", "all"))
    if not root.exists():
        raise FileNotFoundError(f"data directory '{root}' does not exist")
    if not root.is_dir():
        raise ConfigError(f"--data-dir '{root}' is not a folder")
    if data_format == "dlmi":
        from milcell.data.formats.dlmi import load_dlmi

        return load_dlmi(root, split=split)  # type: ignore[arg-type]
    if data_format == "cnmc":
        from milcell.data.formats.cnmc import load_cnmc

        prelim = any((root / d).is_dir() for d in ("validation_data", "C-NMC_test_prelim_phase_data"))
        return load_cnmc(root, include_prelim=prelim)
    from milcell.data.formats.imagefolder import load_imagefolder

    names = {"train": ("train",), "test": ("val", "test"), "all": ()}[split]
    folder = next((root / n for n in names if (root / n).is_dir()), root)
    return load_imagefolder(folder, class_names=class_names)


def _check_samples(samples: Any) -> None:
    if not isinstance(samples, (BagCohort, CellSet)):
        raise ConfigError(f"samples must be a BagCohort or a CellSet, got {type(samples).__name__}")


def _labels_and_groups(samples: Samples) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(samples, CellSet):
        return samples.labels, samples.groups
    return samples.labels, None


def fit_clinical_scaler(
    samples: BagCohort | CellSet, indices: Iterable[int] | np.ndarray, method: str = "minmax"
) -> ClinicalScaler | None:
    """The clinical scaling fitted on the rows ``indices`` only (None without clinical attributes).

    Examples
    --------
    >>> from pathlib import Path
    >>> from milcell.data import BagRecord
    >>> cohort = BagCohort([BagRecord(f"P{i}", i % 2, (Path("x.png"),), (float(i),)) for i in range(4)],
    ...                    clinical_names=("age",))
    >>> fit_clinical_scaler(cohort, [0, 1]).transform(np.array([[1.0], [3.0]])).ravel().tolist()
    [1.0, 3.0]
    """
    _check_samples(samples)
    if not isinstance(samples, BagCohort) or not samples.clinical_names:
        return None
    check_choice(method, "clinical scaling method", ("minmax", "standard"))
    return samples.fit_scaler(np.asarray(list(indices), dtype=np.int64), method=method)  # type: ignore[arg-type]


def _cache(cache_images: bool | ImageCache) -> ImageCache | None:
    if isinstance(cache_images, ImageCache):
        return cache_images
    return ImageCache() if cache_images else None


def _dataset(
    samples: Samples,
    indices: Iterable[int] | np.ndarray | None,
    preprocessing: Preprocessing,
    *,
    train: bool,
    augment: bool | str,
    rotation: float,
    max_instances: int | None,
    seed: int,
    scaler: ClinicalScaler | None,
    cache: ImageCache | None,
) -> Dataset[Bag]:
    subset: Samples = (
        samples if indices is None else samples.subset(np.asarray(list(indices), dtype=np.int64))
    )
    # Per-image resizing (cached with the images), then flips/rotations and normalisation of the
    # whole bag in one call: the augmentation of build_transforms at a fraction of its cost.
    transform, bag_transform = preprocessing.bag_transforms(
        train=train and bool(augment), rotation=rotation, quarter_turns=augment == "quarter"
    )
    cache_arg: bool | ImageCache = cache if cache is not None else False
    if isinstance(subset, BagCohort):
        return BagDataset(
            subset,
            transform=transform,
            max_instances=max_instances,
            train=train,
            seed=seed,
            clinical_scaler=scaler,
            cache_images=cache_arg,
            bag_transform=bag_transform,
            cache_transformed=cache is not None,
        )
    return InstanceDataset(subset, transform, cache_images=cache_arg, bag_transform=bag_transform)


AUGMENTATIONS = (True, False, "rotate", "quarter")


def check_augment(augment: Any) -> bool | str:
    """``augment`` as ``True`` (flips + rotation by any angle), ``"quarter"`` or ``False``.

    ``"rotate"`` is another spelling of ``True``; ``"quarter"`` rotates by multiples of 90°
    (lossless for square cells); ``False`` adds no augmentation.

    Examples
    --------
    >>> check_augment("rotate"), check_augment("quarter"), check_augment(False)
    (True, 'quarter', False)
    """
    if isinstance(augment, np.bool_):
        augment = bool(augment)
    if augment == "rotate":
        return True
    if isinstance(augment, bool) or augment == "quarter":
        return augment
    raise ConfigError(f"augment must be one of True, False, 'rotate', 'quarter', got {augment!r}")


def fold_datasets(
    samples: BagCohort | CellSet,
    train_idx: Iterable[int] | np.ndarray,
    val_idx: Iterable[int] | np.ndarray,
    *,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
    augment: bool | str = True,
    rotation: float = 180.0,
    max_instances: int | None = None,
    cache_images: bool | ImageCache = False,
    seed: int = 0,
    clinical_scaling: str = "minmax",
) -> tuple[Dataset[Bag], Dataset[Bag], ClinicalScaler | None]:
    """The training and validation datasets of one fold, and the fold's clinical scaling.

    Bags (a :class:`BagCohort`) give :class:`~milcell.data.datasets.BagDataset`
    items ``(N_i, C, image_size, image_size)``; single cells (a
    :class:`CellSet`) give :class:`~milcell.data.datasets.InstanceDataset`
    bags of one. The clinical scaling is fitted on ``train_idx`` only and
    applied to both. The training dataset draws random ``max_instances``
    subsets (``train=True``: seeded by ``(seed, epoch, index)``, driven by
    ``set_epoch``, independent of DataLoader workers) and, with ``augment``,
    random flips and rotations up to ``rotation`` degrees; the validation
    dataset is deterministic. The image cache changes none of this.

    Parameters
    ----------
    samples : BagCohort or CellSet
        All samples; the indices refer to it.
    train_idx, val_idx : sequence of int
        The fold's training and validation rows (e.g. a :class:`~milcell.data.splits.Fold`'s
        ``train`` and ``val``); the validation dataset keeps ``val_idx``'s order.
    image_size : int
        Side of the resized images.
    mean, std : sequence of float, default ImageNet statistics
        Normalisation; use the backbone's (:class:`Preprocessing.from_backbone`).
    interpolation : {"nearest", "bilinear", "bicubic"}, default "bilinear"
        Resize interpolation.
    augment : bool or {"rotate", "quarter"}, default True
        Random flips and rotations of the training images: ``True`` (or
        ``"rotate"``) rotates by any angle up to ``rotation`` degrees, as the
        reports did; ``"quarter"`` by multiples of 90° (lossless for square
        cells); see :func:`check_augment`.
    rotation : float, default 180.0
        Largest rotation of the augmentation, in degrees (``0``: flips only).
    max_instances : int or None, default None
        Cap on the instances per bag.
    cache_images : bool or ImageCache, default False
        Decode each image once and keep it in memory (before any transform);
        pass one :class:`~milcell.data.datasets.ImageCache` to every fold so
        the images are decoded once in all.
    seed : int, default 0
        Seed of the random instance subsets.
    clinical_scaling : {"minmax", "standard"}, default "minmax"
        Method of the fold's :class:`~milcell.data.ClinicalScaler`.

    Returns
    -------
    train_ds, val_ds : Dataset of Bag
    scaler : ClinicalScaler or None
        None for samples without clinical attributes.

    Raises
    ------
    ConfigError
        An invalid argument; the message names it.

    Examples
    --------
    >>> import tempfile
    >>> from milcell.data.formats.dlmi import load_dlmi
    >>> from milcell.data.synthetic import make_cohort
    >>> cohort = load_dlmi(make_cohort(tempfile.mkdtemp(), n_patients=6, seed=0, image_size=16,
    ...                                bag_size=(3, 5)), "train")
    >>> train_ds, val_ds, scaler = fold_datasets(cohort, [0, 1, 2], [3], image_size=32,
    ...                                          max_instances=2, cache_images=True)
    >>> len(train_ds), val_ds[0].instances.shape, scaler.names
    (3, torch.Size([2, 3, 32, 32]), ('age', 'lymph_count', 'sex'))
    """
    _check_samples(samples)
    preprocessing = Preprocessing(image_size, tuple(mean), tuple(std), interpolation)
    rotation = check_real(rotation, "rotation", low=0.0)
    augment = check_augment(augment)
    if max_instances is not None:
        max_instances = check_int(max_instances, "max_instances", low=1)
    seed = check_int(seed, "seed", low=0)
    if not isinstance(cache_images, (bool, np.bool_, ImageCache)):
        raise ConfigError(f"cache_images must be a bool or an ImageCache, got {type(cache_images).__name__}")
    cache = _cache(cache_images)
    train_rows = np.asarray(list(train_idx), dtype=np.int64)
    scaler = fit_clinical_scaler(samples, train_rows, clinical_scaling)
    common: dict[str, Any] = {
        "augment": augment,
        "rotation": rotation,
        "max_instances": max_instances,
        "seed": seed,
        "scaler": scaler,
        "cache": cache,
    }
    train_ds = _dataset(samples, train_rows, preprocessing, train=True, **common)
    val_ds = _dataset(samples, val_idx, preprocessing, train=False, **common)
    return train_ds, val_ds, scaler


# --------------------------------------------------------------------------- cached features


def _sample_ids_and_names(samples: Samples) -> tuple[list[str], list[list[str]]]:
    """Each sample's ID and the names its instances have in a feature cache (see ``cache_key``)."""
    if isinstance(samples, BagCohort):
        return list(samples.ids), [list(r.instance_names) for r in samples]
    return [c.id for c in samples], [[c.instance_name] for c in samples]


def cached_features(samples: BagCohort | CellSet, cache: Any) -> list[Tensor]:
    """The cached ``(N_i, D)`` features of each sample of ``samples``, in their order.

    ``cache`` is a :class:`~milcell.train.features.FeatureCache` (or its
    folder) written by :func:`~milcell.train.features.extract_features` /
    ``milcell extract-features`` over these samples, or over a superset of
    them (e.g. ``--split all``). Each sample's cached instances must be its
    own files (by name; a cache made with an instance cap holds a subset).

    Parameters
    ----------
    samples : BagCohort or CellSet
        The samples (bags of a cohort, or single cells).
    cache : FeatureCache or path-like
        The feature cache.

    Returns
    -------
    list of Tensor
        One float32 ``(N_i, D)`` matrix per sample.

    Raises
    ------
    DataError
        Samples the cache has no features for, or whose cached instances are
        not their files (the cache was made from other data); the message names them.
    CacheError
        The cache folder cannot be read.

    Examples
    --------
    >>> import tempfile
    >>> from milcell.data.formats.dlmi import load_dlmi
    >>> from milcell.data.synthetic import make_cohort
    >>> from milcell.nn.backbones import create_backbone
    >>> from milcell.train.features import extract_features
    >>> cohort = load_dlmi(make_cohort(tempfile.mkdtemp(), n_patients=4, seed=0, image_size=16,
    ...                                bag_size=(2, 3)), "train")
    >>> backbone = create_backbone("milcell_mini_resnet_k8", trainable="head")
    >>> prep = Preprocessing.from_backbone("milcell_mini_resnet_k8", image_size=16)
    >>> folder = tempfile.mkdtemp()
    >>> dataset = BagDataset(cohort, prep.transform(train=False))
    >>> _ = extract_features(backbone, dataset, folder, progress=False)
    >>> bags = cached_features(cohort.subset([2, 0]), folder)
    >>> len(bags), bags[0].shape[1] == backbone.num_features
    (2, True)
    """
    from milcell.train.features import FeatureCache, read_feature_cache

    _check_samples(samples)
    if not isinstance(cache, FeatureCache):
        cache = read_feature_cache(cache)
    position = {bag_id: i for i, bag_id in enumerate(cache.dataset.ids)}
    cached_names = cache.instance_names()
    ids, names = _sample_ids_and_names(samples)
    missing = [i for i in ids if i not in position]
    if missing:
        raise DataError(
            f"feature cache {cache.path} has no features for {len(missing)} of the {len(ids)} samples "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); extract features of these "
            "samples (milcell extract-features --split all)"
        )
    foreign = [i for i, own in zip(ids, names, strict=True) if not set(cached_names[i]) <= set(own)]
    if foreign:
        first = foreign[0]
        raise DataError(
            f"feature cache {cache.path} was made from other data: the cached instances of {first} "
            f"({cached_names[first][:3]}...) are not its files ({names[ids.index(first)][:3]}...); "
            f"{len(foreign)} sample(s) differ"
        )
    return [cache.dataset.features[position[i]] for i in ids]


def _feature_dataset(
    samples: Samples,
    features: Sequence[Tensor],
    indices: Iterable[int] | np.ndarray | None,
    *,
    scaler: ClinicalScaler | None,
    max_instances: int | None,
    train: bool,
    seed: int,
) -> Dataset[Bag]:
    """Feature bags of ``samples[indices]``, with their labels, IDs and (scaled) clinical attributes."""
    from milcell.data.datasets import FeatureBagDataset

    rows = np.arange(len(samples)) if indices is None else np.asarray(list(indices), dtype=np.int64)
    subset = samples.subset(rows)
    ids, _ = _sample_ids_and_names(subset)
    clinical = None
    names: Sequence[str] = ()
    if isinstance(subset, BagCohort) and subset.clinical_names:
        names = subset.clinical_names
        matrix = subset.clinical_matrix()
        clinical = scaler.transform(matrix) if scaler is not None else matrix
    return FeatureBagDataset(
        [features[int(i)] for i in rows],
        subset.labels,
        ids,
        clinical,
        clinical_names=names,
        max_instances=max_instances,
        train=train,
        seed=seed,
    )


#: ``train_run`` options that describe the image model or its input: they do not apply to a run on
#: cached features (the cache fixes the backbone and the preprocessing).
_IMAGE_OPTIONS = (
    "backbone",
    "pretrained",
    "checkpoint_path",
    "trainable",
    "chunk_size",
    "image_size",
    "augment",
    "cache_images",
)


# --------------------------------------------------------------------------- models


def _trainable(value: Any) -> str | int:
    text = str(value)
    return int(text) if text.isdigit() else text


def _prediction_level(pooling: str) -> bool:
    """Whether the pooling registered as ``pooling`` outputs the class scores itself."""
    from milcell.nn.pooling import create_pooling

    return bool(getattr(create_pooling(pooling, 8), "prediction_level", False))


def model_arguments(
    num_classes: int,
    clinical_names: Sequence[str],
    *,
    backbone: str = "milcell_mini_resnet_k8",
    pooling: str = "gated_attention",
    fusion: str | None = None,
    inputs: str = "both",
    pretrained: bool = False,
    trainable: str | int = "all",
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """``create_mil_model`` arguments for a model reading images, clinical attributes or both.

    Parameters
    ----------
    num_classes : int
        Number of classes.
    clinical_names : sequence of str
        The samples' clinical attributes (empty for single cells).
    backbone, pooling : str
        Names for :func:`~milcell.nn.model.create_mil_model`.
    fusion : str or None, default None
        Fusion head; ``None`` picks ``concat`` when clinical attributes are
        used, else ``linear``. A prediction-level pooling (``prediction_level``
        is True, e.g. ``instance_mean``) takes none.
    inputs : {"both", "image", "clinical"}, default "both"
        What the model reads (``both`` falls back to the image without clinical attributes).
    pretrained, trainable, chunk_size
        Passed on (``trainable`` may be a digit string, as typed on the command line).

    Returns
    -------
    dict

    Raises
    ------
    ConfigError
        ``inputs="clinical"`` without clinical attributes, or the image-only
        ``linear`` fusion given with clinical attributes.

    Examples
    --------
    >>> args = model_arguments(2, ["age", "sex"], pooling="mean")
    >>> args["fusion"], args["clinical_dim"], args["use_image"]
    ('concat', 2, True)
    >>> model_arguments(2, ["age"], pooling="instance_mean")["fusion"] is None
    True
    """
    check_choice(inputs, "inputs", ("both", "image", "clinical"))
    width = len(clinical_names)
    if inputs == "clinical":
        if width == 0:
            raise ConfigError("inputs='clinical' needs samples with clinical attributes")
        clinical_dim, use_image = width, False
        fusion = fusion or "concat"
    elif inputs == "image" or width == 0:
        clinical_dim, use_image = 0, True
        fusion = fusion or "linear"
    else:
        clinical_dim, use_image = width, True
        fusion = fusion or "concat"
    if use_image and clinical_dim and fusion == "linear":
        raise ConfigError(
            "fusion 'linear' uses the image only; choose concat, moe or gated to use the clinical "
            "attributes, or inputs='image'"
        )
    return {
        "backbone": backbone,
        "pooling": pooling,
        "fusion": None if _prediction_level(pooling) else fusion,
        "num_classes": int(num_classes),
        "clinical_dim": clinical_dim,
        "pretrained": bool(pretrained),
        "trainable": _trainable(trainable),
        "chunk_size": chunk_size,
        "use_image": use_image,
    }


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------- tables


def table_metrics(num_classes: int) -> dict[str, str]:
    """The metrics (and column titles) of the tables: binary or multiclass."""
    return TABLE_METRICS if num_classes == 2 else _MULTICLASS_METRICS


def format_table(rows: Mapping[str, Mapping[str, tuple[float, float]]], metrics: Mapping[str, str]) -> str:
    """An aligned text table: one row per model, one ``mean ± std`` column per metric.

    Examples
    --------
    >>> print(format_table({"model": {"auc": (0.9, 0.05)}}, {"auc": "AUC"}))
    model  AUC
    -----  -----------
    model  0.90 ± 0.05
    """
    from milcell.metrics import format_mean_std

    header = ["model", *metrics.values()]
    body = [
        [name, *(format_mean_std(*summary.get(key, (math.nan, math.nan))) for key in metrics)]
        for name, summary in rows.items()
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- runs


@dataclass
class RunPredictions:
    """What :meth:`SavedRun.predict` returns.

    Attributes
    ----------
    ids : list of str
        ``n`` sample identifiers, in the data's order.
    probabilities : ndarray
        ``(n, C)`` float32 vote of the fold models (see ``method``).
    labels : ndarray
        ``(n,)`` int64 labels (``-1`` = unlabelled).
    fold_probabilities : list of ndarray
        ``(n, C)`` probabilities of each fold model.
    class_names : list of str
    method : str
        ``"soft"`` (mean probability) or ``"hard"`` (majority vote).
    calibrated : ndarray or None
        ``(n, C)`` the fold models' mean probability after the run's
        calibrator (a run trained with ``calibrate``), else None.
    """

    ids: list[str]
    probabilities: np.ndarray
    labels: np.ndarray
    fold_probabilities: list[np.ndarray]
    class_names: list[str]
    method: str = "soft"
    calibrated: np.ndarray | None = None

    @property
    def predicted(self) -> np.ndarray:
        """``(n,)`` int64 most probable class."""
        return self.probabilities.argmax(axis=1).astype(np.int64)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per sample: ``id``, ``predicted`` (class name), ``prob_<class>`` (6 decimals).

        With :attr:`calibrated`, also ``calprob_<class>``.

        Examples
        --------
        >>> p = RunPredictions(["a"], np.array([[0.25, 0.75]]), np.array([-1]), [], ["neg", "pos"])
        >>> p.rows()
        [{'id': 'a', 'predicted': 'pos', 'prob_neg': '0.250000', 'prob_pos': '0.750000'}]
        """
        rows = [
            {
                "id": sample_id,
                "predicted": self.class_names[int(k)],
                **{f"prob_{c}": f"{v:.6f}" for c, v in zip(self.class_names, row, strict=True)},
            }
            for sample_id, k, row in zip(self.ids, self.predicted, self.probabilities, strict=True)
        ]
        if self.calibrated is not None:
            for row, cal in zip(rows, self.calibrated, strict=True):
                row.update({f"calprob_{c}": f"{v:.6f}" for c, v in zip(self.class_names, cal, strict=True)})
        return rows

    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`rows` as CSV (atomically); return the path."""
        write_dict_csv(self.rows(), path)
        return Path(path)

    def write_submission(self, path: str | os.PathLike[str]) -> Path:
        """Write the lymphocytosis challenge's ``Id,Predicted`` CSV (class indices); return the path."""
        rows = [{"Id": i, "Predicted": int(k)} for i, k in zip(self.ids, self.predicted, strict=True)]
        write_dict_csv(rows, path)
        return Path(path)


@dataclass
class RunEvaluation:
    """What :meth:`SavedRun.evaluate` returns: metrics of the vote and of each fold model."""

    ensemble: dict[str, float]
    fold_models: list[dict[str, float]]
    method: str
    num_classes: int
    trained_on: list[str] = field(default_factory=list)
    """IDs of evaluated samples the fold models were trained on (their metrics are optimistic)."""
    calibration: dict[str, float] = field(default_factory=dict)
    """For a calibrated run: ECE/Brier/NLL of the mean probability before and after calibration and the
    referral rule's result (:meth:`milcell.calibration.RunCalibration.report`); else empty."""
    refer_metric: str = "sensitivity"

    def table(self) -> str:
        """The vote's row and the fold models' ``mean ± std`` row (then calibration and referral)."""
        from milcell.calibration import format_calibration
        from milcell.metrics import summarize_folds

        rows = {
            f"{self.method} vote of {len(self.fold_models)} models": {
                k: (v, math.nan) for k, v in self.ensemble.items()
            },
            "fold models (mean ± std)": summarize_folds(self.fold_models),
        }
        text = format_table(rows, table_metrics(self.num_classes))
        if self.calibration:
            text += "\n\n" + format_calibration(self.calibration, self.refer_metric)
        return text


@dataclass
class SavedRun:
    """A cross-validated run: its record, fold models and their clinical scalings.

    Built by :func:`train_run` (then ``cv`` holds the cross-validation's
    out-of-fold predictions and training histories) or by :func:`load_run`.

    Attributes
    ----------
    record : dict
        The content of ``run.json``.
    models : list of nn.Module
        One model per fold, in eval mode, on the CPU.
    scalers : list of ClinicalScaler or None
        Each fold model's clinical scaling.
    path : Path or None
        The run folder (None until saved).
    cv : CVResult or None
        The cross-validation result, right after training.
    """

    record: dict[str, Any]
    models: list[nn.Module]
    scalers: list[ClinicalScaler | None]
    path: Path | None = None
    cv: Any | None = field(default=None, repr=False)

    @property
    def class_names(self) -> list[str]:
        """The class names, in label order."""
        return list(self.record["class_names"])

    @property
    def clinical_names(self) -> list[str]:
        """The clinical attributes the models were trained on (empty for single cells)."""
        return list(self.record.get("clinical_names") or [])

    @property
    def preprocessing(self) -> Preprocessing:
        """Image size, mean, std and interpolation the models were trained with."""
        return Preprocessing.from_dict(self.record)

    @property
    def max_instances(self) -> int | None:
        """The cap on instances per bag (evaluation: evenly spaced subsets)."""
        value = self.record.get("max_instances")
        return None if value is None else int(value)

    @property
    def training_ids(self) -> list[str] | None:
        """IDs of the samples the fold models were trained on (None: a run that does not record them)."""
        ids = self.record.get("train_ids")
        return None if ids is None else [str(i) for i in ids]

    @property
    def data(self) -> dict[str, Any]:
        """The training data's counts: labelled, unlabelled skipped, imputed (see :func:`describe_data`)."""
        return dict(self.record.get("data") or {})

    @property
    def features(self) -> dict[str, Any] | None:
        """For a run trained on cached features: the features' backbone, weights hash, preprocessing, ``dim``.

        None for a run trained on images.
        """
        value = self.record.get("features")
        return dict(value) if isinstance(value, Mapping) else None

    def _check_features(self, features: Any | None) -> Any | None:
        """The :class:`~milcell.train.features.FeatureCache` to predict from (None for an image run)."""
        from milcell.train.features import FeatureCache, read_feature_cache

        expected = self.features
        where = f"run '{self.path}'" if self.path is not None else "this run"
        if expected is None:
            if features is not None:
                raise ConfigError(
                    f"{where} was trained on images, not on cached features: leave out features"
                )
            return None
        if features is None:
            raise ConfigError(
                f"{where} was trained on cached features of {expected.get('backbone')}: pass features= (the "
                "command line: --features DIR), a cache of these samples made by extract-features with the "
                "same backbone weights and preprocessing"
            )
        cache = features if isinstance(features, FeatureCache) else read_feature_cache(features)
        identity = {k: v for k, v in expected.items() if k != "dim"}
        if cache.identity != identity:
            differ = sorted(k for k in identity if cache.identity.get(k) != identity.get(k))
            raise ConfigError(
                f"feature cache {cache.path} was made differently from the features {where} was trained on "
                f"(they differ in {', '.join(differ)}); extract the features with the run's backbone "
                "weights and preprocessing"
            )
        return cache

    def training_overlap(self, samples: BagCohort | CellSet) -> list[str]:
        """The IDs of ``samples`` that the fold models were trained on (empty when unknown).

        Raises
        ------
        ConfigError
            ``samples`` is not a BagCohort or CellSet.
        """
        _check_samples(samples)
        trained = set(self.training_ids or [])
        ids = samples.ids if isinstance(samples, BagCohort) else [c.id for c in samples]
        return [i for i in ids if i in trained]

    @property
    def calibration(self) -> Any | None:
        """The run's :class:`~milcell.calibration.RunCalibration` (trained with ``calibrate``), else None."""
        from milcell.calibration import RunCalibration

        value = self.record.get("calibration")
        return None if value is None else RunCalibration.from_dict(value)

    @property
    def summary(self) -> dict[str, tuple[float, float]]:
        """Cross-validated ``metric -> (mean, std)`` over the folds."""
        return {k: (float(v[0]), float(v[1])) for k, v in (self.record.get("summary") or {}).items()}

    def table(self, name: str | None = None) -> str:
        """The cross-validation table (one row named ``name``, default the pooling).

        A run whose epochs were chosen on the reported folds (``selection="outer"``) ends with a
        line saying its numbers are optimistic.
        """
        config = self.record.get("config") or {}
        row = name or str(config.get("pooling", "model"))
        text = format_table({row: self.summary}, table_metrics(len(self.class_names)))
        if config.get("selection") == "outer":
            text += "\n(optimistic: each fold's epoch was chosen on the fold it reports, selection='outer')"
        return text

    def dataset(
        self,
        samples: BagCohort | CellSet,
        model_index: int = 0,
        *,
        cache_images: bool | ImageCache = False,
        features: Any | None = None,
    ) -> Dataset[Bag]:
        """``samples`` as fold model ``model_index`` sees them: evaluation transform, its clinical scaling.

        For a run trained on cached features (:attr:`features`), ``features``
        is a cache of the samples made the same way (a
        :class:`~milcell.train.features.FeatureCache` or its folder), and the
        dataset holds feature bags.

        Raises
        ------
        DataError
            Samples whose clinical attributes differ from the run's, or
            samples the feature cache does not hold.
        ConfigError
            ``features`` missing for a feature run, given for an image run, or
            made with another backbone or preprocessing.
        """
        _check_samples(samples)
        check_int(model_index, "model_index", low=0, high=len(self.models) - 1)
        cache = self._check_features(features)
        scaler = self.scalers[model_index]
        if (
            isinstance(samples, BagCohort)
            and scaler is not None
            and list(samples.clinical_names) != list(scaler.names)
        ):
            raise DataError(
                f"the samples' clinical attributes {list(samples.clinical_names)} are not the run's "
                f"{list(scaler.names)}"
            )
        if cache is not None:
            bags = cached_features(samples, cache)
            return _feature_dataset(
                samples, bags, None, scaler=scaler, max_instances=self.max_instances, train=False, seed=0
            )
        return _dataset(
            samples,
            None,
            self.preprocessing,
            train=False,
            augment=False,
            rotation=0.0,
            max_instances=self.max_instances,
            seed=0,
            scaler=scaler,
            cache=_cache(cache_images),
        )

    def predict(
        self,
        data: BagCohort | CellSet | Dataset[Bag] | Iterable[Any],
        *,
        method: str = "soft",
        batch_size: int = 4,
        device: str | torch.device | None = None,
        precision: str = "32",
        num_workers: int = 0,
        progress: bool = False,
        cache_images: bool = True,
        held_out: bool = False,
        features: Any | None = None,
    ) -> RunPredictions:
        """Predict with every fold model and vote.

        Parameters
        ----------
        data : BagCohort, CellSet, Dataset or loader
            Samples (each fold model then sees them through its own clinical
            scaling and the run's preprocessing), or a dataset / a loader of
            :class:`~milcell.data.BagBatch` prepared by the caller — only for
            runs without clinical scaling.
        method : {"soft", "hard"}, default "soft"
            Mean probability, or majority vote (:func:`~milcell.train.ensemble.vote`).
        batch_size : int, default 4
            Bags per batch.
        device : str or torch.device, optional
            Default: CUDA when available, else the CPU.
        precision : {"32", "bf16", "fp16"}, default "32"
            Autocast precision.
        num_workers : int, default 0
            DataLoader workers.
        progress : bool, default False
            Progress bars.
        cache_images : bool, default True
            Decode each image once for all fold models.
        held_out : bool, default False
            The samples are a held-out (test) set: any ID that the fold models
            were trained on is an error (IDs are unique across the splits).
        features : FeatureCache or path-like, optional
            Required for a run trained on cached features (:attr:`features`):
            a cache of ``data`` (samples) made with the same backbone weights
            and preprocessing (:meth:`dataset`).

        Returns
        -------
        RunPredictions

        Raises
        ------
        ConfigError
            A dataset or loader given for a run with per-fold clinical scaling,
            or an invalid argument.
        DataError
            Fold models that saw different bags, or (``held_out``) samples the
            fold models were trained on.
        """
        from milcell.train.distributed import make_loader
        from milcell.train.ensemble import vote
        from milcell.train.inference import predict

        check_choice(method, "method", ("soft", "hard"))
        batch_size = check_int(batch_size, "batch_size", low=1)
        num_workers = check_int(num_workers, "num_workers", low=0)
        target = _device(device)
        samples = isinstance(data, (BagCohort, CellSet))
        if held_out and samples:
            overlap = self.training_overlap(data)  # type: ignore[arg-type]
            if overlap:
                raise DataError(
                    f"{len(overlap)} held-out (test) ID(s) are also training IDs of the run "
                    f"({', '.join(overlap[:5])}{', ...' if len(overlap) > 5 else ''}): IDs must be unique "
                    "across the training and test sets"
                )
        if not samples and any(s is not None for s in self.scalers):
            raise ConfigError(
                "this run scales the clinical attributes per fold model: pass the samples (a BagCohort), "
                "not a dataset or loader, so each model gets its own scaling"
            )
        feature_cache = self._check_features(features) if samples or features is not None else None
        cache = ImageCache() if samples and cache_images and len(self.models) > 1 else None
        ids: list[str] | None = None
        labels: np.ndarray | None = None
        per_model: list[np.ndarray] = []
        for i, model in enumerate(self.models):
            if samples:
                ds = self.dataset(
                    data,  # type: ignore[arg-type]
                    i,
                    cache_images=cache if cache is not None else False,
                    features=feature_cache,
                )
                loader: Iterable[Any] = make_loader(
                    ds, batch_size, shuffle=False, distributed=False, num_workers=num_workers
                )
            elif isinstance(data, Dataset):
                loader = make_loader(
                    data, batch_size, shuffle=False, distributed=False, num_workers=num_workers
                )
            else:
                loader = data
            preds = predict(
                model,
                loader,
                device=target,
                precision=precision,
                progress=progress,
                desc=f"fold model {i + 1}/{len(self.models)}",
            )
            if ids is None:
                ids, labels = list(preds.ids), preds.labels.numpy().astype(np.int64)
            elif list(preds.ids) != ids:
                raise DataError(
                    f"fold model {i} saw bags {list(preds.ids)[:3]}... but model 0 saw {ids[:3]}...; "
                    "the data must give the same bags in the same order every pass"
                )
            per_model.append(preds.probabilities.numpy())
        assert ids is not None and labels is not None
        scores = vote([torch.from_numpy(p) for p in per_model], method=method).numpy()
        calibration = self.calibration
        calibrated = None
        if calibration is not None:  # calibrated after averaging (milcell.calibration)
            mean = np.mean(np.stack(per_model).astype(np.float64), axis=0)
            calibrated = calibration.calibrator.transform_probabilities(mean).astype(np.float32)
        return RunPredictions(ids, scores, labels, per_model, self.class_names, method, calibrated)

    def evaluate(
        self,
        data: BagCohort | CellSet | Dataset[Bag] | Iterable[Any],
        *,
        refer_target: float = 0.95,
        refer_metric: str = "sensitivity",
        **kwargs: Any,
    ) -> RunEvaluation:
        """Metrics of the vote and of each fold model on labelled data.

        Samples the fold models were trained on (:meth:`training_overlap`) are
        evaluated too, with a warning: their metrics are optimistic (the
        out-of-fold :attr:`summary` is the estimate for them); their IDs are
        in ``RunEvaluation.trained_on``. Binary problems get :func:`~milcell.metrics.binary_report`, others
        :func:`~milcell.metrics.multiclass_report`.

        Parameters
        ----------
        data
            As for :meth:`predict`.
        refer_target, refer_metric
            For a calibrated run (:attr:`calibration`): the referral rule,
            chosen on the run's held-out patients, whose result on ``data``
            is reported with the ECE/Brier/NLL before and after calibration
            (``RunEvaluation.calibration``).
        **kwargs
            Passed to :meth:`predict` (``method``, ``device``, ...).

        Returns
        -------
        RunEvaluation

        Raises
        ------
        DataError
            No labelled sample.
        """
        from milcell.metrics import binary_report, multiclass_report

        overlap: list[str] = []
        if isinstance(data, (BagCohort, CellSet)):
            overlap = self.training_overlap(data)
            if overlap and not kwargs.get("held_out"):
                logger.warning(
                    "%d of the %d evaluated samples (%s%s) trained the fold models: their metrics are "
                    "optimistic; the run's out-of-fold summary is the honest estimate for them",
                    len(overlap),
                    len(data),
                    ", ".join(overlap[:3]),
                    ", ..." if len(overlap) > 3 else "",
                )
        preds = self.predict(data, **kwargs)
        if (preds.labels >= 0).sum() == 0:
            raise DataError("no labelled sample in the data; evaluate needs labels")
        names = self.class_names
        binary = len(names) == 2

        def report(prob: np.ndarray) -> dict[str, float]:
            if binary:
                return binary_report(preds.labels, prob[:, 1]).as_dict()
            return multiclass_report(preds.labels, prob, class_names=names).as_dict()

        calibration = self.calibration
        trust: dict[str, float] = {}
        if calibration is not None:
            mean = np.mean(np.stack(preds.fold_probabilities).astype(np.float64), axis=0)
            trust = calibration.report(mean, preds.labels, target=refer_target, metric=refer_metric)
        return RunEvaluation(
            report(preds.probabilities),
            [report(p) for p in preds.fold_probabilities],
            preds.method,
            len(names),
            overlap,
            trust,
            refer_metric,
        )


#: Files and folders a run folder holds (what ``overwrite=True`` removes; nothing else is touched).
RUN_OUTPUTS = (
    "run.json",
    "models",
    "cv",
    "folds.csv",
    "oof_predictions.csv",
    "summary.txt",
    "roc.png",
    "training_curves.png",
    "config.yaml",
    "config.json",
    "evaluation.json",
    "submission.csv",
    "submission_probabilities.csv",
    "predictions.csv",
    "submission_calibrated.csv",
    "predictions_calibrated.csv",
)


def data_fingerprint(samples: BagCohort | CellSet) -> str:
    """``"<n> <unit>, sha256 <16 hex>"``: the samples' identity (IDs, labels, clinical values, files).

    The files enter by name and size. Two runs may share folds only when
    this is equal (with the other settings).

    Examples
    --------
    >>> from milcell.data import BagRecord
    >>> cohort = BagCohort([BagRecord("P1", 0, (Path("no-such.png"),), (1.0,))], clinical_names=("age",))
    >>> data_fingerprint(cohort)
    '1 patients, sha256 ...'
    """
    import hashlib

    _check_samples(samples)

    def size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return -1

    rows: list[Any] = []
    if isinstance(samples, BagCohort):
        for r in samples:
            clinical = None if r.clinical is None else [repr(float(v)) for v in r.clinical]
            rows.append([r.id, int(r.label), clinical, [[p.name, size(p)] for p in r.paths]])
        unit = "patients"
    else:
        for c in samples:
            rows.append([c.patient, c.path.name, int(c.label), size(c.path)])
        unit = "cells"
    rows.sort(key=json.dumps)
    digest = hashlib.sha256(json.dumps(rows).encode("utf-8")).hexdigest()[:16]
    return f"{len(rows)} {unit}, sha256 {digest}"


def _data_summary(samples: Samples) -> tuple[Samples, dict[str, Any]]:
    """The labelled samples, and the counts of what was left out or imputed (``run.json``'s ``data``)."""
    labels = np.asarray(samples.labels)
    unlabelled = int((labels < 0).sum())
    imputed: dict[str, list[str]] = {}
    if isinstance(samples, BagCohort):
        unit = "patients"
        samples = samples.labelled()
        if samples.clinical_names and len(samples):
            matrix = samples.clinical_matrix()
            for j, name in enumerate(samples.clinical_names):
                rows = np.flatnonzero(np.isnan(matrix[:, j]))
                if rows.size:
                    imputed[name] = [samples.ids[i] for i in rows]
    else:
        unit = "cells"
    summary = {
        "unit": unit,
        "labelled": int(len(labels) - unlabelled),
        "unlabelled_skipped": unlabelled,
        "imputed": imputed,
    }
    return samples, summary


def describe_data(summary: Mapping[str, Any]) -> str:
    """One line of a run's data counts (``run.json``'s ``data``): labelled, skipped, imputed.

    Examples
    --------
    >>> describe_data({"unit": "patients", "labelled": 72, "unlabelled_skipped": 3,
    ...                "imputed": {"sex": ["P12", "P40"]}})
    '72 labelled patients, 3 unlabelled skipped, 2 values imputed (sex: P12, P40)'
    """
    imputed = dict(summary.get("imputed") or {})
    count = sum(len(v) for v in imputed.values())
    text = (
        f"{summary.get('labelled', '?')} labelled {summary.get('unit', 'samples')}, "
        f"{summary.get('unlabelled_skipped', 0)} unlabelled skipped, {count} values imputed"
    )
    if imputed:

        def ids(values: Sequence[str]) -> str:
            shown = ", ".join(str(v) for v in values[:5])
            return shown + (f", ... ({len(values)} in all)" if len(values) > 5 else "")

        text += " (" + "; ".join(f"{name}: {ids(v)}" for name, v in imputed.items()) + ")"
    return text


def _existing_run(out: Path, settings: Mapping[str, Any]) -> tuple[bool, tuple[str, str] | None]:
    """Whether ``out`` holds (part of) a run, and ``(was, now)`` when its settings differ."""
    from milcell.train.crossval import settings_differences, stale_folds

    record_path = out / "run.json"
    has_record = record_path.is_file()
    stale = stale_folds(out / "cv", settings)
    has_folds = (out / "cv").is_dir() and any((out / "cv").glob("fold_*_*"))
    if has_record:
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"run record '{record_path}' is unreadable: {exc}") from exc
        saved = record.get("settings") if isinstance(record, dict) else None
        if not isinstance(saved, dict):
            return True, ("settings it does not record (an older milcell)", "the given settings")
        if saved != dict(settings):
            return True, settings_differences(saved, settings)
    if stale:
        return True, (stale[0][1], stale[0][2])
    return has_record or has_folds, None


def _clear_run(out: Path) -> None:
    import shutil

    for name in RUN_OUTPUTS:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def _split_description(split: Any) -> str | None:
    """What ``run.json`` records of a custom split: a file's path, or the kind of object."""
    if split is None:
        return None
    if isinstance(split, (str, os.PathLike)):
        return str(split)
    return repr(split) if hasattr(split, "split") else type(split).__name__


def train_run(
    samples: BagCohort | CellSet,
    output_dir: str | os.PathLike[str] | None = None,
    *,
    backbone: str = "milcell_mini_resnet_k8",
    pooling: str = "gated_attention",
    fusion: str | None = None,
    inputs: str = "both",
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike[str] | None = None,
    trainable: str | int = "all",
    chunk_size: int | None = None,
    folds: int = 5,
    repeats: int = 1,
    epochs: int = 20,
    batch_size: int = 4,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    image_size: int = 64,
    augment: bool | str = True,
    max_instances: int | None = None,
    cache_images: bool | ImageCache = False,
    precision: str = "32",
    device: str | torch.device | None = None,
    sampler: str | None = None,
    monitor: str | None = "val_loss",
    patience: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    figures: bool = True,
    data_format: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    before_training: Callable[[Path], None] | None = None,
    features: Any | None = None,
    calibrate: str | None = None,
    split: Any = None,
    selection: str = "inner",
    inner_fraction: float = 0.2,
    one_logit: bool = False,
    pos_weight: float | None = None,
    loggers: Sequence[Any] = (),
    tracking_uri: str | None = None,
    callbacks: Sequence[Any] = (),
) -> SavedRun:
    """Cross-validate (patient level) one model on ``samples``; save the run to ``output_dir``.

    What ``milcell train`` does. Each fold's datasets come from
    :func:`fold_datasets` with the backbone's own preprocessing
    (:meth:`Preprocessing.from_backbone`); models from
    :func:`model_arguments`; training from
    :func:`~milcell.train.crossval.cross_validate` (checkpoints in
    ``output_dir/cv``, so an interrupted run resumes). Unlabelled bags are
    left out and counted, as are the clinical values the folds impute
    (``run.record["data"]``, :func:`describe_data`).

    Every argument is validated, and an existing run in ``output_dir`` is
    compared with this one, before anything is written: a refused run leaves
    no folder behind and an existing run untouched. An existing (or
    interrupted) run is continued only when everything that determines its
    result is the same — the model, the training options, the
    preprocessing, the split and the data (:func:`data_fingerprint`);
    otherwise a :class:`~milcell.exceptions.ConfigError` names the differing
    settings. The run folder is locked while it is written (a second writer
    gets a :class:`~milcell.exceptions.LockError`).

    Parameters
    ----------
    samples : BagCohort or CellSet
        The training data (cells are grouped by patient in the folds).
    output_dir : path-like or None, default None
        The run folder (see :func:`save_run`); None keeps the run in memory.
    backbone, pooling, fusion, inputs, pretrained, trainable, chunk_size
        The model (:func:`model_arguments`).
    checkpoint_path : path-like, optional
        Local backbone weights (safetensors or a torch state dict). A frozen
        backbone (``trainable`` other than ``"all"``) without them or
        ``pretrained`` gets a warning: it would train on random features.
    folds, repeats : int
        ``folds >= 2`` patient-level folds, repeated ``repeats`` times.
    epochs, batch_size, lr, weight_decay, seed, precision, sampler, monitor, patience, num_workers
        Training options (:class:`~milcell.train.trainer.Trainer`,
        :func:`~milcell.train.crossval.cross_validate`).
    image_size, augment, max_instances, cache_images
        Data options (:func:`fold_datasets`); with ``cache_images`` every
        image is decoded once for all folds.
    device : str or torch.device, optional
        Default: CUDA when available, else the CPU.
    progress : bool, default False
        Progress bars.
    figures : bool, default True
        Write ``roc.png`` and ``training_curves.png`` (needs matplotlib).
    data_format : str, optional
        The layout name recorded for ``milcell evaluate`` / ``predict``.
    overwrite : bool, default False
        Replace a run in ``output_dir`` trained with other settings (its
        files, :data:`RUN_OUTPUTS`, are removed first; nothing else is).
    resume : bool, default False
        Require an existing (possibly interrupted) run with the same
        settings in ``output_dir`` and continue it.
    before_training : callable, optional
        ``folder -> None``, called once the run is validated and its folder
        created and locked, before training (the command line writes its
        ``config.yaml`` there).
    features : FeatureCache or path-like, optional
        Train the pooling and head on the features of a frozen backbone,
        cached by :func:`~milcell.train.features.extract_features` (``milcell
        extract-features``) over these samples (:func:`cached_features`),
        instead of on the images: each fold then costs no backbone pass. The
        image options (``backbone``, ``pretrained``, ``checkpoint_path``,
        ``trainable``, ``chunk_size``, ``image_size``, ``augment``,
        ``cache_images``) do not apply and must keep their defaults (the
        cache fixed them); ``max_instances`` and the clinical scaling apply
        as for images. The run records the cache's backbone, weights hash
        and preprocessing; predicting with it needs features of the same
        kind (``SavedRun.predict(..., features=...)``).
    calibrate : {None, "temperature", "vector", "platt"}, default None
        Fit a calibrator on the out-of-fold predictions (one row per patient,
        the first repetition) and store it in ``run.json`` under
        ``calibration`` (:class:`~milcell.calibration.RunCalibration`):
        :meth:`SavedRun.predict` then adds calibrated probabilities, and the
        held-out patients serve as the calibration set of prediction sets and
        the referral rule. The before/after metrics it records are
        cross-fitted over the folds (honest).
    split : splitter, mapping, sequence or path-like, optional
        A custom split instead of ``folds`` / ``repeats``: a scikit-learn
        splitter, a ``patient -> fold`` mapping, one fold per sample, or a
        CSV file with the columns ``patient_id`` and ``fold`` (``milcell
        train --folds-file``); see :func:`~milcell.data.splits.make_folds`.
        Patients are the samples' IDs (a cohort) or their cells' patients.
    selection, inner_fraction
        Model selection (:func:`~milcell.train.crossval.cross_validate`):
        ``"inner"`` (default, honest) chooses each fold's epoch on a share
        ``inner_fraction`` of its training patients; ``"outer"`` on the
        reported fold (optimistic; the run's table says so).
    one_logit : bool, default False
        Binary problems: a one-logit head (see
        :func:`~milcell.nn.model.create_mil_model`).
    pos_weight : float, optional
        Binary problems: weight of the positive class in the loss
        (:class:`~milcell.train.trainer.Trainer`).
    loggers : sequence of str or RunLogger, optional
        Experiment tracking (:mod:`milcell.train.loggers`): names
        (``"csv"``, ``"tensorboard"``, ``"mlflow"``, also comma-separated;
        they need ``output_dir`` and write in it: ``tensorboard/``,
        ``mlruns/``) or logger objects. Each is one run holding the run's
        settings, with a child run per fold (epochs, reported metrics), the
        cross-validated summary and, at the end, the saved run's files
        (``run.json``, configuration, tables, figures, fold models) as
        artifacts. ``"csv"`` is what every run writes anyway
        (``cv/fold_*/metrics.csv``).
    tracking_uri : str, optional
        MLflow tracking URI (a server, ``sqlite:///...``); default the local
        file store ``output_dir/mlruns``.
    callbacks : sequence, optional
        Extra trainer callbacks of every fold (e.g. a tuning trial's
        pruning reporter, :mod:`milcell.tune`).

    Returns
    -------
    SavedRun
        With ``cv`` set.

    Raises
    ------
    ConfigError
        An invalid option (the message names it), an ``output_dir`` holding
        a run with other settings (without ``overwrite``), or ``resume``
        without a run to resume.
    LockError
        Another process is writing ``output_dir``.
    """
    import milcell
    from milcell._locks import folder_lock
    from milcell.data.splits import make_folds
    from milcell.nn.model import create_mil_model
    from milcell.train.crossval import SELECTIONS, cross_validate, fold_settings
    from milcell.train.features import FeatureCache, read_feature_cache
    from milcell.train.loggers import RunLogger, finish_on_error, make_loggers, parse_logger_names

    _check_samples(samples)
    logger_names = parse_logger_names([x for x in loggers if not isinstance(x, RunLogger)])
    if logger_names and output_dir is None:
        raise ConfigError(f"loggers {logger_names} write in the run folder: give output_dir")
    if calibrate is not None:
        from milcell.calibration import CALIBRATION_METHODS

        check_choice(calibrate, "calibrate", CALIBRATION_METHODS)
    feature_cache: FeatureCache | None = None
    if features is not None:
        feature_cache = features if isinstance(features, FeatureCache) else read_feature_cache(features)
        defaults = {
            name: param.default
            for name, param in inspect.signature(train_run).parameters.items()
            if name in _IMAGE_OPTIONS
        }
        # What the cache fixed may be repeated (the same backbone, the same image size), not changed.
        agreed = {
            "backbone": feature_cache.backbone,
            "image_size": (feature_cache.key.get("extra") or {}).get("image_size"),
        }
        given = {
            "backbone": backbone,
            "pretrained": pretrained,
            "checkpoint_path": checkpoint_path,
            "trainable": trainable,
            "chunk_size": chunk_size,
            "image_size": image_size,
            "augment": augment,
            "cache_images": cache_images,
        }
        changed = [
            f"{k}={v!r}" for k, v in given.items() if v != defaults[k] and (k not in agreed or v != agreed[k])
        ]
        if changed:
            raise ConfigError(
                f"{', '.join(changed)} do(es) not apply to a run on cached features (features={features!s}): "
                f"the cache fixed the backbone ({feature_cache.backbone}) and the preprocessing; leave "
                "these options out"
            )
        augment, cache_images = False, False
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ConfigError(f"output folder '{output_dir}' is a file, not a folder")
    start = time.perf_counter()
    folds = check_int(folds, "folds", low=2)
    repeats = check_int(repeats, "repeats", low=1)
    seed = check_int(seed, "seed", low=0)
    selection = check_choice(selection, "selection", SELECTIONS)
    inner_fraction = check_real(
        inner_fraction, "inner_fraction", low=0.0, high=1.0, low_open=True, high_open=True
    )
    if pos_weight is not None:
        pos_weight = check_real(pos_weight, "pos_weight", low=0.0, low_open=True)
    if not isinstance(one_logit, bool):
        raise ConfigError(f"one_logit must be a bool, got {one_logit!r}")
    epochs = check_int(epochs, "epochs", low=1)
    augment = check_augment(augment)
    batch_size = check_int(batch_size, "batch_size", low=1)
    num_workers = check_int(num_workers, "num_workers", low=0)
    lr = check_real(lr, "lr", low=0.0, low_open=True)
    weight_decay = check_real(weight_decay, "weight_decay", low=0.0)
    if patience is not None:
        patience = check_int(patience, "patience", low=1)
    if monitor is not None and not isinstance(monitor, str):
        raise ConfigError(f"monitor must be None or an epoch-log key (str), got {monitor!r}")
    if monitor is not None and not monitor.startswith(("val_", "train_")):
        raise ConfigError(
            "monitor must name an epoch-log key starting with 'val_' or 'train_' (e.g. 'val_loss', "
            f"'val_balanced_accuracy'), got {monitor!r}"
        )
    if sampler is not None:
        check_choice(sampler, "sampler", ("balanced", "oversample"))
    if overwrite and resume:
        raise ConfigError("overwrite and resume exclude each other: replace the run, or continue it")
    if checkpoint_path is not None:
        weights = Path(checkpoint_path)
        if not weights.is_file():
            raise FileNotFoundError(f"checkpoint_path '{weights}' does not exist or is not a file")
        checkpoint_path = str(weights)
    samples, data_counts = _data_summary(samples)
    logger.info("train_run: %s", describe_data(data_counts))
    bag_features = None if feature_cache is None else cached_features(samples, feature_cache)
    class_names = list(samples.class_names)
    clinical_names = list(getattr(samples, "clinical_names", ()))
    model_args = model_arguments(
        len(class_names),
        clinical_names,
        backbone=backbone,
        pooling=pooling,
        fusion=fusion,
        inputs=inputs,
        pretrained=pretrained,
        trainable=trainable,
        chunk_size=chunk_size,
    )
    if checkpoint_path is not None:
        model_args["backbone_kwargs"] = {"checkpoint_path": checkpoint_path}
    if one_logit:
        model_args["one_logit"] = True
    if feature_cache is None:
        backbone_config = backbone_data_config(backbone)
        prep = Preprocessing.from_backbone(backbone, image_size)
    else:  # the features' backbone and preprocessing, as the cache recorded them
        backbone = feature_cache.backbone
        model_args.update(backbone=None, in_dim=feature_cache.dim, chunk_size=None)
        backbone_config = dict(feature_cache.key.get("preprocessing", {}).get("data_config") or {})
        cached_size = (feature_cache.key.get("extra") or {}).get("image_size", image_size)
        prep = (
            Preprocessing.from_data_config(backbone_config, int(cached_size))
            if backbone_config
            else Preprocessing(int(cached_size))
        )
    with torch.random.fork_rng(devices=[]):
        probe = create_mil_model(**model_args)  # validates trainable, pooling, fusion before any write
    if (
        feature_cache is None
        and model_args["use_image"]
        and model_args["trainable"] != "all"
        and not pretrained
        and not checkpoint_path
    ):
        logger.warning(
            "trainable=%r freezes the backbone %s, but it has no pretrained weights (neither pretrained "
            "nor checkpoint_path): the model trains on random features",
            model_args["trainable"],
            backbone,
        )
    labels, groups = _labels_and_groups(samples)
    # A custom split names patients: a cohort's are its IDs.
    patients = groups
    if patients is None and split is not None and isinstance(samples, BagCohort):
        patients = np.asarray(samples.ids, dtype=object)
    splits = make_folds(split, labels, patients, n_splits=folds, n_repeats=repeats, seed=seed)
    if split is not None:
        folds, repeats = 1 + max(f.fold for f in splits), 1 + max(f.repeat for f in splits)
    keys = [(int(f.repeat), int(f.fold)) for f in splits]
    trainer_kwargs: dict[str, Any] = {
        "max_epochs": epochs,
        "lr": lr,
        "precision": precision,
        "progress": progress,
        "device": _device(device),
        "seed": seed,
        "class_names": class_names,
    }
    if monitor:
        trainer_kwargs["monitor"] = monitor
    if patience:
        trainer_kwargs["patience"] = patience
    if pos_weight is not None:
        trainer_kwargs["pos_weight"] = pos_weight
    if weight_decay:  # only when used: runs without it keep their settings fingerprint
        trainer_kwargs["weight_decay"] = weight_decay
    fingerprint = {
        **prep.to_dict(),
        "augment": augment,
        "max_instances": max_instances,
        "clinical_scaling": "minmax",
        "data": data_fingerprint(samples),
    }
    if feature_cache is not None:
        fingerprint["features"] = feature_cache.digest
    settings = fold_settings(
        probe,
        labels,
        None if groups is None else np.asarray(groups, dtype=object),
        n_splits=folds,
        n_repeats=repeats,
        seed=seed,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=False,
        trainer_kwargs=trainer_kwargs,
        fingerprint=fingerprint,
        selection=selection,
        inner_fraction=inner_fraction,
        folds=None if split is None else splits,
    )
    del probe
    out = None if output_dir is None else Path(output_dir)
    if out is not None:
        exists, differs = _existing_run(out, settings)
        if differs is not None and not overwrite:
            was, now = differs
            raise ConfigError(
                f"run folder '{out}' was trained with {was}; now {now}: pass --overwrite (overwrite=True) "
                "to replace it, or --resume (resume=True) to continue it unchanged"
            )
        if resume and not exists:
            raise ConfigError(f"nothing to resume: '{out}' holds no run (leave out --resume to start one)")
        if exists and differs is None and not overwrite:
            logger.info("train_run: continuing the run in %s (same settings)", out)
    cache = _cache(cache_images)
    data_options: dict[str, Any] = {
        "image_size": prep.image_size,
        "mean": prep.mean,
        "std": prep.std,
        "interpolation": prep.interpolation,
        "augment": augment,
        "max_instances": max_instances,
        "cache_images": cache if cache is not None else False,
        "seed": seed,
    }

    def make_datasets(fold: Any) -> tuple[Dataset[Bag], Dataset[Bag]]:
        if bag_features is not None:
            scaler = fit_clinical_scaler(samples, fold.train)
            common: dict[str, Any] = {"scaler": scaler, "max_instances": max_instances, "seed": seed}
            return (
                _feature_dataset(samples, bag_features, fold.train, train=True, **common),
                _feature_dataset(samples, bag_features, fold.val, train=False, **common),
            )
        train_ds, val_ds, _ = fold_datasets(samples, fold.train, fold.val, **data_options)
        return train_ds, val_ds

    def train(out: Path | None) -> SavedRun:
        if out is not None:
            if overwrite:
                _clear_run(out)
            if before_training is not None:
                before_training(out)
        if cache is not None:
            _dataset(
                samples,
                None,
                prep,
                train=False,
                augment=False,
                rotation=0.0,
                max_instances=None,
                seed=0,
                scaler=None,
                cache=cache,
            ).preload(  # type: ignore[attr-defined]
                progress
            )
        logger.info("cross-validating %s: %d folds", model_args["pooling"], len(splits))
        trackers = make_loggers(
            list(loggers),
            out or Path("."),
            tracking_uri=tracking_uri,
            name=None if out is None else out.name,
            csv_folder=None if out is None else out / "cv",
        )
        # The tracking runs end FAILED (KILLED on an interrupt) when the run raises; the error propagates.
        with finish_on_error(*trackers):
            for tracker in trackers:
                tracker.start({"run": settings})
            result = cross_validate(
                lambda: create_mil_model(**model_args),
                make_datasets,
                labels,
                groups,
                n_splits=folds,
                n_repeats=repeats,
                seed=seed,
                batch_size=batch_size,
                num_workers=num_workers,
                sampler=sampler,
                trainer_kwargs=trainer_kwargs,
                output_dir=None if out is None else out / "cv",
                keep_models=True,
                fingerprint=fingerprint,
                folds=None if split is None else splits,
                selection=selection,
                inner_fraction=inner_fraction,
                loggers=trackers,
                callbacks_factory=(lambda fold: list(callbacks)) if callbacks else None,
            )
            # Each fold model's clinical scaling: fitted on what it trained on (make_datasets did the same).
            scalers = [fit_clinical_scaler(samples, idx) for idx in result.fit_indices]
            models = list(result.models)
            if len(models) != len(keys):
                raise CheckpointError(
                    f"cross-validation returned {len(models)} models for {len(keys)} folds; "
                    "cannot save the run"
                )
            for model in models:
                model.eval()
            config = {
                "backbone": backbone,
                "pooling": pooling,
                "fusion": fusion,
                "inputs": inputs,
                "pretrained": bool(pretrained),
                "checkpoint_path": checkpoint_path,
                "trainable": trainable,
                "chunk_size": chunk_size,
                "folds": folds,
                "repeats": repeats,
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "weight_decay": weight_decay,
                "seed": seed,
                "image_size": prep.image_size,
                "augment": augment,
                "max_instances": max_instances,
                "cache_images": cache is not None,
                "precision": str(precision),
                "sampler": sampler,
                "monitor": monitor,
                "patience": patience,
                "num_workers": num_workers,
                "features": None if feature_cache is None else str(feature_cache.path),
                "split": _split_description(split),
                "selection": selection,
                "inner_fraction": inner_fraction if selection == "inner" else None,
                "one_logit": one_logit,
                "pos_weight": pos_weight,
            }
            record = {
                "format": RUN_FORMAT,
                "format_version": RUN_FORMAT_VERSION,
                "milcell_version": milcell.__version__,
                "data_format": data_format,
                "class_names": class_names,
                "clinical_names": clinical_names,
                **prep.to_dict(),
                "backbone_data_config": json_safe(backbone_config),
                "max_instances": max_instances,
                "config": json_safe(config),
                "settings": settings,
                "data": data_counts,
                "train_ids": sorted({str(i) for i in result.oof.ids}),
                "summary": {k: list(v) for k, v in result.summary.items()},
                "models": [{"repeat": r, "fold": k} for r, k in keys],
                "seconds": round(time.perf_counter() - start, 1),
            }
            if feature_cache is not None:
                record["features"] = {**feature_cache.identity, "dim": feature_cache.dim}
            if calibrate is not None:
                record["calibration"] = _run_calibration(result.oof, calibrate)
            run = SavedRun(record, models, scalers, None, result)
            if out is not None:
                save_run(run, out, figures=figures)
            for tracker in trackers:
                if out is not None:
                    for name in RUN_OUTPUTS:
                        if name != "cv" and (out / name).exists():
                            tracker.log_artifacts(out / name)
                tracker.finish()
        return run

    if out is None:
        return train(None)
    with folder_lock(out, what="run folder"):
        return train(out)


def _run_calibration(oof: Any, method: str) -> dict[str, Any]:
    """``run.json``'s ``calibration``: a calibrator fitted on the first repetition's out-of-fold rows."""
    from milcell.calibration import fit_run_calibration

    first = np.asarray(oof.repeat) == 0
    fitted = fit_run_calibration(
        np.asarray(oof.probabilities, dtype=np.float64)[first],
        np.asarray(oof.labels)[first],
        method,
        fitted_on="out-of-fold predictions (repeat 0)",
        folds=np.asarray(oof.fold)[first],
    )
    logger.info("calibration: %r fitted on %d out-of-fold predictions", fitted.calibrator, int(first.sum()))
    return fitted.to_dict()


def save_run(run: SavedRun, path: str | os.PathLike[str], *, figures: bool = True) -> Path:
    """Write ``run`` to the folder ``path`` (see the module docstring); set ``run.path``.

    Every file is written atomically; ``run.json`` last.

    Parameters
    ----------
    run : SavedRun
    path : path-like
        The run folder, created if needed.
    figures : bool, default True
        Write the ROC curves and training curves (skipped with a warning
        without matplotlib, or when the run holds no cross-validation result).

    Returns
    -------
    Path
    """
    from milcell._locks import folder_lock

    out = Path(path)
    with folder_lock(out, what="run folder"):
        _save_run(run, out, figures)
    run.path = out
    logger.info("saved run to %s", out)
    return out


def _save_run(run: SavedRun, out: Path, figures: bool) -> None:
    import safetensors.torch

    entries = []
    keys = [(int(e["repeat"]), int(e["fold"])) for e in run.record["models"]]
    for (repeat, fold), scaler, model in zip(keys, run.scalers, run.models, strict=True):
        rel = Path("models") / f"fold_{repeat}_{fold}"
        folder = out / rel
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "model.safetensors") as tmp:
            safetensors.torch.save_model(model.cpu(), str(tmp), force_contiguous=True)
        model_config = getattr(model, "config", None)
        if isinstance(model_config, Mapping):
            # The weights are saved: a rebuilt model must not need the backbone's weight file again.
            model_config = dict(model_config)
            extra = dict(model_config.get("backbone_kwargs") or {})
            extra.pop("checkpoint_path", None)
            model_config["backbone_kwargs"] = extra
        meta = {
            "model_config": model_config,
            "clinical_scaler": None if scaler is None else scaler.to_dict(),
            "repeat": repeat,
            "fold": fold,
        }
        with atomic_path(folder / "model.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        entries.append({"path": rel.as_posix(), "repeat": repeat, "fold": fold})
    run.record["models"] = entries
    if run.cv is not None:
        _write_oof(run, out / "oof_predictions.csv")
        _write_folds(run, out / "folds.csv")
    with atomic_path(out / "summary.txt") as tmp:
        tmp.write_text(run.table() + "\n", encoding="utf-8")
    if figures and run.cv is not None:
        try:
            run_figures({str((run.record.get("config") or {}).get("pooling", "model")): run}, out)
        except ImportError as exc:  # matplotlib missing
            logger.warning("figures skipped: %s", exc)
    with atomic_path(out / "run.json") as tmp:
        tmp.write_text(json.dumps(json_safe(run.record), indent=2) + "\n", encoding="utf-8")


def _write_oof(run: SavedRun, path: Path) -> None:
    oof = run.cv.oof  # type: ignore[union-attr]
    prob = np.asarray(oof.probabilities, dtype=np.float64)
    rows = [
        {
            "id": sample_id,
            "label": int(oof.labels[i]),
            "repeat": int(oof.repeat[i]),
            "fold": int(oof.fold[i]),
            **{f"prob_{c}": f"{p:.6f}" for c, p in zip(run.class_names, prob[i], strict=True)},
        }
        for i, sample_id in enumerate(oof.ids)
    ]
    write_dict_csv(rows, path)


def _write_folds(run: SavedRun, path: Path) -> None:
    write_dict_csv([dict(r) for r in run.cv.folds], path)  # type: ignore[union-attr]


def _roc_pairs(run: SavedRun) -> list[tuple[np.ndarray, np.ndarray]]:
    oof = run.cv.oof  # type: ignore[union-attr]
    labels = np.asarray(oof.labels)
    prob = np.asarray(oof.probabilities)[:, 1]
    repeat, fold = np.asarray(oof.repeat), np.asarray(oof.fold)
    keys = sorted({(int(r), int(f)) for r, f in zip(repeat, fold, strict=True)})
    return [(labels[(repeat == r) & (fold == f)], prob[(repeat == r) & (fold == f)]) for r, f in keys]


def run_figures(runs: Mapping[str, SavedRun], folder: str | os.PathLike[str]) -> list[Path]:
    """``roc.png`` (binary problems: out-of-fold ROC of each run) and ``training_curves.png``.

    The training curves are those of the first run's first fold. Runs
    without a cross-validation result (loaded ones) are skipped.

    Parameters
    ----------
    runs : mapping of str to SavedRun
        Runs by the name shown in the legend.
    folder : path-like
        Where the PNG files go.

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    ImportError
        matplotlib is missing.
    """
    from milcell.viz import plot_roc_comparison, plot_training_curves, save_figure

    out = Path(folder)
    trained = {name: run for name, run in runs.items() if run.cv is not None}
    written: list[Path] = []
    if not trained:
        return written
    first_name, first = next(iter(trained.items()))
    if len(first.class_names) == 2:
        usable = {k: [p for p in _roc_pairs(r) if len(set(p[0].tolist())) == 2] for k, r in trained.items()}
        usable = {k: v for k, v in usable.items() if v}
        if usable:
            fig = plot_roc_comparison(usable, title="Out-of-fold ROC (mean ± std over folds)")
            written.append(save_figure(fig, out / "roc.png"))
    histories = first.cv.histories if first.cv is not None else []
    history = histories[0] if histories else []
    if history:
        fig = plot_training_curves(history, title=f"{first_name}: training curves, fold 1")
        written.append(save_figure(fig, out / "training_curves.png"))
    return written


def load_run(path: str | os.PathLike[str]) -> SavedRun:
    """Read a run folder: its record, fold models (in eval mode, on the CPU) and clinical scalings.

    Weights are safetensors and models are rebuilt from their JSON
    arguments, so nothing is unpickled.

    Parameters
    ----------
    path : path-like
        A folder written by :func:`save_run` (``milcell train``).

    Returns
    -------
    SavedRun

    Raises
    ------
    FileNotFoundError
        The folder does not exist.
    CheckpointError
        No ``run.json``, an unreadable or foreign record, a ``format_version``
        newer than this milcell reads, a model path outside the run, or a
        missing, truncated or corrupt model file; the message names the file.
    """
    from milcell.nn.model import MILModel
    from milcell.train.checkpoint import load_weights

    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"run folder '{folder}' does not exist")
    record_path = folder / "run.json"
    if not record_path.is_file():
        raise CheckpointError(
            f"'{folder}' is not a saved milcell run: it has no run.json (train one with milcell train)"
        )
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"run record '{record_path}' is unreadable: {exc}") from exc
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise CheckpointError(f"run record '{record_path}' is not a milcell run record")
    version = record.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"run record '{record_path}' has an invalid format_version {version!r}")
    if version > RUN_FORMAT_VERSION:
        raise CheckpointError(
            f"run record '{record_path}' has format_version {version}, newer than the "
            f"{RUN_FORMAT_VERSION} this milcell reads; upgrade milcell"
        )
    _check_record(record, record_path)
    root = folder.resolve()
    models: list[nn.Module] = []
    scalers: list[ClinicalScaler | None] = []
    for entry in record["models"]:
        # A shared run's record may not point the loader outside the run folder.
        model_dir = folder / entry["path"]
        inside = model_dir.resolve()
        if inside == root or not inside.is_relative_to(root):
            raise CheckpointError(
                f"run record '{record_path}': model path {entry!r} is not a folder inside the run"
            )
        meta_path = model_dir / "model.json"
        if not meta_path.is_file():
            raise CheckpointError(f"model record '{meta_path}' is missing")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"model record '{meta_path}' is unreadable: {exc}") from exc
        _check_keys(meta, meta_path, "model record", _MODEL_SCHEMA, closed=True)
        try:
            model = MILModel.from_config(meta["model_config"])
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"model record '{meta_path}': 'model_config' is invalid: {exc}") from exc
        load_weights(model_dir / "model.safetensors", model)
        model.eval()
        models.append(model)
        scaler = meta.get("clinical_scaler")
        try:
            scalers.append(None if scaler is None else ClinicalScaler.from_dict(scaler))
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"model record '{meta_path}': 'clinical_scaler' is invalid: {exc}") from exc
    return SavedRun(record, models, scalers, folder)


_NUMBER = (int, float)
# key -> (allowed types, required); ``None`` is allowed where the tuple holds type(None).
_RUN_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((str,), True),
    "format_version": ((int,), True),
    "class_names": ((list,), True),
    "image_size": ((int,), True),
    "mean": ((list,), True),
    "std": ((list,), True),
    "models": ((list,), True),
    "clinical_names": ((list,), False),
    "interpolation": ((str,), False),
    "max_instances": ((int, type(None)), False),
    "data_format": ((str, type(None)), False),
    "summary": ((dict,), False),
    "config": ((dict,), False),
    "settings": ((dict,), False),
    "data": ((dict,), False),
    "train_ids": ((list,), False),
    "calibration": ((dict,), False),
}
_MODEL_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "model_config": ((dict,), True),
    "clinical_scaler": ((dict, type(None)), False),
    "repeat": ((int,), False),
    "fold": ((int,), False),
}


def _check_keys(
    record: Any, path: Path, what: str, schema: Mapping[str, tuple[tuple[type, ...], bool]], closed: bool
) -> None:
    """Required keys and their types (``closed``: no other key); the message names the file and key."""
    if not isinstance(record, dict):
        raise CheckpointError(f"{what} '{path}' does not hold a JSON object")
    for key, (types, required) in schema.items():
        if key not in record:
            if required:
                raise CheckpointError(f"{what} '{path}' lacks the key {key!r}")
            continue
        value = record[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(
                f"{what} '{path}': {key!r} must be {names}, got {type(value).__name__} {value!r:.60}"
            )
    if closed:
        unknown = sorted(set(record) - set(schema))
        if unknown:
            raise CheckpointError(
                f"{what} '{path}' has unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(schema)}"
            )


def _check_record(record: dict[str, Any], path: Path) -> None:
    _check_keys(record, path, "run record", _RUN_SCHEMA, closed=False)
    for key in ("class_names", "clinical_names", "train_ids"):
        if not all(isinstance(v, str) for v in record.get(key) or []):
            raise CheckpointError(f"run record '{path}': {key!r} must be a list of strings")
    for key in ("mean", "std"):
        values = record[key]
        if not values or not all(isinstance(v, _NUMBER) and not isinstance(v, bool) for v in values):
            raise CheckpointError(
                f"run record '{path}': {key!r} must be a list of numbers, got {values!r:.60}"
            )
    if record["image_size"] < 1:
        raise CheckpointError(f"run record '{path}': 'image_size' must be >= 1, got {record['image_size']}")
    if not record["models"]:
        raise CheckpointError(f"run record '{path}': 'models' is empty")
    for entry in record["models"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise CheckpointError(f"run record '{path}': model entry {entry!r:.60} has no 'path' string")
        for key in ("repeat", "fold"):
            if isinstance(entry.get(key), bool) or not isinstance(entry.get(key, 0), int):
                raise CheckpointError(f"run record '{path}': model entry {entry!r:.60}: {key!r} must be int")
