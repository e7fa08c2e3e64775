"""How much the encoder input's padding matters for samkit-nano and its teacher (vit_t).

The training loop used to pad the resized image with 0 before normalising, so the padded area reached the
encoders as -mean/std (about -2) instead of the 0 that inference gives them; `nano` was distilled that way
(teacher and student both saw it). For each photo of a train split this prints the embedding MSE between
student and teacher with the inference padding ("zeros") and with the old training padding ("-mean/std"),
the change each padding makes to each encoder's own embedding, and the mean IoU between the student's and
the teacher's best mask for the same random single points under each padding.

    python benchmarks/padding_nano.py [--photos 8] [--points 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import samkit
from samkit.transforms import ImagePipeline

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "datasets" / "instances" / "coco_mini" / "train" / "images"


def _inputs(pipe: ImagePipeline, image: np.ndarray) -> dict[str, torch.Tensor]:
    """The encoder input as inference builds it, and as the training loop used to (pad, then normalise)."""
    resized = torch.from_numpy(np.array(pipe.apply_image(image))).permute(2, 0, 1)[None].float()
    mean = torch.tensor(pipe.pixel_mean).view(-1, 1, 1)
    std = torch.tensor(pipe.pixel_std).view(-1, 1, 1)
    return {"zeros": pipe.to_input_torch(resized), "-mean/std": (pipe.pad_torch(resized) - mean) / std}


def _best_masks(pred: samkit.Predictor, emb: torch.Tensor, size: tuple[int, int], points: np.ndarray) -> list:
    pred.reset_image()
    pred.features, pred.original_size = emb, size
    pred.input_size = pred.transform.input_size(size)
    out = []
    for p in points:
        masks, scores, _ = pred.predict(p[None], np.array([1]))
        out.append(masks[int(np.argmax(scores))])
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=8)
    ap.add_argument("--points", type=int, default=8, help="random single points per photo")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    teacher = samkit.load("vit_t", dtype="fp32")
    student = samkit.load("nano", dtype="fp32")
    pipe = ImagePipeline.of(teacher)
    t_pred, s_pred = samkit.Predictor(teacher), samkit.Predictor(student)
    rng = np.random.default_rng(0)
    rows = []
    t0 = time.perf_counter()
    for path in sorted(PHOTOS.glob("*.jpg"))[: args.photos]:
        image = samkit.load_image(path)
        h, w = image.shape[:2]
        points = rng.uniform([0, 0], [w, h], size=(args.points, 2))
        emb = {}
        for pad, x in _inputs(pipe, image).items():
            emb["t", pad] = teacher.image_encoder(x)
            emb["s", pad] = student.image_encoder(x)
        row = {"photo": path.name, "size": f"{w}x{h}"}
        for pad in ("zeros", "-mean/std"):
            row[f"mse {pad}"] = F.mse_loss(emb["s", pad], emb["t", pad]).item()
            t_masks = _best_masks(t_pred, emb["t", pad], (h, w), points)
            s_masks = _best_masks(s_pred, emb["s", pad], (h, w), points)
            row[f"iou {pad}"] = float(np.mean([_iou(a, b) for a, b in zip(s_masks, t_masks, strict=True)]))
        row["teacher shift"] = F.mse_loss(emb["t", "zeros"], emb["t", "-mean/std"]).item()
        row["student shift"] = F.mse_loss(emb["s", "zeros"], emb["s", "-mean/std"]).item()
        rows.append(row)
    cols = list(rows[0])
    from samkit.hardware import run_header

    print("\n".join(f"# {line}" for line in run_header("fp32").splitlines()))
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {time.perf_counter() - t0:.0f} s")
    print(
        "# mse X: student-vs-teacher embedding MSE with padding X; iou X: mean IoU student vs teacher best "
        "mask, same single points; shift: an encoder's own embedding MSE zeros vs -mean/std"
    )
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.5f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    mean = {c: float(np.mean([r[c] for r in rows])) for c in cols[2:]}
    print("mean | - | " + " | ".join(f"{mean[c]:.5f}" for c in cols[2:]))


if __name__ == "__main__":
    main()
