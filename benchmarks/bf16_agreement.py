"""How far bf16 masks are from fp32 masks: issue 4's quality check for `samkit.load(..., dtype="bf16")`.

For each photo (real COCO train photos from ../shared/datasets), both models embed the image, then the same
random single points (seeded) are answered with 3 candidates each; every candidate mask of the bf16 model is
compared with the same candidate of the fp32 model (IoU). Prints per-photo and overall mean IoU, the
fraction of candidates at IoU >= 0.98, and the worst case.

    python benchmarks/bf16_agreement.py [--model vit_t] [--photos 6] [--points 20]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import samkit

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "datasets" / "instances" / "coco_mini" / "train" / "images"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def main() -> None:
    from samkit.hardware import run_header

    print(run_header("fp32", "bf16"), flush=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_t")
    ap.add_argument("--photos", type=int, default=6)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fp32 = samkit.Predictor(samkit.load(args.model))
    bf16 = samkit.Predictor(samkit.load(args.model, dtype="bf16"))
    rng = np.random.default_rng(0)
    all_ious: list[float] = []
    print(f"{args.model}: bf16 vs fp32 masks, {args.points} random points x 3 candidates per photo")
    print(f"{'photo':<22} {'mean IoU':>9} {'>= 0.98':>8} {'min':>6}")
    for path in sorted(PHOTOS.iterdir())[: args.photos]:
        image = samkit.load_image(path)
        fp32.set_image(image)
        bf16.set_image(image)
        h, w = image.shape[:2]
        ious = []
        for _ in range(args.points):
            point = np.array([[rng.uniform(0, w - 1), rng.uniform(0, h - 1)]])
            a, _, _ = fp32.predict(point, np.array([1]))
            b, _, _ = bf16.predict(point, np.array([1]))
            ious.extend(_iou(x, y) for x, y in zip(a, b, strict=True))
        arr = np.array(ious)
        all_ious.extend(ious)
        print(f"{path.name:<22} {arr.mean():>9.4f} {np.mean(arr >= 0.98):>8.2f} {arr.min():>6.3f}")
    arr = np.array(all_ious)
    print(
        f"{'all (' + str(len(arr)) + ' masks)':<22} {arr.mean():>9.4f} {np.mean(arr >= 0.98):>8.2f} {arr.min():>6.3f}"
    )


if __name__ == "__main__":
    main()
