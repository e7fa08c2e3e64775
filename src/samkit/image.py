"""Reading images into the one array layout samkit works in: H x W x 3 uint8 RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from samkit.errors import ImageError

ImageLike = np.ndarray | Image.Image | str | Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# A valid but huge image should be read, not refused as a decompression bomb; 1 gigapixel is the limit.
Image.MAX_IMAGE_PIXELS = 1_000_000_000


def load_image(image: ImageLike) -> np.ndarray:
    """Return `image` as an (H, W, 3) uint8 RGB array.

    Accepts a path, a PIL image (any mode: gray, RGBA and palette are converted) or a numpy array that is
    (H, W) gray or (H, W, 3|4) with dtype uint8 (floats in [0, 1] are scaled). Raises `ImageError` with a
    one-line message for anything else (a missing or corrupt file, a 3D volume, an empty array).
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"image not found: {path}")
        try:
            with Image.open(path) as pil:
                pil.load()
                return _from_pil(pil)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"cannot read image {path}: {exc}") from None
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        return _from_array(image)
    raise ImageError(f"expected a path, a PIL image or a numpy array, got {type(image).__name__}")


def _from_pil(pil: Image.Image) -> np.ndarray:
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
