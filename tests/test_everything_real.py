"""MaskGenerator with the real MobileSAM weights equals MobileSAM's own automatic mask generator.

Marked `network`: the first run downloads the checkpoint into the cache (`samkit download vit_t`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DATASETS
from test_everything_parity import assert_same_masks

import samkit
from samkit.image import load_image
from samkit.zoo import checkpoint_path

pytestmark = pytest.mark.network

PHOTOS = [
    DATASETS / "instances" / "coco_mini" / "train" / "images" / "000000000790.jpg",
    DATASETS / "instances" / "ccp" / "train" / "images" / "0001.jpg",
    DATASETS / "instances" / "camvid" / "train" / "images" / "0001TP_006690.jpg",
]


@pytest.fixture(scope="module")
def models():
    from mobile_sam import sam_model_registry

    path = checkpoint_path("vit_t")
    ref = sam_model_registry["vit_t"]()
    ref.load_state_dict(torch.load(path, map_location="cpu"))
    return samkit.load("vit_t", dtype="fp32"), ref.eval()


def _run(models, image, **kw):
    from mobile_sam import SamAutomaticMaskGenerator

    ours_model, ref = models
    ours = samkit.MaskGenerator(ours_model, output_mode="coco_rle", **kw).generate(image)
    with torch.no_grad():
        theirs = SamAutomaticMaskGenerator(ref, output_mode="coco_rle", **kw).generate(image)
    return ours, theirs


@pytest.mark.slow  # 1024 prompts per photo through both generators
@pytest.mark.parametrize("path", PHOTOS, ids=lambda p: p.parent.parent.parent.name)
def test_default_settings_on_photos(models, path):
    ours, theirs = _run(models, load_image(path))
    assert len(ours) >= 5  # real weights find real objects
    assert_same_masks(ours, theirs)


def test_thresholds_at_zero_many_masks(models):
    # Hundreds of real masks through stability, NMS and RLE.
    ours, theirs = _run(
        models, load_image(PHOTOS[0]), points_per_side=12, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    assert len(ours) >= 100
    assert_same_masks(ours, theirs)


@pytest.mark.slow  # five crops through both generators
def test_crops_with_small_region_cleanup(models):
    kw = dict(points_per_side=8, crop_n_layers=1, min_mask_region_area=200)
    ours, theirs = _run(models, load_image(PHOTOS[1]), **kw)
    assert len({tuple(o["crop_box"]) for o in ours}) > 1  # masks from the crops survived
    assert_same_masks(ours, theirs)
