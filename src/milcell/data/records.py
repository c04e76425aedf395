"""What the format loaders return: records of patients and cells, and their collections.

A loader (:mod:`milcell.data.formats`) reads a real on-disk layout into a
:class:`BagCohort` (one :class:`BagRecord` per patient) or a :class:`CellSet`
(one :class:`CellRecord` per image). Records only point at files; the
datasets in :mod:`milcell.data.datasets` load the pixels lazily.

Clinical attributes are kept raw in the records. :meth:`BagCohort.fit_scaler`
fits a :class:`ClinicalScaler` on the rows of a training fold only, so no
statistic of a validation or test patient leaks into training.

Examples
--------
>>> from pathlib import Path
>>> cohort = BagCohort(
...     [BagRecord("P1", 1, (Path("P1/a.jpg"),), (70.0, 30.5)),
...      BagRecord("P2", 0, (Path("P2/b.jpg"),), (40.0, 8.1))],
...     clinical_names=("age", "lymph_count"),
... )
>>> len(cohort), cohort.labels.tolist(), cohort.ids
(2, [1, 0], ['P1', 'P2'])
>>> scaler = cohort.fit_scaler([0, 1])
>>> scaler.transform(cohort.clinical_matrix()).tolist()
[[1.0, 1.0], [0.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from milcell.exceptions import ConfigError, DataError

__all__ = ["BagCohort", "BagRecord", "CellRecord", "CellSet", "ClinicalScaler"]


@dataclass(frozen=True)
class BagRecord:
    """One patient on disk: an ID, a label, its image files and raw clinical values.

    Parameters
    ----------
    id : str
        Patient identifier (also the patient-level split group).
    label : int
        Class index; ``-1`` for an unlabelled (test) patient.
    paths : tuple of Path
        The patient's image files, in a deterministic (sorted) order.
    clinical : tuple of float or None
        Raw clinical values in the order of the cohort's ``clinical_names``;
        ``nan`` marks a missing value.

    Examples
    --------
    >>> r = BagRecord("P3", 0, (Path("P3/1.jpg"), Path("P3/2.jpg")))
    >>> r.num_instances, r.instance_names
    (2, ('1.jpg', '2.jpg'))
    """

    id: str
    label: int
    paths: tuple[Path, ...]
    clinical: tuple[float, ...] | None = None

    @property
    def num_instances(self) -> int:
        """Number of image files of the patient."""
        return len(self.paths)

    @property
    def instance_names(self) -> tuple[str, ...]:
        """The name of each instance (its file name), as bags and feature caches key them."""
        return tuple(p.name for p in self.paths)


@dataclass(frozen=True)
class CellRecord:
    """One single-cell image on disk.

    Parameters
    ----------
    path : Path
        The image file.
    label : int
        Class index; ``-1`` when unknown.
    patient : str
        The patient the cell comes from (split group); the file stem when the
        layout carries no patient.
    mask_path : Path or None
        A same-named segmentation mask, where the layout has one.

    Examples
    --------
    >>> c = CellRecord(Path("all/UID_3_1_1_all.bmp"), 1, "3")
    >>> c.id, c.instance_name
    ('UID_3_1_1_all', '3/UID_3_1_1_all.bmp')
    """

    path: Path
    label: int
    patient: str
    mask_path: Path | None = None

    @property
    def id(self) -> str:
        """The file stem, used as the sample identifier."""
        return self.path.stem

    @property
    def instance_name(self) -> str:
        """``"<patient>/<file name>"``: the cell's name in a feature cache (unique across patients)."""
        return f"{self.patient}/{self.path.name}"


class ClinicalScaler:
    """Median imputation of missing values, then min-max or standard scaling.

    The statistics are those of scikit-learn's ``SimpleImputer(strategy="median",
    keep_empty_features=True)`` followed by ``MinMaxScaler`` or
    ``StandardScaler``, computed with numpy (so scikit-learn is not imported):
    the fill value is the median of a column's non-missing values (``0`` for a
    column with none); min-max scaling maps the column's range to [0, 1];
    standard scaling subtracts the mean and divides by the population standard
    deviation. A constant column (zero range, or a variance within rounding
    error of zero) gets scale ``1``, as in scikit-learn. Both scalings are
    affine per column, so a fitted scaler is three numbers per column — the
    imputed value, the scale and the offset — which :meth:`to_dict` writes as
    JSON next to a model's weights and :meth:`from_dict` reads back exactly.

    Parameters
    ----------
    names : sequence of str
        Attribute names, in column order.
    method : {"minmax", "standard"}, default "minmax"
        ``"minmax"`` rescales to [0, 1] on the fitted rows, as the 2024
        lymphocytosis report did.

    Attributes
    ----------
    fill, scale, offset : ndarray or None
        ``(F,)`` each once fitted: ``nan`` becomes ``fill``, then
        ``x * scale + offset``.

    Examples
    --------
    >>> import numpy as np
    >>> s = ClinicalScaler(["age"]).fit(np.array([[20.0], [np.nan], [60.0]]))
    >>> s.transform(np.array([[40.0], [np.nan]])).ravel().tolist()
    [0.5, 0.5]
    >>> ClinicalScaler.from_dict(s.to_dict()).transform(np.array([[60.0]])).tolist()
    [[1.0]]
    """

    def __init__(self, names: Sequence[str], method: Literal["minmax", "standard"] = "minmax"):
        if method not in ("minmax", "standard"):
            raise ConfigError(f"ClinicalScaler: method must be 'minmax' or 'standard', got {method!r}")
        self.names = tuple(names)
        self.method = method
        self.fill: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.offset: np.ndarray | None = None

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`from_dict`) has set the statistics."""
        return self.scale is not None

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.names):
            raise DataError(
                f"ClinicalScaler: expected an array of shape (n, {len(self.names)}) for "
                f"{list(self.names)}, got {x.shape}"
            )
        return x

    def fit(self, x: np.ndarray) -> ClinicalScaler:
        """Fit on ``x`` of shape ``(n, F)`` (training rows only); returns self.

        Raises
        ------
        DataError
            If ``x`` has the wrong shape, no rows, or an infinite value (the
            message names the attribute).
        """
        x = self._check(x)
        if x.shape[0] == 0:
            raise DataError("ClinicalScaler.fit: no rows to fit on")
        infinite = np.isinf(x).any(axis=0)
        if infinite.any():
            bad = [name for name, inf in zip(self.names, infinite, strict=True) if inf]
            raise DataError(f"ClinicalScaler.fit: infinite values in attribute(s) {bad}")
        missing = np.isnan(x)
        # Median of the observed values; 0 for a column with none (SimpleImputer, keep_empty_features=True).
        fill = np.array(
            [
                np.median(col[~miss]) if not miss.all() else 0.0
                for col, miss in zip(x.T, missing.T, strict=True)
            ],
            dtype=np.float64,
        ).reshape(x.shape[1])
        imputed = np.where(missing, fill, x)
        n = imputed.shape[0]
        eps = np.finfo(np.float64).eps
        if self.method == "minmax":
            low = imputed.min(axis=0)
            span = imputed.max(axis=0) - low
            span[span < 10 * eps] = 1.0  # MinMaxScaler's rule for a constant column
            scale = 1.0 / span
            offset = -low * scale
        else:
            # Corrected two-pass variance, as StandardScaler computes it (Chan, Golub & LeVeque).
            mean = imputed.sum(axis=0) / n
            centred = imputed - mean
            var = ((centred**2).sum(axis=0) - centred.sum(axis=0) ** 2 / n) / n
            std = np.sqrt(var)
            std[var <= n * eps * var + (n * mean * eps) ** 2] = 1.0  # StandardScaler's constant-column rule
            scale = 1.0 / std
            offset = -mean * scale
        self.fill, self.scale, self.offset = fill, scale, offset
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Impute and scale ``x`` of shape ``(n, F)``; returns float32 ``(n, F)``."""
        if self.fill is None or self.scale is None or self.offset is None:
            raise ConfigError("ClinicalScaler.transform called before fit")
        x = self._check(x)
        return (np.where(np.isnan(x), self.fill, x) * self.scale + self.offset).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state of a fitted scaler."""
        if self.fill is None or self.scale is None or self.offset is None:
            raise ConfigError("ClinicalScaler.to_dict called before fit")
        return {
            "names": list(self.names),
            "method": self.method,
            "fill": self.fill.tolist(),
            "scale": self.scale.tolist(),
            "offset": self.offset.tolist(),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> ClinicalScaler:
        """Rebuild a fitted scaler from :meth:`to_dict`; raises :class:`DataError` if malformed."""
        try:
            scaler = cls(state["names"], state.get("method", "minmax"))
            arrays = [np.asarray(state[k], dtype=np.float64) for k in ("fill", "scale", "offset")]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"malformed clinical scaler state: {exc!r}") from None
        if any(a.shape != (len(scaler.names),) for a in arrays):
            raise DataError(
                f"malformed clinical scaler state: {len(scaler.names)} names but columns of shapes "
                f"{[a.shape for a in arrays]}"
            )
        scaler.fill, scaler.scale, scaler.offset = arrays
        return scaler


@dataclass
class BagCohort(Sequence[BagRecord]):
    """A sized, indexable collection of patients (:class:`BagRecord`).

    Parameters
    ----------
    records : sequence of BagRecord
        The patients, with unique IDs.
    clinical_names : tuple of str, default ()
        Names of the clinical attributes, in the order stored in each record.
    class_names : tuple of str, default ("reactive", "malignant")
        Name of each class index.
    root : Path or None
        The folder the cohort was read from.

    Examples
    --------
    >>> c = BagCohort([BagRecord("A", 0, (Path("A/1.jpg"),))])
    >>> c[0].id, c.subset([0]).ids
    ('A', ['A'])
    """

    records: Sequence[BagRecord]
    clinical_names: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ("reactive", "malignant")
    root: Path | None = None
    _by_id: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.records = list(self.records)
        self.clinical_names = tuple(self.clinical_names)
        self.class_names = tuple(self.class_names)
        self._by_id = {}
        for i, r in enumerate(self.records):
            if r.id in self._by_id:
                raise DataError(f"duplicate patient ID {r.id!r} in cohort")
            self._by_id[r.id] = i
            if r.label >= len(self.class_names) or r.label < -1:
                raise DataError(
                    f"patient {r.id!r}: label {r.label} outside 0..{len(self.class_names) - 1} (or -1)"
                )
            width = 0 if r.clinical is None else len(r.clinical)
            if width != len(self.clinical_names):
                raise DataError(
                    f"patient {r.id!r}: {width} clinical values for attributes {list(self.clinical_names)}"
                )

    @overload
    def __getitem__(self, index: int) -> BagRecord: ...
    @overload
    def __getitem__(self, index: slice) -> BagCohort: ...
    def __getitem__(self, index: int | slice) -> BagRecord | BagCohort:
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        return self.records[index]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[BagRecord]:
        return iter(self.records)

    @property
    def ids(self) -> list[str]:
        """Patient IDs, in order."""
        return [r.id for r in self.records]

    @property
    def labels(self) -> np.ndarray:
        """``(n,)`` int64 labels (``-1`` = unlabelled)."""
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        """``(n,)`` patient IDs, the groups for patient-level splits."""
        return np.array(self.ids, dtype=object)

    def index_of(self, patient_id: str) -> int:
        """Position of a patient by ID; raises :class:`DataError` if absent."""
        try:
            return self._by_id[patient_id]
        except KeyError:
            raise DataError(f"no patient {patient_id!r} in cohort") from None

    def clinical_matrix(self) -> np.ndarray:
        """``(n, F)`` float64 raw clinical values, ``nan`` where missing."""
        rows = [r.clinical if r.clinical is not None else () for r in self.records]
        return np.array(rows, dtype=np.float64).reshape(len(self), len(self.clinical_names))

    def fit_scaler(
        self, indices: Iterable[int] | None = None, method: Literal["minmax", "standard"] = "minmax"
    ) -> ClinicalScaler:
        """Fit a :class:`ClinicalScaler` on the given rows only (default: all).

        Pass the training fold's indices so validation statistics never leak.
        """
        if not self.clinical_names:
            raise DataError("fit_scaler: this cohort has no clinical attributes")
        x = self.clinical_matrix()
        rows = x if indices is None else x[np.asarray(list(indices), dtype=np.int64)]
        return ClinicalScaler(self.clinical_names, method).fit(rows)

    def subset(self, indices: Iterable[int]) -> BagCohort:
        """A new cohort with the selected patients (same names and classes)."""
        return BagCohort(
            [self.records[int(i)] for i in indices],
            clinical_names=self.clinical_names,
            class_names=self.class_names,
            root=self.root,
        )

    def labelled(self) -> BagCohort:
        """The patients whose label is not ``-1``."""
        return self.subset(i for i, r in enumerate(self.records) if r.label >= 0)


@dataclass
class CellSet(Sequence[CellRecord]):
    """A sized, indexable collection of single-cell images (:class:`CellRecord`).

    Parameters
    ----------
    records : sequence of CellRecord
    class_names : tuple of str
        Name of each class index.
    root : Path or None
        The folder the set was read from.

    Examples
    --------
    >>> s = CellSet([CellRecord(Path("a/x.bmp"), 1, "p1"), CellRecord(Path("b/y.bmp"), 0, "p2")],
    ...             class_names=("hem", "all"))
    >>> len(s), s.labels.tolist(), s.groups.tolist()
    (2, [1, 0], ['p1', 'p2'])
    """

    records: Sequence[CellRecord]
    class_names: tuple[str, ...] = ()
    root: Path | None = None

    def __post_init__(self) -> None:
        self.records = list(self.records)
        self.class_names = tuple(self.class_names)
        for r in self.records:
            if self.class_names and not (-1 <= r.label < len(self.class_names)):
                raise DataError(f"{r.path}: label {r.label} outside 0..{len(self.class_names) - 1} (or -1)")

    @overload
    def __getitem__(self, index: int) -> CellRecord: ...
    @overload
    def __getitem__(self, index: slice) -> CellSet: ...
    def __getitem__(self, index: int | slice) -> CellRecord | CellSet:
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        return self.records[index]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[CellRecord]:
        return iter(self.records)

    @property
    def labels(self) -> np.ndarray:
        """``(n,)`` int64 labels."""
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        """``(n,)`` patient of each cell, the groups for patient-level splits."""
        return np.array([r.patient for r in self.records], dtype=object)

    def subset(self, indices: Iterable[int]) -> CellSet:
        """A new set with the selected cells."""
        return CellSet([self.records[int(i)] for i in indices], self.class_names, self.root)
