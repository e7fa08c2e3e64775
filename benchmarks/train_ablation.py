"""Issue 6: what augmentation, synthetic scenes and copy-paste add to a small fine-tune, measured.

A controlled ablation on a small real training set: MobileSAM (`vit_t`), mask decoder only, fine-tuned on
the first TRAIN_IMAGES images of `instances/dsb2018/train` (fluorescence/histology nuclei, where zero-shot
vit_t is weak: see README "Fine-tune on your own masks") with the same seed, steps and settings in every
arm; only `data.train` and the augmentation differ:

  none        the real images only, unaugmented
  augment     + one cached augmented copy per image (scale 0.7-1.3 with crop, h-flip 0.5, colour 0.2),
              drawn half of the time (`data.cache_variants: 2`)
  synthetic   + SYNTH synthetic scenes (random textured shapes, exact masks), mixed 1:1 with the real ones
  copy_paste  + SYNTH copy-paste composites (objects of the training images pasted onto training images),
              mixed 1:1 with the real ones

Every arm runs with each seed in --seeds (the seed changes the drawn images, masks and prompts, and the
augmented copies); the spread between seeds is the noise a difference has to beat. The score is
samkit.eval's single-point protocol (mIoU of the top-scored of 3 masks) on the LAST VAL_IMAGES images of
dsb2018/train, the first VAL_PER_IMAGE objects of each: held-out training images, never trained on. The
evaluation split dsb2018/val is not touched (no setting here was chosen by it).

  python benchmarks/train_ablation.py [--steps 40] [--seeds 0 1] [--work /tmp/ablation] [--table-only]

Runs are resumable (an arm whose metrics hold its final validation is not rerun). One torch thread.
The table goes to stdout and benchmarks/results/train_ablation.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "instances" / "dsb2018" / "train"
RESULTS = ROOT / "benchmarks" / "results" / "train_ablation.txt"
TRAIN_IMAGES = 24
VAL_IMAGES = 20
VAL_PER_IMAGE = 5
SYNTH = 12
ARMS = ("none", "augment", "synthetic", "copy_paste")


def config(arm: str, seed: int, steps: int, work: Path, name: str | None = None) -> dict:
    """The samkit train config of one arm; everything but data.train and the augmentation is shared."""
    real = {"type": "coco", "path": str(DATA), "range": [0, TRAIN_IMAGES]}
    train = [real]
    data: dict = {}
    if arm == "augment":
        data = {"cache_variants": 2, "augment": {"scale": [0.7, 1.3], "hflip": 0.5, "color": 0.2}}
    elif arm == "synthetic":
        train.append({"type": "synthetic", "count": SYNTH, "size": 512, "seed": 0})
    elif arm == "copy_paste":
        train.append(
            {
                "type": "copy_paste",
                "count": SYNTH,
                "max_objects": 4,
                "seed": 0,
                "objects": real,
                "backgrounds": real,
            }
        )
    return {
        "seed": seed,
        "out": str(work / (name or f"{arm}-s{seed}")),
        "threads": 1,
        "mode": "decoder",
        "model": {"init": "vit_t"},
        "data": {
            "train": train,
            "val": {"type": "coco", "path": str(DATA), "range": [-VAL_IMAGES, None]},
            "masks_per_image": 4,
            "batch_size": 1,
            "cache_dir": str(work / "embeddings"),
            "precache": True,
            "workers": 0,
            **data,
        },
        "recipe": {"rounds": 1},
        "optim": {"steps": steps, "lr": 2.0e-4, "warmup": 5, "weight_decay": 0.01, "clip": 1.0},
        "log_every": 10,
        "checkpoint_every": 20,
        "val_every": 0,
        "val_objects": VAL_IMAGES * VAL_PER_IMAGE,
        "val_per_image": VAL_PER_IMAGE,
    }


def final_val(out: Path) -> dict | None:
    """The last validation row of a finished run, or None."""
    from samkit.train import read_metrics

    if not (out / "model.safetensors").is_file():
        return None
    _, val = read_metrics(out / "metrics.jsonl")
    return val[-1]["val"] if val else None


def run_arm(arm: str, seed: int, steps: int, work: Path, name: str | None = None) -> dict:
    from samkit.train import train

    cfg = config(arm, seed, steps, work, name)
    out = Path(cfg["out"])
    record = out / "ablation.json"
    if record.is_file() and final_val(out) is not None:
        return json.loads(record.read_text())
    t0 = time.perf_counter()
    result = train(cfg, progress=False)
    row = {"arm": arm, "seed": seed, "steps": steps, "val": result["val"], "wall_s": time.perf_counter() - t0}
    record.write_text(json.dumps(row))
    return row


def zero_shot(work: Path) -> dict:
    """vit_t untouched (0 steps), the same validation objects."""
    return run_arm("none", 0, 0, work, "zero_shot")


def _var(xs: list[float]) -> float:
    return statistics.variance(xs) if len(xs) > 1 else 0.0


def table(rows: list[dict], base: dict, seeds: list[int], steps: int) -> str:
    lines = [
        f"vit_t decoder-only fine-tune, dsb2018/train[0:{TRAIN_IMAGES}], {steps} steps x 1 image x 4 masks, "
        "first prompt only (rounds 1), lr 2e-4",
        f"score: single-point mIoU (top-1 of 3) x 100 on dsb2018/train[-{VAL_IMAGES}:], "
        f"{VAL_PER_IMAGE} objects per image ({base['val']['objects']} objects); held-out training images",
        f"zero-shot vit_t: top-1 {100 * base['val']['mIoU_top']:.1f}, oracle {100 * base['val']['mIoU_oracle']:.1f}",
        "",
        "| arm | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean | sd | vs none (+- s.e.) | oracle mean | wall min/run |",
        "|---|" + "---|" * (len(seeds) + 5),
    ]
    by_arm: dict[str, list[dict]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r)
    ref_tops = [100 * r["val"]["mIoU_top"] for r in by_arm.get("none", rows)]
    ref, ref_var = statistics.mean(ref_tops), _var(ref_tops) / len(ref_tops)
    for arm in ARMS:
        rs = sorted(by_arm.get(arm, []), key=lambda r: r["seed"])
        if not rs:
            continue
        tops = [100 * r["val"]["mIoU_top"] for r in rs]
        by_seed = {r["seed"]: 100 * r["val"]["mIoU_top"] for r in rs}
        mean = statistics.mean(tops)
        oracle = statistics.mean(100 * r["val"]["mIoU_oracle"] for r in rs)
        minutes = statistics.mean(r["wall_s"] for r in rs) / 60
        cells = " | ".join(f"{by_seed[s]:.1f}" if s in by_seed else "not run" for s in seeds)
        se = (ref_var + _var(tops) / len(tops)) ** 0.5
        lines.append(
            f"| {arm} | {cells} | {mean:.1f} | {_var(tops) ** 0.5:.1f} | {mean - ref:+.1f} (+-{se:.1f}) "
            f"| {oracle:.1f} | {minutes:.1f} |"
        )
    spreads = [
        max(100 * r["val"]["mIoU_top"] for r in rs) - min(100 * r["val"]["mIoU_top"] for r in rs)
        for rs in by_arm.values()
        if len(rs) > 1
    ]
    if spreads:
        lines += ["", f"seed-to-seed spread within an arm: {min(spreads):.1f} to {max(spreads):.1f} points"]
    lines.append(
        f"machine: {platform.machine()}, {os.cpu_count()} shared cores, 1 torch thread, load average "
        f"{os.getloadavg()[0]:.1f} at the end; wall min/run includes encoding the arm's new images and "
        "depends on the load at the time (indicative only)"
    )
    return "\n".join(lines)


def main() -> None:
    from samkit.hardware import run_header

    print(run_header("fp32"), flush=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "train_ablation")
    ap.add_argument("--table-only", action="store_true", help="print the table from finished runs")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = zero_shot(args.work)
    rows = []
    # The baseline's seeds first: its spread is the noise every other difference is read against.
    order = [(a, s) for a in args.arms[:1] for s in args.seeds]
    order += [(a, s) for s in args.seeds for a in args.arms[1:]]
    for arm, seed in order:
        out = Path(config(arm, seed, args.steps, args.work)["out"])
        if args.table_only and not (out / "ablation.json").is_file():
            continue
        rows.append(run_arm(arm, seed, args.steps, args.work))
        print(f"{arm} seed {seed}: top-1 {100 * rows[-1]['val']['mIoU_top']:.1f}", flush=True)
    text = table(rows, base, args.seeds, args.steps)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
