"""Loader for a one-folder-per-class layout of single cells, with optional masks.

Layout read by :func:`load_imagefolder` (the five white-cell types set)::

    train/                      # root: the folder that holds data/ (and maybe mask/)
      data/
        Basophil/  *.jpg
        Eosinophil/ *.jpg
        Lymphocyte/ *.jpg
        Monocyte/  *.jpg
        Neutrophil/ *.jpg
      mask/                     # optional, masks for a subset of the images
        Basophil/ <same file name as the image>
        ...

``root`` may also point directly at a folder of class folders (no ``data/``;
then no masks). A mask matches an image with the same file name in
``mask/<Class>/``, or failing that the same stem with another image suffix
(``x.jpg`` and ``x.png``). Masks without an image are reported in a warning.
Class indices follow the sorted folder names unless ``class_names`` fixes
them. Files that are not images (by suffix) are skipped with a warning;
hidden files are skipped.

The layout carries no patient: each cell's ``patient`` is its file stem.

Examples
--------
>>> import tempfile
>>> from milcell.data.synthetic import make_cohort
>>> from milcell.data.formats.imagefolder import load_imagefolder
>>> root = make_cohort(tempfile.mkdtemp(), n_patients=5, layout="imagefolder", image_size=32)
>>> train = load_imagefolder(root / "train")
>>> train.class_names
('Basophil', 'Eosinophil', 'Lymphocyte', 'Monocyte', 'Neutrophil')
>>> sum(r.mask_path is not None for r in train) > 0
True
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from milcell.data.formats._paths import IMAGE_SUFFIXES, check_name, list_dir, resolve_root, verify_image
from milcell.data.records import CellRecord, CellSet
from milcell.exceptions import ConfigError, DataError

__all__ = ["load_imagefolder"]

logger = logging.getLogger("milcell")


def _class_files(class_dir: Path, root: Path) -> list[Path]:
    entries = list_dir(class_dir, root)
    nested = [p for p in entries if p.is_dir()]
    if nested:
        raise DataError(f"unexpected folder '{nested[0]}' inside class folder '{class_dir}'")
    broken = [p.name for p in entries if p.is_symlink() and not p.exists()]
    if broken:
        raise DataError(
            f"{broken} in class folder '{class_dir}' are broken links (their target does not exist)"
        )
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p.name for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        logger.warning(
            "load_imagefolder: ignoring %d files that are not images in a format milcell reads (%s; "
            "images: %s) in '%s'",
            len(others),
            ", ".join(others),
            " ".join(sorted(IMAGE_SUFFIXES)),
            class_dir,
        )
    return images


def _masks_for(mask_dir: Path | None, cls: str, root: Path) -> dict[str, Path]:
    """Mask files of one class, by file name."""
    if mask_dir is None or not (mask_dir / cls).is_dir():
        return {}
    return {p.name: p for p in _class_files(mask_dir / cls, root)}


def load_imagefolder(
    root: str | os.PathLike[str],
    class_names: Sequence[str] | None = None,
    verify_images: bool = False,
) -> CellSet:
    """Read one-folder-per-class images (and same-named masks) into a :class:`CellSet`.

    Parameters
    ----------
    root : path-like
        The folder that holds ``data/<Class>/`` (and optionally
        ``mask/<Class>/``), or directly a folder of class folders.
    class_names : sequence of str or None
        The classes in label order. ``None``: the sorted folder names. When
        given, every class folder on disk must be one of them (a class may
        have no folder, e.g. in a small validation set).
    verify_images : bool, default False
        Open every image and mask with PIL (``Image.verify``) now, so a
        corrupt file fails at load time. Otherwise the dataset raises when it
        decodes it.

    Returns
    -------
    CellSet
        One :class:`CellRecord` per image (by class, then file name), with
        ``mask_path`` set where a mask exists and ``patient`` = file stem.

    Raises
    ------
    DataError
        No class folders, a class folder with no images, a folder nested in a
        class folder, a class folder not in ``class_names``, image files
        directly in the class-level folder, a symlink leaving ``root``, an
        undecodable image or mask (with ``verify_images=True``).
    ConfigError
        If ``class_names`` is empty or has duplicates or unsafe names.

    Examples
    --------
    >>> import tempfile
    >>> from milcell.data.synthetic import make_cohort
    >>> root = make_cohort(tempfile.mkdtemp(), n_patients=4, layout="imagefolder", image_size=32)
    >>> val = load_imagefolder(root / "val" / "data", class_names=["Basophil", "Eosinophil",
    ...     "Lymphocyte", "Monocyte", "Neutrophil"])
    >>> len(val.class_names), all(r.mask_path is None for r in val)
    (5, True)
    """
    base = resolve_root(root)
    if (base / "data").is_dir():
        data_dir = base / "data"
        mask_dir = base / "mask" if (base / "mask").is_dir() else None
    else:
        data_dir, mask_dir = base, None
    if class_names is not None:
        class_names = tuple(class_names)
        if not class_names or len(set(class_names)) != len(class_names):
            raise ConfigError(
                f"load_imagefolder: class_names must be non-empty and unique, got {class_names}"
            )
        for c in class_names:
            check_name(c, "class name")
    entries = list_dir(data_dir, base)
    folders = [p for p in entries if p.is_dir()]
    loose = [p.name for p in entries if not p.is_dir()]
    loose_images = [n for n in loose if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    if loose_images:
        raise DataError(
            f"image files {loose_images[:5]} directly in '{data_dir}': expected one folder per class"
        )
    if loose:
        logger.warning("load_imagefolder: ignoring files %s in '%s'", loose, data_dir)
    if not folders:
        raise DataError(f"no class folders in '{data_dir}'")
    found = [p.name for p in folders]
    if class_names is None:
        class_names = tuple(found)
    else:
        unknown = [n for n in found if n not in class_names]
        if unknown:
            raise DataError(
                f"class folders {unknown} in '{data_dir}' are not in class_names {list(class_names)}"
            )
    records: list[CellRecord] = []
    for folder in folders:
        label = class_names.index(folder.name)
        images = _class_files(folder, base)
        if not images:
            raise DataError(f"class folder '{folder}' holds no images")
        masks = _masks_for(mask_dir, folder.name, base)
        by_stem = {p.stem: p for p in masks.values()}
        used: set[Path] = set()
        for path in images:
            mask = masks.get(path.name) or by_stem.get(path.stem)
            if mask is not None:
                used.add(mask)
            if verify_images:
                verify_image(path, f"class {folder.name!r}")
                if mask is not None:
                    verify_image(mask, f"mask of '{path}'")
            records.append(CellRecord(path, label, path.stem, mask))
        orphans = sorted(p.name for p in masks.values() if p not in used)
        if orphans:
            logger.warning(
                "load_imagefolder: masks without an image in class %r: %s", folder.name, orphans[:10]
            )
    if mask_dir is not None:
        stray = [p.name for p in list_dir(mask_dir, base, dirs=True) if p.name not in found]
        if stray:
            logger.warning("load_imagefolder: mask folders %s in '%s' have no class folder", stray, mask_dir)
    logger.info("load_imagefolder: %d images in %d classes from '%s'", len(records), len(found), data_dir)
    return CellSet(records, class_names=class_names, root=base)
