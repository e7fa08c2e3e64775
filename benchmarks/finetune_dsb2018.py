"""Issue 12: fine-tune MobileSAM (vit_t) on dsb2018 nuclei and measure it with samkit's eval protocols.

Stages (each resumable: a report that exists is not recomputed). Reports, training records and metric
logs go to benchmarks/results/finetune_dsb2018/; checkpoints and embedding caches to --work
(default runs/finetune_dsb2018, kept out of git).

  python benchmarks/finetune_dsb2018.py train decoder [--name N] [--set KEY=VALUE ...] [--old-padding]
        samkit train in a child process (checkpoint in WORK/runs/N): wall time, peak RSS (ru_maxrss);
        --old-padding feeds the encoders as training did until 2026-12-04 (pad, then normalise)
  python benchmarks/finetune_dsb2018.py eval NAME SPEC [--sets dsb2018 GrabCut Berkeley DAVIS345]
        [--forget-limit N] [--protocols single-point box]
        single-point + box on dsb2018/val (subset below) and the forgetting sets
  python benchmarks/finetune_dsb2018.py proposals NAME SPEC
        segment-everything mask recall (AR@100) on dsb2018/val, subset below
  python benchmarks/finetune_dsb2018.py heldout NAME SPEC
        single-point + box on the held-out *training* images (dsb2018/train[-20:]): model selection
  python benchmarks/finetune_dsb2018.py baseline-val | ceiling
  python benchmarks/finetune_dsb2018.py table [--names ...] [--pairs BEFORE:AFTER ...]
        with --pairs, a section comparing two runs of one variant on the same objects

Evaluation is `samkit.eval.run_eval` (the code behind `samkit eval`) with `embedding_cache`, so models
sharing vit_t's image encoder (every decoder-only fine-tune) encode each image once. Fixed subsets:
- dsb2018/val single-point and box: the first VAL_IMAGES images (by id), up to VAL_PER_IMAGE objects each
  (seeded choice): `--limit N` counts objects and dsb2018 has ~45 per image.
- dsb2018/val AR@100: the first AR_IMAGES images, every object, MaskGenerator with an AR_GRID x AR_GRID
  point grid (`samkit eval proposals --limit 5 --points-per-side 16`); 32 x 32 costs 4x more here.
- forgetting: the first FORGET_LIMIT[set] objects of GrabCut, Berkeley, DAVIS345 (None = all);
  `--forget-limit N` uses the first N of each (the 2026-11-26 full/lora runs were measured on 20).
- held-out training images: dsb2018/train[-20:], up to VAL_PER_IMAGE objects each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results" / "finetune_dsb2018"
WORK = ROOT / "runs" / "finetune_dsb2018"
VAL_IMAGES = 25
VAL_PER_IMAGE = 6
AR_IMAGES = 5
AR_GRID = 16
HELDOUT_IMAGES = 20
FORGET_SETS = ("GrabCut", "Berkeley", "DAVIS345")
FORGET_LIMIT = {"GrabCut": None, "Berkeley": 50, "DAVIS345": 50}
CONFIGS = {v: ROOT / "configs" / f"dsb2018_{v}.yaml" for v in ("decoder", "lora", "full")}


# The training feed as it was until 2026-12-04 (zero padding, then normalisation), for before/after runs.
OLD_PADDING = """
import sys
sys.path.insert(0, {bench!r})
from padding_nano_distill import old_encoder_input
from samkit.train import distill, embeddings
embeddings.encoder_input = distill.encoder_input = old_encoder_input
from samkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cmd_train(variant: str, name: str, overrides: list[str], old_padding: bool = False) -> None:
    """Run `samkit train` for one variant in a child process; record wall time and its peak RSS.
    `old_padding`: the encoders get the former training feed (padding reaches them as -mean/std)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = WORK / "runs" / name
    cmd = [str(Path(sys.executable).with_name("samkit"))]
    if old_padding:
        cmd = [sys.executable, "-c", OLD_PADDING.format(bench=str(ROOT / "benchmarks"))]
    cmd += ["train", str(CONFIGS[variant]), "--out", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    record = {
        "variant": variant,
        "name": name,
        "overrides": overrides,
        "old_padding": old_padding,
        "rc": rc,
        "wall_s": wall,
        "peak_rss_mb": rss_mb,
        "load_avg_at_end": os.getloadavg(),
        "model": str(out / "model.safetensors"),
    }
    (RESULTS / f"train_{name}.json").write_text(json.dumps(record, indent=2))
    if (out / "metrics.jsonl").is_file():
        shutil.copyfile(out / "metrics.jsonl", RESULTS / f"train_{name}_metrics.jsonl")
    print(json.dumps(record))


def coco_subset(split: str, start: int, stop: int | None, per_image: int):
    """dsb2018/<split> images [start:stop] (by id), up to `per_image` objects each (seeded choice)."""
    from samkit.eval.datasets import CocoInstances, ImageItem

    class Subset(CocoInstances):
        def __init__(self, annotations: Path) -> None:
            super().__init__(annotations)
            self._images = self._images[start:stop]

        def images(self):
            for n, item in enumerate(super().images()):
                pick = np.random.default_rng(n).permutation(len(item.masks))[:per_image]
                yield ImageItem(item.id, item.image, [item.masks[k] for k in sorted(pick)], item.ignore)

    return Subset(DATA / "instances" / "dsb2018" / split / "annotations.json")


def _run(protocol: str, data, spec: str, out: Path, limit: int | None = None, **kwargs) -> None:
    """One run_eval report to `out` (atomically), skipped when it exists."""
    import torch

    from samkit.eval import run_eval

    if out.is_file():
        return
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    report = run_eval(
        protocol, data, spec, limit=limit, progress=False, embedding_cache=WORK / "embeddings", **kwargs
    )
    report["meta"]["wall_s"] = time.perf_counter() - t0
    report["meta"]["load_avg_at_end"] = os.getloadavg()
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, out)
    cache = report["meta"]["settings"]["embedding_cache"]
    print(out.name, report["summary"], f"{report['meta']['wall_s']:.0f}s", f"cache {cache}", flush=True)


def cmd_eval(
    name: str,
    spec: str,
    sets: list[str],
    forget_limit: int | None = None,
    protocols: tuple[str, ...] = ("single-point", "box"),
) -> None:
    """Single-point and box on each set for one model; one JSON report per (set, protocol).
    `forget_limit` replaces FORGET_LIMIT for every forgetting set."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for set_name in sets:
        if set_name == "dsb2018":
            data, limit = coco_subset("val", 0, VAL_IMAGES, VAL_PER_IMAGE), None
        else:
            data = DATA / "interactive" / set_name
            limit = FORGET_LIMIT[set_name] if forget_limit is None else forget_limit
        for protocol in protocols:
            _run(protocol, data, spec, RESULTS / f"eval_{name}_{set_name}_{protocol}.json", limit)


def cmd_proposals(name: str, spec: str, pred_iou_thresh: float | None) -> None:
    """AR@100 / AR@1000 on the first AR_IMAGES dsb2018/val images (all their objects); with
    `pred_iou_thresh` set, MaskGenerator's predicted-IoU filter is changed (report `..._iouT.json`)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = DATA / "instances" / "dsb2018" / "val"
    suffix = "" if pred_iou_thresh is None else f"_iou{pred_iou_thresh:g}"
    out = RESULTS / f"eval_{name}_dsb2018_proposals{suffix}.json"
    _run("proposals", data, spec, out, AR_IMAGES, points_per_side=AR_GRID, pred_iou_thresh=pred_iou_thresh)


def cmd_heldout(name: str, spec: str) -> None:
    """Single-point and box on the held-out training images: what model selection may look at."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = coco_subset("train", -HELDOUT_IMAGES, None, VAL_PER_IMAGE)
    for protocol in ("single-point", "box"):
        _run(protocol, data, spec, RESULTS / f"heldout_{name}_{protocol}.json")


def cmd_baseline_val() -> None:
    """Zero-shot vit_t on the held-out train images, with the objects each variant's validation used
    (decoder: 60, lora/full short runs: 15), from the decoder run's cached embeddings."""
    from samkit.train import Trainer, load_config

    out = {}
    for variant in CONFIGS:
        cache = str(WORK / "train_embeddings")
        cfg = load_config(CONFIGS[variant], mode="decoder", data={"cache_dir": cache})
        out[variant] = Trainer(cfg, progress=False).validate()
    (RESULTS / "val_zero_shot.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


def cmd_ceiling() -> None:
    """Best mIoU a 256x256 low-res logit grid can reach on the dsb2018/val subset: each ground-truth mask
    taken to the model input (1024), area-downsampled to 256, upsampled back as the Predictor does, > 0.5."""
    import torch
    import torch.nn.functional as F

    from samkit.eval.metrics import iou

    ious = []
    for item in coco_subset("val", 0, VAL_IMAGES, VAL_PER_IMAGE).images():
        h, w = item.masks[0].shape
        scale = 1024 / max(h, w)
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        for m in item.masks:
            big = F.interpolate(torch.from_numpy(m).float()[None, None], size=(nh, nw), mode="nearest")
            low = F.interpolate(F.pad(big, (0, 1024 - nw, 0, 1024 - nh)), size=(256, 256), mode="area")
            up = F.interpolate(low, size=(1024, 1024), mode="bilinear", align_corners=False)[..., :nh, :nw]
            back = F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0.5
            ious.append(iou(back.numpy(), m, item.ignore))
    print(f"low-res (256x256) ceiling on {len(ious)} dsb2018/val objects: mIoU {100 * np.mean(ious):.1f}")


def cmd_boundary() -> None:
    """What one pixel of boundary is worth on these nuclei: the IoU of each ground-truth mask (the
    dsb2018/val subset) with itself grown or shrunk by one pixel (3x3 cross), by box side."""
    import cv2

    from samkit.eval.metrics import iou

    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    bins = {"< 10 px": [], "10-16 px": [], "16-25 px": [], ">= 25 px": []}
    for item in coco_subset("val", 0, VAL_IMAGES, VAL_PER_IMAGE).images():
        for m in item.masks:
            ys, xs = np.nonzero(m)
            side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            u8 = m.astype(np.uint8)
            grown = iou(cv2.dilate(u8, kernel).astype(bool), m, item.ignore)
            shrunk = iou(cv2.erode(u8, kernel).astype(bool), m, item.ignore)
            key = (
                "< 10 px"
                if side < 10
                else "10-16 px"
                if side < 16
                else "16-25 px"
                if side < 25
                else ">= 25 px"
            )
            bins[key].append((grown, shrunk))
    every = [v for b in bins.values() for v in b]
    print("IoU of each ground-truth nucleus with itself one pixel larger / smaller (mIoU x 100)")
    print("| box side | nuclei | +1 px | -1 px |")
    print("|---|---|---|---|")
    for key, vals in [*bins.items(), ("all", every)]:
        g, s_ = np.mean(vals, axis=0) * 100 if vals else (float("nan"), float("nan"))
        print(f"| {key} | {len(vals)} | {g:.1f} | {s_:.1f} |")


# --- tables -------------------------------------------------------------------------------------------

METRICS = {"single-point": ("iou_top", "iou_oracle"), "box": ("iou",)}


def _items(prefix: str, name: str, set_name: str, protocol: str) -> dict[str, dict] | None:
    path = RESULTS / ("_".join(p for p in (prefix, name, set_name, protocol) if p) + ".json")
    return {it["id"]: it for it in json.loads(path.read_text())["items"]} if path.is_file() else None


def _cell(name: str, set_name: str, protocol: str, key: str, prefix: str = "eval") -> str:
    """mIoU x 100 of one report, and its change vs vit_t on the same objects (paired) in brackets."""
    items = _items(prefix, name, set_name, protocol)
    if items is None:
        return "-"
    mean = 100 * float(np.mean([it[key] for it in items.values()]))
    base = _items(prefix, "vit_t", set_name, protocol)
    if name == "vit_t" or base is None or not set(items) <= set(base):
        return f"{mean:.1f}"
    delta = 100 * float(np.mean([items[i][key] - base[i][key] for i in items]))
    return f"{mean:.1f} ({delta:+.1f})"


def _ar(name: str, suffix: str = "") -> str:
    path = RESULTS / f"eval_{name}_dsb2018_proposals{suffix}.json"
    if not path.is_file():
        return "-"
    s = json.loads(path.read_text())["summary"]
    return f"{100 * s['AR@100']:.1f}"


def _paired(before: str, after: str, set_name: str, protocol: str, key: str) -> tuple[str, int]:
    """`before -> after (change ± 95% CI half-width)` in mIoU x 100 over the objects both reports hold."""
    a, b = _items("eval", before, set_name, protocol), _items("eval", after, set_name, protocol)
    if a is None or b is None:
        return "-", 0
    common = sorted(set(a) & set(b))
    if not common:
        return "-", 0
    old = np.array([a[i][key] for i in common])
    new = np.array([b[i][key] for i in common])
    half = 1.96 * np.std(new - old, ddof=1) / np.sqrt(len(common)) if len(common) > 1 else float("nan")
    cell = f"{100 * old.mean():.1f} -> {100 * new.mean():.1f} ({100 * (new - old).mean():+.1f} ± {100 * half:.1f})"
    return cell, len(common)


def _before_after(pairs: list[str]) -> None:
    """One row per BEFORE:AFTER pair of runs: paired change on the same objects, per set and protocol."""
    columns = [("dsb2018", "single-point", "iou_top"), ("dsb2018", "single-point", "iou_oracle")]
    columns += [("dsb2018", "box", "iou")]
    for set_name in FORGET_SETS:
        columns += [(set_name, "single-point", "iou_top"), (set_name, "box", "iou")]
    label = {"iou_top": "1-point top-1", "iou_oracle": "1-point oracle", "iou": "box"}
    rows = []
    for pair in pairs:
        before, after = pair.split(":")
        cells = {col: _paired(before, after, *col) for col in columns}
        if any(n for _, n in cells.values()):
            rows.append((before, after, cells))
    shown = [col for col in columns if any(cells[col][0] != "-" for _, _, cells in rows)]
    if not shown:
        return
    print(
        "\nBefore / after, same variant and config (mIoU x 100 on the same objects: before -> after "
        "(paired change ± 95% CI half-width, 1.96 x sd / sqrt(n)))"
    )
    print("| runs | " + " | ".join(f"{s} {label[k]} (n)" for s, _, k in shown) + " |")
    print("|---|" + "---|" * len(shown))
    for before, after, cells in rows:
        text = [f"{cells[col][0]} ({cells[col][1]})" if cells[col][1] else "-" for col in shown]
        print(f"| {before} -> {after} | " + " | ".join(text) + " |")


def cmd_table(names: list[str], pairs: list[str]) -> None:
    """Markdown tables: dsb2018/val quality, held-out selection, forgetting, before/after pairs, training
    cost."""
    print(
        f"dsb2018/val: 1-point and box on the first {VAL_IMAGES} images x up to {VAL_PER_IMAGE} nuclei; "
        f"AR@100 on the first {AR_IMAGES} images, all nuclei, {AR_GRID}x{AR_GRID} grid "
        "(mIoU / AR x 100; paired change vs zero-shot vit_t); AR@100 with MaskGenerator's filters, and "
        "without its predicted-IoU filter (pred_iou_thresh 0)"
    )
    print("| model | objects | 1-point top-1 | 1-point oracle | box | AR@100 | AR@100, IoU filter off |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        sp = _items("eval", name, "dsb2018", "single-point")
        if sp is None and _ar(name) == "-":
            continue
        cells = [_cell(name, "dsb2018", "single-point", k) for k in ("iou_top", "iou_oracle")]
        cells += [_cell(name, "dsb2018", "box", "iou"), _ar(name), _ar(name, "_iou0")]
        print(f"| {name} | {len(sp or {})} | " + " | ".join(cells) + " |")

    print(f"\nHeld-out training images dsb2018/train[-{HELDOUT_IMAGES}:] (model selection; mIoU x 100)")
    print("| model | objects | 1-point top-1 | 1-point oracle | box |")
    print("|---|---|---|---|---|")
    for name in names:
        sp = _items("heldout", name, "", "single-point")
        if sp is None:
            continue
        cells = [_cell(name, "", "single-point", k, "heldout") for k in ("iou_top", "iou_oracle")]
        cells.append(_cell(name, "", "box", "iou", "heldout"))
        print(f"| {name} | {len(sp)} | " + " | ".join(cells) + " |")

    print("\nForgetting (mIoU x 100; paired change vs zero-shot vit_t on the same objects)")
    header = " | ".join(f"{s} 1-point top-1 | {s} box" for s in FORGET_SETS)
    print(f"| model | objects | {header} |")
    print("|---|---|" + "---|---|" * len(FORGET_SETS))
    for name in names:
        cells, counts = [], []
        for set_name in FORGET_SETS:
            cells.append(_cell(name, set_name, "single-point", "iou_top"))
            cells.append(_cell(name, set_name, "box", "iou"))
            sp = _items("eval", name, set_name, "single-point")
            counts.append(str(len(sp)) if sp else "-")
        if any(c != "-" for c in cells):
            print(f"| {name} | {' / '.join(counts)} | " + " | ".join(cells) + " |")

    _before_after(pairs)

    print("\nTraining cost on this CPU (samkit train in a subprocess; peak RSS = ru_maxrss of the child)")
    print("| run | steps | wall (s) | median s/step | peak RSS (MB) | held-out 1-point top-1 by step |")
    print("|---|---|---|---|---|---|")
    from samkit.train import read_metrics

    for rec_path in sorted(RESULTS.glob("train_*.json")):
        rec = json.loads(rec_path.read_text())
        metrics = RESULTS / f"{rec_path.stem}_metrics.jsonl"
        if not metrics.is_file():
            continue
        rows, vals = read_metrics(metrics)
        curve = ", ".join(f"{v['step']}: {100 * v['val']['mIoU_top']:.1f}" for v in vals if v["val"])
        s_step = float(np.median([r["sec_per_step"] for r in rows])) if rows else float("nan")
        steps = rows[-1]["step"] if rows else 0
        run = rec.get("name", rec["variant"])
        print(
            f"| {run} | {steps} | {rec['wall_s']:.0f} | {s_step:.1f} | {rec['peak_rss_mb']:.0f} | {curve} |"
        )

    gpu = sorted(RESULTS.glob("gpu_train_*.json"))
    if gpu:
        print(f"\nTraining cost on a GPU ({json.loads(gpu[0].read_text())['gpu']})")
        print("| run | steps | wall (s) | median s/step | peak GPU memory (GiB) | held-out 1-point top-1 |")
        print("|---|---|---|---|---|---|")
    for rec_path in gpu:
        rec = json.loads(rec_path.read_text())
        rows, vals = read_metrics(RESULTS / f"{rec_path.stem}_metrics.jsonl")
        curve = ", ".join(f"{v['step']}: {100 * v['val']['mIoU_top']:.1f}" for v in vals if v["val"])
        s_step = float(np.median([r["sec_per_step"] for r in rows]))
        print(
            f"| {rec['name']} | {rows[-1]['step']} | {rec['wall_s']:.0f} | {s_step:.2f} | "
            f"{rec['peak_gpu_gib']:.1f} | {curve} |"
        )


def main() -> None:
    global WORK
    from samkit.hardware import run_header

    print(run_header("fp32"), flush=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=WORK, help="checkpoints and embedding caches")
    sub = ap.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("train")
    p.add_argument("variant", choices=list(CONFIGS))
    p.add_argument("--name", default=None, help="run name (default: the variant)")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--old-padding", action="store_true", help="the former training feed: pad, then normalise")
    for stage in ("eval", "proposals", "heldout"):
        p = sub.add_parser(stage)
        p.add_argument("name", help="row name, e.g. vit_t or decoder")
        p.add_argument("spec", help="zoo name or checkpoint path")
        if stage == "eval":
            p.add_argument("--sets", nargs="+", default=["dsb2018", *FORGET_SETS])
            p.add_argument("--forget-limit", type=int, default=None, help="objects per forgetting set")
            p.add_argument(
                "--protocols", nargs="+", default=["single-point", "box"], choices=["single-point", "box"]
            )
        if stage == "proposals":
            p.add_argument("--pred-iou-thresh", type=float, default=None)
    sub.add_parser("baseline-val")
    sub.add_parser("ceiling")
    sub.add_parser("boundary")
    p = sub.add_parser("table")
    p.add_argument(
        "--names",
        nargs="+",
        default=[
            "vit_t",
            "medsam_lite",
            "decoder",
            "decoder_box",
            "lora",
            "full",
            "lora_fixedpad",
            "full_fixedpad",
        ],
    )
    p.add_argument(
        "--pairs",
        nargs="*",
        default=[
            "full:full_fixedpad",
            "lora:lora_fixedpad",
            "full_oldpad:full_fixedpad",
            "lora_oldpad:lora_fixedpad",
            "full:full_oldpad",
            "lora:lora_oldpad",
            "vit_t:vit_t_recheck",
        ],
        help="BEFORE:AFTER run names compared on the same objects (vit_t_recheck: vit_t's box reports "
        "re-run with today's eval code, a control)",
    )
    args = ap.parse_args()
    WORK = args.work
    if args.stage == "train":
        cmd_train(args.variant, args.name or args.variant, args.set, args.old_padding)
    elif args.stage == "eval":
        cmd_eval(args.name, args.spec, args.sets, args.forget_limit, tuple(args.protocols))
    elif args.stage == "proposals":
        cmd_proposals(args.name, args.spec, args.pred_iou_thresh)
    elif args.stage == "heldout":
        cmd_heldout(args.name, args.spec)
    elif args.stage == "baseline-val":
        cmd_baseline_val()
    elif args.stage == "ceiling":
        cmd_ceiling()
    elif args.stage == "boundary":
        cmd_boundary()
    else:
        cmd_table(args.names, args.pairs)


if __name__ == "__main__":
    main()
