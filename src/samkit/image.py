"""Reading images into the one array layout samkit works in: H x W x 3 uint8 RGB."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from samkit.errors import ImageError

ImageLike = np.ndarray | Image.Image | str | Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# samkit's own limit (`max_pixels`) is checked first; PIL's decompression-bomb guard only stays as a
# backstop above it, so PIL must not refuse what samkit was told to accept.
Image.MAX_IMAGE_PIXELS = 1_000_000_000

MAX_PIXELS_ENV = "SAMKIT_MAX_PIXELS"
# 100 megapixels: every current camera's photo but the largest medium-format ones. A decoded image costs
# ~15 bytes per pixel on its way through the model (20000 x 20000 took 4.6-7.5 GB).
DEFAULT_MAX_PIXELS = 100_000_000

# EXIF orientations 5-8 turn the stored image by 90 degrees: width and height swap on display.
_SWAPS_SIDES = (5, 6, 7, 8)
_ORIENTATION_TAG = 0x0112


def max_pixels() -> int:
    """The largest image (width x height) samkit reads: `$SAMKIT_MAX_PIXELS`, else 100 million."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value < 1:
        raise ImageError(f"{MAX_PIXELS_ENV} must be a positive number of pixels, got {text!r}")
    return value


def check_pixels(width: int, height: int, what: str = "image") -> None:
    """Raise ImageError when a `width` x `height` image is over `max_pixels()`."""
    limit = max_pixels()
    if width * height > limit:
        raise ImageError(
            f"{what} is {width}x{height} = {width * height:,} pixels, more than the limit of {limit:,}; "
            f"shrink it, or raise the limit with {MAX_PIXELS_ENV}=N"
        )


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file as viewers show it (EXIF orientation applied), from the header
    only. Raises ImageError for a missing or unreadable file."""
    path = Path(path)
    try:
        with Image.open(path) as pil:
            w, h = pil.size
            return (h, w) if _orientation(pil) in _SWAPS_SIDES else (w, h)
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from None


def load_image(image: ImageLike) -> np.ndarray:
    """Return `image` as an (H, W, 3) uint8 RGB array, in the frame viewers show.

    Accepts a path, a PIL image (any mode: gray, RGBA and palette are converted) or a numpy array that is
    (H, W) gray or (H, W, 3|4) with dtype uint8 (floats in [0, 1] are scaled). A file's or PIL image's
    EXIF orientation is applied, so pixel coordinates match what an image viewer shows. Images over
    `max_pixels()` are refused from the file header, before decoding. Raises `ImageError` with a
    one-line message for anything else (a missing or corrupt file, a 3D volume, an empty array).
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image not found: {path}")
        try:
            with Image.open(path) as pil:
                check_pixels(*pil.size, what=f"image {path}")
                pil.load()
                return _from_pil(pil)
        except ImageError:
            raise
        except (
            UnidentifiedImageError,
            Image.DecompressionBombError,
            OSError,
            SyntaxError,
            ValueError,
        ) as exc:
            raise ImageError(f"cannot read image {path}: {exc}") from None
    if isinstance(image, Image.Image):
        check_pixels(*image.size)
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        if image.ndim >= 2:
            check_pixels(image.shape[1], image.shape[0])
        return _from_array(image)
    raise ImageError(f"expected a path, a PIL image or a numpy array, got {type(image).__name__}")


def _orientation(pil: Image.Image) -> int:
    try:
        return int(pil.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a damaged EXIF block must not make a readable image unreadable
        return 1


def _from_pil(pil: Image.Image) -> np.ndarray:
    if _orientation(pil) not in (0, 1):
        pil = ImageOps.exif_transpose(pil)
    if pil.mode in ("I;16", "I;16B", "I", "F"):
        arr = np.asarray(pil, dtype=np.float64)
        span = max(float(arr.max() - arr.min()), 1e-12)
        return _from_array(((arr - arr.min()) / span * 255.0).round().astype(np.uint8))
    return _from_array(np.asarray(pil.convert("RGB")))


def _from_array(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f"expected an (H, W) gray or (H, W, 3) RGB image, got an array of shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"image is empty (shape {arr.shape})")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)
