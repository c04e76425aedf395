"""Reading cell images and segmentation masks from disk, the same way everywhere.

Microscopes and slide scanners write more than 8-bit RGB: 16-bit greyscale or
RGB TIFF/PNG, images with an EXIF orientation, RGBA with a transparent
background, palette images, and masks stored either as ``{0, 255}`` or as
``{0, 1}``. :func:`read_image` turns each into the 8-bit image a transform
expects, and :func:`read_mask` into weights in ``[0, 1]``:

- 16-bit (``I;16``, ``I;16B``, 32-bit ``I``) images are scaled from the full
  16-bit range to 8 bits (``value / 257``), not clipped to white;
  floating-point (``F``) images are taken to lie in ``[0, 1]``;
- the EXIF orientation is applied;
- transparency (RGBA, LA, palette with a transparent colour) is composited on
  white, the colour of an empty slide, not on black;
- images above :data:`MAX_PIXELS` pixels are refused before they are decoded
  (a 10,000 × 10,000 PNG would take gigabytes), with an error naming the file.

Every failure is a :class:`~milcell.exceptions.DataError` naming the file.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> import numpy as np
>>> from PIL import Image
>>> d = Path(tempfile.mkdtemp())
>>> Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(d / "cell16.png")
>>> np.asarray(read_image(d / "cell16.png"))[0, 0].tolist()  # 16-bit white is 8-bit white
[255, 255, 255]
>>> Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(d / "grey16.png")
>>> np.asarray(read_image(d / "grey16.png"))[0, 0].tolist()  # mid-grey stays mid-grey
[128, 128, 128]
>>> Image.fromarray(np.eye(4, dtype=np.uint8)).save(d / "mask01.png")  # a {0, 1} mask
>>> float(read_mask(d / "mask01.png").max())
1.0
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from milcell.exceptions import DataError

__all__ = ["MAX_PIXELS", "mask_weights", "read_image", "read_mask"]

logger = logging.getLogger("milcell")

#: Largest image (width × height) milcell decodes: 40 megapixels, far above any cell crop or
#: blood-smear tile (a 2,000 × 2,000 tile is 4 megapixels), far below what exhausts memory.
MAX_PIXELS = 40_000_000

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def _open(path: Path, owner: str, max_pixels: int) -> Image.Image:
    prefix = f"{owner}: " if owner else ""
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) between its two limits; we apply our own limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        width, height = image.size
        if width * height > max_pixels:
            image.close()
            raise DataError(
                f"{prefix}image {str(path)!r} is {width}x{height} = {width * height:,} pixels, above the "
                f"limit of {max_pixels:,} (milcell.data.images.MAX_PIXELS); crop or downscale it first"
            )
        with image:
            image.load()
            return ImageOps.exif_transpose(image) or image
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{prefix}cannot read image {str(path)!r}: {exc}") from exc


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit integer and float images to 8-bit greyscale (``L``)."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64) / 257.0
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64) * 255.0
    else:
        return image
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _composite_on_white(image: Image.Image) -> Image.Image:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image


def read_image(
    path: str | os.PathLike[str], mode: str = "RGB", *, owner: str = "", max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Read an image fully, normalised to 8 bits, oriented, and converted to ``mode``.

    Parameters
    ----------
    path : str or os.PathLike
        The image file (any format PIL reads).
    mode : str, default "RGB"
        The PIL mode of the result, e.g. ``"RGB"`` or ``"L"``.
    owner : str, default ""
        Who the image belongs to (``"patient 'P1'"``), put at the start of error messages.
    max_pixels : int, default MAX_PIXELS
        Images with more pixels are refused before decoding.

    Returns
    -------
    PIL.Image.Image
        An ``(H, W)`` image in ``mode``; 16-bit input scaled to 8 bits, transparency on white.

    Raises
    ------
    DataError
        The file cannot be read or decoded, or is larger than ``max_pixels``.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> path = Path(tempfile.mkdtemp()) / "clear.png"
    >>> Image.new("RGBA", (2, 2), (0, 0, 0, 0)).save(path)  # fully transparent
    >>> read_image(path).getpixel((0, 0))  # composited on white, not black
    (255, 255, 255)
    """
    image = _composite_on_white(_to_eight_bit(_open(Path(path), owner, max_pixels)))
    return image if image.mode == mode else image.convert(mode)


def read_mask(path: str | os.PathLike[str], *, owner: str = "", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a segmentation mask as float32 weights in ``[0, 1]``, shape ``(H, W)``.

    Both conventions are accepted: a mask whose largest value is at most 1 is a ``{0, 1}``
    mask and is used as it is; otherwise grey levels are divided by 255 (``{0, 255}`` masks
    and soft masks).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from PIL import Image
    >>> path = Path(tempfile.mkdtemp()) / "m.png"
    >>> Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).save(path)
    >>> read_mask(path).tolist()
    [[0.0, 1.0], [1.0, 0.0]]
    """
    return mask_weights(read_image(path, "L", owner=owner, max_pixels=max_pixels))


def mask_weights(mask: Image.Image) -> np.ndarray:
    """Weights in ``[0, 1]``, shape ``(H, W)``, of an 8-bit mask in either convention.

    A mask whose largest value is at most 1 is a ``{0, 1}`` mask; otherwise grey levels are
    divided by 255.

    Examples
    --------
    >>> from PIL import Image
    >>> mask_weights(Image.new("L", (2, 1), 1)).tolist()
    [[1.0, 1.0]]
    """
    grey = np.asarray(mask.convert("L") if mask.mode != "L" else mask, dtype=np.float32)
    if grey.size and grey.max() <= 1.0:
        return grey
    return grey / 255.0
