"""How far the bf16 mask decoder (what `dtype="auto"` runs where bf16 is native) is from the fp32 decoder.

    python benchmarks/bench_decoder_bf16.py [--images 40] [--split ../shared/datasets/instances/coco_mini/train]

vit_t, each image of a training split encoded once (the `auto` encoder), then every click decoded twice on
that same embedding: once with the fp32 decoder, once with the bf16 one. Clicks: the interior point of up
to 4 ground-truth objects per image (the pixel farthest from the object's boundary; objects over 500 px)
and 2 uniformly random points. Prints, over all clicks: the IoU of the two best masks (the mask the fp32
decoder scores highest, full size), how often both pick the same mask, the predicted-IoU difference, and
clicks where bf16 gives an empty best mask that fp32 does not. Needs a CPU (or GPU) with native bf16.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

import samkit

ROOT = Path(__file__).resolve().parents[1]
SPLIT = ROOT.parent / "shared" / "datasets" / "instances" / "coco_mini" / "train"


def _clicks(
    coco, image_id: int, shape: tuple[int, int], rng: np.random.Generator
) -> list[tuple[float, float]]:
    import cv2

    clicks = []
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
    for ann in [a for a in anns if a["area"] > 500][:4]:
        mask = coco.annToMask(ann).astype(np.uint8)
        dist = cv2.distanceTransform(np.pad(mask, 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
        y, x = np.unravel_index(dist.argmax(), dist.shape)
        clicks.append((float(x), float(y)))
    clicks += [(rng.uniform(0, shape[1]), rng.uniform(0, shape[0])) for _ in range(2)]
    return clicks


def main() -> None:
    from pycocotools.coco import COCO

    from samkit.hardware import run_header

    print(run_header("auto"), flush=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--split", type=Path, default=SPLIT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = samkit.load("vit_t", dtype="auto", progress=False)
    if model.mask_decoder.inference_dtype != torch.bfloat16:
        raise SystemExit("bf16 is not native here: dtype='auto' runs the decoder in fp32, nothing to compare")
    coco = COCO(str(args.split / "annotations.json"))
    pred = samkit.Predictor(model)
    rng = np.random.default_rng(0)
    ious, diffs, same, empty = [], [], 0, 0
    ids = sorted(coco.getImgIds())[: args.images]
    for image_id in ids:
        image = samkit.load_image(args.split / "images" / coco.loadImgs(image_id)[0]["file_name"])
        pred.set_image(image)
        for x, y in _clicks(coco, image_id, image.shape[:2], rng):
            prompt = {"point_coords": np.array([[x, y]]), "point_labels": np.array([1])}
            model.mask_decoder.inference_dtype = None
            m32, s32, _ = pred.predict(**prompt)
            model.mask_decoder.inference_dtype = torch.bfloat16
            m16, s16, _ = pred.predict(**prompt)
            best = int(s32.argmax())
            union = (m32[best] | m16[best]).sum()
            ious.append((m32[best] & m16[best]).sum() / union if union else 1.0)
            diffs.append(float(np.abs(s32 - s16).max()))
            same += int(s16.argmax() == best)
            empty += int(m16[best].sum() == 0 < m32[best].sum())
    ious_a, diffs_a = np.array(ious), np.array(diffs)
    result = {
        "split": str(args.split.relative_to(ROOT.parent))
        if args.split.is_relative_to(ROOT.parent)
        else str(args.split),
        "images": len(ids),
        "clicks": len(ious),
        "best_mask_iou_mean": round(float(ious_a.mean()), 4),
        "best_mask_iou_p05": round(float(np.percentile(ious_a, 5)), 4),
        "best_mask_iou_min": round(float(ious_a.min()), 4),
        "same_best_mask": round(same / len(ious), 3),
        "pred_iou_abs_diff_mean": round(float(diffs_a.mean()), 4),
        "pred_iou_abs_diff_max": round(float(diffs_a.max()), 4),
        "bf16_empty_where_fp32_not": empty,
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
