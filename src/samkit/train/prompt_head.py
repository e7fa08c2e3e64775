"""Training the learned-prompt head: the grid segment-everything run is the teacher.

Two steps, each a function and a `python -m samkit.train.prompt_head` subcommand:

* `teacher`: for each training image, the image embedding (1, 256, 64, 64) and the prompt points
  (x, y original-image pixels) of the masks that the 32 x 32 grid run keeps, one `.npz` per image
  (rerun skips done images).
* `fit`: a `PromptHead` trained on those files to put a peak on each kept mask's prompt point (a
  Gaussian heat map on the 64 x 64 embedding grid, focal loss); saved as safetensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from samkit.everything.learned import PEAK_DEFAULTS, pick_peaks, points_to_cells
from samkit.models.prompt_head import PromptHead

SIGMA_CELLS = 1.0  # Gaussian radius of a target peak, in embedding cells (16 input pixels each)


def make_teacher(
    images: list[Path], out_dir: Path, model_name: str = "vit_t", time_budget_s: float = 1e9
) -> None:
    """One `<stem>.npz` per image in `out_dir`: features float16 (256, 64, 64), points float32 (N, 2)
    (x, y original pixels of the kept masks' prompts), original_size, input_size, grid_seconds."""
    import samkit
    from samkit.everything.generator import MaskGenerator
    from samkit.image import load_image
    from samkit.predictor import Predictor

    out_dir.mkdir(parents=True, exist_ok=True)
    model = samkit.load(model_name, dtype="fp32")
    generator = MaskGenerator(model, output_mode="coco_rle")
    pred = Predictor(model)
    start = time.perf_counter()
    for path in images:
        dest = out_dir / f"{path.parent.parent.parent.name}_{path.stem}.npz"
        if dest.exists():
            continue
        if time.perf_counter() - start > time_budget_s:
            break
        arr = load_image(path)
        t0 = time.perf_counter()
        pred.set_image(arr)
        records = generator.generate(arr, embedded=pred)
        seconds = time.perf_counter() - t0
        points = np.array([r["point_coords"][0] for r in records], dtype=np.float32).reshape(-1, 2)
        tmp = dest.with_suffix(".tmp.npz")
        np.savez_compressed(
            tmp,
            features=pred.embedding[0].cpu().numpy().astype(np.float16),
            points=points,
            original_size=np.array(pred.original_size),
            input_size=np.array(pred.input_size),
            grid_seconds=np.array(seconds),
        )
        os.replace(tmp, dest)
        print(f"{dest.name}: {len(points)} masks, {seconds:.1f} s", flush=True)


def heatmap_target(
    points: np.ndarray,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    side: int = 64,
    sigma: float = SIGMA_CELLS,
) -> torch.Tensor:
    """(side, side) float32 target: max over the points of a Gaussian centred on each point's cell
    position (x, y original pixels -> embedding cells); 1.0 at each point's own cell."""
    cells = points_to_cells(points, original_size, input_size)
    centres = torch.arange(side, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    target = torch.zeros(side, side)
    for cx, cy in cells:
        g = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
        target = torch.maximum(target, g)
        target[int(cy), int(cx)] = 1.0
    return target


def _valid_area(input_size: tuple[int, int], side: int = 64) -> torch.Tensor:
    """(side, side) bool: embedding cells that cover image pixels (not padding)."""
    h, w = (-(-s // 16) for s in input_size)
    valid = torch.zeros(side, side, dtype=torch.bool)
    valid[:h, :w] = True
    return valid


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on (B, H, W) logits and Gaussian targets, over valid cells,
    normalised by the number of peaks (cells where target == 1)."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = (target >= 1.0) & valid
    neg = (~pos) & valid
    pos_loss = -((1 - p) ** 2 * torch.log(p))[pos].sum()
    neg_loss = -(((1 - target) ** 4) * p**2 * torch.log(1 - p))[neg].sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def _load(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (N, 256, 64, 64), heat-map targets (N, 64, 64) and valid cells (N, 64, 64) of the files."""
    feats, targets, valids = [], [], []
    for f in files:
        d = np.load(f)
        osz = tuple(int(v) for v in d["original_size"])
        isz = tuple(int(v) for v in d["input_size"])
        feats.append(torch.from_numpy(d["features"].astype(np.float32)))
        targets.append(heatmap_target(d["points"], osz, isz))
        valids.append(_valid_area(isz))
    return torch.stack(feats), torch.stack(targets), torch.stack(valids)


@torch.no_grad()
def heldout_report(
    head: PromptHead, files: list[Path], thresholds: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
) -> list:
    """Per peak threshold: mean peaks per image and the share of the teacher's kept prompts within one
    cell (Chebyshev) of a peak, over held-out teacher files (training images the head did not see)."""
    rows = []
    for t in thresholds:
        settings = dataclasses.replace(PEAK_DEFAULTS, threshold=t)
        n_peaks, hit, total = [], 0, 0
        for f in files:
            d = np.load(f)
            osz = tuple(int(v) for v in d["original_size"])
            isz = tuple(int(v) for v in d["input_size"])
            logits = head(torch.from_numpy(d["features"].astype(np.float32))[None])[0, 0]
            peaks = pick_peaks(logits, isz, settings)
            cells = np.floor(points_to_cells(d["points"], osz, isz))
            n_peaks.append(len(peaks))
            if len(cells):
                dist = np.abs(cells[:, None, :] - peaks[None, :, :]).max(-1).min(1)
                hit += int((dist <= 1).sum())
                total += len(cells)
        rows.append(
            {
                "threshold": t,
                "peaks_per_image": float(np.mean(n_peaks)),
                "teacher_prompts_within_1_cell": hit / max(total, 1),
            }
        )
    return rows


def fit(
    teacher_dir: Path,
    out: Path,
    steps: int = 400,
    lr: float = 2e-3,
    batch: int = 8,
    seed: int = 0,
    holdout: int = 6,
) -> dict:
    """Train a PromptHead on the teacher files but the last `holdout` made (reported on, not trained on);
    writes `out` (safetensors) and `<out>.json` (settings, loss log, held-out report)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    all_files = sorted(teacher_dir.glob("*.npz"), key=lambda f: f.stat().st_mtime)
    if len(all_files) <= holdout:
        raise FileNotFoundError(f"need more than {holdout} teacher files in {teacher_dir}")
    files, held = all_files[: len(all_files) - holdout], all_files[len(all_files) - holdout :]
    x_all, t_all, v_all = _load(files)
    head = PromptHead()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    log = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(files), (batch,))
        x, t, v = x_all[idx], t_all[idx], v_all[idx]
        loss = focal_loss(head(x)[:, 0], t, v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - t0})
            print(log[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out))
    head.eval()
    report = heldout_report(head, held) if held else []
    for row in report:
        print(row, flush=True)
    info = {
        "images": len(files),
        "heldout_images": [f.stem for f in held],
        "heldout": report,
        "steps": steps,
        "lr": lr,
        "batch": batch,
        "seed": seed,
        "sigma_cells": SIGMA_CELLS,
        "seconds": time.perf_counter() - t0,
        "log": log,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m samkit.train.prompt_head")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("teacher", help="embeddings + kept prompt points of the grid run, per training image")
    p.add_argument("folders", nargs="+", help="image folders of training splits")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-folder", type=int, default=None, help="first N images of each folder")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new images after this")
    p = sub.add_parser("fit", help="train the head on the teacher files")
    p.add_argument("teacher", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--holdout", type=int, default=6, help="last N teacher files: reported on, not trained on")
    p.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    if args.cmd == "teacher":
        images = []
        per = [sorted(Path(f).glob("*.jpg")) + sorted(Path(f).glob("*.png")) for f in args.folders]
        n = args.per_folder or max(len(p) for p in per)
        for i in range(n):  # interleave the folders, so a time budget covers each of them
            images += [p[i] for p in per if i < len(p)]
        make_teacher(images, args.out, time_budget_s=args.budget_s)
    else:
        fit(args.teacher, args.out, steps=args.steps, lr=args.lr, holdout=args.holdout)


if __name__ == "__main__":
    main()
