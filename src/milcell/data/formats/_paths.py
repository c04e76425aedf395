"""Path safety shared by the format loaders (internal).

Every name a loader takes from a CSV (a patient ID, an image file name) or
from a folder listing is checked before it is joined to the dataset root:

* a *name* must be a single path component: not empty, not ``.`` or ``..``,
  without ``/``, ``\\`` or NUL, not absolute, not a Windows drive (``C:``);
* a joined or listed path must *resolve* (after following symlinks) inside
  the resolved root, so a symlink cannot point a loader outside the dataset.

Symlinks that stay inside the root are accepted. Hidden entries (names that
start with ``.``) and ``__MACOSX`` folders are skipped by :func:`list_dir`.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> root = Path(tempfile.mkdtemp())
>>> (root / "P1").mkdir()
>>> safe_join(root, "P1").name
'P1'
>>> safe_join(root, "..")
Traceback (most recent call last):
...
milcell.exceptions.DataError: patient ID '..' is not a plain name...
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image

from milcell.exceptions import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "check_inside",
    "check_name",
    "list_dir",
    "resolve_root",
    "safe_join",
    "verify_image",
]

#: File suffixes (lower case) the loaders treat as images.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})

_SKIPPED_DIRS = frozenset({"__MACOSX"})


def check_name(name: str, what: str = "patient ID", source: str | os.PathLike[str] | None = None) -> str:
    """Return ``name`` if it is a single safe path component, else raise :class:`DataError`.

    Parameters
    ----------
    name : str
        The candidate name (a patient ID or a file name).
    what : str, default "patient ID"
        What the name is, for the error message.
    source : path-like or None
        The file the name was read from, for the error message.

    Raises
    ------
    DataError
        If the name is empty, ``.`` or ``..``, contains a path separator or NUL,
        or is absolute or a drive; the message names the value and its source.

    Examples
    --------
    >>> check_name("P26")
    'P26'
    >>> check_name("a/b", source="train.csv")
    Traceback (most recent call last):
    ...
    milcell.exceptions.DataError: patient ID 'a/b' (in train.csv) is not a plain name...
    """
    where = f" (in {source})" if source is not None else ""
    bad = (
        not isinstance(name, str)
        or name.strip() == ""
        or name in (".", "..")
        or any(c in name for c in ("/", "\\", "\x00"))
        or PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive != ""
    )
    if bad:
        raise DataError(
            f"{what} {name!r}{where} is not a plain name: it must be one path component, "
            "without '/', '\\', NUL, '.' or '..', and not absolute"
        )
    return name


def resolve_root(root: str | os.PathLike[str], what: str = "dataset root") -> Path:
    """Return ``root`` as an absolute path, checking that it is an existing folder.

    Examples
    --------
    >>> resolve_root("/nonexistent/milcell")
    Traceback (most recent call last):
    ...
    milcell.exceptions.DataError: dataset root '/nonexistent/milcell' does not exist
    """
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{what} '{path}' does not exist")
    if not path.is_dir():
        raise DataError(f"{what} '{path}' is not a folder")
    return path.absolute()


def check_inside(root: Path, path: Path) -> Path:
    """Return ``path`` if it resolves (symlinks followed) inside ``root``; else raise :class:`DataError`.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> check_inside(root, root / "x.jpg") == root / "x.jpg"
    True
    """
    real_root = root.resolve()
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as err:  # symlink loops
        raise DataError(f"'{path}' cannot be resolved: {err}") from None
    if real != real_root and not real.is_relative_to(real_root):
        raise DataError(f"'{path}' resolves to '{real}', outside the dataset root '{real_root}'")
    return path


def safe_join(
    root: Path, *names: str, what: str = "patient ID", source: str | os.PathLike[str] | None = None
) -> Path:
    """Join checked ``names`` under ``root``; the result must resolve inside ``root``.

    Parameters
    ----------
    root : Path
        The dataset root (or a folder under it).
    *names : str
        Path components, each checked by :func:`check_name`.
    what, source
        For the error message, as in :func:`check_name`.

    Raises
    ------
    DataError
        If a name is unsafe or the joined path escapes ``root`` through a symlink.

    Examples
    --------
    >>> safe_join(Path("/data"), "P1", "a.jpg").as_posix()
    '/data/P1/a.jpg'
    """
    path = root
    for name in names:
        path = path / check_name(name, what, source)
    return check_inside(root, path)


def list_dir(
    folder: Path, root: Path, *, dirs: bool | None = None, suffixes: Iterable[str] | None = None
) -> list[Path]:
    """Sorted entries of ``folder``, each checked to resolve inside ``root``.

    Hidden entries (``.name``) and ``__MACOSX`` are skipped.

    Parameters
    ----------
    folder : Path
        The folder to list.
    root : Path
        The dataset root no entry may escape.
    dirs : bool or None
        ``True``: folders only; ``False``: files only; ``None``: both.
    suffixes : iterable of str or None
        Keep only files whose lower-cased suffix is in this set.

    Raises
    ------
    DataError
        If ``folder`` cannot be listed or an entry resolves outside ``root``.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> for n in ("b.jpg", "a.JPG", ".hidden.jpg", "notes.txt"):
    ...     _ = (root / n).write_bytes(b"")
    >>> [p.name for p in list_dir(root, root, dirs=False, suffixes={".jpg"})]
    ['a.JPG', 'b.jpg']
    """
    keep = None if suffixes is None else {s.lower() for s in suffixes}
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as err:
        raise DataError(f"cannot list folder '{folder}': {err}") from None
    out = []
    for entry in entries:
        if entry.name.startswith(".") or entry.name in _SKIPPED_DIRS:
            continue
        check_inside(root, entry)
        is_dir = entry.is_dir()
        if dirs is True and not is_dir:
            continue
        if dirs is False and is_dir:
            continue
        if keep is not None and (is_dir or entry.suffix.lower() not in keep):
            continue
        out.append(entry)
    return out


def verify_image(path: Path, context: str = "") -> None:
    """Check that PIL can parse ``path`` (``Image.verify``: header and structure, no full decode).

    Raises
    ------
    DataError
        If the file cannot be opened or verified; the message names the file
        and ``context`` (e.g. the patient).

    Examples
    --------
    >>> import tempfile
    >>> bad = Path(tempfile.mkdtemp()) / "x.jpg"
    >>> _ = bad.write_bytes(b"not an image")
    >>> verify_image(bad, "patient 'P1'")
    Traceback (most recent call last):
    ...
    milcell.exceptions.DataError: patient 'P1': image '...x.jpg' cannot be decoded ...
    """
    prefix = f"{context}: " if context else ""
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as err:  # PIL raises many types for corrupt files
        raise DataError(f"{prefix}image '{path}' cannot be decoded ({type(err).__name__}: {err})") from None
