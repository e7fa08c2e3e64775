"""A/B of the encoder input's padding order in a short samkit-nano distillation (CPU scale).

Two runs of configs/nano.yaml with the same seed, steps and batches, on coco_mini/train[0:-10] only, the
teacher run online on each batch (no embedding cache, no augmentation):
- "fixed": both encoders fed as inference feeds them (normalise, then pad with 0): the training loop now;
- "old": the order the training loop used before (pad with 0, then normalise, so the padding reaches both
  encoders as -mean/std), reproduced in this script only by replacing `encoder_input` in
  samkit.train.distill for that run.
Each student (and the warm start, step 0) is then measured against the teacher on the held-out
coco_mini/train[-10:] (the config's validation images, never drawn in training): embedding MSE under the
inference padding (and, for reference, under the old one) and the mean IoU of the student's and the teacher's
best mask for the same random single points under the inference padding.

    python benchmarks/padding_nano_distill.py [--steps 30] [--threads 1] [--points 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from padding_nano import _best_masks, _iou

import samkit
from samkit.train import distill
from samkit.train.config import load_config
from samkit.train.loop import Trainer
from samkit.transforms import ImagePipeline

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "nano.yaml"
TRAIN = {"type": "coco", "path": "../shared/datasets/instances/coco_mini/train", "range": [0, -10]}


def old_encoder_input(batch, pipeline: ImagePipeline, device: torch.device) -> torch.Tensor:
    """(B, 3, S, S): the former training feed, zero padding first and normalisation after."""
    mean = torch.tensor(pipeline.pixel_mean, device=device).view(-1, 1, 1)
    std = torch.tensor(pipeline.pixel_std, device=device).view(-1, 1, 1)
    return torch.cat(
        [
            (pipeline.pad_torch(torch.tensor(img, device=device).permute(2, 0, 1)[None].float()) - mean) / std
            for _, img, _ in batch
        ]
    )


def trainer(steps: int, threads: int, out: Path) -> Trainer:
    cfg = load_config(
        CONFIG,
        out=str(out),
        threads=threads,
        teacher_online=True,
        data={"train": [TRAIN], "cache_dir": None, "precache": False},
        optim={"steps": steps},
        val_every=0,
    )
    return Trainer(cfg, progress=False)


class Meter:
    """Student-vs-teacher agreement on held-out photos; the teacher's side is computed once."""

    def __init__(self, t: Trainer, points: int) -> None:
        self.teacher = t.teacher
        self.pipe = ImagePipeline.of(self.teacher)
        self.t_pred = samkit.Predictor(self.teacher)
        rng = np.random.default_rng(0)
        self.photos = []
        for i in range(len(t.val_source)):
            image = t.val_source[i].image
            h, w = image.shape[:2]
            pts = rng.uniform([0, 0], [w, h], size=(points, 2))
            x = self.pipe.to_input_torch(self._resized(image))
            x_old = old_encoder_input([(None, self.pipe.apply_image(image), None)], self.pipe, x.device)
            with torch.no_grad():
                emb, emb_old = self.teacher.image_encoder(x), self.teacher.image_encoder(x_old)
            masks = _best_masks(self.t_pred, emb, (h, w), pts)
            self.photos.append((image, x, x_old, pts, emb, emb_old, masks))

    def _resized(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(self.pipe.apply_image(image))).permute(2, 0, 1)[None].float()

    def __call__(self, student) -> dict[str, float]:
        student.eval()
        s_pred = samkit.Predictor(student)
        mse, mse_old, ious = [], [], []
        with torch.no_grad():
            for image, x, x_old, pts, emb, emb_old, t_masks in self.photos:
                s_emb = student.image_encoder(x)
                mse.append(F.mse_loss(s_emb, emb).item())
                mse_old.append(F.mse_loss(student.image_encoder(x_old), emb_old).item())
                s_masks = _best_masks(s_pred, s_emb, image.shape[:2], pts)
                ious.append(np.mean([_iou(a, b) for a, b in zip(s_masks, t_masks, strict=True)]))
        return {
            "mse zeros": float(np.mean(mse)),
            "mse -mean/std": float(np.mean(mse_old)),
            "iou zeros": float(np.mean(ious)),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--points", type=int, default=8, help="random single points per held-out photo")
    args = ap.parse_args()
    from samkit.hardware import run_header

    print("\n".join(f"# {line}" for line in run_header("fp32").splitlines()), flush=True)
    print(f"# torch {torch.__version__}, {args.threads} threads, load {os.getloadavg()}", flush=True)
    rows, curves = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in ("fixed", "old"):
            patch = mock.patch.object(distill, "encoder_input", old_encoder_input) if arm == "old" else None
            t = trainer(args.steps, args.threads, Path(tmp) / arm)
            if arm == "fixed":
                meter = Meter(t, args.points)
                rows["step 0 (warm start)"] = meter(t.model)
                print("measured the warm start", rows["step 0 (warm start)"], flush=True)
            t0 = time.perf_counter()
            if patch:
                patch.start()
            try:
                curves[arm] = [t.train_step()["mse"] for _ in range(args.steps)]
            finally:
                if patch:
                    patch.stop()
            wall = time.perf_counter() - t0
            rows[f"{arm}, step {args.steps}"] = meter(t.model)
            print(
                f"{arm}: {args.steps} steps {wall:.0f} s ({wall / args.steps:.1f} s/step), load "
                f"{os.getloadavg()}, {rows[f'{arm}, step {args.steps}']}",
                flush=True,
            )
    print(
        f"\n# held-out coco_mini/train[-10:] ({len(meter.photos)} photos, {args.points} random points each); "
        "mse X: student-vs-teacher embedding MSE with padding X; iou zeros: mean IoU of student vs teacher "
        "best mask, same single points, inference padding"
    )
    print("| student | mse zeros | mse -mean/std | iou zeros |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['mse zeros']:.5f} | {r['mse -mean/std']:.5f} | {r['iou zeros']:.4f} |")
    print("\n# training MSE by step (each arm against its own teacher feed)")
    for arm, c in curves.items():
        print(f"{arm}: " + ", ".join(f"{v:.4f}" for v in c))


if __name__ == "__main__":
    main()
