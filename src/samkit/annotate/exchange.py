"""Export a project to SA-1B or COCO files, and import existing COCO / SA-1B annotations for correction."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samkit.annotate.store import ObjectRecord, Store
from samkit.errors import InputError

FORMATS = ("sa1b", "coco")


def export_project(store: Store, out: str | Path, fmt: str) -> list[Path]:
    """Write every image that has objects: SA-1B (one `<stem>.json` per image) or COCO (`annotations.json`).

    COCO gets one category per distinct label; SA-1B keeps each object's label in an extra `label` field.
    Returns the files written.
    """
    from samkit.formats import atomic_write_json, coco_dict, sa1b_dict

    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = [im for im in store.images() if im["objects"] > 0]
    for im in images:
        if im["width"] is None or im["height"] is None:
            raise InputError(f"the size of image {im['path']} is unknown; restore the file and rerun")
    per_image = [store.objects(im["id"]) for im in images]
    if fmt == "sa1b":
        written = []
        used: set[str] = set()
        for im, objs in zip(images, per_image, strict=True):
            info = {
                "image_id": im["id"],
                "width": im["width"],
                "height": im["height"],
                "file_name": im["path"],
            }
            doc = sa1b_dict(info, [_sa1b_record(o) for o in objs])
            for ann, o in zip(doc["annotations"], objs, strict=True):
                ann["label"] = o.label
            name = _unique_name(Path(im["path"]).stem, used)
            written.append(atomic_write_json(out / f"{name}.json", doc))
        return written
    infos = [
        {"id": im["id"], "file_name": im["path"], "width": im["width"], "height": im["height"]}
        for im in images
    ]
    records = [[_coco_record(o) for o in objs] for objs in per_image]
    doc = coco_dict(infos, records)
    labels = sorted({o.label for objs in per_image for o in objs})
    cat_ids = {label: i + 1 for i, label in enumerate(labels)}
    doc["categories"] = [{"id": cat_ids[n], "name": n, "supercategory": n} for n in labels]
    flat = [o for objs in per_image for o in objs]
    for ann, o in zip(doc["annotations"], flat, strict=True):
        ann["category_id"] = cat_ids[o.label]
        ann["source"] = o.source
    return [atomic_write_json(out / "annotations.json", doc)]


def import_annotations(
    store: Store, files: Sequence[str | Path], annotator: str = "import"
) -> dict[str, int]:
    """Load COCO instance files or SA-1B per-image JSONs (or folders of them) as objects with source=import.

    Images are matched by `file_name` relative to the project's images folder, then by file name alone.
    Returns counts: {"objects": n, "images": m, "skipped_images": k}.
    """
    paths: list[Path] = []
    for f in files:
        p = Path(f)
        if p.is_dir():
            paths.extend(sorted(p.glob("*.json")))
        elif p.is_file():
            paths.append(p)
        else:
            raise InputError(f"annotation file not found: {p}")
    if not paths:
        raise InputError("no .json annotation files to import")
    counts = {"objects": 0, "images": 0, "skipped_images": 0}
    for p in paths:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{p} is not valid JSON ({exc})") from None
        if isinstance(data, dict) and "image" in data and "annotations" in data:
            _import_sa1b(store, data, annotator, counts)
        elif isinstance(data, dict) and "images" in data and "annotations" in data:
            _import_coco(store, p, data, annotator, counts)
        else:
            raise InputError(f"{p} is neither COCO (images/annotations) nor SA-1B (image/annotations)")
    return counts


def _import_sa1b(store: Store, data: dict[str, Any], annotator: str, counts: dict[str, int]) -> None:
    info = data["image"]
    image = _match_image(store, str(info.get("file_name", "")))
    if image is None:
        counts["skipped_images"] += 1
        return
    h, w = int(info["height"]), int(info["width"])
    items = []
    for ann in data["annotations"]:
        items.append({**_item(ann, h, w), "label": str(ann.get("label") or "object")})
    _add(store, image, items, annotator, counts)


def _import_coco(
    store: Store, path: Path, data: dict[str, Any], annotator: str, counts: dict[str, int]
) -> None:
    from samkit.formats import read_coco

    names = {c["id"]: str(c.get("name") or "object") for c in data.get("categories", [])}
    for info, anns in read_coco(path):
        image = _match_image(store, str(info.get("file_name", "")))
        if image is None:
            counts["skipped_images"] += 1
            continue
        h, w = int(info["height"]), int(info["width"])
        items = []
        for mask, ann in anns:
            if ann.get("iscrowd"):
                continue
            record = {"segmentation": mask, "predicted_iou": ann.get("score")}
            items.append({**_item(record, h, w), "label": names.get(ann.get("category_id"), "object")})
        _add(store, image, items, annotator, counts)


def _item(record: dict[str, Any], h: int, w: int) -> dict[str, Any]:
    """Store fields of an annotation whose segmentation is a mask or an RLE of an (h, w) image."""
    from pycocotools import mask as mask_utils

    from samkit.masks import to_coco_rle

    if "segmentation" not in record:
        raise InputError("an annotation lacks its 'segmentation'")
    rle = to_coco_rle(record["segmentation"])
    if tuple(rle["size"]) != (h, w):
        raise InputError(
            f"a mask of size {rle['size'][0]}x{rle['size'][1]} does not match its image ({h}x{w})"
        )
    encoded = {"size": rle["size"], "counts": rle["counts"].encode()}
    points = record.get("point_coords") or []
    return {
        "rle": rle,
        "bbox": [float(v) for v in mask_utils.toBbox(encoded)],
        "area": int(mask_utils.area(encoded)),
        "predicted_iou": record.get("predicted_iou"),
        "stability_score": record.get("stability_score"),
        "prompt": {"points": [[float(x), float(y), 1] for x, y in points], "box": None} if points else None,
    }


def _add(
    store: Store, image: dict[str, Any], items: list[dict[str, Any]], annotator: str, counts: dict[str, int]
) -> None:
    size = [image["height"], image["width"]]
    for item in items:
        if image["height"] is not None and list(item["rle"]["size"]) != size:
            raise InputError(
                f"annotations for {image['path']} are {item['rle']['size'][0]}x{item['rle']['size'][1]} "
                f"but the image is {size[0]}x{size[1]}"
            )
    store.add_objects(image["id"], items, source="import", annotator=annotator)
    counts["objects"] += len(items)
    counts["images"] += 1


def _match_image(store: Store, file_name: str) -> dict[str, Any] | None:
    rel = file_name.replace("\\", "/").lstrip("./")
    image = store.image_by_path(rel)
    if image is not None:
        return image
    base = Path(rel).name
    matches = [im for im in store.images() if Path(im["path"]).name == base]
    return matches[0] if len(matches) == 1 else None


def _sa1b_record(o: ObjectRecord) -> dict[str, Any]:
    return {
        "id": o.id,
        "segmentation": o.rle,
        "bbox": o.bbox,
        "area": o.area,
        "predicted_iou": o.predicted_iou if o.predicted_iou is not None else 1.0,
        "stability_score": o.stability_score if o.stability_score is not None else 1.0,
        "point_coords": _point_coords(o),
    }


def _coco_record(o: ObjectRecord) -> dict[str, Any]:
    record: dict[str, Any] = {"segmentation": o.rle, "bbox": o.bbox, "area": o.area}
    if o.predicted_iou is not None:
        record["predicted_iou"] = o.predicted_iou
    return record


def _point_coords(o: ObjectRecord) -> list[list[float]]:
    """The prompt's foreground points, else the box centre, else the bbox centre (SA-1B wants one point)."""
    prompt = o.prompt or {}
    pts = [[float(p[0]), float(p[1])] for p in prompt.get("points") or [] if len(p) < 3 or p[2] == 1]
    if pts:
        return pts
    box = prompt.get("box")
    if box:
        return [[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]]
    x, y, w, h = o.bbox
    return [[x + w / 2, y + h / 2]]


def _unique_name(stem: str, used: set[str]) -> str:
    name, i = stem, 1
    while name in used:
        i += 1
        name = f"{stem}_{i}"
    used.add(name)
    return name
