"""Turning mask-generator records (or bare masks) into the annotation fields the file formats share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from samkit.errors import InputError
from samkit.masks.rle import rle_area, rle_to_mask, to_coco_rle


def as_mask(item: Any) -> np.ndarray:
    """bool (H, W) array from a mask (numpy/torch), an RLE dict, or a record with a 'segmentation'."""
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        if item.ndim != 2:
            raise InputError(f"a mask must be (H, W), got shape {item.shape}")
        return item.astype(bool, copy=False)
    if isinstance(item, Mapping):
        if "segmentation" in item:
            return as_mask(item["segmentation"])
        if "counts" in item:
            return rle_to_mask(dict(item))
    raise InputError(
        f"cannot read a mask from {type(item).__name__}; give a bool (H, W) array, an RLE dict, "
        "or a record with 'segmentation'"
    )


def record_fields(record: Mapping[str, Any], height: int, width: int) -> dict[str, Any]:
    """Segmentation (COCO RLE), bbox (XYWH), area and the optional scores of one record, as JSON types.

    Missing bbox/area are computed from the mask; keys the record lacks are left out (not invented).
    """
    if not isinstance(record, Mapping) or "segmentation" not in record:
        raise InputError("each record must be a dict with a 'segmentation' (mask or RLE)")
    rle = to_coco_rle(record["segmentation"])
    if tuple(rle["size"]) != (height, width):
        raise InputError(
            f"a mask of size {rle['size'][0]}x{rle['size'][1]} does not match the image size {height}x{width}"
        )
    out: dict[str, Any] = {"segmentation": rle}
    if record.get("bbox") is not None:
        out["bbox"] = _floats(record["bbox"], "bbox", 4)
    else:
        coco = {"size": rle["size"], "counts": rle["counts"].encode("utf-8")}
        out["bbox"] = [float(v) for v in mask_utils.toBbox(coco)]
    out["area"] = int(record["area"]) if record.get("area") is not None else rle_area(rle)
    for key in ("predicted_iou", "stability_score"):
        if record.get(key) is not None:
            out[key] = float(record[key])
    if record.get("crop_box") is not None:
        out["crop_box"] = _floats(record["crop_box"], "crop_box", 4)
    if record.get("point_coords") is not None:
        points = np.asarray(_tolist(record["point_coords"]), dtype=np.float64).reshape(-1, 2)
        out["point_coords"] = points.tolist()
    return out


def _tolist(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _floats(value: Any, name: str, n: int) -> list[float]:
    value = _tolist(value)
    if not isinstance(value, Sequence) or len(value) != n:
        raise InputError(f"'{name}' must be {n} numbers, got {value!r}")
    return [float(v) for v in value]
