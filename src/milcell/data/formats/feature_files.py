"""Feature bags written by other MIL tools, one file per bag, and milcell's features written for them.

What is read (one bag per file, the file's stem is the bag ID):

- **CLAM / TRIDENT** ``.h5`` (HDF5; needs the ``h5`` extra, ``pip install
  "milcell[h5]"``): a dataset ``features`` of shape ``(N, D)`` (``(1, N, D)``
  is accepted) and, optionally, ``coords`` ``(N, 2)``; other datasets are
  ignored. CLAM's output folder (``h5_files/`` next to ``pt_files/``) may be
  given directly: its ``h5_files`` are read.
- **CLAM ``.pt``** (``pt_files/``) and **slideflow** feature bags: a torch
  tensor ``(N, D)`` (or ``(1, N, D)``), or a dictionary with ``features``
  (and optionally ``coords``), read with ``torch.load(weights_only=True)``;
  slideflow's ``<slide>.index.npz`` (or ``.index.npy``) next to a bag gives its
  tile coordinates.
- **torchmil**'s processed datasets: one ``(N, D)`` ``.npy`` per bag in a
  features folder, coordinates optionally in another folder of ``.npy`` files
  with the same names (``coords_dir=``).

Labels and patients come from a CSV (CLAM's ``case_id, slide_id, label`` by
default; the column names are arguments): one row per bag, matched to the
file stem. Labels are integers, or class names (mapped in sorted order, or in
the order of ``class_names``). Files the CSV does not list are left out (and
logged); a listed bag without a file is an error.

:func:`write_feature_h5` writes a :class:`~milcell.data.FeatureBagDataset` or a
milcell feature cache (``milcell extract-features``) in the CLAM / TRIDENT
layout: one ``<bag id>.h5`` per bag with ``features`` (float32 ``(N, D)``),
``coords`` when known and ``instance_names`` (the cell image names), plus a
``dataset.csv`` (``case_id, slide_id, label``) when the bags are labelled.

Examples
--------
>>> import tempfile, torch
>>> from pathlib import Path
>>> folder = Path(tempfile.mkdtemp())
>>> torch.save(torch.rand(5, 8), folder / "P1.pt")
>>> torch.save({"features": torch.rand(3, 8)}, folder / "P2.pt")
>>> _ = (folder / "labels.csv").write_text("case_id,slide_id,label\\nA,P1,1\\nA,P2,0\\n")
>>> bags = load_feature_files(folder, folder / "labels.csv")
>>> bags.dataset.ids, bags.dataset.labels.tolist(), bags.groups.tolist(), bags.dataset.dim
(['P1', 'P2'], [1, 0], ['A', 'A'], 8)
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from milcell._validation import check_choice
from milcell.exceptions import ConfigError, DataError

if TYPE_CHECKING:
    from milcell.data.datasets import FeatureBagDataset
    from milcell.train.features import FeatureCache

__all__ = [
    "FEATURE_FILE_SUFFIXES",
    "FeatureFile",
    "FeatureFileSet",
    "load_feature_files",
    "read_feature_file",
    "write_feature_h5",
]

logger = logging.getLogger("milcell")

#: File suffixes :func:`load_feature_files` reads.
FEATURE_FILE_SUFFIXES: tuple[str, ...] = (".h5", ".hdf5", ".pt", ".pth", ".npy")
_H5 = (".h5", ".hdf5")
_INSTALL_H5 = 'reading and writing .h5 feature files needs h5py: pip install "milcell[h5]" (or h5py)'


@dataclass(frozen=True)
class FeatureFile:
    """One bag read from a feature file.

    Attributes
    ----------
    path : Path
        The file.
    features : Tensor
        ``(N, D)`` float32 instance features, ``N >= 1``, all finite.
    coords : ndarray or None
        ``(N, 2)`` coordinates of the instances (tile or cell positions) when
        the file (or its slideflow index) holds them.
    """

    path: Path
    features: Tensor
    coords: np.ndarray | None = None


@dataclass(frozen=True)
class FeatureFileSet:
    """Feature bags read by :func:`load_feature_files`, with what the files and the CSV said.

    Attributes
    ----------
    dataset : FeatureBagDataset
        One bag per file, labelled from the CSV (``-1`` without one).
    groups : ndarray
        ``(n,)`` patient of each bag (the CSV's patient column; the bag ID
        when there is none), for ``groups=`` of
        :func:`~milcell.train.cross_validate` so a patient's bags stay in one fold.
    class_names : tuple of str
        Class names, in label order (the labels as strings when they are integers).
    files : dict of str to Path
        Bag ID -> the file it came from.
    coords : dict of str to ndarray or None
        Bag ID -> its ``(N, 2)`` coordinates, or None.
    """

    dataset: FeatureBagDataset
    groups: np.ndarray
    class_names: tuple[str, ...]
    files: dict[str, Path] = field(default_factory=dict)
    coords: dict[str, np.ndarray | None] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ reading
def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise ConfigError(_INSTALL_H5) from None
    return h5py


def _matrix(value: Any, path: Path, what: str) -> np.ndarray:
    """``value`` as a 2-D float32 array (a leading batch axis of 1 dropped); errors name the file."""
    array = value.detach().cpu().numpy() if isinstance(value, Tensor) else np.asarray(value)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise DataError(
            f"feature file '{path}': {what} has shape {tuple(array.shape)}; expected (N, D) or (1, N, D)"
        )
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise DataError(f"feature file '{path}': {what} has dtype {array.dtype}, not numbers")
    return array


def _check_features(array: np.ndarray, path: Path) -> Tensor:
    if array.shape[0] == 0:
        raise DataError(f"feature file '{path}': empty bag (0 instances)")
    if array.shape[1] == 0:
        raise DataError(f"feature file '{path}': features have width 0")
    features = np.ascontiguousarray(array, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad.size:
        raise DataError(
            f"feature file '{path}': {bad.size} of {features.shape[0]} rows have NaN or infinite "
            f"values (first row {int(bad[0])})"
        )
    return torch.from_numpy(features)


def _check_coords(coords: Any, n: int, path: Path, what: str = "coords") -> np.ndarray:
    array = _matrix(coords, path, what)
    if array.shape != (n, 2):
        raise DataError(f"feature file '{path}': {what} has shape {tuple(array.shape)}; expected ({n}, 2)")
    return np.ascontiguousarray(array)


def _read_h5(path: Path, features_key: str, coords_key: str) -> tuple[np.ndarray, Any]:
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as fh:
            if features_key not in fh or not isinstance(fh[features_key], h5py.Dataset):
                raise DataError(
                    f"feature file '{path}' has no dataset {features_key!r} (it has: {sorted(fh.keys())})"
                )
            features = _matrix(fh[features_key][()], path, repr(features_key))
            coords = fh[coords_key][()] if coords_key in fh else None
    except DataError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise DataError(f"cannot read feature file '{path}' as HDF5: {exc}") from None
    return features, coords


def _read_torch(path: Path, features_key: str, coords_key: str) -> tuple[np.ndarray, Any]:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"cannot read feature file '{path}': not a weights-only torch file (milcell does not run code "
            f"to load features): {str(exc).splitlines()[0][:200]}"
        ) from None
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise DataError(
            f"cannot read feature file '{path}': {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    coords = None
    if isinstance(value, Mapping):
        if features_key not in value:
            raise DataError(
                f"feature file '{path}' has no {features_key!r} entry (it has: {sorted(value)[:10]})"
            )
        coords = value.get(coords_key)
        value = value[features_key]
    if not isinstance(value, Tensor):
        raise DataError(f"feature file '{path}' holds a {type(value).__name__}, not a tensor of features")
    return _matrix(value, path, "the tensor"), coords


def _read_npy(path: Path) -> np.ndarray:
    try:
        value = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read feature file '{path}': {exc}") from None
    return _matrix(value, path, "the array")


def _slideflow_coords(path: Path) -> Any:
    """slideflow keeps a bag's tile locations in ``<slide>.index.npz`` (``arr_0``) or ``.index.npy``."""
    for index in (path.with_name(f"{path.stem}.index.npz"), path.with_name(f"{path.stem}.index.npy")):
        if not index.is_file():
            continue
        try:
            loaded = np.load(index, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                return loaded
            with loaded:
                key = "arr_0" if "arr_0" in loaded.files else loaded.files[0]
                return loaded[key]
        except (OSError, ValueError, IndexError) as exc:
            raise DataError(f"cannot read the coordinates file '{index}': {exc}") from None
    return None


def read_feature_file(
    path: str | os.PathLike[str],
    *,
    features_key: str = "features",
    coords_key: str = "coords",
    coords_path: str | os.PathLike[str] | None = None,
) -> FeatureFile:
    """Read one bag's features (and coordinates, when present) from a file of another tool.

    Parameters
    ----------
    path : path-like
        ``.h5`` / ``.hdf5`` (CLAM, TRIDENT), ``.pt`` / ``.pth`` (CLAM,
        slideflow; ``torch.load(weights_only=True)``) or ``.npy`` (torchmil).
    features_key, coords_key : str, default "features", "coords"
        Dataset names in an ``.h5`` file, keys of a dictionary in a ``.pt`` file.
    coords_path : path-like or None, default None
        A ``.npy`` file with the ``(N, 2)`` coordinates (torchmil's ``coords``
        folder). Without it, an ``.h5`` file's ``coords`` dataset, a ``.pt``
        dictionary's ``coords`` entry, or slideflow's ``<stem>.index.npz`` is used.

    Returns
    -------
    FeatureFile

    Raises
    ------
    DataError
        A missing or unreadable file, no ``features`` dataset, a wrong rank
        or shape, non-numeric values, NaN or infinite rows, an empty bag, or
        coordinates that do not match; the message names the file.
    ConfigError
        An ``.h5`` file without h5py installed, or an unsupported suffix.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from pathlib import Path
    >>> f = Path(tempfile.mkdtemp()) / "bag.npy"
    >>> np.save(f, np.ones((4, 3), dtype=np.float16))
    >>> bag = read_feature_file(f)
    >>> bag.features.shape, bag.features.dtype, bag.coords
    (torch.Size([4, 3]), torch.float32, None)
    >>> np.save(f, np.full((2, 3), np.nan))
    >>> read_feature_file(f)
    Traceback (most recent call last):
    ...
    milcell.exceptions.DataError: feature file '...bag.npy': 2 of 2 rows have NaN or infinite values ...
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in FEATURE_FILE_SUFFIXES:
        raise ConfigError(
            f"feature file '{file}': unsupported suffix {file.suffix!r}; "
            f"milcell reads {', '.join(FEATURE_FILE_SUFFIXES)}"
        )
    if not file.is_file():
        raise DataError(f"feature file '{file}' does not exist")
    coords: Any = None
    if suffix in _H5:
        array, coords = _read_h5(file, features_key, coords_key)
    elif suffix == ".npy":
        array = _read_npy(file)
    else:
        array, coords = _read_torch(file, features_key, coords_key)
    features = _check_features(array, file)
    n = int(features.shape[0])
    if coords_path is not None:
        extra = Path(coords_path)
        if not extra.is_file():
            raise DataError(f"coordinates file '{extra}' for '{file}' does not exist")
        return FeatureFile(file, features, _check_coords(_read_npy(extra), n, extra, "the array"))
    if coords is None and suffix in (".pt", ".pth"):
        coords = _slideflow_coords(file)
    return FeatureFile(file, features, None if coords is None else _check_coords(coords, n, file))


def _collect(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], suffixes: Sequence[str]
) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.exists():
            raise DataError(f"feature folder '{folder}' does not exist")
        if folder.is_file():
            return [folder]
        if (folder / "h5_files").is_dir():  # CLAM's output folder: h5_files/ (with coords) and pt_files/
            folder = folder / "h5_files"
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in suffixes and not p.name.endswith((".index.npy",))
        )
        if not files:
            raise DataError(f"no feature files ({', '.join(suffixes)}) in '{folder}'")
        return files
    files = [Path(p) for p in source]
    if not files:
        raise DataError("load_feature_files: no files given")
    return files


def _labels(
    values: list[str], class_names: Sequence[str] | None, csv_path: Path
) -> tuple[list[int], tuple[str, ...]]:
    if class_names is not None:
        names = tuple(str(c) for c in class_names)
        index = {c: i for i, c in enumerate(names)}
        unknown = sorted({v for v in values if v not in index})
        if unknown:
            raise DataError(
                f"labels CSV '{csv_path}': labels {unknown[:5]} are not in class_names {list(names)}"
            )
        return [index[v] for v in values], names
    try:
        ints = [int(v) for v in values]
    except ValueError:
        names = tuple(sorted(set(values)))
        return [names.index(v) for v in values], names
    if any(i < 0 for i in ints):
        raise DataError(f"labels CSV '{csv_path}': negative label {min(ints)}")
    return ints, tuple(str(i) for i in range(max(ints) + 1))


def load_feature_files(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    labels_csv: str | os.PathLike[str] | None = None,
    *,
    id_column: str = "slide_id",
    label_column: str = "label",
    patient_column: str | None = "case_id",
    class_names: Sequence[str] | None = None,
    features_key: str = "features",
    coords_key: str = "coords",
    coords_dir: str | os.PathLike[str] | None = None,
    suffixes: Sequence[str] = FEATURE_FILE_SUFFIXES,
) -> FeatureFileSet:
    """Read a folder of per-bag feature files (CLAM, TRIDENT, slideflow, torchmil) as feature bags.

    Parameters
    ----------
    source : path-like or sequence of path-like
        A folder of feature files (CLAM's output folder with ``h5_files/``
        works too), or the files themselves. Each file is one bag; its stem
        (``P1`` for ``P1.h5``) is the bag ID.
    labels_csv : path-like or None, default None
        A CSV with one row per bag: ``id_column`` (the file stem; a trailing
        suffix such as ``.svs`` is ignored), ``label_column`` and, if the
        CSV has it, ``patient_column``. Without a CSV every file is read,
        unlabelled.
    id_column, label_column : str, default "slide_id", "label"
        Column names (CLAM's); matched ignoring case and surrounding spaces.
    patient_column : str or None, default "case_id"
        The patient of each bag, used when the CSV has this column; bags of one
        patient then share a group. None: no patient column.
    class_names : sequence of str or None, default None
        The label strings in class order. None: integer labels as they are,
        other labels mapped in sorted order.
    features_key, coords_key : str, default "features", "coords"
        See :func:`read_feature_file`.
    coords_dir : path-like or None, default None
        A folder of ``<bag id>.npy`` coordinates (torchmil's layout).
    suffixes : sequence of str, default FEATURE_FILE_SUFFIXES
        The file types to read from a folder (e.g. ``(".h5",)`` where ``.h5``
        and ``.pt`` copies of the same bags sit side by side).

    Returns
    -------
    FeatureFileSet
        ``dataset`` (a :class:`~milcell.data.FeatureBagDataset`), ``groups``,
        ``class_names``, ``files`` and ``coords``.

    Raises
    ------
    DataError
        A bad file (see :func:`read_feature_file`), two files for one bag, a
        CSV row without a file or a duplicated row, bags of different widths.
    ConfigError
        A bad argument, or ``.h5`` files without h5py.

    Examples
    --------
    See the module docstring.
    """
    from milcell.data.datasets import FeatureBagDataset
    from milcell.data.formats._csv import read_table

    wanted = tuple(str(s).lower() for s in suffixes)
    unknown = [s for s in wanted if s not in FEATURE_FILE_SUFFIXES]
    if unknown or not wanted:
        raise ConfigError(
            f"load_feature_files: suffixes {unknown or list(suffixes)} are not among {FEATURE_FILE_SUFFIXES}"
        )
    files = _collect(source, wanted)
    by_id: dict[str, Path] = {}
    for file in files:
        if file.stem in by_id:
            raise DataError(
                f"two feature files for bag {file.stem!r}: '{by_id[file.stem]}' and '{file}' "
                "(choose one type with suffixes=, e.g. ('.h5',))"
            )
        by_id[file.stem] = file
    ids = list(by_id)
    labels: list[int] | None = None
    names: tuple[str, ...] = ()
    patients = list(ids)
    if labels_csv is not None:
        csv_path = Path(labels_csv)
        if not csv_path.is_file():
            raise DataError(f"labels CSV '{csv_path}' does not exist")
        from milcell.data.formats._csv import has_columns

        use_patient = patient_column is not None and has_columns(csv_path, [patient_column])
        columns = [id_column, label_column] + ([patient_column] if use_patient and patient_column else [])
        rows = read_table(csv_path, columns)
        listed: dict[str, tuple[str, str, int]] = {}
        for row in rows:
            raw_id = row[id_column]
            bag_id = (
                raw_id if raw_id in by_id else Path(raw_id).stem if Path(raw_id).stem in by_id else raw_id
            )
            if not bag_id:
                raise DataError(f"labels CSV '{csv_path}', line {row.line}: empty {id_column!r}")
            if bag_id in listed:
                raise DataError(
                    f"labels CSV '{csv_path}', line {row.line}: bag {bag_id!r} is listed twice "
                    f"(first on line {listed[bag_id][2]})"
                )
            patient = row[patient_column] if use_patient and patient_column else bag_id
            listed[bag_id] = (row[label_column], patient or bag_id, row.line)
        missing = [b for b in listed if b not in by_id]
        if missing:
            raise DataError(
                f"labels CSV '{csv_path}' lists {len(missing)} bags without a feature file, e.g. "
                f"{missing[:5]} (looked for <id>{{{','.join(wanted)}}})"
            )
        extra = [b for b in ids if b not in listed]
        if extra:
            logger.info(
                "load_feature_files: %d files not in %s left out, e.g. %s", len(extra), csv_path, extra[:5]
            )
        ids = list(listed)
        empty = [b for b in ids if listed[b][0] == ""]
        if empty:
            raise DataError(f"labels CSV '{csv_path}': bag {empty[0]!r} has an empty {label_column!r}")
        labels, names = _labels([listed[b][0] for b in ids], class_names, csv_path)
        patients = [listed[b][1] for b in ids]
    bags = []
    for bag_id in ids:
        extra_coords = None
        if coords_dir is not None:
            candidate = Path(coords_dir) / f"{bag_id}.npy"
            extra_coords = candidate if candidate.is_file() else None
        bags.append(
            read_feature_file(
                by_id[bag_id], features_key=features_key, coords_key=coords_key, coords_path=extra_coords
            )
        )
    dims = {int(b.features.shape[1]) for b in bags}
    if len(dims) > 1:
        first = int(bags[0].features.shape[1])
        odd = next(b for b in bags if int(b.features.shape[1]) != first)
        raise DataError(
            f"feature file '{odd.path}' has width {int(odd.features.shape[1])}, "
            f"'{bags[0].path}' has {first}: all bags need one D (features of one encoder)"
        )
    dataset = FeatureBagDataset(
        [b.features for b in bags],
        labels=labels,
        ids=ids,
        metadata={"source": str(source) if isinstance(source, (str, os.PathLike)) else "files"},
    )
    return FeatureFileSet(
        dataset=dataset,
        groups=np.asarray(patients, dtype=object),
        class_names=names,
        files={b: by_id[b] for b in ids},
        coords={bag_id: b.coords for bag_id, b in zip(ids, bags, strict=True)},
    )


# ------------------------------------------------------------------------------------------ writing
def _safe_name(bag_id: str) -> str:
    if not bag_id or bag_id in (".", "..") or any(c in bag_id for c in "/\\\0") or bag_id.startswith("."):
        raise DataError(f"bag ID {bag_id!r} cannot be a file name; rename the bag before writing it")
    return bag_id


def write_feature_h5(
    bags: FeatureBagDataset | FeatureCache | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    coords: Mapping[str, Any] | None = None,
    groups: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write feature bags in the CLAM / TRIDENT ``.h5`` layout, one file per bag.

    Each ``<out_dir>/<bag id>.h5`` holds ``features`` (float32 ``(N, D)``),
    ``coords`` (``(N, 2)``) when given, and ``instance_names`` (UTF-8
    strings) when the bags have them; its attributes record the bag ID and,
    for a feature cache, the backbone. ``dataset.csv`` (``case_id,
    slide_id, label``) lists labelled bags. Files are written atomically.

    Parameters
    ----------
    bags : FeatureBagDataset, FeatureCache or path-like
        Feature bags, a cache read by
        :func:`~milcell.train.features.read_feature_cache`, or a cache folder.
    out_dir : path-like
        The folder to write (created).
    coords : mapping of str to array or None, default None
        Bag ID -> ``(N, 2)`` coordinates of its instances.
    groups : mapping of str to str or None, default None
        Bag ID -> patient, for the ``case_id`` column (default: the bag ID).
    overwrite : bool, default False
        Replace existing files; otherwise an existing ``.h5`` is an error.

    Returns
    -------
    list of Path
        The ``.h5`` files, in bag order.

    Raises
    ------
    DataError
        A bag ID that is not a file name, coordinates of the wrong shape, or
        an existing file without ``overwrite``.
    ConfigError
        h5py is not installed.

    Examples
    --------
    >>> import tempfile, torch
    >>> from milcell.data import FeatureBagDataset
    >>> ds = FeatureBagDataset({"P1": torch.rand(4, 6), "P2": torch.rand(2, 6)}, labels=[1, 0])
    >>> out = tempfile.mkdtemp()
    >>> [p.name for p in write_feature_h5(ds, out, coords={"P1": [[0, 0], [0, 1], [1, 0], [1, 1]]})]
    ['P1.h5', 'P2.h5']
    >>> back = load_feature_files(out, f"{out}/dataset.csv")
    >>> back.dataset.ids, back.dataset.labels.tolist(), back.coords["P1"].shape, back.coords["P2"]
    (['P1', 'P2'], [1, 0], (4, 2), None)
    >>> torch.equal(back.dataset[0].instances, ds[0].instances)
    True
    """
    from milcell._utils import atomic_path, write_dict_csv
    from milcell.data.datasets import FeatureBagDataset

    overwrite = bool(check_choice(overwrite, "write_feature_h5: overwrite", (True, False)))
    attrs: dict[str, str] = {}
    names_by_id: dict[str, list[str]] | None = None
    if isinstance(bags, (str, os.PathLike)):
        from milcell.train.features import read_feature_cache

        bags = read_feature_cache(bags)
    if not isinstance(bags, FeatureBagDataset):
        from milcell.train.features import FeatureCache

        if not isinstance(bags, FeatureCache):
            raise ConfigError(
                f"write_feature_h5: bags must be a FeatureBagDataset, a FeatureCache or a cache folder, "
                f"got {type(bags).__name__}"
            )
        attrs["backbone"] = bags.backbone
        attrs["weights_sha256"] = str(bags.key.get("weights", ""))
        names_by_id = bags.instance_names()
        dataset = bags.dataset
    else:
        dataset = bags
    h5py = _h5py()
    out = Path(out_dir)
    targets = [out / f"{_safe_name(bag_id)}.h5" for bag_id in dataset.ids]
    if not overwrite:
        existing = [t for t in targets if t.exists()]
        if existing:
            raise DataError(
                f"'{existing[0]}' exists ({len(existing)} files would be replaced); pass overwrite=True"
            )
    unknown = sorted(set(coords or {}) - set(dataset.ids))
    if unknown:
        raise DataError(f"write_feature_h5: coords for unknown bags {unknown[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    for index, (bag_id, target) in enumerate(zip(dataset.ids, targets, strict=True)):
        matrix = dataset.features[index].float().cpu().numpy()
        names: Sequence[str] | None = None
        if dataset.instance_names is not None:
            names = dataset.instance_names[index]
        elif names_by_id is not None and len(names_by_id.get(bag_id, ())) == matrix.shape[0]:
            names = names_by_id[bag_id]
        bag_coords = None
        if coords is not None and coords.get(bag_id) is not None:
            bag_coords = _check_coords(coords[bag_id], matrix.shape[0], target)
        with atomic_path(target) as tmp, h5py.File(tmp, "w") as fh:
            fh.create_dataset("features", data=matrix)
            if bag_coords is not None:
                fh.create_dataset("coords", data=bag_coords)
            if names is not None:
                fh.create_dataset("instance_names", data=list(names), dtype=h5py.string_dtype("utf-8"))
            fh.attrs["bag_id"] = bag_id
            for key, value in {**attrs, **dataset.metadata}.items():
                fh.attrs[key] = str(value)
    labels = dataset.labels
    if (labels >= 0).any():
        rows = [
            {"case_id": (groups or {}).get(bag_id, bag_id), "slide_id": bag_id, "label": int(label)}
            for bag_id, label in zip(dataset.ids, labels, strict=True)
            if label >= 0
        ]
        write_dict_csv(rows, out / "dataset.csv")
    logger.info("wrote %d feature bags to %s", len(targets), out)
    return targets
