from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samkit.eval.datasets import Bsds500, CocoInstances, DatasetError, MaskFolder, Sa1bFolder, open_dataset

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
if not DATA.is_dir():
    DATA = Path("/work/shared/datasets")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared datasets not present")


@needs_data
def test_grabcut_folder_has_ignore_band():
    ds = open_dataset(DATA / "interactive" / "GrabCut")
    assert isinstance(ds, MaskFolder) and len(ds) == 50
    items = list(islice(ds.objects(), 2))
    for item in items:
        h, w = Image.open(item.image).size[::-1]
        assert item.mask.shape == (h, w) and item.mask.dtype == bool and item.mask.any()
    # 106024's mask has no unknown band; 124080's 128-valued band becomes the ignore mask
    assert [it.id for it in items] == ["106024", "124080"]
    assert items[0].ignore is None
    assert (
        items[1].ignore is not None and items[1].ignore.any() and not (items[1].ignore & items[1].mask).any()
    )


@needs_data
def test_berkeley_folder_has_no_ignore():
    item = next(open_dataset(DATA / "interactive" / "Berkeley").objects())
    assert item.ignore is None and item.mask.shape == (321, 481) or item.mask.shape == (481, 321)


@needs_data
def test_coco_mini_polygons_and_crowd_ignore():
    ds = open_dataset(DATA / "instances" / "coco_mini" / "val")
    assert isinstance(ds, CocoInstances) and len(ds) == 66
    first = next(ds.images())
    assert first.image.is_file() and len(first.masks) > 0
    h, w = Image.open(first.image).size[::-1]
    assert all(m.shape == (h, w) and m.any() for m in first.masks)
    n_objects = sum(len(im.masks) for im in ds.images())
    crowd_images = [im for im in ds.images() if im.ignore is not None]
    assert n_objects == 501 - 4 and len(crowd_images) >= 1  # 4 crowd annotations become ignore regions
    obj = next(ds.objects())
    assert obj.id.startswith(first.id + ":")


@needs_data
def test_dsb2018_compressed_rle():
    im = next(open_dataset(DATA / "instances" / "dsb2018" / "val" / "annotations.json").images())
    assert len(im.masks) > 5 and all(m.dtype == bool for m in im.masks)


@needs_data
def test_bsds500_root_reads_test_split_boundaries():
    ds = open_dataset(DATA / "bsds500")
    assert isinstance(ds, Bsds500) and len(ds) == 200
    item = next(ds.edges())
    assert item.image.is_file() and item.image.parent.name == "test"
    assert 4 <= len(item.boundaries) <= 9
    assert all(b.shape in ((321, 481), (481, 321)) and b.any() for b in item.boundaries)
    val = open_dataset(DATA / "bsds500" / "groundTruth" / "val")
    assert isinstance(val, Bsds500) and len(val) == 100


def test_sa1b_folder_round_trip(tmp_path):
    import json

    from pycocotools import mask as mask_utils

    img = np.zeros((8, 10, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "sa_1.jpg")
    m = np.zeros((8, 10), dtype=np.uint8)
    m[2:5, 3:7] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    record = {
        "image": {"image_id": 1, "width": 10, "height": 8, "file_name": "sa_1.jpg"},
        "annotations": [{"id": 3, "segmentation": rle}],
    }
    (tmp_path / "sa_1.json").write_text(json.dumps(record))
    ds = open_dataset(tmp_path)
    assert isinstance(ds, Sa1bFolder)
    (obj,) = list(ds.objects())
    np.testing.assert_array_equal(obj.mask, m.astype(bool))
    assert obj.id == "sa_1:0"


def test_unknown_layout_is_a_one_line_error(tmp_path):
    with pytest.raises(DatasetError, match="cannot tell the layout"):
        open_dataset(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        open_dataset(tmp_path / "missing")
