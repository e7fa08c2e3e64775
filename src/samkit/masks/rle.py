"""Run-length encoding of masks in the COCO layout (column-major), through pycocotools.

Uncompressed RLE: {"size": [h, w], "counts": [int, ...]} with runs alternating 0s and 1s, starting with 0s.
COCO (compressed) RLE: {"size": [h, w], "counts": str}, the form SA-1B and COCO JSON files hold.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

from samkit.errors import InputError

MaskArray = np.ndarray | torch.Tensor


def mask_to_rle(masks: MaskArray) -> list[dict[str, Any]]:
    """Uncompressed RLEs of masks: bool (N, H, W) -> N dicts {"size": [H, W], "counts": [int]}.

    Runs are read down columns (COCO order). Equal to the reference's `mask_to_rle_pytorch`.
    """
    cols_first = _column_major(masks)
    b, w, h = cols_first.shape
    hw = h * w
    if b == 0 or hw == 0:
        return [{"size": [h, w], "counts": [hw]} for _ in range(b)]
    flat = cols_first.reshape(b, hw)
    # np.flatnonzero is several times faster than torch.nonzero on CPU.
    change = np.flatnonzero(flat[:, 1:] != flat[:, :-1])
    rows, ends = np.divmod(change, hw - 1)
    ends += 1  # a run ends just after each change position
    per_mask = np.bincount(rows, minlength=b)
    bounds = np.concatenate([[0], np.cumsum(per_mask)])
    # A run's length is its end minus the previous end in the same mask (0 for a mask's first run).
    prev = np.zeros_like(ends)
    prev[1:] = ends[:-1]
    prev[bounds[:-1][per_mask > 0]] = 0
    runs = (ends - prev).tolist()
    last_end = np.zeros(b, dtype=np.int64)
    has = per_mask > 0
    last_end[has] = ends[bounds[1:][has] - 1]
    final_run = (hw - last_end).tolist()
    starts_on = flat[:, 0].astype(bool).tolist()
    bounds_list = bounds.tolist()
    out = []
    for i in range(b):
        counts = [0] if starts_on[i] else []
        counts.extend(runs[bounds_list[i] : bounds_list[i + 1]])
        counts.append(final_run[i])
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Decode an uncompressed or COCO RLE to a bool (H, W) array (C order)."""
    h, w = _size(rle)
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        return mask_utils.decode(_as_bytes_rle(rle)).astype(bool)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != h * w or (counts < 0).any():
        raise InputError(
            f"RLE counts sum to {counts.sum()} but size {h}x{w} needs {h * w}; the RLE is corrupt"
        )
    values = (np.arange(len(counts)) % 2).astype(bool)
    return np.ascontiguousarray(np.repeat(values, counts).reshape(w, h).T)


def coco_encode_rle(uncompressed: dict[str, Any]) -> dict[str, Any]:
    """Compress an uncompressed RLE to COCO RLE {"size": [h, w], "counts": str} (JSON-serialisable)."""
    h, w = _size(uncompressed)
    rle = mask_utils.frPyObjects({"size": [h, w], "counts": list(uncompressed["counts"])}, h, w)
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("utf-8")}


def rle_area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of an uncompressed or COCO RLE."""
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        return int(mask_utils.area(_as_bytes_rle(rle)))
    return int(sum(counts[1::2]))


def coco_rle_areas(encoded: list[dict[str, Any]]) -> np.ndarray:
    """Foreground pixel counts (N,) int64 of pycocotools-encoded RLEs (counts as bytes), in one call per 255.

    pycocotools' `area` fails with numpy 2 on 256 or more RLEs at once (it builds a uint8 array from the
    count), so a segment-everything result with hundreds of masks must not pass them all together."""
    parts = [mask_utils.area(encoded[i : i + 255]) for i in range(0, len(encoded), 255)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def masks_to_coco_rle(masks: MaskArray) -> list[dict[str, Any]]:
    """COCO RLEs of bool (N, H, W) masks (torch or numpy) in one pycocotools call; the fast path to files."""
    cols_first = _column_major(masks)
    if cols_first.shape[0] == 0:
        return []
    # (N, W, H) in C order is (H, W, N) in Fortran order, the layout pycocotools encodes.
    encoded = mask_utils.encode(cols_first.transpose(2, 1, 0))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("utf-8")} for r in encoded]


def to_coco_rle(segmentation: Any) -> dict[str, Any]:
    """COCO RLE of a segmentation given as a bool (H, W) array/tensor, an uncompressed RLE or a COCO RLE."""
    if isinstance(segmentation, (np.ndarray, torch.Tensor)):
        if segmentation.ndim != 2:
            raise InputError(f"a mask must be (H, W), got shape {tuple(segmentation.shape)}")
        return masks_to_coco_rle(segmentation[None])[0]
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        counts = segmentation["counts"]
        if isinstance(counts, bytes):
            return {"size": list(_size(segmentation)), "counts": counts.decode("utf-8")}
        if isinstance(counts, str):
            return {"size": list(_size(segmentation)), "counts": counts}
        return coco_encode_rle(segmentation)
    raise InputError(
        f"cannot read a segmentation of type {type(segmentation).__name__}; "
        "give a bool (H, W) mask or an RLE dict with 'size' and 'counts'"
    )


def _column_major(masks: MaskArray) -> np.ndarray:
    """bool (N, H, W) torch/numpy masks -> uint8 (N, W, H) C-contiguous numpy, i.e. each mask column-major."""
    if masks.ndim != 3:
        raise InputError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    if isinstance(masks, torch.Tensor):
        if masks.device.type != "cpu":
            # Transpose on the accelerator, where it is cheap, and copy the result once.
            return masks.to(torch.uint8).transpose(1, 2).contiguous().cpu().numpy()
        masks = masks.detach().numpy()
    src = np.ascontiguousarray(masks, dtype=bool).view(np.uint8)
    n, h, w = src.shape
    out = np.empty((n, w, h), dtype=np.uint8)
    if h and w:
        # cv2.transpose is cache-blocked: about 3x faster than a numpy or torch transposed copy.
        for i in range(n):
            cv2.transpose(src[i], out[i])
    return out


def _size(rle: dict[str, Any]) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in rle["size"])
    except (KeyError, TypeError, ValueError):
        raise InputError("an RLE needs 'size': [height, width]") from None
    return h, w


def _as_bytes_rle(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": list(_size(rle)), "counts": counts.encode("utf-8") if isinstance(counts, str) else counts}
