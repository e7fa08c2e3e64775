"""Segment everything with learned prompts vs the 32 x 32 grid: proposal AR and wall time, same run.

For each of the first `--limit` images of an instance set (default coco_mini/val, an EVAL split: measured
here, never tuned on), both modes run `MaskGenerator.generate()` on the same image, one after the other
(image encoding included in each, model loading excluded), then their masks are scored as the
`proposals` protocol does (AR@100 / AR@1000 over IoU 0.5:0.95, ranked by predicted IoU).

    OMP_NUM_THREADS=1 python benchmarks/bench_learned_prompts.py --limit 10 --threads 1
    OMP_NUM_THREADS=1 python benchmarks/bench_learned_prompts.py --limit 10 --threads 1 --threshold 0.05 --min-points 64
    OMP_NUM_THREADS=1 python benchmarks/bench_learned_prompts.py --limit 10 --threads 1 --also parts:cover_max_area=0.1

`--also NAME:KEY=VALUE,...` adds a learned run with other settings on every image of the same run (the learned
runs take turns going first), so two settings' times compare without the host's drift between runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "instances" / "coco_mini" / "val"


def main() -> None:
    import samkit
    from samkit.eval import protocols as P
    from samkit.eval.datasets import open_dataset
    from samkit.everything.learned import PEAK_DEFAULTS, parse_peaks
    from samkit.hardware import run_header
    from samkit.image import load_image
    from samkit.train.config import parse_override

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument(
        "--skip", type=int, default=0, help="start after this many images (split a set over runs)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--threshold", type=float, default=PEAK_DEFAULTS.threshold, help="peak threshold")
    parser.add_argument("--min-points", type=int, default=PEAK_DEFAULTS.min_points)
    parser.add_argument("--max-points", type=int, default=PEAK_DEFAULTS.max_points)
    parser.add_argument("--nms-radius", type=int, default=PEAK_DEFAULTS.nms_radius)
    parser.add_argument(
        "--grid", type=int, default=PEAK_DEFAULTS.grid, help="candidates: n x n grid (0: cells)"
    )
    parser.add_argument(
        "--cover",
        action=argparse.BooleanOptionalAction,
        default=PEAK_DEFAULTS.cover,
        help="skip candidates inside a mask already found",
    )
    parser.add_argument(
        "--boxes", type=int, default=PEAK_DEFAULTS.boxes, help="box prompts after the points (0: none)"
    )
    parser.add_argument(
        "--yield-after",
        type=int,
        default=PEAK_DEFAULTS.yield_after,
        help="points decoded before the yield rule may end the rounds (0: no yield rule)",
    )
    parser.add_argument(
        "--min-yield", type=float, default=PEAK_DEFAULTS.min_yield, help="new masks per point"
    )
    parser.add_argument(
        "--refill",
        type=int,
        default=PEAK_DEFAULTS.refill,
        help="points between the grid's on crowded images (0: none)",
    )
    parser.add_argument(
        "--refill-cover-rel",
        type=float,
        default=PEAK_DEFAULTS.refill_cover_rel,
        help="in the refill, masks over this many times the median kept area cover nothing (0: off)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other PeakSettings field, e.g. --set cover_hits=2 (repeatable)",
    )
    parser.add_argument("--head", default=None, help="prompt head file (default: the shipped one)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new image after this long")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="one more learned run per image with these PeakSettings changes (e.g. parts:cover_max_area=0.1), "
        "timed in the same run (repeatable)",
    )
    parser.add_argument(
        "--modes",
        default="grid,learned",
        help="comma-separated modes to run (time ratios need grid in the same run)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(run_header("fp32"))
    print(f"date {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; load average {_load()}")
    print(f"command: {shlex.join(['python', *sys.argv])} (nice {os.nice(0)})")
    print(
        f"torch threads {args.threads}; data {args.data}; model {args.model} (fp32); "
        f"skip {args.skip}; limit {args.limit}"
    )
    peaks = dataclasses.replace(
        PEAK_DEFAULTS,
        threshold=args.threshold,
        min_points=args.min_points,
        max_points=args.max_points,
        nms_radius=args.nms_radius,
        grid=args.grid,
        cover=args.cover,
        boxes=args.boxes,
        yield_after=args.yield_after,
        min_yield=args.min_yield,
        refill=args.refill,
        refill_cover_rel=args.refill_cover_rel,
    )
    for pair in args.set:
        (key, *_), value = parse_override(pair)
        peaks = dataclasses.replace(peaks, **{key: value})
    print(f"learned peaks: {peaks}")
    model = samkit.load(args.model, dtype="fp32")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or set(modes) - {"grid", "learned"}:
        parser.error("--modes takes grid, learned or both")
    gens = {m: samkit.MaskGenerator(model, prompts=m, peaks=peaks, prompt_head=args.head) for m in modes}
    for spec in args.also:
        name, _, changes = spec.partition(":")
        if not name or name in gens:
            parser.error(f"--also needs a new NAME:KEY=VALUE,..., got {spec!r}")
        extra = parse_peaks(changes, peaks)  # the named fields over this run's peaks
        print(f"{name} peaks: {extra}")
        gens[name] = samkit.MaskGenerator(model, prompts="learned", peaks=extra, prompt_head=args.head)
    modes = tuple(gens)
    learned_runs = [m for m in modes if m != "grid"]
    results: dict[str, list] = {m: [] for m in modes}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    dataset = open_dataset(args.data)
    start = time.perf_counter()
    for n, item in enumerate(itertools.islice(dataset.images(), args.skip, None)):
        if n >= args.limit or (args.budget_s is not None and time.perf_counter() - start > args.budget_s):
            break
        image = load_image(item.image)
        order = [m for m in modes if m == "grid"] + (learned_runs if n % 2 == 0 else learned_runs[::-1])
        for m in order:  # the learned runs take turns going first
            t0 = time.perf_counter()
            records = gens[m].generate(image)
            seconds[m].append(time.perf_counter() - t0)
            masks = [r["segmentation"] for r in records]
            scores = np.array([r["predicted_iou"] for r in records], dtype=np.float64)
            results[m].append(P.proposals(lambda _, masks=masks, scores=scores: (masks, scores), item))
        per_mode = " | ".join(
            f"{m} {seconds[m][-1]:.1f} s {results[m][-1]['n_proposals']} masks" for m in modes
        )
        print(f"{item.id}: {per_mode} | load {_load()}", flush=True)

    print(f"\n{'mode':8} {'AR@100':>7} {'AR@1000':>8} {'masks/img':>9} {'s/img':>7} {'time ratio':>10}")
    base = float(np.mean(seconds["grid"])) if "grid" in modes else float("nan")
    for m in modes:
        s = P.summarize_proposals(results[m])
        t = float(np.mean(seconds[m]))
        masks = float(np.mean([r["n_proposals"] for r in results[m]]))
        print(
            f"{m:8} {100 * s['AR@100']:7.1f} {100 * s['AR@1000']:8.1f} {masks:9.1f} {t:7.2f} {t / base:10.3f}"
        )
    print(f"images {len(seconds[modes[0]])}, objects {P.summarize_proposals(results[modes[0]])['n_objects']}")
    print(f"date {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; load average {_load()}")


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
