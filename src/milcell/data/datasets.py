"""Datasets that yield :class:`~milcell.data.Bag` objects for :func:`~milcell.data.collate_bags`.

Three datasets feed the same collate and the same model:

* :class:`BagDataset` reads a patient's cell images lazily from disk (one
  :class:`~milcell.data.BagRecord` per item) and transforms each image;
* :class:`FeatureBagDataset` serves precomputed feature matrices ``(N, D)``
  (a frozen backbone's cache), in memory or from safetensors / ``.npy`` files;
* :class:`InstanceDataset` serves single-cell images as *bags of one*, so
  single-cell classification runs through the MIL model unchanged.

Capping the bag size
--------------------
``max_instances`` caps the number of instances per bag. With ``train=True``
a random subset is drawn from a generator seeded by ``(seed, epoch, index)``,
so it changes from epoch to epoch (call :meth:`BagDataset.set_epoch`, as with
``DistributedSampler``), is reproducible, and does not depend on the number of
DataLoader workers. With ``train=False`` the subset is deterministic: evenly
spaced positions over the record's (sorted) file list. Selected instances keep
their original order.

Keeping decoded images in memory
--------------------------------
``cache_images=True`` (or a shared :class:`ImageCache`) makes
:class:`BagDataset` and :class:`InstanceDataset` decode every image file once
and keep it in memory as the decoded ``uint8`` array, *before* any transform.
Every access still builds a PIL image from it and runs the dataset's
``transform``, so augmentation, the ``max_instances`` rule, ``set_epoch`` and
resume behave exactly as without the cache; only the file reads and decoding
are saved. Memory: ``H * W * 3`` bytes per image at the file's own size.

Examples
--------
>>> import torch
>>> from milcell.data import collate_bags
>>> ds = FeatureBagDataset([torch.rand(3, 8), torch.rand(5, 8)], labels=[0, 1], ids=["P1", "P2"])
>>> batch = collate_bags([ds[0], ds[1]])
>>> batch.instances.shape, batch.bag_sizes.tolist()
(torch.Size([8, 8]), [3, 5])
"""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from milcell._utils import atomic_path
from milcell.data.bag import Bag
from milcell.data.formats._paths import check_inside
from milcell.data.images import mask_weights, read_image
from milcell.data.records import BagCohort, BagRecord, CellSet
from milcell.data.transforms import default_transform
from milcell.exceptions import ConfigError, DataError

__all__ = [
    "BagDataset",
    "FeatureBagDataset",
    "ImageCache",
    "InstanceDataset",
    "group_cells_by_patient",
    "select_instances",
]

logger = logging.getLogger("milcell")

_FORMAT = "milcell.feature_bags"
_FORMAT_VERSION = "1"
_LABELS_KEY = "__labels__"
_CLINICAL_KEY = "__clinical__"


def select_instances(
    num_instances: int,
    max_instances: int | None,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    index: int = 0,
) -> np.ndarray:
    """Positions of the instances kept when a bag is capped at ``max_instances``.

    Parameters
    ----------
    num_instances : int
        Size ``N`` of the bag.
    max_instances : int or None
        The cap; ``None`` (or a cap ``>= N``) keeps every instance.
    train : bool
        ``True``: a random subset from a generator seeded by ``(seed, epoch, index)``.
        ``False``: evenly spaced positions, the same every time.
    seed, epoch, index : int
        Seed of the random subset; non-negative.

    Returns
    -------
    ndarray
        ``(min(N, max_instances),)`` int64 sorted unique positions in ``0..N-1``.

    Examples
    --------
    >>> select_instances(10, 4, train=False).tolist()
    [1, 3, 6, 8]
    >>> a = select_instances(10, 4, train=True, seed=0, epoch=0, index=3)
    >>> b = select_instances(10, 4, train=True, seed=0, epoch=0, index=3)
    >>> bool((a == b).all()), len(a)
    (True, 4)
    """
    if max_instances is None or max_instances >= num_instances:
        return np.arange(num_instances, dtype=np.int64)
    if train:
        rng = np.random.default_rng([int(seed), int(epoch), int(index)])
        return np.sort(rng.choice(num_instances, size=max_instances, replace=False)).astype(np.int64)
    # Centre of each of max_instances equal slices; slices are wider than 1, so positions are unique.
    return np.floor((np.arange(max_instances) + 0.5) * num_instances / max_instances).astype(np.int64)


def _check_cap(max_instances: int | None, seed: int) -> None:
    if max_instances is not None and (
        isinstance(max_instances, bool)
        or not isinstance(max_instances, numbers.Integral)
        or max_instances < 1
    ):
        raise ConfigError(f"max_instances must be None or a positive int, got {max_instances!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")


class _EpochMixin:
    """Epoch counter kept in shared memory so persistent DataLoader workers see ``set_epoch``."""

    _epoch: Tensor

    def _init_epoch(self) -> None:
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch used to seed the random instance subsets."""
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the random subsets (training with ``max_instances``).

        Call it at the start of every epoch, like ``DistributedSampler.set_epoch``;
        the value is shared with DataLoader workers, persistent ones included.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ConfigError(f"set_epoch: epoch must be a non-negative int, got {epoch!r}")
        self._epoch.fill_(int(epoch))


def _locate(path: Path, root: Path | None) -> Path:
    """The file of a record: as given, or under ``root`` when a relative path does not exist."""
    path = Path(path)
    if root is not None and not path.is_absolute() and not path.exists():
        candidate = Path(root) / path
        if candidate.exists():
            path = candidate
    return path


def _check_before_reading(path: Path, root: Path | None) -> None:
    if root is not None:
        # Checked again at read time: a file replaced by a symlink pointing out of the dataset
        # after the loader checked it is refused. (An image served from memory is not read.)
        check_inside(Path(root), path)


def _resolve_path(path: Path, root: Path | None) -> Path:
    located = _locate(path, root)
    _check_before_reading(located, root)
    return located


def _open_image(path: Path, mode: str, owner: str) -> Image.Image:
    """Read an image fully (:func:`milcell.data.images.read_image`); failures name the file."""
    return read_image(path, mode, owner=owner)


class ImageCache:
    """Decoded images kept in memory, keyed by file and colour mode: each file is decoded once.

    The stored value is the decoded ``uint8`` array (``(H, W, 3)`` for RGB,
    ``(H, W)`` for grey masks) at the file's own size, before any transform:
    datasets using the cache run their transform on it at every access, so
    random augmentation is unchanged. One cache can be shared by several
    datasets over the same files (the folds of a cross-validation), so every
    file is decoded once in all. DataLoader workers started after the cache is
    filled (see :meth:`BagDataset.preload`) share its pages with the main
    process; images a worker decodes itself stay in that worker.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> path = Path(tempfile.mkdtemp()) / "c.png"
    >>> Image.new("RGB", (6, 4), (200, 10, 10)).save(path)
    >>> cache = ImageCache()
    >>> cache.open(path, "RGB", "cell c").size, len(cache), cache.nbytes
    ((6, 4), 1, 72)
    >>> path.unlink()                      # decoded once: the file is no longer read
    >>> cache.open(path, "RGB", "cell c").getpixel((0, 0))
    (200, 10, 10)
    """

    def __init__(self) -> None:
        self._images: dict[tuple[str, str], np.ndarray] = {}
        self._tensors: dict[tuple[str, str, str], Tensor] = {}

    def __len__(self) -> int:
        """Number of cached entries: decoded images plus transformed tensors."""
        return len(self._images) + len(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._images

    @property
    def nbytes(self) -> int:
        """Memory held by the decoded images and transformed tensors, in bytes."""
        tensors = sum(t.numel() * t.element_size() for t in self._tensors.values())
        return int(sum(a.nbytes for a in self._images.values()) + tensors)

    def transformed(
        self,
        path: Path,
        mode: str,
        owner: str,
        transform: Callable[[Image.Image], Tensor],
        root: Path | None = None,
    ) -> Tensor:
        """The output of a *deterministic* ``transform`` on the image, computed on the first call only.

        Keyed by the file, the mode and ``repr(transform)`` (torchvision transforms list
        their parameters there), so datasets sharing the cache and an equal transform
        share the tensors. The decoded image itself is not kept. With ``root``, a file
        about to be read is first checked to be inside it.

        Raises
        ------
        DataError
            An unreadable file or a transform that does not return a tensor.
        """
        key = (str(path), mode, repr(transform))
        tensor = self._tensors.get(key)
        if tensor is None:
            image = self.open(path, mode, owner) if (str(path), mode) in self._images else None
            if image is None:
                _check_before_reading(Path(path), root)
                image = _open_image(Path(path), mode, owner)
            tensor = _apply_transform(transform, image, Path(path), owner)
            self._tensors[key] = tensor
        return tensor

    def open(self, path: Path, mode: str, owner: str) -> Image.Image:
        """The image at ``path`` converted to ``mode``, decoded on the first call only.

        Parameters
        ----------
        path : Path
            The image file (already resolved and checked by the caller).
        mode : str
            PIL mode, ``"RGB"`` or ``"L"``.
        owner : str
            Who reads it (``"patient 'P1'"``), for the error message.

        Returns
        -------
        PIL.Image.Image
            A fresh image (transforms may modify it freely).

        Raises
        ------
        DataError
            An unreadable file; the message names the file and ``owner``.
        """
        key = (str(path), mode)
        array = self._images.get(key)
        if array is None:
            array = np.asarray(_open_image(Path(path), mode, owner))
            self._images[key] = array
        return Image.fromarray(array)


def _as_cache(cache_images: bool | ImageCache) -> ImageCache | None:
    if isinstance(cache_images, ImageCache):
        return cache_images
    if isinstance(cache_images, (bool, np.bool_)):
        return ImageCache() if cache_images else None
    raise ConfigError(f"cache_images must be a bool or an ImageCache, got {type(cache_images).__name__}")


def _read_image(
    cache: ImageCache | None, path: Path, mode: str, owner: str, root: Path | None = None
) -> Image.Image:
    """The image from the cache, or from disk after checking that ``path`` is inside ``root``."""
    if cache is None or (str(path), mode) not in cache:
        _check_before_reading(path, root)
    return _open_image(path, mode, owner) if cache is None else cache.open(path, mode, owner)


def _check_bag_transform(
    bag_transform: Callable[[Tensor], Tensor] | None, who: str
) -> Callable[[Tensor], Tensor] | None:
    if bag_transform is not None and not callable(bag_transform):
        raise ConfigError(
            f"{who}: bag_transform must be callable or None, got {type(bag_transform).__name__}"
        )
    return bag_transform


def _check_cache_transformed(cache_transformed: Any, cache: ImageCache | None, who: str) -> bool:
    if not isinstance(cache_transformed, (bool, np.bool_)):
        raise ConfigError(f"{who}: cache_transformed must be a bool, got {cache_transformed!r}")
    if cache_transformed and cache is None:
        raise ConfigError(f"{who}: cache_transformed=True needs cache_images=True (or an ImageCache)")
    return bool(cache_transformed)


def _run_bag_transform(
    bag_transform: Callable[[Tensor], Tensor] | None, instances: Tensor, owner: str
) -> Tensor:
    if bag_transform is None:
        return instances
    out = bag_transform(instances)
    if not isinstance(out, Tensor) or out.ndim < 1 or out.shape[0] != instances.shape[0]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise DataError(
            f"{owner}: bag_transform must return a tensor with the {instances.shape[0]} instances "
            f"first, got {got}"
        )
    return out


def _apply_transform(transform: Callable[[Any], Any], image: Image.Image, path: Path, owner: str) -> Tensor:
    out = transform(image)
    if not isinstance(out, Tensor):
        raise DataError(
            f"{owner}: the transform returned {type(out).__name__} for {str(path)!r}, "
            "expected a Tensor (C, H, W)"
        )
    return out


class BagDataset(_EpochMixin, Dataset[Bag]):
    """Bags of cell images read lazily from disk, one patient per item.

    Each item opens the patient's image files with PIL, converts them to RGB,
    applies ``transform`` to every image and stacks the results into the
    bag's instances ``(N, C, H, W)``.

    Parameters
    ----------
    cohort : BagCohort
        The patients; every record needs at least one image file. Relative
        paths that do not exist as given are looked up under ``cohort.root``.
    transform : callable or None, default None
        ``PIL.Image -> Tensor (C, H, W)``, e.g. from
        :func:`~milcell.data.transforms.build_transforms`. It must give every
        image of a bag the same size (resize there). ``None`` converts to
        float32 in [0, 1] without resizing.
    max_instances : int or None, default None
        Cap on the instances per bag; see the module docstring.
    train : bool, default False
        Random capped subsets (``True``) or deterministic ones (``False``).
    seed : int, default 0
        Seed of the random subsets (with the epoch and the item index).
    clinical_scaler : ClinicalScaler or callable or None, default None
        A fitted :class:`~milcell.data.ClinicalScaler` (its ``transform`` is
        used) or any callable mapping the raw ``(n, F)`` float64 clinical
        matrix to ``(n, F')``. Without a scaler the bag's clinical tensor holds
        the raw float values, ``nan`` included. A cohort without clinical names
        yields ``clinical=None``.
    cache_images : bool or ImageCache, default False
        Keep every decoded image in memory (an :class:`ImageCache`; pass one
        to share it between datasets): each file is decoded once, the
        ``transform`` still runs at every access. See the module docstring.
    bag_transform : callable or None, default None
        ``(N, C, H, W) -> (N, C, H, W)`` applied to the stacked instances of each
        item, e.g. the :class:`~milcell.data.transforms.BagAugment` of
        :func:`~milcell.data.transforms.build_bag_transforms`: random flips and
        rotations of a whole bag in one call, much cheaper than per image.
    cache_transformed : bool, default False
        With ``cache_images``: cache the output of ``transform`` instead of the
        decoded image, so it runs once per file. Only for a deterministic
        ``transform`` (put the random augmentation in ``bag_transform``).

    Attributes
    ----------
    clinical : Tensor or None
        ``(n, F')`` float32 clinical attributes of every patient (after the scaler).
    image_cache : ImageCache or None
        The decoded images, when ``cache_images`` is on.

    Raises
    ------
    DataError
        A patient without image files, an unreadable image, a non-tensor
        transform output or images of different sizes within a bag; the message
        names the patient and the file or sizes.
    ConfigError
        An invalid argument.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from milcell.data import BagCohort, BagRecord
    >>> root = Path(tempfile.mkdtemp())
    >>> paths = []
    >>> for i in range(3):
    ...     Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(root / f"{i}.png")
    ...     paths.append(root / f"{i}.png")
    >>> cohort = BagCohort([BagRecord("P1", 1, tuple(paths), (63.0,))], clinical_names=("age",))
    >>> bag = BagDataset(cohort, max_instances=2)[0]
    >>> bag.id, bag.instances.shape, bag.instance_names, bag.clinical
    ('P1', torch.Size([2, 3, 8, 8]), ('0.png', '2.png'), tensor([63.]))
    >>> cached = BagDataset(cohort, max_instances=2, cache_images=True)
    >>> cached.preload()                  # decode every file now (else: on first access)
    >>> len(cached.image_cache), torch.equal(cached[0].instances, bag.instances)
    (3, True)
    """

    def __init__(
        self,
        cohort: BagCohort,
        transform: Callable[[Image.Image], Tensor] | None = None,
        max_instances: int | None = None,
        train: bool = False,
        seed: int = 0,
        clinical_scaler: Any | None = None,
        cache_images: bool | ImageCache = False,
        bag_transform: Callable[[Tensor], Tensor] | None = None,
        cache_transformed: bool = False,
    ) -> None:
        if not isinstance(cohort, BagCohort):
            raise ConfigError(f"BagDataset: cohort must be a BagCohort, got {type(cohort).__name__}")
        self.image_cache = _as_cache(cache_images)
        self.bag_transform = _check_bag_transform(bag_transform, "BagDataset")
        self.cache_transformed = _check_cache_transformed(cache_transformed, self.image_cache, "BagDataset")
        _check_cap(max_instances, seed)
        for record in cohort:
            if record.num_instances == 0:
                raise DataError(f"patient {record.id!r} has no image files")
        self.cohort = cohort
        self.transform = transform if transform is not None else default_transform()
        self.max_instances = max_instances
        self.train = bool(train)
        self.seed = int(seed)
        self.clinical = self._clinical(cohort, clinical_scaler)
        self._init_epoch()

    @staticmethod
    def _clinical(cohort: BagCohort, scaler: Any | None) -> Tensor | None:
        if not cohort.clinical_names:
            return None
        raw = cohort.clinical_matrix()
        if scaler is None:
            values = raw
            if np.isnan(values).any():
                logger.warning(
                    "BagDataset: %d missing clinical values passed through as nan (no clinical_scaler given)",
                    int(np.isnan(values).sum()),
                )
        else:
            fn = getattr(scaler, "transform", scaler)
            if not callable(fn):
                raise ConfigError(
                    "clinical_scaler must be a fitted ClinicalScaler or a callable, "
                    f"got {type(scaler).__name__}"
                )
            values = np.asarray(fn(raw))
            if values.ndim != 2 or values.shape[0] != len(cohort):
                raise DataError(
                    f"clinical_scaler returned shape {values.shape}, expected ({len(cohort)}, F) "
                    f"for {len(cohort)} patients"
                )
        return torch.as_tensor(np.asarray(values, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.cohort)

    @property
    def labels(self) -> np.ndarray:
        """``(n,)`` int64 labels of the patients (``-1`` = unlabelled)."""
        return self.cohort.labels

    @property
    def ids(self) -> list[str]:
        """Patient IDs, in order."""
        return self.cohort.ids

    def bag_size(self, index: int) -> int:
        """Number of instances item ``index`` yields (after the cap), without reading images."""
        n = self.cohort[index].num_instances
        return n if self.max_instances is None else min(n, self.max_instances)

    def preload(self, progress: bool = False) -> None:
        """Decode every image of every bag into :attr:`image_cache` now (all of them, not a subset).

        Without it the cache fills on first access. Call it before handing the
        dataset to a DataLoader with workers, so the workers share the decoded
        images instead of each decoding its own copy.

        Parameters
        ----------
        progress : bool, default False
            Show a progress bar.

        Raises
        ------
        ConfigError
            The dataset was built without ``cache_images``.
        DataError
            An unreadable image; the message names the patient and the file.
        """
        if self.image_cache is None:
            raise ConfigError("BagDataset.preload: the dataset has no image cache (pass cache_images=True)")
        from tqdm.auto import tqdm

        for record in tqdm(self.cohort, desc="decoding", disable=not progress, leave=False):
            owner = f"patient {record.id!r}"
            for path in record.paths:
                resolved = _resolve_path(path, self.cohort.root)
                if self.cache_transformed:
                    self.image_cache.transformed(resolved, "RGB", owner, self.transform)
                else:
                    self.image_cache.open(resolved, "RGB", owner)

    def __getitem__(self, index: int) -> Bag:
        record: BagRecord = self.cohort[index]
        owner = f"patient {record.id!r}"
        keep = select_instances(
            record.num_instances,
            self.max_instances,
            train=self.train,
            seed=self.seed,
            epoch=self.epoch,
            index=int(index) % len(self),
        )
        root = self.cohort.root
        paths = [_locate(record.paths[int(i)], root) for i in keep]  # checked when read from disk
        if self.cache_transformed and self.image_cache is not None:
            images = [
                self.image_cache.transformed(path, "RGB", owner, self.transform, root) for path in paths
            ]
        else:
            images = [
                _apply_transform(
                    self.transform, _read_image(self.image_cache, path, "RGB", owner, root), path, owner
                )
                for path in paths
            ]
        shapes = {tuple(x.shape) for x in images}
        if len(shapes) > 1:
            raise DataError(
                f"{owner}: images end with different sizes {sorted(shapes)}; "
                "use a transform that resizes them to one size"
            )
        return Bag(
            _run_bag_transform(self.bag_transform, torch.stack(images), owner),
            label=record.label,
            clinical=None if self.clinical is None else self.clinical[index],
            id=record.id,
            instance_names=tuple(record.instance_names[int(i)] for i in keep),
        )


def _as_matrix(value: Any, name: str) -> Tensor:
    if isinstance(value, np.ndarray):
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as exc:
            raise DataError(f"bag {name!r}: features have unsupported dtype {value.dtype}") from exc
    elif isinstance(value, Tensor):
        tensor = value.detach()
    else:
        raise DataError(f"bag {name!r}: features must be a Tensor or ndarray, got {type(value).__name__}")
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise DataError(
            f"bag {name!r}: features must have shape (N, D) with N >= 1, got {tuple(tensor.shape)}"
        )
    if not tensor.is_floating_point():
        tensor = tensor.float()
    return tensor


class FeatureBagDataset(_EpochMixin, Dataset[Bag]):
    """Bags of precomputed instance features ``(N_i, D)``, in memory.

    Build it from matrices (e.g. a frozen backbone's outputs) or read it with
    :meth:`from_safetensors` / :meth:`from_numpy_dir`; write it with
    :meth:`save_safetensors`. Items are float32 :class:`~milcell.data.Bag`
    objects with ``(N, D)`` instances, fed to the same collate as image bags.

    Parameters
    ----------
    features : sequence of Tensor/ndarray, or mapping id -> Tensor/ndarray
        One ``(N_i, D)`` matrix per bag, ``N_i >= 1``, the same ``D`` for all.
        Floating dtypes are kept in memory (e.g. float16 caches) and returned
        as float32.
    labels : sequence of int or None, default None
        One label per bag; ``None`` marks every bag unlabelled (``-1``).
    ids : sequence of str or None, default None
        Unique bag IDs. Defaults to the mapping's keys, or ``"0", "1", ...``.
        With a mapping, the given IDs select and order its entries.
    clinical : array-like or None, default None
        ``(n, F)`` clinical attributes (already scaled), or None.
    clinical_names : sequence of str, default ()
        Names of the clinical columns (kept by :meth:`save_safetensors`).
    instance_names : sequence of sequence of str or None, default None
        Per bag, one name per row (e.g. the image file names).
    max_instances, train, seed
        Cap on the instances per bag, as in :class:`BagDataset`.
    metadata : mapping of str to str or None, default None
        Free-form strings saved with :meth:`save_safetensors` (e.g. the
        backbone that produced the features).

    Raises
    ------
    DataError
        Inconsistent inputs; the message names the bag or argument.

    Examples
    --------
    >>> import numpy as np
    >>> ds = FeatureBagDataset({"P1": np.ones((4, 2)), "P2": np.zeros((1, 2))}, labels=[1, 0])
    >>> ds.ids, ds[1].instances.shape, ds.dim
    (['P1', 'P2'], torch.Size([1, 2]), 2)
    """

    def __init__(
        self,
        features: Sequence[Tensor | np.ndarray] | Mapping[str, Tensor | np.ndarray],
        labels: Sequence[int] | np.ndarray | Tensor | None = None,
        ids: Sequence[str] | None = None,
        clinical: Any | None = None,
        *,
        clinical_names: Sequence[str] = (),
        instance_names: Sequence[Sequence[str]] | None = None,
        max_instances: int | None = None,
        train: bool = False,
        seed: int = 0,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        _check_cap(max_instances, seed)
        if isinstance(features, Mapping):
            if ids is None:
                ids = [str(k) for k in features]
            missing = [i for i in ids if i not in features]
            if missing:
                raise DataError(f"FeatureBagDataset: no features for bag IDs {missing[:5]}")
            matrices = [features[i] for i in ids]
        elif isinstance(features, (str, bytes)) or not isinstance(features, Sequence):
            raise DataError(
                f"FeatureBagDataset: features must be a sequence or a mapping of matrices, "
                f"got {type(features).__name__}"
            )
        else:
            matrices = list(features)
            if ids is None:
                ids = [str(i) for i in range(len(matrices))]
        ids = [str(i) for i in ids]
        n = len(matrices)
        if n == 0:
            raise DataError("FeatureBagDataset: no bags given")
        if len(ids) != n:
            raise DataError(f"FeatureBagDataset: {len(ids)} ids for {n} bags")
        seen: set[str] = set()
        for bag_id in ids:
            if bag_id in seen:
                raise DataError(f"FeatureBagDataset: duplicate bag ID {bag_id!r}")
            seen.add(bag_id)
        self.ids = ids
        self.features = [_as_matrix(m, bag_id) for m, bag_id in zip(matrices, ids, strict=True)]
        dims = {int(f.shape[1]) for f in self.features}
        if len(dims) > 1:
            first = int(self.features[0].shape[1])
            odd = next(b for b, f in zip(ids, self.features, strict=True) if f.shape[1] != first)
            raise DataError(
                f"bag {odd!r}: feature width differs from bag {ids[0]!r} ({sorted(dims)}); "
                "all bags need one D"
            )
        self.dim = dims.pop()
        if labels is None:
            label_array = np.full(n, -1, dtype=np.int64)
        else:
            label_array = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
            if label_array.shape != (n,) or not np.issubdtype(label_array.dtype, np.integer):
                raise DataError(
                    f"FeatureBagDataset: labels must be {n} integers, got shape {label_array.shape} "
                    f"of dtype {label_array.dtype}"
                )
            bad = np.flatnonzero(label_array < -1)
            if bad.size:
                raise DataError(f"bag {ids[bad[0]]!r}: label {int(label_array[bad[0]])} < -1")
        self._labels = label_array.astype(np.int64)
        if clinical is None:
            self.clinical: Tensor | None = None
        else:
            clin = torch.as_tensor(
                np.asarray(clinical.cpu() if isinstance(clinical, Tensor) else clinical, dtype=np.float32)
            )
            if clin.ndim != 2 or clin.shape[0] != n:
                raise DataError(
                    f"FeatureBagDataset: clinical must have shape ({n}, F), got {tuple(clin.shape)}"
                )
            if clinical_names and len(clinical_names) != clin.shape[1]:
                raise DataError(
                    f"FeatureBagDataset: {len(clinical_names)} clinical_names for {clin.shape[1]} columns"
                )
            self.clinical = clin
        self.clinical_names = tuple(str(c) for c in clinical_names)
        names_per_bag: list[tuple[str, ...]] | None = None
        if instance_names is not None:
            names_per_bag = [tuple(str(s) for s in names) for names in instance_names]
            if len(names_per_bag) != n:
                raise DataError(
                    f"FeatureBagDataset: instance_names for {len(names_per_bag)} bags, expected {n}"
                )
            for bag_id, names, f in zip(ids, names_per_bag, self.features, strict=True):
                if len(names) != f.shape[0]:
                    raise DataError(f"bag {bag_id!r}: {len(names)} instance names for {f.shape[0]} rows")
        self.instance_names: list[tuple[str, ...]] | None = names_per_bag
        self.max_instances = max_instances
        self.train = bool(train)
        self.seed = int(seed)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._init_epoch()

    def __len__(self) -> int:
        return len(self.features)

    @property
    def labels(self) -> np.ndarray:
        """``(n,)`` int64 labels (``-1`` = unlabelled)."""
        return self._labels.copy()

    def bag_size(self, index: int) -> int:
        """Number of instances item ``index`` yields (after the cap)."""
        n = int(self.features[index].shape[0])
        return n if self.max_instances is None else min(n, self.max_instances)

    def __getitem__(self, index: int) -> Bag:
        matrix = self.features[index]
        keep = select_instances(
            int(matrix.shape[0]),
            self.max_instances,
            train=self.train,
            seed=self.seed,
            epoch=self.epoch,
            index=int(index) % len(self),
        )
        whole = keep.shape[0] == matrix.shape[0]
        instances = (matrix if whole else matrix[torch.from_numpy(keep)]).float()
        names = None
        if self.instance_names is not None:
            names = self.instance_names[index]
            names = names if whole else tuple(names[int(i)] for i in keep)
        return Bag(
            instances,
            label=int(self._labels[index]),
            clinical=None if self.clinical is None else self.clinical[index],
            id=self.ids[index],
            instance_names=names,
        )

    # ------------------------------------------------------------------ files
    def save_safetensors(self, path: str | Path) -> Path:
        """Write every bag to one safetensors file, atomically.

        Each bag's ``(N_i, D)`` matrix is stored under its ID; labels
        ``(n,)`` int64 under ``"__labels__"``, clinical ``(n, F)`` float32 under
        ``"__clinical__"``; IDs (in order), clinical names, instance names and
        :attr:`metadata` go into the file's string metadata.

        Parameters
        ----------
        path : str or Path
            Target file; its parent folders are created.

        Returns
        -------
        Path
            The written file.

        Raises
        ------
        DataError
            If a bag ID collides with a reserved tensor name.

        Examples
        --------
        >>> import tempfile, torch
        >>> ds = FeatureBagDataset([torch.rand(2, 3)], labels=[1], ids=["P1"], metadata={"backbone": "r18"})
        >>> p = ds.save_safetensors(tempfile.mkdtemp() + "/feats.safetensors")
        >>> back = FeatureBagDataset.from_safetensors(p)
        >>> back.ids, back.labels.tolist(), back.metadata["backbone"]
        (['P1'], [1], 'r18')
        >>> torch.equal(back[0].instances, ds[0].instances)
        True
        """
        from safetensors.torch import save_file

        for bag_id in self.ids:
            if bag_id in (_LABELS_KEY, _CLINICAL_KEY):
                raise DataError(f"bag ID {bag_id!r} is reserved in the safetensors layout; rename the bag")
        tensors: dict[str, Tensor] = {
            bag_id: f.contiguous().cpu() for bag_id, f in zip(self.ids, self.features, strict=True)
        }
        tensors[_LABELS_KEY] = torch.from_numpy(self._labels.copy())
        if self.clinical is not None:
            tensors[_CLINICAL_KEY] = self.clinical.contiguous().clone()
        meta = dict(self.metadata)
        meta.update(
            {
                "format": _FORMAT,
                "format_version": _FORMAT_VERSION,
                "ids": json.dumps(self.ids),
                "clinical_names": json.dumps(list(self.clinical_names)),
            }
        )
        if self.instance_names is not None:
            meta["instance_names"] = json.dumps([list(n) for n in self.instance_names])
        target = Path(path)
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return target

    @classmethod
    def from_safetensors(cls, path: str | Path, **kwargs: Any) -> FeatureBagDataset:
        """Read a file written by :meth:`save_safetensors`.

        Parameters
        ----------
        path : str or Path
            The safetensors file.
        **kwargs
            ``max_instances``, ``train``, ``seed`` for the new dataset.

        Returns
        -------
        FeatureBagDataset

        Raises
        ------
        DataError
            If the file is missing, unreadable, not in this layout, or lacks a
            bag listed in its metadata; the message names the file.

        Examples
        --------
        See :meth:`save_safetensors`.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DataError(f"feature file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
                if meta.get("format") != _FORMAT:
                    raise DataError(
                        f"{str(path)!r} is not a milcell feature-bag file "
                        f"(metadata format={meta.get('format')!r})"
                    )
                ids = json.loads(meta.pop("ids"))
                clinical_names = json.loads(meta.pop("clinical_names", "[]"))
                names_json = meta.pop("instance_names", None)
                keys = set(fh.keys())
                missing = [i for i in ids if i not in keys]
                if missing or _LABELS_KEY not in keys:
                    raise DataError(f"{str(path)!r}: missing tensors {(missing or [_LABELS_KEY])[:5]}")
                features = [fh.get_tensor(i) for i in ids]
                labels = fh.get_tensor(_LABELS_KEY).numpy()
                clinical = fh.get_tensor(_CLINICAL_KEY) if _CLINICAL_KEY in keys else None
        except DataError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise DataError(f"cannot read feature file {str(path)!r}: {exc}") from exc
        for key in ("format", "format_version"):
            meta.pop(key, None)
        return cls(
            features,
            labels,
            ids,
            clinical,
            clinical_names=clinical_names,
            instance_names=None if names_json is None else json.loads(names_json),
            metadata=meta,
            **kwargs,
        )

    @classmethod
    def from_numpy_dir(
        cls,
        directory: str | Path,
        labels: Mapping[str, int] | None = None,
        clinical: Mapping[str, Sequence[float]] | None = None,
        **kwargs: Any,
    ) -> FeatureBagDataset:
        """Read one ``<id>.npy`` file ``(N_i, D)`` per bag from a folder.

        Bags are ordered by ID (file stem, sorted). Files are loaded with
        ``allow_pickle=False``.

        Parameters
        ----------
        directory : str or Path
            Folder holding the ``.npy`` files.
        labels : mapping id -> int or None, default None
            Labels by bag ID; bags absent from it (or all, when None) are
            unlabelled (``-1``).
        clinical : mapping id -> sequence of float or None, default None
            Clinical values by bag ID; every bag must be present.
        **kwargs
            Passed to the constructor (``max_instances``, ``clinical_names``, ...).

        Returns
        -------
        FeatureBagDataset

        Raises
        ------
        DataError
            A missing folder, no ``.npy`` file, an unreadable file, or a bag
            missing from ``clinical``; the message names it.

        Examples
        --------
        >>> import tempfile, numpy as np
        >>> from pathlib import Path
        >>> d = Path(tempfile.mkdtemp())
        >>> np.save(d / "P2.npy", np.zeros((3, 4), np.float32)); np.save(d / "P1.npy", np.ones((2, 4)))
        >>> ds = FeatureBagDataset.from_numpy_dir(d, labels={"P1": 1})
        >>> ds.ids, ds.labels.tolist(), [len(ds[i]) for i in range(2)]
        (['P1', 'P2'], [1, -1], [2, 3])
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise DataError(f"feature folder {str(directory)!r} does not exist")
        files = sorted(directory.glob("*.npy"))
        if not files:
            raise DataError(f"feature folder {str(directory)!r} holds no .npy file")
        ids = [f.stem for f in files]
        features = []
        for f in files:
            try:
                features.append(np.load(f, allow_pickle=False))
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read feature file {str(f)!r}: {exc}") from exc
        unknown = sorted(set(labels or {}) - set(ids))
        if unknown:
            raise DataError(f"labels given for bags with no .npy file in {str(directory)!r}: {unknown[:5]}")
        label_list = [int((labels or {}).get(i, -1)) for i in ids]
        clin = None
        if clinical is not None:
            missing = [i for i in ids if i not in clinical]
            if missing:
                raise DataError(f"no clinical values for bags {missing[:5]}")
            clin = np.array([list(clinical[i]) for i in ids], dtype=np.float32)
        return cls(features, label_list, ids, clin, **kwargs)


class InstanceDataset(Dataset[Bag]):
    """Single-cell images as bags of one: ``instances`` has shape ``(1, C, H, W)``.

    Design choice: single-cell classification reuses the MIL model unchanged.
    A bag of one goes through the same collate, encoder, pooling and head;
    every pooling of a single instance returns that instance's embedding, so
    the model reduces to a plain image classifier.

    Parameters
    ----------
    cells : CellSet
        The images and their labels.
    transform : callable or None, default None
        ``PIL.Image -> Tensor (C, H, W)``; ``None`` converts to float32 in [0, 1].
    apply_mask : bool, default False
        Multiply the image by its segmentation mask (``{0, 1}`` or grey levels
        ``{0, ..., 255}``, see :func:`milcell.data.images.mask_weights`) before the
        transform, for cells whose record has a
        ``mask_path``; cells without a mask are left as they are.
    cache_images : bool or ImageCache, default False
        Keep every decoded image (and mask) in memory, as in :class:`BagDataset`.
    bag_transform : callable or None, default None
        ``(1, C, H, W) -> (1, C, H, W)`` applied after ``transform``, as in :class:`BagDataset`.

    Raises
    ------
    DataError
        An unreadable image or mask, or a mask whose size differs from its
        image; the message names the file.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from milcell.data import CellRecord, CellSet
    >>> d = Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (6, 6), "white").save(d / "c1.png")
    >>> Image.new("L", (6, 6), 0).save(d / "m1.png")
    >>> record = CellRecord(d / "c1.png", 1, "p1", mask_path=d / "m1.png")
    >>> cells = CellSet([record], class_names=("hem", "all"))
    >>> bag = InstanceDataset(cells, apply_mask=True)[0]
    >>> bag.instances.shape, bag.label, bag.id, bag.instances.max().item()
    (torch.Size([1, 3, 6, 6]), 1, 'c1', 0.0)
    """

    def __init__(
        self,
        cells: CellSet,
        transform: Callable[[Image.Image], Tensor] | None = None,
        apply_mask: bool = False,
        cache_images: bool | ImageCache = False,
        bag_transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not isinstance(cells, CellSet):
            raise ConfigError(f"InstanceDataset: cells must be a CellSet, got {type(cells).__name__}")
        self.cells = cells
        self.transform = transform if transform is not None else default_transform()
        self.apply_mask = bool(apply_mask)
        self.image_cache = _as_cache(cache_images)
        self.bag_transform = _check_bag_transform(bag_transform, "InstanceDataset")

    def __len__(self) -> int:
        return len(self.cells)

    @property
    def labels(self) -> np.ndarray:
        """``(n,)`` int64 labels of the cells."""
        return self.cells.labels

    @property
    def groups(self) -> np.ndarray:
        """``(n,)`` patient of each cell (split groups)."""
        return self.cells.groups

    def preload(self, progress: bool = False) -> None:
        """Decode every image (and mask, with ``apply_mask``) into :attr:`image_cache` now.

        See :meth:`BagDataset.preload`.

        Raises
        ------
        ConfigError
            The dataset was built without ``cache_images``.
        DataError
            An unreadable file; the message names the cell and the file.
        """
        if self.image_cache is None:
            raise ConfigError(
                "InstanceDataset.preload: the dataset has no image cache (pass cache_images=True)"
            )
        from tqdm.auto import tqdm

        root = self.cells.root
        for record in tqdm(self.cells, desc="decoding", disable=not progress, leave=False):
            owner = f"cell {record.id!r} (patient {record.patient!r})"
            self.image_cache.open(_resolve_path(record.path, root), "RGB", owner)
            if self.apply_mask and record.mask_path is not None:
                self.image_cache.open(_resolve_path(record.mask_path, root), "L", owner)

    def __getitem__(self, index: int) -> Bag:
        record = self.cells[index]
        root = self.cells.root
        path = _resolve_path(record.path, root)
        owner = f"cell {record.id!r} (patient {record.patient!r})"
        image = _read_image(self.image_cache, path, "RGB", owner)
        if self.apply_mask and record.mask_path is not None:
            mask_path = _resolve_path(record.mask_path, root)
            mask = _read_image(self.image_cache, mask_path, "L", owner)
            if mask.size != image.size:
                raise DataError(
                    f"{owner}: mask {str(mask_path)!r} is {mask.size[0]}x{mask.size[1]} but image "
                    f"{str(path)!r} is {image.size[0]}x{image.size[1]}"
                )
            weights = mask_weights(mask)[..., None]  # {0, 1} and {0, 255} masks alike
            masked = np.asarray(image, dtype=np.float32) * weights
            image = Image.fromarray(np.clip(np.rint(masked), 0, 255).astype(np.uint8), mode="RGB")
        x = _run_bag_transform(
            self.bag_transform, _apply_transform(self.transform, image, path, owner)[None], owner
        )
        return Bag(x, label=record.label, id=record.id, instance_names=(path.name,))


def group_cells_by_patient(cells: CellSet, on_conflict: Literal["error", "max"] = "error") -> BagCohort:
    """Turn a single-cell set into a cohort with one bag per patient.

    Useful for C-NMC style data, where every cell of a patient shares the
    patient's label: the cells of a patient become one bag. Masks are not
    carried over (a :class:`~milcell.data.BagRecord` has none).

    Parameters
    ----------
    cells : CellSet
        The cells; ``CellRecord.patient`` gives the groups.
    on_conflict : {"error", "max"}, default "error"
        What to do when a patient's cells carry different labels: raise, or
        take the largest label (the standard MIL assumption: one positive cell
        makes a positive bag). Unlabelled cells (``-1``) are ignored when
        labelled cells exist.

    Returns
    -------
    BagCohort
        Patients in order of first appearance, each with its cell paths sorted.
        Class names come from the cell set (``"0", "1", ...`` if it has none).

    Raises
    ------
    DataError
        Conflicting labels with ``on_conflict="error"``, or an empty set.

    Examples
    --------
    >>> from pathlib import Path
    >>> from milcell.data import CellRecord, CellSet
    >>> cells = CellSet([CellRecord(Path("b.bmp"), 1, "p1"), CellRecord(Path("c.bmp"), 0, "p2"),
    ...                  CellRecord(Path("a.bmp"), 1, "p1")], class_names=("hem", "all"))
    >>> cohort = group_cells_by_patient(cells)
    >>> cohort.ids, cohort.labels.tolist(), [p.name for p in cohort[0].paths]
    (['p1', 'p2'], [1, 0], ['a.bmp', 'b.bmp'])
    """
    if on_conflict not in ("error", "max"):
        raise ConfigError(f"on_conflict must be 'error' or 'max', got {on_conflict!r}")
    if len(cells) == 0:
        raise DataError("group_cells_by_patient: the cell set is empty")
    paths: dict[str, list[Path]] = {}
    labels: dict[str, set[int]] = {}
    for record in cells:
        paths.setdefault(record.patient, []).append(record.path)
        labels.setdefault(record.patient, set()).add(int(record.label))
    records = []
    for patient, patient_paths in paths.items():
        found = labels[patient]
        known = found - {-1}
        if len(known) > 1 and on_conflict == "error":
            raise DataError(f"patient {patient!r}: cells carry different labels {sorted(known)}")
        label = max(known) if known else -1
        records.append(BagRecord(patient, label, tuple(sorted(patient_paths))))
    class_names = cells.class_names
    if not class_names:
        top = max(int(r.label) for r in cells)
        class_names = tuple(str(i) for i in range(max(top + 1, 1)))
    return BagCohort(records, class_names=class_names, root=cells.root)
