"""The published weights: samkit `vit_t` equals MobileSAM's reference on real photos; `medsam_lite` works.

Marked `network`: the first run downloads the checkpoints into the cache (`samkit download vit_t medsam_lite`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DATASETS
from pycocotools import mask as mask_utils
from tolerances import DECODER_DEPTH, assert_close_at_scale, assert_masks_equal, sam_depth

import samkit
from samkit.image import load_image
from samkit.zoo import checkpoint_path

pytestmark = pytest.mark.network

PHOTOS = [
    DATASETS / "instances" / "coco_mini" / "train" / "images" / "000000000790.jpg",
    DATASETS / "instances" / "ccp" / "train" / "images" / "0001.jpg",
    DATASETS / "instances" / "camvid" / "train" / "images" / "0001TP_006690.jpg",
]


def _prompts(h: int, w: int) -> dict[str, dict]:
    """Prompts placed at fractions of the image size: (x, y) points and XYXY boxes in image pixels."""

    def pt(fx: float, fy: float) -> list[float]:
        return [round(fx * w), round(fy * h)]

    box = [*pt(0.2, 0.2), *pt(0.75, 0.85)]
    return {
        "single_point": dict(point_coords=[pt(0.5, 0.5)], point_labels=[1]),
        "points_pm": dict(point_coords=[pt(0.5, 0.5), pt(0.1, 0.1), pt(0.6, 0.7)], point_labels=[1, 0, 1]),
        "box": dict(box=box),
        "box_points": dict(point_coords=[pt(0.5, 0.5), pt(0.25, 0.3)], point_labels=[1, 0], box=box),
    }


@pytest.fixture(scope="module", params=range(len(PHOTOS)), ids=[p.parent.parent.parent.name for p in PHOTOS])
def pair(request):
    """(samkit Predictor, MobileSAM reference SamPredictor), both on the real mobile_sam.pt and one photo."""
    from mobile_sam import SamPredictor, sam_model_registry

    path = checkpoint_path("vit_t", progress=False)
    ref = sam_model_registry["vit_t"](checkpoint=str(path)).eval()
    ours, theirs = samkit.Predictor(samkit.load("vit_t", dtype="fp32", progress=False)), SamPredictor(ref)
    image = load_image(PHOTOS[request.param])
    with torch.no_grad():
        ours.set_image(image)
        theirs.set_image(image)
    return ours, theirs


def _same(ours, theirs, multimask: bool, **kw) -> np.ndarray:
    """Run one prompt through both; check logits and scores (fp32 bound, tests/tolerances.py) and masks;
    return our low-res logits."""
    kw = {k: np.asarray(v) for k, v in kw.items()}
    m1, s1, l1 = ours.predict(**kw, multimask_output=multimask)
    with torch.no_grad():
        m2, s2, l2 = theirs.predict(**kw, multimask_output=multimask)
        full2, _, _ = theirs.predict(**kw, multimask_output=multimask, return_logits=True)
    assert m1.shape == m2.shape == ((3 if multimask else 1), *ours.original_size)
    depth = sam_depth(ours.model)
    atol = assert_close_at_scale(l1, l2, depth, "low-res logits")
    assert_close_at_scale(s1, s2, depth, "scores")
    # Identical masks: a pixel may only differ where the reference's own logit is float noise away from 0.
    assert_masks_equal(m1, m2, full2, atol)
    return l1


def test_embedding_matches(pair):
    ours, theirs = pair
    assert ours.input_size == tuple(theirs.input_size)
    assert_close_at_scale(ours.embedding, theirs.features, sam_depth(ours.model) - DECODER_DEPTH, "embedding")


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", ["single_point", "points_pm", "box", "box_points"])
def test_prompts_match_reference(pair, prompt, multimask):
    ours, theirs = pair
    _same(ours, theirs, multimask, **_prompts(*ours.original_size)[prompt])


def test_mask_input_round_matches_reference(pair):
    ours, theirs = pair
    h, w = ours.original_size
    first = _prompts(h, w)["single_point"]
    logits = _same(ours, theirs, True, **first)
    _, scores, _ = ours.predict(**{k: np.asarray(v) for k, v in first.items()})
    prev = logits[int(np.argmax(scores))][None]
    second = dict(
        point_coords=[first["point_coords"][0], [round(0.3 * w), round(0.6 * h)]], point_labels=[1, 0]
    )
    _same(ours, theirs, False, mask_input=prev, **second)
    _same(ours, theirs, True, mask_input=prev, **second)


# --- LiteMedSAM ------------------------------------------------------------------------------------------

DSB = DATASETS / "instances" / "dsb2018" / "train"


@pytest.fixture(scope="module")
def lite():
    return samkit.Predictor(samkit.load("medsam_lite", dtype="fp32", progress=False))


def test_medsam_lite_loads_strict_with_its_preprocessing(lite):
    model = lite.model
    assert model.arch == "medsam_lite" and model.image_size == 256
    assert (model.normalize, model.resize) == ("minmax", "area")
    n = sum(p.numel() for p in model.parameters())
    assert 9.7e6 < n < 9.9e6


def test_medsam_lite_embedding_follows_litemedsam_preprocessing(lite):
    """LiteMedSAM's inference: INTER_AREA resize of the longest side to 256, min-max to [0, 1], zero pad."""
    import cv2

    image = load_image(DSB / "images" / "0121d6759c5adb29.jpg")  # 320 x 256, not square
    lite.set_image(image)
    h, w = image.shape[:2]
    assert lite.input_size == (round(h * 256 / w), 256) and lite.embedding.shape == (1, 256, 64, 64)
    small = cv2.resize(image, (256, round(h * 256 / w)), interpolation=cv2.INTER_AREA).astype(np.float64)
    small = (small - small.min()) / max(small.max() - small.min(), 1e-8)
    x = np.zeros((256, 256, 3))
    x[: small.shape[0], : small.shape[1]] = small
    with torch.no_grad():
        expected = lite.model.image_encoder(torch.tensor(x, dtype=torch.float32).permute(2, 0, 1)[None])
    assert (lite.embedding - expected).abs().max().item() < 1e-5


def test_medsam_lite_box_segments_nuclei(lite):
    """Box prompts (COCO XYWH -> XYXY) on a fluorescence image; measured IoUs 0.90, 0.88, 0.90, 0.73, 0.84."""
    coco = json.loads((DSB / "annotations.json").read_text())
    info = next(i for i in coco["images"] if i["file_name"] == "003cee89357d9fe1.jpg")
    anns = sorted((a for a in coco["annotations"] if a["image_id"] == info["id"]), key=lambda a: -a["area"])
    lite.set_image(load_image(DSB / "images" / info["file_name"]))
    ious = []
    for ann in anns[:5]:
        gt = mask_utils.decode(ann["segmentation"]).astype(bool)
        x, y, bw, bh = ann["bbox"]
        masks, _, low_res = lite.predict(box=[x, y, x + bw, y + bh], multimask_output=False)
        assert masks.shape == (1, *gt.shape) and low_res.shape == (1, 256, 256)
        ious.append((masks[0] & gt).sum() / (masks[0] | gt).sum())
    assert ious[0] > 0.5, f"IoU with the largest nucleus {ious[0]:.3f}"
    assert np.mean(ious) > 0.7, f"mean IoU over 5 nuclei {np.mean(ious):.3f}"
