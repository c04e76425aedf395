"""The one-folder-per-class loader (five white-cell types), with optional masks."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from milcell.data.formats.imagefolder import load_imagefolder
from milcell.data.synthetic import WBC_CLASSES, make_cohort
from milcell.exceptions import ConfigError, DataError


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 60, 160)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def build(root: Path, with_data: bool = True) -> Path:
    base = root / "data" if with_data else root
    for cls, names in {
        "Neutrophil": ["n1.jpg", "n2.jpg"],
        "Basophil": ["b1.jpg"],
        "Monocyte": ["m1.jpg"],
    }.items():
        (base / cls).mkdir(parents=True)
        for n in names:
            (base / cls / n).write_bytes(JPEG)
    if with_data:
        (root / "mask" / "Neutrophil").mkdir(parents=True)
        (root / "mask" / "Neutrophil" / "n2.jpg").write_bytes(JPEG)
        (root / "mask" / "Basophil").mkdir(parents=True)
        (root / "mask" / "Basophil" / "b1.png").write_bytes(JPEG)
    return root


def test_layout_with_data_and_masks(tmp_path: Path) -> None:
    cells = load_imagefolder(build(tmp_path))
    assert cells.class_names == ("Basophil", "Monocyte", "Neutrophil")
    assert [(r.path.name, r.label, r.patient) for r in cells] == [
        ("b1.jpg", 0, "b1"),
        ("m1.jpg", 1, "m1"),
        ("n1.jpg", 2, "n1"),
        ("n2.jpg", 2, "n2"),
    ]
    masks = {r.path.name: r.mask_path for r in cells}
    assert masks["n2.jpg"] == tmp_path.absolute() / "mask" / "Neutrophil" / "n2.jpg"
    assert masks["b1.jpg"] == tmp_path.absolute() / "mask" / "Basophil" / "b1.png"  # same stem
    assert masks["n1.jpg"] is None and masks["m1.jpg"] is None
    assert cells.root == tmp_path.absolute()


def test_root_is_folder_of_class_folders(tmp_path: Path) -> None:
    cells = load_imagefolder(build(tmp_path, with_data=False))
    assert len(cells) == 4 and all(r.mask_path is None for r in cells)
    same = load_imagefolder(build(tmp_path / "other") / "data")
    assert [r.label for r in same] == [r.label for r in cells]


def test_fixed_class_names(tmp_path: Path) -> None:
    build(tmp_path)
    cells = load_imagefolder(tmp_path, class_names=list(WBC_CLASSES))
    assert cells.class_names == WBC_CLASSES
    assert sorted({r.label for r in cells}) == [0, 3, 4]
    with pytest.raises(DataError, match=r"class folders \['Monocyte'\] .* are not in class_names"):
        load_imagefolder(tmp_path, class_names=["Basophil", "Neutrophil"])
    with pytest.raises(ConfigError, match="non-empty and unique"):
        load_imagefolder(tmp_path, class_names=["A", "A"])
    with pytest.raises(ConfigError, match="non-empty and unique"):
        load_imagefolder(tmp_path, class_names=[])
    with pytest.raises(DataError, match="class name '../x' is not a plain name"):
        load_imagefolder(tmp_path, class_names=["../x"])


def test_synthetic_roundtrip(tmp_path: Path) -> None:
    root = make_cohort(
        tmp_path / "w", n_patients=6, seed=1, layout="imagefolder", image_size=16, bag_size=(4, 6)
    )
    train = load_imagefolder(root / "train")
    val = load_imagefolder(root / "val", class_names=train.class_names)
    assert train.class_names == WBC_CLASSES
    assert len(train) == sum(1 for _ in (root / "train" / "data").rglob("*.jpg"))
    with_mask = [r for r in train if r.mask_path is not None]
    assert with_mask and all(r.mask_path.name == r.path.name for r in with_mask)
    assert len(with_mask) < len(train)
    assert set(train.labels.tolist()) == set(range(5))
    assert len(val) > 0 and all(r.mask_path is None for r in val)


def test_warnings_for_stray_files_and_masks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    build(tmp_path)
    (tmp_path / "data" / "Monocyte" / "notes.txt").write_text("x")
    (tmp_path / "data" / "README").write_text("x")
    (tmp_path / "mask" / "Neutrophil" / "zz.jpg").write_bytes(JPEG)
    (tmp_path / "mask" / "Ghost").mkdir()
    with caplog.at_level("WARNING", logger="milcell"):
        cells = load_imagefolder(tmp_path)
    assert len(cells) == 4
    for text in ("notes.txt", "README", "zz.jpg", "Ghost"):
        assert text in caplog.text


# --- every bad input ---------------------------------------------------------------------


def test_empty_class_folder(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / "data" / "Eosinophil").mkdir()
    with pytest.raises(DataError, match="class folder '.*Eosinophil' holds no images"):
        load_imagefolder(tmp_path)


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="no class folders in"):
        load_imagefolder(tmp_path)


def test_loose_images(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / "data" / "x.jpg").write_bytes(JPEG)
    with pytest.raises(DataError, match=r"image files \['x\.jpg'\] directly in"):
        load_imagefolder(tmp_path)


def test_nested_folder(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / "data" / "Basophil" / "more").mkdir()
    with pytest.raises(DataError, match="unexpected folder '.*more' inside class folder"):
        load_imagefolder(tmp_path)


def test_symlink_outside_root(tmp_path: Path) -> None:
    root = build(tmp_path / "root")
    (tmp_path / "x.jpg").write_bytes(JPEG)
    (root / "data" / "Basophil" / "b2.jpg").symlink_to(tmp_path / "x.jpg")
    with pytest.raises(DataError, match="b2.jpg' resolves to .*outside the dataset root"):
        load_imagefolder(root)


def test_undecodable_image_and_mask(tmp_path: Path) -> None:
    build(tmp_path)
    (tmp_path / "mask" / "Neutrophil" / "n2.jpg").write_bytes(b"junk")
    assert len(load_imagefolder(tmp_path)) == 4
    with pytest.raises(DataError, match=r"mask of '.*n2\.jpg': image '.*mask/Neutrophil/n2\.jpg' cannot be"):
        load_imagefolder(tmp_path, verify_images=True)
    (tmp_path / "data" / "Basophil" / "b1.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"class 'Basophil': image '.*b1\.jpg' cannot be decoded"):
        load_imagefolder(tmp_path, verify_images=True)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_imagefolder(tmp_path / "nope")
