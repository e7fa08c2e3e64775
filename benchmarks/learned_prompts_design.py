"""Choosing the learned prompts' settings on held-out TRAINING images (never an evaluation split).

Runs the 32 x 32 grid once per image (cached under --cache) and then each prompt variant on the same stored
embedding, scoring all of them as `samkit eval proposals` does against the training split's own human masks
(AR over IoU 0.5:0.95, and AR@1000 by object size). Time is the decoding only (the image encoding, the same
for every variant, is left out), with one torch thread. Per image it prints each run's prompts (p), masks
(m), seconds (s) and objects recalled (r: averaged over AR's IoU thresholds, 1,000 proposals); at the end the
images where each variant trails the grid most (recall is pooled over objects: a few images can hold a gap).

The images are those the shipped head never saw: the split's images less the first --seen (46) in name
order, which the teacher ran on (`configs/prompt_head.yaml`, teacher.per_folder); --every takes every Nth,
from the --offset-th on (two offsets give two disjoint sets: one to choose on, one to check).
With --trained-on CONFIG, a chosen image that CONFIG's teacher also used (e.g. a listed one) is refused;
with --drop-trained too, such images are left out before --every and --limit instead (e.g. every 10th of
dsb2018/train's unseen images, 46: a sample of all densities). With --no-grid, only the variants run (an
image without a cached grid run is encoded only): for measuring settings on a set whose grid recall is known.

    OMP_NUM_THREADS=1 python benchmarks/learned_prompts_design.py \\
        --data ../shared/datasets/instances/coco_mini/train --limit 34 \\
        --variant top150 cover=False --variant cover150 --variant no_area_cap cover_max_area=1.01
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _variants(specs: list[list[str]]) -> dict[str, object]:
    """`--variant NAME key=value ...` -> {NAME: PeakSettings}; values parsed as `samkit train --set` parses
    them (YAML: bool, int, float or text)."""
    from samkit.everything.learned import PEAK_DEFAULTS
    from samkit.train.config import parse_override

    out = {}
    for name, *pairs in specs:
        kw = {}
        for pair in pairs:
            (key, *_), value = parse_override(pair)
            kw[key] = value
        out[name] = dataclasses.replace(PEAK_DEFAULTS, **kw)
    return out


def unseen_items(
    data: str,
    seen: int,
    densest: bool = False,
    every: int = 1,
    limit: int | None = None,
    drop: frozenset[Path] = frozenset(),
    offset: int = 0,
) -> tuple[list, int]:
    """The images of the TRAINING split `data` (exits on an evaluation split) less its first `seen` in name
    order (the teacher's) and less those in `drop` (resolved paths), in name order or with `densest` most
    annotated objects first (a stable sort keeps name order among equals), every `every`th from the `offset`th,
    at most `limit`;
    and how many such unseen images there are."""
    from samkit.eval.datasets import open_dataset
    from samkit.train.prompt_head import training_images

    parts = Path(data).resolve().parts
    if "val" in parts or "test" in parts or "interactive" in parts:
        sys.exit(f"{data} is an evaluation split: held-out training images only")
    names = {p.name for p in training_images([Path(data) / "images"], seen)}
    items = sorted(
        (
            it
            for it in open_dataset(data).images()
            if Path(it.image).name not in names and Path(it.image).resolve() not in drop
        ),
        key=lambda it: Path(it.image).name,
    )
    if densest:
        items = sorted(items, key=lambda it: -len(it.masks))
    return items[offset::every][:limit], len(items)


def teacher_images(config: str) -> frozenset[Path]:
    """The images (resolved paths) the teacher of a prompt_head config `config` ran on."""
    from samkit.train.prompt_head import load_prompt_head_config, training_images

    cfg = load_prompt_head_config(config)
    return frozenset(
        p.resolve() for p in training_images(cfg["teacher"]["folders"], cfg["teacher"]["per_folder"])
    )


def _recalled(result: dict) -> float:
    """One image's objects recalled by its first 1,000 proposals, averaged over the IoU thresholds of AR
    (its share of AR@1000 times the set's object count)."""
    from samkit.eval.metrics import AR_IOU_THRESHOLDS

    best = np.asarray(result["best_iou@1000"], dtype=np.float64)
    return float(np.mean([(best >= t).sum() for t in AR_IOU_THRESHOLDS]))


def grid_cache_file(cache: Path, data: str, item) -> Path:
    """Where the grid run of `item` (an image of the split `data`) is cached."""
    return cache / f"{Path(data).resolve().parent.name}_{item.id}.pkl"


def main() -> None:
    from pycocotools import mask as mask_utils

    import samkit
    from samkit.eval import protocols as P
    from samkit.everything.generator import MaskGenerator
    from samkit.everything.learned import load_head
    from samkit.hardware import run_header
    from samkit.image import load_image
    from samkit.predictor import Predictor

    class CountingGenerator(MaskGenerator):
        """A MaskGenerator that counts the prompts it decodes."""

        decoded = 0

        def _process_batch(self, embedded_image, points, *args):  # type: ignore[override]
            self.decoded += len(points)
            return super()._process_batch(embedded_image, points, *args)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a TRAINING split with annotations.json")
    parser.add_argument(
        "--seen", type=int, default=46, help="the head's teacher ran on the first N in name order"
    )
    parser.add_argument("--every", type=int, default=1, help="every Nth of the unseen images")
    parser.add_argument("--offset", type=int, default=0, help="with --every: start at this unseen image")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument(
        "--densest", action="store_true", help="take the unseen images with the most objects (before --every)"
    )
    parser.add_argument("--head", default=None, help="prompt head file (default: the shipped one)")
    parser.add_argument(
        "--trained-on", default=None, help="a prompt_head config: refuse to score an image its teacher used"
    )
    parser.add_argument(
        "--drop-trained",
        action="store_true",
        help="with --trained-on: leave out its teacher's images before --every and --limit (else refused)",
    )
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "learned_design")
    parser.add_argument(
        "--no-grid",
        action="store_true",
        help="variants only: an image with no cached grid run is only encoded (its grid recall measured before)",
    )
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE]")
    args = parser.parse_args()
    # a head trained on more than the first --seen images must not be scored on those
    used = teacher_images(args.trained_on) if args.trained_on else frozenset()
    drop = used if args.drop_trained else frozenset()
    items, n_unseen = unseen_items(
        args.data, args.seen, args.densest, args.every, args.limit, drop, args.offset
    )
    torch.set_num_threads(1)
    variants = _variants(args.variant)

    print(run_header("fp32"))
    print(f"date {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"command: {shlex.join(['python', *sys.argv])}")
    model = samkit.load("vit_t", dtype="fp32")
    head = load_head(args.head)
    grid_gen = CountingGenerator(model, output_mode="coco_rle", threads=1)
    args.cache.mkdir(parents=True, exist_ok=True)
    names = ["grid", *variants] if not args.no_grid else list(variants)
    results: dict[str, list] = {n: [] for n in names}
    stats: dict[str, list] = {n: [] for n in names}
    if used:
        clash = [it.image for it in items if Path(it.image).resolve() in used]
        if clash:
            sys.exit(f"{clash[0]} was a teacher image of {args.trained_on}: choose settings on unseen images")
    for it in items:
        image = load_image(it.image)
        size = (image.shape[0], image.shape[1])
        cached = grid_cache_file(args.cache, args.data, it)
        pred = Predictor(model)
        if cached.exists():
            grid = pickle.loads(cached.read_bytes())
            pred.set_embedding(grid["features"], size)
        else:
            pred.set_image(image)
        if not cached.exists() and not args.no_grid:
            t0 = time.perf_counter()
            records = grid_gen.generate(image, embedded=pred)
            grid = {
                "features": pred.embedding.cpu().numpy(),
                "rles": [r["segmentation"] for r in records],
                "scores": np.array([r["predicted_iou"] for r in records]),
                "seconds": time.perf_counter() - t0,
            }
            cached.write_bytes(pickle.dumps(grid))

        def score(rles: list, scores: np.ndarray, item=it) -> dict:
            masks = [mask_utils.decode(r).astype(bool) for r in rles]
            return P.proposals(lambda _: (masks, scores), item)

        if "grid" in results:
            results["grid"].append(score(grid["rles"], grid["scores"]))
            stats["grid"].append((1024, grid["seconds"], len(grid["rles"])))
        for name, peaks in variants.items():
            gen = CountingGenerator(
                model, output_mode="coco_rle", prompts="learned", prompt_head=head, peaks=peaks, threads=1
            )
            t0 = time.perf_counter()
            records = gen.generate(image, embedded=pred)
            seconds = time.perf_counter() - t0
            scores = np.array([r["predicted_iou"] for r in records])
            results[name].append(score([r["segmentation"] for r in records], scores))
            stats[name].append((gen.decoded, seconds, len(records)))
        print(
            f"{it.id}: "
            + " | ".join(
                f"{n} {s[-1][0]}p {s[-1][2]}m {s[-1][1]:.1f}s {_recalled(results[n][-1]):.1f}r"
                for n, s in stats.items()
            ),
            flush=True,
        )

    print(
        f"\nimages {len(items)} of {args.data} (every {args.every} of the {n_unseen} the head never saw"
        f"{', the densest first' if args.densest else ''});"
        " decode time only, one thread"
    )
    print(
        f"{'variant':14} {'AR@100':>7} {'AR@1000':>8} {'prompts':>8} {'s/img':>6} {'masks':>6}  AR@1000 S/M/L"
    )
    for name in names:
        s = P.summarize_proposals(results[name])
        n, t, m = np.array(stats[name], dtype=float).mean(0)
        sml = " / ".join(f"{100 * s[f'AR_{k}@1000']:.1f}" for k in ("small", "medium", "large"))
        print(
            f"{name:14} {100 * s['AR@100']:7.1f} {100 * s['AR@1000']:8.1f} {n:8.1f} {t:6.2f} {m:6.1f}  {sml}"
        )
    for name, peaks in variants.items():
        print(f"{name}: {peaks}")
    if args.no_grid:
        return
    # Where the gap to the grid lies: recall is pooled over objects, so a few images can hold all of it.
    grid_r = np.array([_recalled(r) for r in results["grid"]])
    for name in variants:
        diff = np.array([_recalled(r) for r in results[name]]) - grid_r
        worst = np.argsort(diff, kind="stable")[:5]
        print(
            f"{name} - grid: {diff.sum():+.1f} objects recalled; most behind: "
            + ", ".join(f"{items[i].id} {diff[i]:+.1f}" for i in worst if diff[i] < 0)
        )


if __name__ == "__main__":
    main()
