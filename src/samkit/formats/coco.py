"""COCO instances JSON (one category) for mask-generator output, and a reader over COCO files."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samkit.errors import InputError
from samkit.formats._atomic import PathLike, atomic_write_json
from samkit.formats._records import record_fields

_IMAGE_KEYS = ("id", "file_name", "width", "height")


def coco_dict(
    images: Sequence[Mapping[str, Any]],
    annotations_per_image: Sequence[Sequence[Mapping[str, Any]]],
    category_name: str = "object",
) -> dict[str, Any]:
    """A COCO instances document: images, annotations (COCO RLE, XYWH bbox, iscrowd 0, score) and one category.

    images: dicts with id, file_name, width, height. annotations_per_image[i]: the records of images[i],
    each with a segmentation (mask or RLE) and optionally area, bbox (XYWH) and predicted_iou (written as
    `score`). Annotation ids run from 1 across all images.
    """
    if len(images) != len(annotations_per_image):
        raise InputError(
            f"got {len(images)} images but {len(annotations_per_image)} annotation lists; give one list per image"
        )
    out_images, out_anns = [], []
    ann_id = 1
    for info, records in zip(images, annotations_per_image, strict=True):
        missing = [k for k in _IMAGE_KEYS if k not in info]
        if missing:
            raise InputError(
                f"an image lacks {', '.join(missing)}; COCO images need {', '.join(_IMAGE_KEYS)}"
            )
        image = {
            "id": info["id"],
            "file_name": str(info["file_name"]),
            "width": int(info["width"]),
            "height": int(info["height"]),
        }
        out_images.append(image)
        for record in records:
            fields = record_fields(record, image["height"], image["width"])
            ann = {
                "id": ann_id,
                "image_id": image["id"],
                "category_id": 1,
                "segmentation": fields["segmentation"],
                "area": fields["area"],
                "bbox": fields["bbox"],
                "iscrowd": 0,
            }
            if "predicted_iou" in fields:
                ann["score"] = fields["predicted_iou"]
            out_anns.append(ann)
            ann_id += 1
    return {
        "info": {"description": "written by samkit"},
        "licenses": [],
        "images": out_images,
        "annotations": out_anns,
        "categories": [{"id": 1, "name": category_name, "supercategory": category_name}],
    }


def write_coco(
    path: PathLike,
    images: Sequence[Mapping[str, Any]],
    annotations_per_image: Sequence[Sequence[Mapping[str, Any]]],
    category_name: str = "object",
) -> Path:
    """Write a COCO instances JSON atomically (see `coco_dict` for the inputs). Returns the path."""
    return atomic_write_json(path, coco_dict(images, annotations_per_image, category_name))


def read_coco(path: PathLike) -> Iterator[tuple[dict[str, Any], list[tuple[np.ndarray, dict[str, Any]]]]]:
    """Yield (image_info, [(mask bool (H, W), annotation), ...]) per image of a COCO instances file.

    Polygons, uncompressed and compressed RLE are all decoded by pycocotools; crowd regions are returned
    too, recognisable by annotation["iscrowd"] == 1 (set to 0 where the file leaves it out).
    """
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise InputError(f"COCO file not found: {path}")
    try:
        # pycocotools prints progress to stdout; keep it off the user's terminal.
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(path))
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise InputError(f"{path} is not a COCO instances file ({exc})") from None
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        items = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None)):
            ann = dict(ann)
            ann.setdefault("iscrowd", 0)
            items.append((coco.annToMask(ann).astype(bool), ann))
        yield info, items
