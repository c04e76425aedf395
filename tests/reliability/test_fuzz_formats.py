"""Hypothesis fuzzing of every format loader with generated folder trees, loaded AND materialised.

Each example writes a whole small dataset tree in a fresh temporary folder: CSV files with missing,
extra, re-cased or duplicated columns, odd dates, bad labels, duplicate IDs, other encodings, empty
files; patient / class / fold folders with 0-3 images of random modes (L, RGB, RGBA, P, I;16),
sizes (1-33 px) and encodings (PNG, JPEG, BMP, TIFF, whatever the suffix says), some of them
zero-byte, truncated or garbage; masks with and without partners, of the wrong size. The tree is
then read by its loader and every item is materialised through the datasets
(:class:`~milcell.data.datasets.BagDataset` / :class:`~milcell.data.datasets.InstanceDataset`
with a resize transform).

Oracles:

* the only exceptions that escape are :class:`~milcell.exceptions.MilcellError` subclasses whose
  message names the culprit: a path inside the tree, a patient ID, a column or an argument;
* every fault the generator injects on purpose is *definite* (e.g. a zero-byte image, a duplicate
  ID, a missing column), so it must make the load or the materialisation fail; a tree without any
  injected fault must load, and its items must be finite float tensors of the requested size with
  clinical values that scale to finite numbers. A few faults are only *possible* failures (a
  truncated mask that ``Image.verify`` may not notice and that is never decoded); they relax the
  second oracle only.
"""

from __future__ import annotations

import csv
import functools
import io
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

from milcell.data.bag import collate_bags
from milcell.data.datasets import BagDataset, InstanceDataset, group_cells_by_patient
from milcell.data.formats import load_cnmc, load_dlmi, load_imagefolder
from milcell.data.transforms import build_transforms
from milcell.exceptions import MilcellError

pytestmark = pytest.mark.slow

PX = 16
RESIZE = build_transforms({"input_size": (3, PX, PX), "mean": (0.5,) * 3, "std": (0.25,) * 3}, train=False)
MODES = ["L", "RGB", "RGBA", "P", "I;16"]
SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".tif": "TIFF"}
DLMI_COLUMNS = ["ID", "LABEL", "GENDER", "DOB", "LYMPH_COUNT"]
PRELIM_COLUMNS = ["Patient_ID", "new_names", "labels"]
GARBAGE = b"\x00\x01this is not an image\xff\xfe" * 3


# --------------------------------------------------------------------------- images


@functools.cache
def _encoded(mode: str, width: int, height: int, fmt: str) -> bytes:
    """A deterministic noise image in ``mode``, encoded as ``fmt`` (PNG when ``fmt`` cannot hold the mode)."""
    rng = np.random.default_rng(width * 1000 + height)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    else:
        image = Image.fromarray(rgb).convert(mode)
    for target in (fmt, "PNG"):
        buf = io.BytesIO()
        try:
            image.save(buf, format=target)
        except OSError:
            continue
        return buf.getvalue()
    raise AssertionError(f"cannot encode {mode}")  # PNG holds every mode above


@dataclass(frozen=True)
class ImageFile:
    """One generated image file: what it holds and how it is (mis)encoded."""

    kind: str  # "ok", "empty", "truncated", "garbage"
    mode: str
    size: tuple[int, int]
    suffix: str

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    def data(self) -> bytes:
        good = _encoded(self.mode, *self.size, SUFFIXES[self.suffix])
        return {"ok": good, "empty": b"", "truncated": good[: len(good) // 2], "garbage": GARBAGE}[self.kind]


_KINDS = st.sampled_from(["ok"] * 4 + ["empty", "truncated", "garbage"])
_SIDES = st.sampled_from([1, 5, 16, 33])


@st.composite
def image_files(draw: st.DrawFn, kinds: st.SearchStrategy[str] = _KINDS) -> ImageFile:
    return ImageFile(
        draw(kinds),
        draw(st.sampled_from(MODES)),
        (draw(_SIDES), draw(_SIDES)),
        draw(st.sampled_from(list(SUFFIXES))),
    )


def _chance(draw: st.DrawFn, percent: int) -> bool:
    return draw(st.integers(0, 99)) < percent


def _categories(draw: st.DrawFn, tree: Tree, names: list[str]) -> None:
    """Choose the fault categories of this tree, each with a 15 % chance: often none, mostly one."""
    tree.allowed = frozenset(name for name in names if _chance(draw, 15))


def _fault(draw: st.DrawFn, tree: Tree, percent: int, category: str) -> bool:
    """Inject a fault of ``category`` (4 x ``percent`` % chance) if the tree allows that category."""
    return category in tree.allowed and _chance(draw, min(100, 4 * percent))


def _kinds(tree: Tree, category: str = "image") -> st.SearchStrategy[str]:
    return _KINDS if category in tree.allowed else st.just("ok")


def _image_lists(draw: st.DrawFn, tree: Tree) -> list[ImageFile]:
    """1-3 image files, or (sometimes, when folder faults are allowed) none."""
    if _fault(draw, tree, 5, "folder"):
        return []
    return draw(st.lists(image_files(_kinds(tree)), min_size=1, max_size=3))


# --------------------------------------------------------------------------- trees


@dataclass
class Tree:
    """A generated dataset: files to write, the faults injected, and names a message may point at."""

    files: dict[str, bytes] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)  # each one must make loading fail
    maybe: list[str] = field(default_factory=list)  # each one may make loading fail
    names: set[str] = field(default_factory=set)  # patient IDs, columns, arguments
    options: dict = field(default_factory=dict)
    allowed: frozenset[str] = frozenset()  # fault categories that may be injected

    def write(self, root: Path) -> None:
        for d in self.dirs:
            (root / d).mkdir(parents=True, exist_ok=True)
        for rel, data in self.files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)


def _csv_bytes(header: list[str], rows: list[list[str]], encoding: str) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode(encoding)


def _encoding(draw: st.DrawFn, tree: Tree, where: str) -> tuple[str, bool]:
    """A CSV encoding; returns it and whether a non-ASCII note column is needed to make it a fault."""
    choice = draw(st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "latin-1", "utf-16"]))
    if "encoding" not in tree.allowed:
        choice = "utf-8-sig" if choice == "utf-8-sig" else "utf-8"
    if choice == "utf-16":
        tree.faults.append(f"{where}: UTF-16")
    if choice == "latin-1":
        tree.faults.append(f"{where}: latin-1 with a non-ASCII value")
    return choice, choice == "latin-1"


_VALID = {
    "LABEL": ["0", "1", "-1", "1.0", " 0 "],
    "GENDER": ["M", "f", "female", "MALE", ""],
    "DOB": ["3/4/1950", "25-04-1948", "1950-12-31", "2/29/1952", "29-02-1960", "1/1/1900", ""],
    "LYMPH_COUNT": ["12.5", "", "0", "1e3", " 7 ", "200.25"],
}
_INVALID = {
    "LABEL": ["2", "x", "", "0.5", "-2"],
    "GENDER": ["X", "?", "unknown"],
    "DOB": ["2/29/1951", "1950-13-01", "12/31/2021", "31/12/1950", "yesterday", "1950/1/1", "1-1-50"],
    "LYMPH_COUNT": ["-3", "nan", "inf", "abc", "1,5"],
}


@st.composite
def dlmi_trees(draw: st.DrawFn) -> Tree:
    tree = Tree(names=set(DLMI_COLUMNS) | {"split", "reference_date"})
    _categories(draw, tree, ["id", "column", "field", "encoding", "layout", "folder", "image"])
    ids = draw(
        st.lists(st.sampled_from(["P1", "P2", "P10", "p1", "P 3"]), min_size=1, max_size=4, unique=True)
    )
    if _fault(draw, tree, 6, "id"):
        ids.append(ids[0])
        tree.faults.append("duplicate patient ID")
    tree.names |= set(ids)
    header = list(DLMI_COLUMNS)
    if _fault(draw, tree, 8, "column"):
        missing = draw(st.sampled_from(DLMI_COLUMNS))
        header.remove(missing)
        tree.faults.append(f"missing column {missing}")
    if _chance(draw, 30):
        header = [draw(st.sampled_from([h, h.lower(), f" {h.title()} "])) for h in header]
    encoding, needs_note = _encoding(draw, tree, "trainset CSV")
    if needs_note or _chance(draw, 25):
        header.append("note")
    header = draw(st.permutations(header))
    rows = []
    for pid in ids:
        values = {"ID": pid}
        for column in ("LABEL", "GENDER", "DOB", "LYMPH_COUNT"):
            if _fault(draw, tree, 6, "field"):
                values[column] = draw(st.sampled_from(_INVALID[column]))
                if any(h.strip().upper() == column for h in header):
                    tree.faults.append(f"{pid}: bad {column} {values[column]!r}")
            else:
                values[column] = draw(st.sampled_from(_VALID[column]))
        values["NOTE"] = "café" if needs_note else "x"
        rows.append([values[h.strip().upper()] for h in header])
    content = _csv_bytes(header, rows, encoding)
    layout = draw(st.sampled_from(["normal"] * 12 + ["empty", "header only", "blank lines", "two CSVs"]))
    if "layout" not in tree.allowed and layout != "blank lines":
        layout = "normal"
    if layout == "empty":
        content = b""
        tree.faults.append("empty CSV")
    elif layout == "header only":
        content = _csv_bytes(header, [], encoding)
        tree.faults.append("CSV without rows")
    elif layout == "blank lines":
        content = content + "\n\n".encode(encoding).replace(b"\xff\xfe", b"")
    elif layout == "two CSVs":
        tree.files["trainset/other.csv"] = content
        tree.faults.append("two CSV files")
    tree.files["trainset/trainset_true.csv"] = content
    for pid in dict.fromkeys(ids):
        if _fault(draw, tree, 5, "folder"):
            tree.faults.append(f"{pid}: no folder")
            continue
        tree.dirs.append(f"trainset/{pid}")
        images = _image_lists(draw, tree)
        if not images:
            tree.faults.append(f"{pid}: no image")
        for k, spec in enumerate(images):
            tree.files[f"trainset/{pid}/{k:06d}{spec.suffix}"] = spec.data()
            if not spec.ok:
                tree.faults.append(f"{pid}: {spec.kind} image")
        if _chance(draw, 15):
            tree.files[f"trainset/{pid}/notes.txt"] = b"not an image"
        if _chance(draw, 10):
            tree.files[f"trainset/{pid}/.DS_Store"] = GARBAGE
        if _chance(draw, 10):
            tree.dirs.append(f"trainset/{pid}/thumbs")
    if _fault(draw, tree, 6, "folder"):
        tree.dirs.append("trainset/P99")
        tree.faults.append("folder P99 without a CSV row")
    tree.options = {"verify_images": draw(st.booleans())}
    return tree


@st.composite
def cnmc_trees(draw: st.DrawFn) -> Tree:
    tree = Tree(names=set(PRELIM_COLUMNS) | {"include_prelim"})
    _categories(draw, tree, ["fold", "folder", "name", "image", "prelim", "column", "field", "encoding"])
    train = draw(st.sampled_from(["training_data", "C-NMC_training_data"]))
    seen: dict[str, str] = {}
    folds = draw(st.integers(1, 2))
    for f in range(folds):
        fold = f"{train}/fold_{f}"
        tags = draw(
            st.lists(
                st.sampled_from(["all", "hem", "ALL"]),
                min_size=0 if "fold" in tree.allowed else 1,
                max_size=2,
                unique=True,
            )
        )
        if {"all", "ALL"} <= set(tags):
            tags.remove("ALL")
        if not tags:
            tree.dirs.append(fold)
            tree.faults.append(f"{fold} is empty")
        for tag in tags:
            files = _image_lists(draw, tree)
            if not files:
                tree.dirs.append(f"{fold}/{tag}")
                tree.faults.append(f"{fold}/{tag} is empty")
            for spec in files:
                patient = draw(st.sampled_from(["1", "11", "2"]))
                label = tag.lower()
                if _fault(draw, tree, 5, "name"):
                    label = "hem" if label == "all" else "all"
                    tree.faults.append(f"{label} name in {tag}/")
                prefix = "H" if label == "hem" else ""
                name = f"UID_{prefix}{patient}_{draw(st.integers(1, 3))}_{draw(st.integers(1, 3))}_{label}"
                name += draw(st.sampled_from([".bmp", ".bmp", spec.suffix]))
                if _fault(draw, tree, 5, "name"):
                    name = draw(st.sampled_from(["cell.bmp", "UID_x_1_1_all.bmp", "notes.txt"]))
                    tree.faults.append(f"unrecognised name {name}")
                if name in seen and seen[name] != f"{fold}/{tag}":
                    tree.faults.append(f"{name} in two folders")
                elif name in seen:
                    continue  # the same file again
                seen[name] = f"{fold}/{tag}"
                tree.names.add(prefix + patient)
                tree.files[f"{fold}/{tag}/{name}"] = spec.data()
                if not spec.ok:
                    tree.faults.append(f"{name}: {spec.kind} image")
    if _fault(draw, tree, 5, "fold"):
        tree.files[f"{train}/readme.txt"] = b"stray"
        tree.faults.append("stray file in the training folder")
    if _fault(draw, tree, 5, "fold"):
        tree.dirs.append(f"{train}/fold_0/other")
        tree.faults.append("unexpected class folder")
    include = draw(st.booleans())
    tree.options = {"include_prelim": include, "verify_images": draw(st.booleans())}
    if not include:
        return tree
    if _fault(draw, tree, 5, "prelim"):
        tree.faults.append("no validation_data folder")
        return tree
    prelim = "validation_data"
    image_dir = f"{prelim}/C-NMC_test_prelim_phase_data"
    header = list(PRELIM_COLUMNS)
    if _fault(draw, tree, 6, "column"):
        missing = draw(st.sampled_from(PRELIM_COLUMNS))
        header.remove(missing)
        tree.faults.append(f"missing column {missing}")
    encoding, needs_note = _encoding(draw, tree, "prelim CSV")
    if needs_note:
        header.append("note")
    rows = []
    n = draw(st.integers(0 if "prelim" in tree.allowed else 1, 3))
    if n == 0:
        tree.faults.append("prelim CSV without rows")
    for k in range(1, n + 1):
        healthy = draw(st.booleans())
        pid = draw(st.sampled_from(["UID_H49", "UID_h7"] if healthy else ["UID_57", "UID_3"]))
        label = "0" if healthy else "1"
        values = {"Patient_ID": pid, "new_names": f"{k}.bmp", "labels": label, "note": "café"}
        bad = draw(st.integers(0, 30)) if "field" in tree.allowed else 99
        if bad < 4:
            values["labels"] = draw(st.sampled_from(["2", "ALL", ""]))
            tree.faults.append(f"prelim label {values['labels']!r}")
        elif bad < 8:
            values["Patient_ID"] = draw(st.sampled_from(["57", "patient", "UID_"]))
            tree.faults.append(f"prelim Patient_ID {values['Patient_ID']!r}")
        elif bad < 11:
            values["Patient_ID"] = f"UID_57_1_1_{'all' if healthy else 'hem'}"
            tree.faults.append("prelim Patient_ID disagrees with labels")
        elif bad < 14:
            values["new_names"] = draw(st.sampled_from(["../1.bmp", "..", "a/b.bmp"]))
            tree.faults.append(f"unsafe new_names {values['new_names']!r}")
        tree.names.add(pid.split("_")[1].capitalize() if pid.startswith("UID_") else pid)
        rows.append([values[h] for h in header])
        if values["new_names"] == f"{k}.bmp":
            if _fault(draw, tree, 5, "prelim"):
                tree.faults.append(f"listed image {k}.bmp is missing")
            else:
                spec = draw(image_files(_kinds(tree)))
                tree.files[f"{image_dir}/{k}.bmp"] = spec.data()
                if not spec.ok:
                    tree.faults.append(f"{k}.bmp: {spec.kind} image")
    if _fault(draw, tree, 6, "prelim") and rows:
        rows.append(list(rows[0]))
        tree.faults.append("image listed twice")
    if _fault(draw, tree, 5, "prelim"):
        tree.files[f"{image_dir}/99.bmp"] = _encoded("RGB", 5, 5, "BMP")
        tree.faults.append("unlisted prelim image")
    if not any(rel.startswith(image_dir) for rel in tree.files):
        tree.dirs.append(image_dir)
        if "no prelim images" not in tree.faults and rows:
            tree.maybe.append("no prelim image file at all")
    tree.files[f"{prelim}/C-NMC_test_prelim_phase_data_labels.csv"] = _csv_bytes(header, rows, encoding)
    return tree


@st.composite
def imagefolder_trees(draw: st.DrawFn) -> Tree:
    tree = Tree(names={"class_names", "class name"})
    _categories(draw, tree, ["image", "mask", "folder", "layout", "class_names"])
    classes = draw(
        st.lists(
            st.sampled_from(["Basophil", "Eosinophil", "Lymphocyte"]),
            min_size=0 if "layout" in tree.allowed else 1,
            max_size=3,
            unique=True,
        )
    )
    tree.names |= set(classes)
    apply_mask = draw(st.booleans())
    verify = draw(st.booleans())
    if not classes:
        tree.dirs.append("data")
        tree.faults.append("no class folders")
    for cls in classes:
        tree.dirs.append(f"data/{cls}")
        images = _image_lists(draw, tree)
        if not images:
            tree.faults.append(f"{cls}: no image")
        for k, spec in enumerate(images):
            name = f"c{k}{spec.suffix}"
            tree.files[f"data/{cls}/{name}"] = spec.data()
            if not spec.ok:
                tree.faults.append(f"{cls}/{name}: {spec.kind} image")
            if _chance(draw, 50):
                mask = draw(image_files(_kinds(tree, "mask")))
                if "mask" not in tree.allowed or draw(st.booleans()):
                    mask = ImageFile(mask.kind, mask.mode, spec.size, mask.suffix)
                mask_name = name if draw(st.booleans()) else f"c{k}{mask.suffix}"
                tree.files[f"mask/{cls}/{mask_name}"] = mask.data()
                if not mask.ok and apply_mask:
                    tree.faults.append(f"{cls}/{mask_name}: {mask.kind} mask")
                elif mask.kind in ("empty", "garbage") and verify:
                    tree.faults.append(f"{cls}/{mask_name}: {mask.kind} mask (verified)")
                elif not mask.ok and verify:
                    tree.maybe.append(f"{cls}/{mask_name}: truncated mask, maybe noticed by verify")
                if mask.ok and apply_mask and mask.size != spec.size and spec.ok:
                    tree.faults.append(f"{cls}/{mask_name}: mask of another size")
        if _chance(draw, 10):
            tree.files[f"data/{cls}/readme.txt"] = b"not an image"
        if _chance(draw, 10):
            tree.files[f"mask/{cls}/orphan.png"] = _encoded("L", 5, 5, "PNG")
        if _fault(draw, tree, 4, "layout"):
            tree.dirs.append(f"data/{cls}/nested")
            tree.faults.append(f"{cls}: nested folder")
    if _fault(draw, tree, 5, "layout"):
        tree.files["data/loose.png"] = _encoded("RGB", 5, 5, "PNG")
        tree.faults.append("image directly in data/")
    if _chance(draw, 10):
        tree.files["data/README.md"] = b"notes"
    if _chance(draw, 8):
        tree.dirs.append("mask/Monocyte")
    class_names = None
    pick = draw(st.integers(0, 30) if "class_names" in tree.allowed else st.sampled_from([0, 99]))
    if pick < 15:
        class_names = [*sorted(classes), "Monocyte"]
    elif pick < 20 and classes:
        class_names = sorted(classes)[1:] or ["Monocyte"]
        tree.faults.append("a class folder not in class_names")
    elif pick < 24:
        class_names = draw(st.sampled_from([[], ["Basophil", "Basophil"], ["../x"]]))
        tree.faults.append(f"bad class_names {class_names}")
    tree.options = {"class_names": class_names, "verify_images": verify, "apply_mask": apply_mask}
    return tree


# --------------------------------------------------------------------------- the oracle


def _check_message(err: MilcellError, root: Path, tree: Tree) -> None:
    text = str(err)
    tokens = [str(root), *(repr(n) for n in tree.names), *(n for n in tree.names if len(n) > 3)]
    assert any(t in text for t in tokens), f"{type(err).__name__} names no culprit: {text}"


def _fuzz(tree: Tree, load_and_materialise: Callable[[Path, Tree], None]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        tree.write(root)
        try:
            load_and_materialise(root, tree)
        except MilcellError as err:
            _check_message(err, root, tree)
            assert tree.faults or tree.maybe, f"a tree without faults failed: {err}"
            event(f"{type(err).__name__}")
            return
    assert not tree.faults, f"loaded despite the faults {tree.faults}"
    event("loaded and materialised")


def _check_bags(bags: list, sizes: list[int]) -> None:
    assert [len(b) for b in bags] == sizes
    for bag in bags:
        assert bag.instances.shape[1:] == (3, PX, PX)
        assert bag.instances.dtype == torch.float32 and bool(torch.isfinite(bag.instances).all())
    collate_bags(bags)


def _dlmi(root: Path, tree: Tree) -> None:
    cohort = load_dlmi(root, split="train", **tree.options)
    scaler = cohort.fit_scaler()
    assert np.isfinite(scaler.transform(cohort.clinical_matrix())).all()
    ds = BagDataset(cohort, transform=RESIZE, clinical_scaler=scaler)
    bags = [ds[i] for i in range(len(ds))]
    _check_bags(bags, [r.num_instances for r in cohort])
    assert all(bool(torch.isfinite(b.clinical).all()) for b in bags)


def _cnmc(root: Path, tree: Tree) -> None:
    cells = load_cnmc(root, **tree.options)
    ds = InstanceDataset(cells, transform=RESIZE)
    _check_bags([ds[i] for i in range(len(ds))], [1] * len(ds))
    cohort = group_cells_by_patient(cells, on_conflict="max")
    bags_ds = BagDataset(cohort, transform=RESIZE)
    _check_bags([bags_ds[i] for i in range(len(bags_ds))], [r.num_instances for r in cohort])


def _imagefolder(root: Path, tree: Tree) -> None:
    options = dict(tree.options)
    apply_mask = options.pop("apply_mask")
    cells = load_imagefolder(root, **options)
    ds = InstanceDataset(cells, transform=RESIZE, apply_mask=apply_mask)
    _check_bags([ds[i] for i in range(len(ds))], [1] * len(ds))


@settings(max_examples=60)
@given(tree=dlmi_trees())
def test_fuzz_dlmi_trees(tree: Tree) -> None:
    _fuzz(tree, _dlmi)


@settings(max_examples=60)
@given(tree=cnmc_trees())
def test_fuzz_cnmc_trees(tree: Tree) -> None:
    _fuzz(tree, _cnmc)


@settings(max_examples=60)
@given(tree=imagefolder_trees())
def test_fuzz_imagefolder_trees(tree: Tree) -> None:
    _fuzz(tree, _imagefolder)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("suffix", list(SUFFIXES))
def test_every_mode_and_encoding_materialises(mode: str, suffix: str, tmp_path: Path) -> None:
    """The generator's 'ok' images really are readable, so the fuzz oracle's success side is sound."""
    spec = ImageFile("ok", mode, (5, 33), suffix)
    (tmp_path / f"x{suffix}").write_bytes(spec.data())
    from milcell.data.records import CellRecord, CellSet

    cells = CellSet([CellRecord(tmp_path / f"x{suffix}", 0, "x")], class_names=("a", "b"))
    bag = InstanceDataset(cells, transform=RESIZE)[0]
    assert bag.instances.shape == (1, 3, PX, PX) and bool(torch.isfinite(bag.instances).all())
