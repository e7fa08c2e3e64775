"""run_eval options: the proposals predicted-IoU filter."""

import json

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import samkit
from samkit.eval import run_eval
from samkit.models.build import SamConfig, build_sam


def _stable_but_unsure_sam(path):
    """A tiny random SAM whose masks are stable (huge logits) but scored ~0.5 by its IoU head."""
    torch.manual_seed(0)
    cfg = SamConfig("vit", embed_dim=32, depth=1, num_heads=1, global_attn_indexes=(0,), image_size=256)
    sam = build_sam(cfg).eval()
    with torch.no_grad():
        head = sam.mask_decoder.iou_prediction_head.layers[-1]
        head.weight.zero_()
        head.bias.fill_(0.5)
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(1000)
            mlp.layers[-1].bias.mul_(1000)
    samkit.save(sam, path)
    return str(path)


def _one_image_coco(root):
    image = np.zeros((48, 64, 3), np.uint8)
    image[10:30, 20:44] = 200
    (root / "images").mkdir(parents=True)
    Image.fromarray(image).save(root / "images" / "a.png")
    obj = np.zeros((48, 64), np.uint8)
    obj[10:30, 20:44] = 1
    rle = mask_utils.encode(np.asfortranarray(obj))
    rle["counts"] = rle["counts"].decode()
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 48, "width": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def test_proposals_pred_iou_thresh_reaches_the_generator(tmp_path):
    data = _one_image_coco(tmp_path / "data")
    model = _stable_but_unsure_sam(tmp_path / "m.safetensors")
    default = run_eval("proposals", data, model, points_per_side=4, progress=False)
    loose = run_eval("proposals", data, model, points_per_side=4, progress=False, pred_iou_thresh=0.0)
    assert default["items"][0]["n_proposals"] == 0  # every score (0.5) is under the default 0.88
    assert loose["items"][0]["n_proposals"] > 0
    assert loose["meta"]["settings"]["pred_iou_thresh"] == 0.0
    cached = run_eval(
        "proposals",
        data,
        model,
        points_per_side=4,
        progress=False,
        pred_iou_thresh=0.0,
        embedding_cache=tmp_path / "emb",
    )
    assert cached["items"] == loose["items"]
