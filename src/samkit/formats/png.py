"""Masks as PNG files: one 0/255 PNG per mask, or one label map holding them all."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from samkit.errors import InputError
from samkit.formats._atomic import PathLike, atomic_write_bytes
from samkit.formats._records import as_mask


def write_mask_pngs(directory: PathLike, masks: Sequence[Any], prefix: str = "mask") -> list[Path]:
    """Write each mask (bool (H, W), RLE or record) as `<prefix>_<i>.png` with values 0/255.

    Indices are zero-padded to the same width so the files sort in mask order. Returns the paths.
    """
    directory = Path(directory)
    digits = max(4, len(str(len(masks) - 1)))
    paths = []
    for i, item in enumerate(masks):
        image = as_mask(item).astype(np.uint8) * 255
        paths.append(atomic_write_bytes(directory / f"{prefix}_{i:0{digits}d}.png", _encode_png(image)))
    return paths


def read_mask_png(path: PathLike) -> np.ndarray:
    """Read a mask PNG as bool (H, W): any non-zero pixel is foreground."""
    image = _read_png(path)
    if image.ndim == 3:
        image = image.max(axis=2)
    return image > 0


def label_map(masks: Sequence[Any]) -> np.ndarray:
    """(H, W) int32 map with value i + 1 where masks[i] is visible and 0 on background.

    Larger masks are painted first so smaller ones stay visible where masks overlap.
    """
    arrays = [as_mask(m) for m in masks]
    if not arrays:
        raise InputError("no masks to put in a label map")
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise InputError("all masks of a label map must have the same (H, W)")
    areas = np.array([a.sum() for a in arrays])
    labels = np.zeros(shape, dtype=np.int32)
    # Stable sort: equal areas keep their order, the later mask on top.
    for i in np.argsort(-areas, kind="stable"):
        labels[arrays[i]] = i + 1
    return labels


def write_label_map(path: PathLike, masks: Sequence[Any]) -> Path:
    """Write `label_map(masks)` as a PNG: 8-bit for up to 255 masks, 16-bit up to 65535. Returns the path."""
    if len(masks) > 65535:
        raise InputError(
            f"a PNG label map holds at most 65535 masks, got {len(masks)}; write mask PNGs instead"
        )
    labels = label_map(masks)
    dtype = np.uint8 if len(masks) <= 255 else np.uint16
    return atomic_write_bytes(path, _encode_png(labels.astype(dtype)))


def read_label_map(path: PathLike) -> np.ndarray:
    """Read a label-map PNG as an int32 (H, W) array (0 = background, i + 1 = mask i)."""
    image = _read_png(path)
    if image.ndim != 2:
        raise InputError(f"{path} is not a single-channel label map")
    return image.astype(np.int32)


def label_map_to_masks(labels: np.ndarray, n: int | None = None) -> np.ndarray:
    """bool (N, H, W) masks of the visible part of each label 1..N (N defaults to the largest label)."""
    n = int(labels.max()) if n is None else n
    return labels[None] == np.arange(1, n + 1)[:, None, None]


def _encode_png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise InputError(f"cannot encode a {image.dtype} array of shape {image.shape} as PNG")
    return buf.tobytes()


def _read_png(path: PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"PNG not found: {path}")
    # np.fromfile + imdecode also handles non-ASCII paths, which cv2.imread does not on Windows.
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputError(f"cannot decode {path} as an image; is it a PNG?")
    return image
