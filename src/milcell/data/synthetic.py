"""A seeded synthetic cohort of stained blood-cell images, written in the real on-disk layouts.

:func:`make_cohort` draws patients, renders their cells and writes them to
disk in the layout a real dataset has, so tests and examples go through the
same loaders (:mod:`milcell.data.formats`) a user points at real data:

* ``layout="dlmi"`` (default): lymphocytosis bags. Malignant patients carry
  a fraction (5-65 %) of *atypical* lymphocytes (larger, irregular or cleaved,
  darker and bluer nucleus, higher nucleus/cytoplasm ratio, deeper blue
  cytoplasm); reactive patients only a few (0-6 %). Single cells of the two
  kinds overlap in size and colour, so neither a cell nor a small bag is
  trivially classified. Age, lymphocyte count and sex are drawn by class as
  in the lymphocytosis reports (malignant patients older, with higher counts,
  more often male), with overlap, so the clinical attributes alone are good
  but not perfect. The real data's quirks are reproduced: about a quarter of
  the DOBs are written ``dd-mm-YYYY`` (the rest ``m/d/YYYY``), one female
  training patient has gender ``f`` (lower case), and the test CSV has
  ``LABEL = -1``. The hidden test labels are written to
  ``root/synthetic_truth.csv`` (``ID, LABEL, SPLIT, N_CELLS, N_ATYPICAL``),
  outside the folders a loader reads.
* ``layout="cnmc"``: the C-NMC 2019 single-cell layout: cells segmented on a
  black background, ``training_data/fold_{0,1,2}/{all,hem}/`` with the real
  file-name pattern, and ``validation_data/`` holding the prelim folder
  (``1.bmp, 2.bmp, ...``) and its labels CSV. An ALL patient's cells are
  atypical blasts with probability 0.8, a healthy patient's with 0.05, and
  every cell carries its patient's label, as in C-NMC.
* ``layout="imagefolder"``: the five white-cell types (Basophil, Eosinophil,
  Lymphocyte, Monocyte, Neutrophil, imbalanced like the real set) in
  ``train/data/<Class>/`` and ``val/data/<Class>/``, with same-named masks
  for about 10 % of the training images in ``train/mask/<Class>/``.

Everything is drawn from one ``numpy.random.Generator(seed)``: the same
arguments write byte-identical files. A 60-patient cohort of 64 px images
takes about a second to write.

Examples
--------
>>> import tempfile
>>> from milcell.data.synthetic import make_cohort
>>> from milcell.data.formats.dlmi import load_dlmi
>>> root = make_cohort(tempfile.mkdtemp(), n_patients=12, seed=0, image_size=32)
>>> sorted(p.name for p in root.iterdir())
['synthetic_truth.csv', 'testset', 'trainset']
>>> cohort = load_dlmi(root, split="all")
>>> len(cohort), cohort.clinical_names
(12, ('age', 'lymph_count', 'sex'))
"""

from __future__ import annotations

import csv
import functools
import logging
import os
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image

from milcell.exceptions import ConfigError

__all__ = ["CELL_KINDS", "WBC_CLASSES", "make_cohort", "render_cell", "smear_background"]

logger = logging.getLogger("milcell")

#: The five white-cell classes of the ``imagefolder`` layout, in sorted order.
WBC_CLASSES: tuple[str, ...] = ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil")
#: Every kind of cell :func:`render_cell` can draw.
CELL_KINDS: tuple[str, ...] = (
    "normal",
    "atypical",
    "basophil",
    "eosinophil",
    "lymphocyte",
    "monocyte",
    "neutrophil",
)

_WBC_WEIGHTS = np.array([0.05, 0.11, 0.26, 0.10, 0.48])  # imbalanced like the real WBC set
_REFERENCE = date(2020, 1, 1)  # the dlmi loader's default reference date

# Colours (RGB in [0, 1]) of a May-Grünwald-Giemsa-like stain.
_PLASMA = np.array([0.93, 0.87, 0.87], dtype=np.float32)
_RBC = np.array([0.88, 0.62, 0.65], dtype=np.float32)


class _Style(NamedTuple):
    """Radius (mean, sd), N/C ratio (mean, sd), irregularity, notch depth, nucleus and cytoplasm colour."""

    r: tuple[float, float]
    nc: tuple[float, float]
    irr: float
    notch: float
    nuc: tuple[float, float, float]
    cyto: tuple[float, float, float]


# fmt: off
_CELL_STYLE: dict[str, _Style] = {
    "normal": _Style(r=(0.36, 0.04), nc=(0.74, 0.05), irr=0.035, notch=0.0,
                     nuc=(0.42, 0.27, 0.56), cyto=(0.70, 0.74, 0.90)),
    "atypical": _Style(r=(0.43, 0.05), nc=(0.82, 0.05), irr=0.08, notch=0.3,
                       nuc=(0.33, 0.22, 0.55), cyto=(0.60, 0.66, 0.88)),
    "monocyte": _Style(r=(0.50, 0.04), nc=(0.62, 0.05), irr=0.04, notch=0.45,
                       nuc=(0.52, 0.38, 0.64), cyto=(0.74, 0.74, 0.85)),
    "neutrophil": _Style(r=(0.44, 0.03), nc=(0.30, 0.03), irr=0.0, notch=0.0,
                         nuc=(0.42, 0.24, 0.52), cyto=(0.87, 0.80, 0.84)),
    "eosinophil": _Style(r=(0.46, 0.03), nc=(0.34, 0.03), irr=0.0, notch=0.0,
                         nuc=(0.40, 0.25, 0.52), cyto=(0.93, 0.58, 0.45)),
    "basophil": _Style(r=(0.40, 0.03), nc=(0.62, 0.05), irr=0.06, notch=0.0,
                       nuc=(0.36, 0.22, 0.52), cyto=(0.66, 0.55, 0.78)),
}
# fmt: on
_CELL_STYLE["lymphocyte"] = _CELL_STYLE["normal"]
_LOBES = {"neutrophil": (3, 5), "eosinophil": (2, 2)}


def _soft_inside(dist_to_edge: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased mask from a signed distance (> 0 inside)."""
    return np.clip(dist_to_edge * (1.0 / edge) + 0.5, 0.0, 1.0)


def _waves(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, freq: float, n: int = 3) -> np.ndarray:
    """Smooth random texture in about [-1, 1]: a sum of ``n`` plane waves."""
    out = np.zeros_like(x)
    for _ in range(n):
        angle, phase = rng.uniform(0, 2 * np.pi, 2)
        f = freq * rng.uniform(0.6, 1.4)
        out += np.cos(
            np.float32(f * np.cos(angle)) * x + np.float32(f * np.sin(angle)) * y + np.float32(phase)
        )
    return out * np.float32(np.sqrt(2.0 / n))


def _blob(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    radius: float,
    irr: float,
    notch: float,
    edge: float,
) -> np.ndarray:
    """Soft mask of a round shape with a wobbly boundary and an optional notch (cleft)."""
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    r = np.sqrt(dx * dx + dy * dy)
    if irr <= 0 and notch <= 0:
        return _soft_inside(radius - r, edge)
    theta = np.arctan2(dy, dx)
    boundary = np.ones_like(r)
    if irr > 0:
        amps = rng.normal(0.0, irr, 3)
        phases = rng.uniform(0, 2 * np.pi, 3)
        for k, (a, p) in enumerate(zip(amps, phases, strict=True), start=2):
            boundary += np.float32(a) * np.cos(k * theta + np.float32(p))
    if notch > 0:
        depth = notch * rng.uniform(0.5, 1.2)
        theta0 = rng.uniform(-np.pi, np.pi)
        diff = np.remainder(
            theta - np.float32(theta0) + np.float32(np.pi), np.float32(2 * np.pi)
        ) - np.float32(np.pi)
        boundary *= 1.0 - np.float32(depth) * np.exp(-(diff * diff) * np.float32(1 / (2 * 0.35**2)))
    return _soft_inside(np.float32(radius) * boundary - r, edge)


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Alpha-blend ``colour`` ((3,) or (H, W, 3)) into ``img`` (H, W, 3) where ``mask`` (H, W)."""
    m = mask[..., None]
    return img + (np.asarray(colour, dtype=np.float32) - img) * m


@functools.lru_cache(maxsize=8)
def _grid(height: int, width: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units of half an image side (an image spans [-1, 1]); read-only."""
    xs = ((np.arange(width, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    ys = ((np.arange(height, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    x, y = np.meshgrid(xs, ys)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def smear_background(rng: np.random.Generator, height: int, width: int, size: int) -> np.ndarray:
    """Plasma with scattered red cells: a ``(height, width, 3)`` float32 canvas in [0, 1].

    ``size`` is the side of one cell image, which sets the scale of the red
    cells; crop ``(size, size)`` windows of a large canvas to give the cells
    of one patient a shared smear, cheaply.

    Examples
    --------
    >>> import numpy as np
    >>> smear_background(np.random.default_rng(0), 40, 80, 32).shape
    (40, 80, 3)
    """
    x, y = _grid(height, width, size)
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = _PLASMA
    img += (0.015 * _waves(rng, x, y, 3.0))[..., None]
    edge = 2.5 / size
    area = (2.0 * width / size) * (2.0 * height / size)
    for _ in range(int(rng.poisson(0.8 * area))):
        cx = rng.uniform(-1.2, 2.0 * width / size - 0.8)
        cy = rng.uniform(-1.2, 2.0 * height / size - 0.8)
        rc = rng.uniform(0.24, 0.34)
        # draw only inside the red cell's bounding window
        c0 = max(int((cx - rc + 1.0) * size / 2) - 2, 0)
        c1 = min(int((cx + rc + 1.0) * size / 2) + 3, width)
        r0 = max(int((cy - rc + 1.0) * size / 2) - 2, 0)
        r1 = min(int((cy + rc + 1.0) * size / 2) + 3, height)
        if c0 >= c1 or r0 >= r1:
            continue
        xs, ys = x[r0:r1, c0:c1], y[r0:r1, c0:c1]
        disc = _blob(rng, xs, ys, cx, cy, rc, 0.0, 0.0, edge)
        pallor = _soft_inside(0.45 * rc - np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2), 6 * edge)
        window = _paint(img[r0:r1, c0:c1], disc, _RBC + rng.normal(0, 0.02, 3))
        img[r0:r1, c0:c1] = _paint(window, disc * pallor * 0.6, _PLASMA)
    return img


def render_cell(
    kind: str,
    size: int = 64,
    rng: np.random.Generator | None = None,
    stain: np.ndarray | None = None,
    segmented: bool = False,
    off_centre: float = 0.0,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """Draw one stained white blood cell; returns a ``(size, size, 3)`` uint8 RGB array.

    Parameters
    ----------
    kind : str
        One of :data:`CELL_KINDS`: ``"normal"`` (= ``"lymphocyte"``), ``"atypical"``
        (malignant lymphocyte / blast) or a white-cell type.
    size : int, default 64
        Side of the square image in pixels (at least 16).
    rng : numpy.random.Generator or None
        Source of all randomness (default: ``default_rng(0)``).
    stain : ndarray or None
        ``(3,)`` per-channel gains on the stain's optical density (a patient's
        or a slide's colour); ``None`` = ones.
    segmented : bool, default False
        Black background outside the cell (C-NMC style) instead of plasma with
        red cells.
    off_centre : float, default 0.0
        Largest shift of the cell centre, as a fraction of the half-width.
    background : ndarray or None
        ``(size, size, 3)`` float canvas in [0, 1] to draw on (a crop of
        :func:`smear_background`); ``None`` draws a fresh one.

    Raises
    ------
    ConfigError
        For an unknown ``kind``, a ``size`` below 16 or a background of the wrong shape.

    Examples
    --------
    >>> import numpy as np
    >>> img = render_cell("atypical", 32, np.random.default_rng(0))
    >>> img.shape, img.dtype
    ((32, 32, 3), dtype('uint8'))
    >>> bool((render_cell("normal", 32, np.random.default_rng(1)) == render_cell(
    ...     "normal", 32, np.random.default_rng(1))).all())
    True
    """
    if kind not in CELL_KINDS:
        raise ConfigError(f"render_cell: unknown kind {kind!r}; expected one of {list(CELL_KINDS)}")
    if int(size) < 16:
        raise ConfigError(f"render_cell: size must be at least 16 pixels, got {size}")
    rng = np.random.default_rng(0) if rng is None else rng
    style = _CELL_STYLE[kind]
    size = int(size)
    x, y = _grid(size, size, size)
    edge = 2.5 / size
    if segmented:
        img = np.empty((size, size, 3), dtype=np.float32)
        img[:] = _PLASMA
    elif background is None:
        img = smear_background(rng, size, size, size)
    else:
        if background.shape != (size, size, 3):
            raise ConfigError(
                f"render_cell: background must have shape {(size, size, 3)}, got {background.shape}"
            )
        img = np.asarray(background, dtype=np.float32).copy()

    # the white cell
    shift = rng.normal(0.0, 0.04, 2)
    if off_centre > 0:
        shift += rng.uniform(-off_centre, off_centre, 2)
    cx, cy = float(shift[0]), float(shift[1])
    r_mean, r_sd = style.r
    radius = float(np.clip(rng.normal(r_mean, r_sd), 0.2, 0.75))
    cell = _blob(rng, x, y, cx, cy, radius, 0.03, 0.0, edge)
    cyto = np.asarray(style.cyto) + rng.normal(0, 0.03, 3)
    cyto_tex = (0.03 * _waves(rng, x, y, 12.0))[..., None]
    if kind == "eosinophil":  # coarse orange granules
        grains = (rng.random((size, size), dtype=np.float32) < 0.35).astype(np.float32)
        cyto_tex = cyto_tex - 0.12 * grains[..., None] * np.array([0.2, 1.0, 1.0], dtype=np.float32)
    if kind == "monocyte":  # a few pale vacuoles
        for _ in range(int(rng.integers(1, 4))):
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.8) * radius
            vx, vy = cx + d * np.cos(a), cy + d * np.sin(a)
            vac = _soft_inside(0.12 * radius - np.sqrt((x - vx) ** 2 + (y - vy) ** 2), edge)
            cyto_tex = cyto_tex + 0.12 * vac[..., None]
    img = _paint(img, cell, cyto + cyto_tex)

    nc_mean, nc_sd = style.nc
    n_radius = radius * float(np.clip(rng.normal(nc_mean, nc_sd), 0.2, 0.95))
    if kind in _LOBES:
        lo, hi = _LOBES[kind]
        n_lobes = int(rng.integers(lo, hi + 1))
        start = rng.uniform(0, 2 * np.pi)
        nucleus = np.zeros_like(x)
        for i in range(n_lobes):
            a = start + i * (2 * np.pi * 0.7) / max(n_lobes - 1, 1)
            lx, ly = cx + 0.5 * radius * np.cos(a), cy + 0.5 * radius * np.sin(a)
            nucleus = np.maximum(nucleus, _blob(rng, x, y, lx, ly, n_radius, 0.05, 0.0, edge))
    else:
        off = rng.normal(0.0, 0.06 * radius, 2)
        if kind == "monocyte":
            off += 0.25 * radius * rng.uniform(-1, 1, 2)
        irr, notch = style.irr, style.notch
        nucleus = _blob(rng, x, y, cx + off[0], cy + off[1], n_radius, irr, notch, edge)
    nucleus = nucleus * cell
    nuc = np.asarray(style.nuc) + rng.normal(0, 0.035, 3)
    chromatin = (0.06 * _waves(rng, x, y, 18.0 if kind == "atypical" else 10.0))[..., None]
    img = _paint(img, nucleus, nuc + chromatin)
    if kind == "basophil":  # dark granules over nucleus and cytoplasm
        grains = (rng.random((size, size), dtype=np.float32) < 0.3) * cell
        img = _paint(img, 0.8 * grains, np.array([0.25, 0.15, 0.40]))

    # stain variation (per-channel gain on optical density), sensor noise
    gains = np.ones(3) if stain is None else np.asarray(stain, dtype=np.float64)
    gains = (gains * (1 + rng.normal(0, 0.03, 3))).astype(np.float32)
    img = (1.0 - (1.0 - np.clip(img, 0.0, 1.0)) * gains).astype(np.float32, copy=False)
    img += 0.012 * rng.standard_normal(img.shape, dtype=np.float32)
    if segmented:
        img *= (cell > 0.5)[..., None]
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _canvas(rng: np.random.Generator, n_cells: int, size: int) -> np.ndarray:
    """One patient's smear: a canvas about large enough for its cells' crops to overlap little."""
    side = size * int(min(4, max(1, np.ceil(np.sqrt(n_cells) / 1.5))))
    return smear_background(rng, side, side, size)


def _crop(rng: np.random.Generator, canvas: np.ndarray, size: int) -> np.ndarray:
    """A random ``(size, size, 3)`` window of a patient's smear canvas."""
    r = int(rng.integers(0, canvas.shape[0] - size + 1))
    c = int(rng.integers(0, canvas.shape[1] - size + 1))
    return canvas[r : r + size, c : c + size]


def _save(arr: np.ndarray, path: Path) -> None:
    """Write an image; JPEG (quality 92) or BMP chosen by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.save(path, format="JPEG", quality=92)
    else:
        im.save(path, format="BMP")


def _check_args(
    root: Path, n_patients: int, image_size: int, bag_size: Sequence[int], fractions: dict[str, float]
) -> None:
    if int(n_patients) < 4:
        raise ConfigError(f"make_cohort: n_patients must be at least 4, got {n_patients}")
    if int(image_size) < 16:
        raise ConfigError(f"make_cohort: image_size must be at least 16, got {image_size}")
    if len(bag_size) != 2 or not 1 <= int(bag_size[0]) <= int(bag_size[1]):
        raise ConfigError(f"make_cohort: bag_size must be (low, high) with 1 <= low <= high, got {bag_size}")
    for name, value in fractions.items():
        if not 0.0 < float(value) < 1.0:
            raise ConfigError(f"make_cohort: {name} must be strictly between 0 and 1, got {value}")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"make_cohort: '{root}' exists and is not an empty folder; choose a new root")


def _labels(rng: np.random.Generator, n: int, positive_fraction: float) -> np.ndarray:
    n_pos = min(max(round(n * positive_fraction), 2), n - 2)
    labels = np.zeros(n, dtype=np.int64)
    labels[:n_pos] = 1
    return rng.permutation(labels)


def _held_out(rng: np.random.Generator, labels: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of held-out patients: at least one, stratified, each class keeping one elsewhere."""
    n_held = max(1, round(len(labels) * fraction))
    counts = [int((labels == c).sum()) for c in (0, 1)]
    k1 = min(round(n_held * counts[1] / len(labels)), counts[1] - 1)
    k0 = min(n_held - k1, counts[0] - 1)
    k1 = min(n_held - k0, counts[1] - 1)
    held = np.zeros(len(labels), dtype=bool)
    for c, k in ((0, k0), (1, k1)):
        held[rng.choice(np.flatnonzero(labels == c), size=k, replace=False)] = True
    return held


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _dlmi(
    root: Path,
    rng: np.random.Generator,
    n: int,
    size: int,
    bag: Sequence[int],
    malignant_fraction: float,
    test_fraction: float,
) -> None:
    labels = _labels(rng, n, malignant_fraction)
    test = _held_out(rng, labels, test_fraction)
    rows: dict[str, list[list[object]]] = {"trainset": [], "testset": []}
    truth: list[list[object]] = []
    lowered = False
    for i, label in enumerate(labels):
        pid = f"P{i + 1}"
        split = "testset" if test[i] else "trainset"
        malignant = bool(label)
        age = float(np.clip(rng.normal(71, 11) if malignant else rng.normal(50, 18), 18, 99))
        count = float(np.exp(rng.normal(2.6, 0.8) if malignant else rng.normal(1.7, 0.55)))
        male = rng.random() < (0.62 if malignant else 0.45)
        frac = 0.05 + 0.6 * rng.beta(2.0, 2.5) if malignant else rng.uniform(0.0, 0.06)
        stain = 1 + rng.normal(0, 0.06, 3)
        n_cells = int(rng.integers(bag[0], bag[1] + 1))
        atypical = rng.random(n_cells) < frac
        canvas = _canvas(rng, n_cells, size)
        for j in range(n_cells):
            kind = "atypical" if atypical[j] else "normal"
            off = 0.35 if rng.random() < 0.15 else 0.0
            arr = render_cell(kind, size, rng, stain, off_centre=off, background=_crop(rng, canvas, size))
            _save(arr, root / split / pid / f"{j:06d}.jpg")
        dob = _REFERENCE - timedelta(days=int(age * 365.25))
        dob_text = dob.strftime("%d-%m-%Y") if rng.random() < 0.25 else f"{dob.month}/{dob.day}/{dob.year}"
        gender = "M" if male else "F"
        if not male and split == "trainset" and not lowered:
            gender, lowered = "f", True
        csv_label = -1 if test[i] else int(label)
        rows[split].append([pid, csv_label, gender, dob_text, f"{count:.2f}"])
        truth.append([pid, int(label), split, n_cells, int(atypical.sum())])
    _write_csv(
        root / "trainset" / "trainset_true.csv",
        ["ID", "LABEL", "GENDER", "DOB", "LYMPH_COUNT"],
        rows["trainset"],
    )
    _write_csv(
        root / "testset" / "testset_data.csv",
        ["ID", "LABEL", "GENDER", "DOB", "LYMPH_COUNT"],
        rows["testset"],
    )
    _write_csv(root / "synthetic_truth.csv", ["ID", "LABEL", "SPLIT", "N_CELLS", "N_ATYPICAL"], truth)


def _cnmc(
    root: Path,
    rng: np.random.Generator,
    n: int,
    size: int,
    bag: Sequence[int],
    malignant_fraction: float,
    test_fraction: float,
) -> None:
    labels = _labels(rng, n, malignant_fraction)
    prelim = _held_out(rng, labels, test_fraction)
    prelim_cells: list[tuple[np.ndarray, str, int]] = []
    counters = {0: 0, 1: 0}
    for i, label in enumerate(labels):
        counters[int(label)] += 1
        tag = "all" if label else "hem"
        patient = f"{counters[int(label)] + 10}" if label else f"H{counters[int(label)] + 10}"
        stain = 1 + rng.normal(0, 0.04, 3)
        n_cells = int(rng.integers(bag[0], bag[1] + 1))
        blast = rng.random(n_cells) < (0.8 if label else 0.05)
        fold = f"fold_{i % 3}"
        for j in range(n_cells):
            arr = render_cell("atypical" if blast[j] else "normal", size, rng, stain, segmented=True)
            if prelim[i]:
                prelim_cells.append((arr, f"UID_{patient}", int(label)))
            else:
                name = f"UID_{patient}_{j // 3 + 1}_{j % 3 + 1}_{tag}.bmp"
                _save(arr, root / "training_data" / fold / tag / name)
    order = rng.permutation(len(prelim_cells))
    rows = []
    for k, idx in enumerate(order, start=1):
        arr, pid, label = prelim_cells[idx]
        _save(arr, root / "validation_data" / "C-NMC_test_prelim_phase_data" / f"{k}.bmp")
        rows.append([pid, f"{k}.bmp", label])
    _write_csv(
        root / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv",
        ["Patient_ID", "new_names", "labels"],
        rows,
    )


def _imagefolder(
    root: Path, rng: np.random.Generator, n: int, size: int, bag: Sequence[int], test_fraction: float
) -> None:
    n_val = max(1, round(n * test_fraction))
    counts = {"train": 0, "val": 0}
    for i in range(n):
        split = "val" if i >= n - n_val else "train"
        stain = 1 + rng.normal(0, 0.05, 3)
        n_cells = int(rng.integers(bag[0], bag[1] + 1))
        canvas = _canvas(rng, n_cells, size)
        for _ in range(n_cells):
            k = counts[split]
            # the first cells of each split cycle through the classes so none is empty
            c = k % 5 if k < 10 else int(rng.choice(5, p=_WBC_WEIGHTS))
            cls = WBC_CLASSES[c]
            kind = cls.lower()
            off = 0.2 if rng.random() < 0.1 else 0.0
            arr = render_cell(kind, size, rng, stain, off_centre=off, background=_crop(rng, canvas, size))
            name = f"{i + 1:03d}_{k:05d}.jpg"
            _save(arr, root / split / "data" / cls / name)
            if split == "train" and (k < 5 or rng.random() < 0.1):
                mask = np.where(arr.mean(axis=2) < 200, 255, 0).astype(np.uint8)
                _save(mask, root / split / "mask" / cls / name)
            counts[split] += 1


def make_cohort(
    root: str | os.PathLike[str],
    n_patients: int = 60,
    seed: int = 0,
    layout: Literal["dlmi", "cnmc", "imagefolder"] = "dlmi",
    image_size: int = 64,
    bag_size: tuple[int, int] = (8, 40),
    malignant_fraction: float = 0.65,
    test_fraction: float = 0.2,
) -> Path:
    """Write a seeded synthetic cohort to ``root`` in a real dataset's layout; return ``root``.

    Parameters
    ----------
    root : path-like
        Target folder; created if missing, and must be empty if it exists.
    n_patients : int, default 60
        Number of patients (at least 4). For ``"imagefolder"``, the number of
        smears the cells are drawn from.
    seed : int, default 0
        Seed of the single ``numpy.random.Generator``; the same arguments
        write identical files.
    layout : {"dlmi", "cnmc", "imagefolder"}, default "dlmi"
        The on-disk layout (see the module docstring and ``docs/formats.rst``).
    image_size : int, default 64
        Side of the square images in pixels (the real data: 224 dlmi, 450 C-NMC).
    bag_size : (int, int), default (8, 40)
        Inclusive range of the number of cells per patient (real dlmi: 16-198).
    malignant_fraction : float, default 0.65
        Share of malignant (dlmi) or ALL (cnmc) patients; ignored by ``"imagefolder"``.
    test_fraction : float, default 0.2
        Share of patients in ``testset/`` (dlmi, LABEL -1), in the prelim
        validation folder (cnmc), or in ``val/`` (imagefolder); stratified by class.

    Returns
    -------
    Path
        ``root``, the folder to hand to :func:`~milcell.data.formats.dlmi.load_dlmi`
        or :func:`~milcell.data.formats.cnmc.load_cnmc`; for ``"imagefolder"``
        load ``root / "train"`` and ``root / "val"`` with
        :func:`~milcell.data.formats.imagefolder.load_imagefolder`.

    Raises
    ------
    ConfigError
        For an unknown layout, an out-of-range argument, or a non-empty ``root``.

    Examples
    --------
    >>> import tempfile
    >>> root = make_cohort(tempfile.mkdtemp(), n_patients=6, layout="cnmc", image_size=32, bag_size=(2, 3))
    >>> sorted(p.name for p in (root / "training_data").iterdir())
    ['fold_0', 'fold_1', 'fold_2']
    """
    if layout not in ("dlmi", "cnmc", "imagefolder"):
        raise ConfigError(f"make_cohort: layout must be 'dlmi', 'cnmc' or 'imagefolder', got {layout!r}")
    target = Path(root)
    _check_args(
        target,
        n_patients,
        image_size,
        bag_size,
        {"malignant_fraction": malignant_fraction, "test_fraction": test_fraction},
    )
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n, size, bag = int(n_patients), int(image_size), (int(bag_size[0]), int(bag_size[1]))
    if layout == "dlmi":
        _dlmi(target, rng, n, size, bag, malignant_fraction, test_fraction)
    elif layout == "cnmc":
        _cnmc(target, rng, n, size, bag, malignant_fraction, test_fraction)
    else:
        _imagefolder(target, rng, n, size, bag, test_fraction)
    logger.info("make_cohort: wrote a %s cohort of %d patients to '%s'", layout, n, target)
    return target
