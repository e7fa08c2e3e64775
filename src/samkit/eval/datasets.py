"""Readers of the evaluation data sets: RITM folders, COCO instances, SA-1B folders, BSDS500.

Every mask is an (H, W) bool array in original-image pixels. `open_dataset(path)` detects the layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from samkit.errors import InputError
from samkit.image import IMAGE_SUFFIXES


class DatasetError(InputError):
    """A data set path that is missing or in a layout samkit cannot read."""


@dataclass
class ObjectItem:
    """One object to segment: its image, its mask (H, W) bool, pixels to ignore (H, W) bool or None."""

    id: str
    image: Path
    mask: np.ndarray
    ignore: np.ndarray | None


@dataclass
class ImageItem:
    """One image with all of its object masks (each (H, W) bool) and an ignore mask (crowd) or None."""

    id: str
    image: Path
    masks: list[np.ndarray]
    ignore: np.ndarray | None


@dataclass
class EdgeItem:
    """One BSDS image with each annotator's boundary map, (H, W) bool."""

    id: str
    image: Path
    boundaries: list[np.ndarray]


class Dataset:
    """A data set on disk. `objects()` yields one ObjectItem per object; `images()` one ImageItem per image."""

    kind = "dataset"

    def __init__(self, root: Path) -> None:
        self.root = root

    def images(self) -> Iterator[ImageItem]:
        raise DatasetError(f"{self.root} is a {self.kind} set, which has no per-image instance masks")

    def objects(self) -> Iterator[ObjectItem]:
        for img in self.images():
            for k, mask in enumerate(img.masks):
                yield ObjectItem(f"{img.id}:{k}", img.image, mask, img.ignore)

    def edges(self) -> Iterator[EdgeItem]:
        raise DatasetError(f"{self.root} is a {self.kind} set without boundaries; use a BSDS500 folder")

    def __len__(self) -> int:
        return len(self._stems())

    def _stems(self) -> list:
        raise NotImplementedError


class MaskFolder(Dataset):
    """RITM layout: `images/<stem>.<ext>` + `masks/<stem>.png`, 255 object, 0 background, 128 ignore."""

    kind = "mask-folder"

    def _stems(self) -> list[tuple[str, Path]]:
        found = []
        for mask_path in sorted((self.root / "masks").glob("*.png")):
            image = next(
                (
                    p
                    for p in sorted((self.root / "images").glob(mask_path.stem + ".*"))
                    if p.suffix.lower() in IMAGE_SUFFIXES
                ),
                None,
            )
            if image is not None:
                found.append((mask_path.stem, image))
        return found

    def objects(self) -> Iterator[ObjectItem]:
        for stem, image in self._stems():
            label = np.asarray(Image.open(self.root / "masks" / f"{stem}.png").convert("L"))
            ignore = (label > 0) & (label < 255)
            yield ObjectItem(stem, image, label == 255, ignore if ignore.any() else None)

    def images(self) -> Iterator[ImageItem]:
        for obj in self.objects():
            yield ImageItem(obj.id, obj.image, [obj.mask], obj.ignore)


class CocoInstances(Dataset):
    """COCO instances JSON (polygons or RLE); images in `images/` next to it. Crowd regions are ignored."""

    kind = "coco"

    def __init__(self, annotations: Path) -> None:
        super().__init__(annotations.parent)
        try:
            data = json.loads(annotations.read_text())
            self._images = sorted(data["images"], key=lambda im: im["id"])
            anns = data["annotations"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"cannot read COCO annotations {annotations}: {exc}") from None
        self._anns: dict[int, list[dict]] = {}
        for ann in sorted(anns, key=lambda a: a["id"]):
            self._anns.setdefault(ann["image_id"], []).append(ann)

    def _stems(self) -> list[dict]:
        return self._images

    def images(self) -> Iterator[ImageItem]:
        for info in self._images:
            h, w = info["height"], info["width"]
            masks, crowd = [], np.zeros((h, w), dtype=bool)
            for ann in self._anns.get(info["id"], []):
                m = _coco_decode(ann["segmentation"], h, w)
                if ann.get("iscrowd", 0):
                    crowd |= m
                elif m.any():
                    masks.append(m)
            yield ImageItem(
                str(info["id"]),
                self.root / "images" / info["file_name"],
                masks,
                crowd if crowd.any() else None,
            )


def _coco_decode(seg, h: int, w: int) -> np.ndarray:
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode()
    return mask_utils.decode(rle).astype(bool)


class Sa1bFolder(Dataset):
    """SA-1B layout: `<name>.jpg` + `<name>.json` ({"image": ..., "annotations": [RLE masks]})."""

    kind = "sa1b"

    def _stems(self) -> list[tuple[Path, Path]]:
        pairs = []
        for js in sorted(self.root.glob("*.json")):
            image = next(
                (p for p in sorted(self.root.glob(js.stem + ".*")) if p.suffix.lower() in IMAGE_SUFFIXES),
                None,
            )
            if image is not None:
                pairs.append((js, image))
        return pairs

    def images(self) -> Iterator[ImageItem]:
        for js, image in self._stems():
            try:
                data = json.loads(js.read_text())
                info = data["image"]
                h, w = info["height"], info["width"]
                masks = [_coco_decode(a["segmentation"], h, w) for a in data["annotations"]]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DatasetError(f"cannot read SA-1B annotation {js}: {exc}") from None
            yield ImageItem(js.stem, image, [m for m in masks if m.any()], None)


class Bsds500(Dataset):
    """BSDS500: `groundTruth/<split>/<id>.mat` (cell array of annotators) + `images/<split>/<id>.jpg`."""

    kind = "bsds500"

    def __init__(self, gt_dir: Path, image_dir: Path) -> None:
        super().__init__(gt_dir)
        self.image_dir = image_dir

    def _stems(self) -> list[Path]:
        return sorted(self.root.glob("*.mat"))

    def edges(self) -> Iterator[EdgeItem]:
        for mat in self._stems():
            yield EdgeItem(mat.stem, self.image_dir / f"{mat.stem}.jpg", _bsds_annotations(mat, "Boundaries"))

    def images(self) -> Iterator[ImageItem]:
        """Every region of the first annotator as an object (BSDS has no single foreground)."""
        for mat in self._stems():
            seg = _bsds_annotations(mat, "Segmentation")[0]
            masks = [seg == label for label in np.unique(seg)]
            yield ImageItem(mat.stem, self.image_dir / f"{mat.stem}.jpg", masks, None)


def _bsds_annotations(mat: Path, field: str) -> list[np.ndarray]:
    from scipy.io import loadmat

    try:
        cells = loadmat(str(mat))["groundTruth"]
        return [np.asarray(cells[0, k][field][0, 0]) for k in range(cells.shape[1])]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise DatasetError(f"cannot read BSDS ground truth {mat}: {exc}") from None


def open_dataset(path: str | Path) -> Dataset:
    """Detect the layout of `path` and return its reader.

    Accepts a RITM folder (has `images/` and `masks/`), a COCO annotations JSON or a folder holding
    `annotations.json`, a BSDS500 root (reads the `test` split) or one of its `groundTruth/<split>`
    folders, or an SA-1B folder of `<name>.jpg` + `<name>.json`.
    """
    root = Path(path)
    if root.is_file() and root.suffix == ".json":
        return CocoInstances(root)
    if not root.is_dir():
        raise DatasetError(f"data set not found: {root}")
    if (root / "masks").is_dir() and (root / "images").is_dir():
        return MaskFolder(root)
    if (root / "annotations.json").is_file():
        return CocoInstances(root / "annotations.json")
    if (root / "groundTruth" / "test").is_dir():
        return Bsds500(root / "groundTruth" / "test", root / "images" / "test")
    if any(root.glob("*.mat")) and root.parent.name == "groundTruth":
        return Bsds500(root, root.parent.parent / "images" / root.name)
    if any(root.glob("*.json")):
        return Sa1bFolder(root)
    raise DatasetError(
        f"cannot tell the layout of {root}: expected images/+masks/, annotations.json, a BSDS500 root "
        "or an SA-1B folder of .jpg + .json"
    )
