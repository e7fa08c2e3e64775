"""samkit.formats: files load with pycocotools and decode back to the masks written; writes are atomic."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import samkit.formats._atomic as atomic_mod
from samkit.errors import InputError
from samkit.formats import (
    atomic_write_bytes,
    atomic_write_json,
    label_map,
    label_map_to_masks,
    overlay,
    palette,
    read_coco,
    read_label_map,
    read_mask_png,
    read_sa1b,
    sa1b_masks,
    save_overlay,
    write_coco,
    write_label_map,
    write_mask_pngs,
    write_sa1b,
)
from samkit.masks import mask_to_rle, masks_to_coco_rle

H, W = 30, 40


def make_masks(n: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, H, W), dtype=bool)
    for i in range(n):
        y, x = rng.integers(0, H - 5), rng.integers(0, W - 5)
        masks[i, y : y + rng.integers(3, H - y), x : x + rng.integers(3, W - x)] = True
    masks[0, 0, 0] = True
    return masks


def make_records(masks: np.ndarray) -> list[dict]:
    """Records in the shapes a mask generator hands over: a bool mask, an uncompressed RLE, a COCO RLE."""
    forms = [
        lambda m: m,
        lambda m: mask_to_rle(torch.from_numpy(m)[None])[0],
        lambda m: masks_to_coco_rle(m[None])[0],
        lambda m: torch.from_numpy(m),
    ]
    records = []
    for i, m in enumerate(masks):
        records.append(
            {
                "segmentation": forms[i % len(forms)](m),
                "predicted_iou": np.float32(0.9 - i / 100),
                "stability_score": 0.95,
                "point_coords": [[float(i), 2.0]],
                "crop_box": [0, 0, W, H],
            }
        )
    return records


def test_sa1b_round_trip_and_format(tmp_path):
    masks = make_masks()
    path = tmp_path / "sa_1.json"
    write_sa1b(path, {"image_id": 1, "width": W, "height": H, "file_name": "sa_1.jpg"}, make_records(masks))
    raw = json.loads(path.read_text())
    assert list(raw) == ["image", "annotations"]
    assert raw["image"] == {"image_id": 1, "width": W, "height": H, "file_name": "sa_1.jpg"}
    ann = raw["annotations"][0]
    assert list(ann) == [
        "id",
        "segmentation",
        "bbox",
        "area",
        "predicted_iou",
        "stability_score",
        "crop_box",
        "point_coords",
    ]
    assert isinstance(ann["segmentation"]["counts"], str) and ann["segmentation"]["size"] == [H, W]
    assert ann["point_coords"] == [[0.0, 2.0]]
    for a, m in zip(raw["annotations"], masks, strict=True):
        rle = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), m)
        assert a["area"] == int(m.sum())
        ys, xs = np.nonzero(m)
        # Computed boxes agree with pycocotools (XYWH, exclusive width).
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    data = read_sa1b(path)
    assert np.array_equal(sa1b_masks(data), masks)
    assert [a["id"] for a in data["annotations"]] == [0, 1, 2, 3]


def test_sa1b_rejects_bad_input(tmp_path):
    info = {"image_id": 1, "width": W, "height": H, "file_name": "x.jpg"}
    with pytest.raises(InputError, match="file_name"):
        write_sa1b(tmp_path / "a.json", {"image_id": 1, "width": W, "height": H}, [])
    wrong_size = make_records(make_masks())[:1]
    wrong_size[0]["segmentation"] = np.zeros((H + 1, W), dtype=bool)
    with pytest.raises(InputError, match="does not match"):
        write_sa1b(tmp_path / "a.json", info, wrong_size)
    with pytest.raises(InputError, match="predicted_iou"):
        write_sa1b(
            tmp_path / "a.json", info, [{"segmentation": np.zeros((H, W), bool), "stability_score": 1}]
        )
    assert not (tmp_path / "a.json").exists()
    (tmp_path / "half.json").write_text('{"image": {')
    with pytest.raises(InputError, match="truncated"):
        read_sa1b(tmp_path / "half.json")


def test_coco_round_trip_with_pycocotools(tmp_path):
    first, second = make_masks(3, seed=1), make_masks(2, seed=2)
    images = [
        {"id": 7, "file_name": "a.jpg", "width": W, "height": H},
        {"id": 9, "file_name": "b.jpg", "width": W, "height": H},
    ]
    path = tmp_path / "out" / "instances.json"
    write_coco(path, images, [make_records(first), make_records(second)], category_name="thing")
    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [7, 9]
    assert coco.loadCats(coco.getCatIds())[0]["name"] == "thing"
    ann_ids = coco.getAnnIds(imgIds=[7])
    anns = coco.loadAnns(ann_ids)
    assert [a["id"] for a in anns] == [1, 2, 3]
    assert all(a["iscrowd"] == 0 and a["category_id"] == 1 for a in anns)
    assert anns[0]["score"] == pytest.approx(0.9)
    for a, m in zip(anns, first, strict=True):
        assert np.array_equal(coco.annToMask(a).astype(bool), m)
    # Results loading (the path evaluation takes) accepts the annotations as detections.
    dets = coco.loadRes(coco.dataset["annotations"])
    assert len(dets.getAnnIds()) == 5

    got = list(read_coco(path))
    assert [info["id"] for info, _ in got] == [7, 9]
    for (_, items), expected in zip(got, [first, second], strict=True):
        assert np.array_equal(np.stack([m for m, _ in items]), expected)
        assert all(ann["iscrowd"] == 0 for _, ann in items)


def test_read_coco_flags_crowd_and_decodes_polygons(tmp_path):
    doc = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 8}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1, "bbox": [0, 0, 4, 4],
             "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
            {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 1, "bbox": [0, 0, 1, 1],
             "segmentation": {"size": [8, 10], "counts": [0, 3, 77]}},
        ],
        "categories": [{"id": 1, "name": "x"}],
    }  # fmt: skip
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(doc))
    [(info, items)] = list(read_coco(path))
    assert info["width"] == 10
    (poly_mask, poly_ann), (crowd_mask, crowd_ann) = items
    assert poly_mask.shape == (8, 10) and poly_mask[1:3, 1:3].all() and not poly_mask[6:, 6:].any()
    assert crowd_ann["iscrowd"] == 1 and crowd_mask.sum() == 3 and crowd_mask[:3, 0].all()
    with pytest.raises(InputError):
        list(read_coco(tmp_path / "missing.json"))


def test_mask_pngs_round_trip(tmp_path):
    masks = make_masks()
    paths = write_mask_pngs(tmp_path / "pngs", list(masks), prefix="img")
    assert [p.name for p in paths] == ["img_0000.png", "img_0001.png", "img_0002.png", "img_0003.png"]
    for p, m in zip(paths, masks, strict=True):
        assert np.array_equal(read_mask_png(p), m)
    assert not list((tmp_path / "pngs").glob(".*"))


def test_label_map_round_trip_and_small_on_top(tmp_path):
    masks = np.zeros((3, H, W), dtype=bool)
    masks[0, :10] = True
    masks[1, 20:] = True
    masks[2, 12:15, 5:9] = True
    path = write_label_map(tmp_path / "labels.png", list(masks))
    labels = read_label_map(path)
    assert labels.shape == (H, W) and labels.max() == 3
    assert np.array_equal(label_map_to_masks(labels, 3), masks)
    # Overlap: the big mask is painted first, so the small one inside it stays visible.
    big, small = np.ones((H, W), bool), np.zeros((H, W), bool)
    small[3:5, 3:5] = True
    lm = label_map([small, big])
    assert (lm[3:5, 3:5] == 1).all() and (lm[small == 0] == 2).all()


def test_label_map_uses_16_bit_above_255_masks(tmp_path):
    n = 300
    masks = np.zeros((n, 20, 15), dtype=bool)
    masks.reshape(n, -1)[np.arange(n), np.arange(n)] = True
    path = write_label_map(tmp_path / "many.png", list(masks))
    labels = read_label_map(path)
    assert labels.max() == n
    assert np.array_equal(label_map_to_masks(labels, n), masks)


def test_overlay_colours_masked_pixels_only():
    image = np.full((H, W, 3), 100, dtype=np.uint8)
    masks = make_masks(2)
    out = overlay(image, list(masks), alpha=0.5, outline=False)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    covered = masks.any(0)
    assert (out[covered] != 100).any(axis=1).all()
    assert (out[~covered] == 100).all()
    assert image.max() == 100  # the input is not modified
    records = [{"segmentation": m} for m in masks]
    assert np.array_equal(overlay(image, records, outline=False), out)


def test_overlay_outline_points_boxes(tmp_path):
    image = np.zeros((H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), bool)
    mask[5:25, 5:35] = True
    color = palette(1)[0]
    out = overlay(image, [mask], alpha=0.3, outline=True)
    assert np.array_equal(out[5, 20], color)  # the border has the full colour
    assert not np.array_equal(out[15, 20], color)  # the inside is blended
    drawn = overlay(image, [], points=[[10, 10], [30, 20]], point_labels=[1, 0], boxes=[[2, 2, 37, 27]])
    assert drawn[10, 10, 1] > 150 and drawn[10, 10, 0] < 50  # positive: green
    assert drawn[20, 30, 0] > 150 and drawn[20, 30, 1] < 50  # negative: red
    assert drawn[2, 20].any() and not drawn[15, 20].any()
    path = save_overlay(tmp_path / "o.png", image, [mask])
    assert path.stat().st_size > 0
    with pytest.raises(InputError):
        overlay(image, [np.ones((H + 1, W), bool)])
    with pytest.raises(InputError):
        save_overlay(tmp_path / "o.unknownformat", image, [mask])


def test_palette_is_deterministic_and_distinct():
    p = palette(50)
    assert p.shape == (50, 3) and p.dtype == np.uint8
    assert np.array_equal(palette(10), p[:10])
    assert len({tuple(c) for c in p}) == 50


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "r.json"
    atomic_write_json(path, {"a": np.int64(3), "b": np.arange(2), "c": torch.tensor([1.5])})
    assert json.loads(path.read_text()) == {"a": 3, "b": [0, 1], "c": [1.5]}
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(path.parent) == ["r.json"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~atomic_mod._UMASK


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"old": True})

    def crash(fd):
        raise OSError("disk full")

    # Fail after the data went to the temp file but before the rename.
    monkeypatch.setattr(atomic_mod.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"new": list(range(1000))})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["r.json"]
    # Unserialisable content fails before the file is touched.
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["r.json"]
