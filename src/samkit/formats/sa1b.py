"""The SA-1B per-image JSON: {"image": {...}, "annotations": [...]}, one file per image.

Annotation fields, in the published order: id, segmentation (COCO RLE), bbox (XYWH), area, predicted_iou,
stability_score, crop_box (XYWH), point_coords ([[x, y]], original-image pixels).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samkit.errors import InputError
from samkit.formats._atomic import PathLike, atomic_write_json
from samkit.formats._records import record_fields
from samkit.masks.rle import rle_to_mask

_IMAGE_KEYS = ("image_id", "width", "height", "file_name")


def sa1b_dict(image_info: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The SA-1B document for one image.

    image_info: image_id, width, height, file_name. records: mask-generator outputs, each with
    segmentation (bool (H, W) mask, uncompressed or COCO RLE), predicted_iou, stability_score,
    point_coords and optionally id, area, bbox and crop_box (XYWH; the whole image when absent).
    """
    missing = [k for k in _IMAGE_KEYS if k not in image_info]
    if missing:
        raise InputError(f"image_info lacks {', '.join(missing)}; SA-1B needs {', '.join(_IMAGE_KEYS)}")
    image = {
        "image_id": image_info["image_id"],
        "width": int(image_info["width"]),
        "height": int(image_info["height"]),
        "file_name": str(image_info["file_name"]),
    }
    h, w = image["height"], image["width"]
    annotations = []
    for i, record in enumerate(records):
        fields = record_fields(record, h, w)
        lacking = [k for k in ("predicted_iou", "stability_score", "point_coords") if k not in fields]
        if lacking:
            raise InputError(f"record {i} lacks {', '.join(lacking)}, which SA-1B annotations require")
        annotations.append(
            {
                "id": int(record["id"]) if record.get("id") is not None else i,
                "segmentation": fields["segmentation"],
                "bbox": fields["bbox"],
                "area": fields["area"],
                "predicted_iou": fields["predicted_iou"],
                "stability_score": fields["stability_score"],
                "crop_box": fields.get("crop_box", [0.0, 0.0, float(w), float(h)]),
                "point_coords": fields["point_coords"],
            }
        )
    return {"image": image, "annotations": annotations}


def write_sa1b(path: PathLike, image_info: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Path:
    """Write one image's SA-1B JSON atomically (see `sa1b_dict` for the inputs). Returns the path."""
    return atomic_write_json(path, sa1b_dict(image_info, records))


def read_sa1b(path: PathLike) -> dict[str, Any]:
    """Load an SA-1B JSON as a dict with "image" and "annotations" (segmentations stay COCO RLE)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"SA-1B file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); is the file truncated?") from None
    if not isinstance(data, dict) or "image" not in data or "annotations" not in data:
        raise InputError(f"{path} is not an SA-1B file: it needs 'image' and 'annotations'")
    return data


def sa1b_masks(data: Mapping[str, Any]) -> np.ndarray:
    """Decode the annotations of a loaded SA-1B dict to bool masks (N, H, W)."""
    h, w = int(data["image"]["height"]), int(data["image"]["width"])
    masks = [rle_to_mask(a["segmentation"]) for a in data["annotations"]]
    return np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
