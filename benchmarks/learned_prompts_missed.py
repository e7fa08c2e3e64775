"""Which objects the learned prompts miss that the grid finds, on held-out TRAINING images.

For each annotated object: its best mask IoU among the grid run's masks and among the learned run's. Prints
recall at each IoU threshold for both, the mean best IoU where both find the object (mask quality), and for
the objects only the grid finds (IoU >= 0.5) how much of each lies under the learned masks (a missed object
fully under learned masks sits inside a larger mask: a clump the covering rule then skips) and their sizes.
Reads the grid runs cached by `learned_prompts_design.py` (run it first on the same images).

    OMP_NUM_THREADS=1 python benchmarks/learned_prompts_missed.py \\
        --data ../shared/datasets/instances/dsb2018/train --densest --limit 25
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from learned_prompts_design import (  # the same held-out images and cache
        grid_cache_file,
        teacher_images,
        unseen_items,
    )
    from pycocotools import mask as mask_utils

    import samkit
    from samkit.everything.generator import MaskGenerator
    from samkit.everything.learned import PEAK_DEFAULTS, grid_candidates, head_logits, load_head
    from samkit.hardware import run_header
    from samkit.image import load_image
    from samkit.predictor import Predictor

    class RecordingGenerator(MaskGenerator):
        """A MaskGenerator that keeps the point prompts it decodes (x, y; no crops, so image pixels)."""

        decoded: list[np.ndarray]

        def _process_batch(self, embedded_image, points, *args):  # type: ignore[override]
            if len(args) < 5 or args[4] is None:  # a point prompt, not a box (args[4]: boxes)
                self.decoded.append(np.asarray(points, dtype=np.float64))
            return super()._process_batch(embedded_image, points, *args)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a TRAINING split with annotations.json")
    parser.add_argument("--seen", type=int, default=46, help="the teacher ran on the first N in name order")
    parser.add_argument("--every", type=int, default=1, help="every Nth of the unseen images")
    parser.add_argument("--offset", type=int, default=0, help="with --every: start at this unseen image")
    parser.add_argument("--limit", type=int, default=25)
    parser.add_argument("--densest", action="store_true", help="the unseen images with the most objects")
    parser.add_argument(
        "--trained-on", default=None, help="a prompt_head config: leave out the images its teacher used"
    )
    parser.add_argument("--head", default=None, help="prompt head file (default: the shipped one)")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "learned_design")
    parser.add_argument("--detail", action="store_true", help="one line per object only the grid finds")
    parser.add_argument(
        "--filters",
        action="store_true",
        help="with --detail: decode every grid point inside each such object and count the masks that match "
        "it (IoU >= 0.5), pass pred_iou_thresh, pass stability, and the head's ranks of the points whose "
        "matching mask passes both",
    )
    args = parser.parse_args()
    drop = teacher_images(args.trained_on) if args.trained_on else frozenset()
    items, _ = unseen_items(args.data, args.seen, args.densest, args.every, args.limit, drop, args.offset)
    torch.set_num_threads(1)
    print(run_header("fp32"))
    print(f"date {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")

    model = samkit.load("vit_t", dtype="fp32")
    head = load_head(args.head)
    gen = RecordingGenerator(model, output_mode="coco_rle", prompts="learned", prompt_head=head, threads=1)

    def filter_counts(pred: Predictor, head, gen: MaskGenerator, obj: np.ndarray) -> str:
        """How the grid points inside `obj` fare: their masks matching it, and those passing the filters."""
        logits = head_logits(head, pred.embedded_image.features)
        pts, _ = grid_candidates(logits, pred.original_size, pred.input_size, PEAK_DEFAULTS)  # best first
        h, w = obj.shape
        px = np.minimum(pts.astype(int), [w - 1, h - 1])
        idx = np.flatnonzero(obj[px[:, 1], px[:, 0]])
        if not len(idx):
            return "no grid point inside"
        masks, scores, _ = pred.predict_batch(
            pts[idx][:, None, :], np.ones((len(idx), 1)), return_logits=True
        )
        t, off = model.mask_threshold, gen.stability_score_offset
        match = good_iou = stable = 0
        ranks = []
        for i, rank in enumerate(idx):
            for c in range(masks.shape[1]):
                lg = masks[i, c]
                mk = lg > t
                if (mk & obj).sum() < 0.5 * (mk | obj).sum():
                    continue
                match += 1
                ok_iou = scores[i, c] > gen.pred_iou_thresh
                ok_stab = (lg > t + off).sum() / max((lg > t - off).sum(), 1) >= gen.stability_score_thresh
                good_iou += int(ok_iou)
                stable += int(ok_stab)
                if ok_iou and ok_stab:
                    ranks.append(int(rank))
        return (
            f"grid points inside {len(idx)}: masks matching it {match}, of those over pred_iou_thresh "
            f"{good_iou}, stable {stable}, both {len(ranks)}; the head's ranks (of {len(pts)}) of the points "
            f"with such a mask: {sorted(set(ranks))[:10]}"
        )

    grid_best, learned_best, under, missed_area, tried = [], [], [], [], []
    for it in items:
        cached = grid_cache_file(args.cache, args.data, it)
        if not cached.exists():
            sys.exit(
                f"no cached grid run for {it.image}: run learned_prompts_design.py on these images first"
            )
        grid = pickle.loads(cached.read_bytes())
        image = load_image(it.image)
        pred = Predictor(model)
        pred.set_embedding(grid["features"], image.shape[:2])
        gen.decoded = []
        learned = [r["segmentation"] for r in gen.generate(image, embedded=pred)]
        pts = np.concatenate(gen.decoded) if gen.decoded else np.zeros((0, 2))
        h, w = image.shape[:2]
        n = 32
        frac = (np.arange(n) + 0.5) / n  # the grid's points: columns and rows of image pixels
        cols, rows = np.minimum((frac * w).astype(int), w - 1), np.minimum((frac * h).astype(int), h - 1)
        gts = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in it.masks]
        crowd = [0] * len(gts)
        g = np.asarray(mask_utils.iou(list(grid["rles"]), gts, crowd)).reshape(-1, len(gts)).max(0, initial=0)
        lv = np.asarray(mask_utils.iou(learned, gts, crowd)).reshape(-1, len(gts)).max(0, initial=0)
        grid_best.extend(g)
        learned_best.extend(lv)
        union = np.zeros(image.shape[:2], bool)
        for r in learned:
            union |= mask_utils.decode(r).astype(bool)
        for k in np.flatnonzero((g >= 0.5) & (lv < 0.5)):
            m = it.masks[k].astype(bool)
            under.append((union & m).sum() / max(m.sum(), 1))
            missed_area.append(int(m.sum()))
            # grid points inside the object, and how many of any decoded point lie inside it
            in_grid = int(m[np.ix_(rows, cols)].sum())
            px = np.clip(pts.astype(int), 0, [w - 1, h - 1])
            in_dec = int(m[px[:, 1], px[:, 0]].sum()) if len(px) else 0
            tried.append((in_grid, in_dec))
            if args.detail:
                print(
                    f"  {it.id}: object {k}, {100 * m.sum() / (h * w):.1f}% of the image, best IoU grid "
                    f"{g[k]:.2f} learned {lv[k]:.2f}, {100 * under[-1]:.0f}% under learned masks, grid points "
                    f"inside {in_grid}, decoded points inside {in_dec}"
                )
                if args.filters:
                    print("    " + filter_counts(pred, head, gen, m))
    g, lv = np.array(grid_best), np.array(learned_best)
    print(f"images {len(items)} of {args.data}{' (densest)' if args.densest else ''}; objects {len(g)}")
    for t in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95):
        print(
            f"recall at IoU {t:.2f}: grid {100 * (g >= t).mean():5.1f}  learned {100 * (lv >= t).mean():5.1f}"
        )
    both = (g >= 0.5) & (lv >= 0.5)
    print(
        f"found by both: {both.sum()}, mean best IoU grid {g[both].mean():.3f} learned {lv[both].mean():.3f}"
    )
    print(
        f"found only by the grid: {len(under)}; only by the learned prompts: {int(((lv >= 0.5) & (g < 0.5)).sum())}"
    )
    if under:
        u = np.array(under)
        print(
            f"of those only the grid finds: {int((u > 0.8).sum())} lie over 80% under learned masks, "
            f"{int((u < 0.2).sum())} under 20%; area median {np.median(missed_area):.0f} px "
            f"(10th-90th percentile {np.percentile(missed_area, 10):.0f}-{np.percentile(missed_area, 90):.0f})"
        )
        t = np.array(tried)
        print(
            f"grid points inside them: none {int((t[:, 0] == 0).sum())}, one {int((t[:, 0] == 1).sum())}, "
            f"more {int((t[:, 0] > 1).sum())}; a learned point was decoded inside {int((t[:, 1] > 0).sum())} "
            f"of them (its masks then lost to the filters or NMS), none inside {int((t[:, 1] == 0).sum())}"
        )


if __name__ == "__main__":
    main()
