"""Reading cell images and masks: bit depth, orientation, transparency, size limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from milcell.data.images import read_image, read_mask
from milcell.exceptions import DataError


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_images_are_scaled_not_clipped_to_white(tmp_path: Path, suffix: str) -> None:
    # Regression: convert("RGB") clipped every 16-bit value above 255 to white.
    ramp = np.linspace(0, 65535, 16, dtype=np.uint16).reshape(4, 4)
    path = tmp_path / f"cell16{suffix}"
    Image.fromarray(ramp).save(path)
    out = np.asarray(read_image(path))
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert len(np.unique(out)) == 16  # the ramp survives


def test_float_images_in_unit_range_are_scaled(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    Image.fromarray(np.full((3, 3), 0.5, dtype=np.float32), mode="F").save(path)
    assert np.asarray(read_image(path, "L"))[0, 0] == 128


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)  # 4 wide, 2 high
    pixels[:, :2] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=100)
    assert read_image(path).size == (2, 4)  # (width, height) after rotation


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    # Regression: convert("RGB") dropped alpha, turning a transparent background black.
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 10, 255)  # one opaque red pixel, the rest transparent black
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    out = np.asarray(read_image(path))
    assert out[0, 0].tolist() == [200, 10, 10]
    assert out[1, 1].tolist() == [255, 255, 255]


@pytest.mark.parametrize(("high", "expected"), [(1, 1.0), (255, 1.0), (128, 128 / 255)])
def test_masks_accept_both_conventions(tmp_path: Path, high: int, expected: float) -> None:
    # Regression: a {0, 1} mask was divided by 255, blacking out the cell.
    path = tmp_path / "mask.png"
    Image.fromarray(np.array([[0, high]], dtype=np.uint8)).save(path)
    np.testing.assert_allclose(read_mask(path), [[0.0, expected]], rtol=1e-6)


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    Image.new("RGB", (200, 100)).save(path)
    with pytest.raises(DataError, match=r"patient 'P1': image .*huge.png.* 200x100 = 20,000 pixels"):
        read_image(path, owner="patient 'P1'", max_pixels=10_000)
    assert read_image(path, max_pixels=20_000).size == (200, 100)


def test_undecodable_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=r"patient 'P2': cannot read image .*broken.png"):
        read_image(path, owner="patient 'P2'")
