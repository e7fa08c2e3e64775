"""The annotation store (SQLite, WAL) and SA-1B / COCO export and import, without a model."""

from __future__ import annotations

import json
import sqlite3
import threading

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from samkit.annotate import Store, export_project, import_annotations
from samkit.errors import InputError
from samkit.masks import to_coco_rle


def _mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _item(mask: np.ndarray, label: str = "object") -> dict:
    rle = to_coco_rle(mask)
    enc = {"size": rle["size"], "counts": rle["counts"].encode()}
    return {
        "rle": rle,
        "bbox": [float(v) for v in mask_utils.toBbox(enc)],
        "area": int(mask.sum()),
        "label": label,
        "predicted_iou": 0.9,
        "stability_score": 0.95,
        "prompt": {"points": [[5.0, 6.0, 1]], "box": None},
    }


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "p.sqlite")
    s.sync_images([("a.jpg", 40, 30), ("sub/b.png", 20, 10)])
    return s


def test_wal_mode_and_status_flow(store, tmp_path):
    conn = sqlite3.connect(tmp_path / "p.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    ims = store.images()
    assert [im["path"] for im in ims] == ["a.jpg", "sub/b.png"]
    assert [im["status"] for im in ims] == ["todo", "todo"]
    obj = store.add_object(
        ims[0]["id"], **_item(_mask(30, 40, 2, 8, 3, 9)), annotator="ann", duration_ms=1500
    )
    assert obj.bbox == [3.0, 2.0, 6.0, 6.0] and obj.area == 36 and obj.source == "manual"
    assert store.image(ims[0]["id"])["status"] == "in progress"
    store.set_status(ims[0]["id"], "done")
    first = store.images()[0]
    assert (first["status"], first["objects"]) == ("done", 1)
    with pytest.raises(InputError, match="status must be one of"):
        store.set_status(ims[0]["id"], "finished")
    accept = store.events("accept")
    assert len(accept) == 1 and accept[0]["duration_ms"] == 1500 and accept[0]["annotator"] == "ann"
    assert store.stats()["median_ms_per_mask"] == 1500


def test_sync_keeps_objects_and_order(store):
    im = store.images()[1]
    store.add_object(im["id"], **_item(_mask(10, 20, 0, 5, 0, 5)))
    store.sync_images([("sub/b.png", None, None), ("c.jpg", 8, 8)])
    paths = [i["path"] for i in store.images()]
    assert paths[:2] == ["sub/b.png", "c.jpg"]  # listing order updated, old a.jpg kept
    b = store.image_by_path("sub/b.png")
    assert (b["width"], b["height"]) == (20, 10)  # unknown size does not erase the known one
    assert len(store.objects(b["id"])) == 1


def test_delete_relabel_are_soft_and_logged(store):
    im = store.images()[0]["id"]
    o = store.add_object(im, **_item(_mask(30, 40, 0, 4, 0, 4)))
    assert store.relabel_object(o.id, " cat ").label == "cat"
    store.delete_object(o.id)
    assert store.objects(im) == []
    with pytest.raises(InputError, match="no object"):
        store.delete_object(o.id)
    with pytest.raises(InputError, match=f"no object with id {o.id} "):
        store.relabel_object(o.id, "dog")
    with pytest.raises(InputError, match="label"):
        store.relabel_object(o.id, "")
    kinds = [e["kind"] for e in store.events()]
    assert kinds == ["accept", "relabel", "delete"]


def test_not_a_database(tmp_path):
    bad = tmp_path / "x.sqlite"
    bad.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(InputError, match="not a samkit annotation database"):
        Store(bad)


def test_concurrent_writers_lose_nothing(tmp_path):
    """Two stores (two processes' worth of connections) and several threads writing at once."""
    path = tmp_path / "p.sqlite"
    Store(path).sync_images([("a.jpg", 40, 30)])
    stores = [Store(path), Store(path)]
    image_id = stores[0].images()[0]["id"]
    item = _item(_mask(30, 40, 1, 9, 1, 9))
    errors = []

    def write(store: Store) -> None:
        try:
            for _ in range(15):
                store.add_object(image_id, **item)
        except Exception as exc:  # the test reports any failure below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(stores[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(Store(path).objects(image_id)) == 60
    assert len(Store(path).events("accept")) == 60


def test_export_coco_and_sa1b_read_back(store, tmp_path):
    a, b = (im["id"] for im in store.images())
    m1, m2, m3 = _mask(30, 40, 2, 8, 3, 9), _mask(30, 40, 10, 20, 10, 30), _mask(10, 20, 1, 9, 2, 7)
    store.add_object(a, **_item(m1, "dog"))
    store.add_object(a, **_item(m2, "cat"))
    store.add_object(b, **_item(m3, "dog"))
    (coco_path,) = export_project(store, tmp_path / "coco", "coco")
    coco = COCO(str(coco_path))
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["cat", "dog"]
    by_file = {im["file_name"]: im["id"] for im in coco.dataset["images"]}
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[by_file["a.jpg"]]))
    assert np.array_equal(coco.annToMask(anns[0]).astype(bool), m1)
    assert np.array_equal(coco.annToMask(anns[1]).astype(bool), m2)
    assert coco.loadCats(anns[1]["category_id"])[0]["name"] == "cat"
    assert anns[0]["bbox"] == [3.0, 2.0, 6.0, 6.0] and anns[0]["area"] == 36

    files = export_project(store, tmp_path / "sa1b", "sa1b")
    assert sorted(f.name for f in files) == ["a.json", "b.json"]
    doc = json.loads((tmp_path / "sa1b" / "b.json").read_text())
    assert doc["image"] == {"image_id": b, "width": 20, "height": 10, "file_name": "sub/b.png"}
    ann = doc["annotations"][0]
    seg = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
    assert np.array_equal(mask_utils.decode(seg).astype(bool), m3)
    assert ann["point_coords"] == [[5.0, 6.0]] and ann["label"] == "dog"

    with pytest.raises(InputError, match="--format"):
        export_project(store, tmp_path / "x", "voc")


def test_import_round_trip_for_correction(store, tmp_path):
    a, b = (im["id"] for im in store.images())
    m1, m3 = _mask(30, 40, 2, 8, 3, 9), _mask(10, 20, 1, 9, 2, 7)
    store.add_object(a, **_item(m1, "dog"))
    store.add_object(b, **_item(m3, "bird"))
    export_project(store, tmp_path / "coco", "coco")
    export_project(store, tmp_path / "sa1b", "sa1b")

    fresh = Store(tmp_path / "fresh.sqlite")
    fresh.sync_images([("a.jpg", 40, 30), ("sub/b.png", 20, 10)])
    counts = import_annotations(fresh, [tmp_path / "coco" / "annotations.json"])
    assert counts == {"objects": 2, "images": 2, "skipped_images": 0}
    fa, fb = (im["id"] for im in fresh.images())
    (o,) = fresh.objects(fa)
    assert o.source == "import" and o.label == "dog" and o.area == 36
    assert np.array_equal(mask_utils.decode({**o.rle, "counts": o.rle["counts"].encode()}).astype(bool), m1)

    again = Store(tmp_path / "again.sqlite")
    again.sync_images([("b.png", 20, 10)])  # matched by file name when the folder differs
    counts = import_annotations(again, [tmp_path / "sa1b"])
    assert counts == {"objects": 1, "images": 1, "skipped_images": 1}
    assert again.objects(again.images()[0]["id"])[0].label == "bird"

    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(InputError, match="neither COCO"):
        import_annotations(fresh, [bad])
    with pytest.raises(InputError, match="not found"):
        import_annotations(fresh, [tmp_path / "nope.json"])
