"""Issue 12: fine-tune MobileSAM (vit_t) on dsb2018 nuclei and measure it with samkit's eval protocols.

Stages (each resumable; results go to runs/finetune_dsb2018/):

  python benchmarks/finetune_dsb2018.py train decoder [--set KEY=VALUE ...]   # samkit train in a subprocess:
                                                                              # wall time, peak RSS (ru_maxrss)
  python benchmarks/finetune_dsb2018.py eval MODEL_NAME MODEL_SPEC            # dsb2018/val + GrabCut/Berkeley
  python benchmarks/finetune_dsb2018.py baseline-val                          # zero-shot on the held-out images
  python benchmarks/finetune_dsb2018.py ceiling                               # what a 256x256 mask grid allows
  python benchmarks/finetune_dsb2018.py table                                 # prints the README tables

Evaluation is `samkit.eval.run_eval` (the code behind `samkit eval`) on fixed subsets, stated in the table:
dsb2018/val: the first VAL_IMAGES images (sorted by file name) with up to VAL_PER_IMAGE objects each
(seeded choice), because `samkit eval --limit N` counts objects (dsb2018 has ~45 per image) and one
single-point item costs ~1 s on this contended CPU. GrabCut and Berkeley: the first FORGET_LIMIT objects.
vit_t embeddings are computed once per image and reused by every model with the same encoder (the
decoder-only fine-tune leaves the encoder bit-identical), which is what makes three models affordable here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
OUT = ROOT / "runs" / "finetune_dsb2018"
VAL_IMAGES = 25
VAL_PER_IMAGE = 6
FORGET_LIMIT = 20
CONFIGS = {v: ROOT / "configs" / f"dsb2018_{v}.yaml" for v in ("decoder", "lora", "full")}


def cmd_train(variant: str, overrides: list[str]) -> None:
    """Run `samkit train` for one variant in a child process; record wall time and its peak RSS."""
    OUT.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("samkit")), "train", str(CONFIGS[variant])]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT)
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    record = {"variant": variant, "overrides": overrides, "rc": rc, "wall_s": wall, "peak_rss_mb": rss_mb}
    (OUT / f"train_{variant}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


class CachedPredictor:
    """samkit.Predictor whose set_image reads the embedding from disk when this encoder has seen the image."""

    def __init__(self, spec: str) -> None:
        import torch

        import samkit

        self.model = samkit.load(spec)
        self.predictor = samkit.Predictor(self.model)
        self.name = spec
        h = hashlib.sha1()
        for k, t in self.model.image_encoder.state_dict().items():
            h.update(k.encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.cache = OUT / "embeddings" / h.hexdigest()[:16]
        self.cache.mkdir(parents=True, exist_ok=True)

    def set_image(self, image: np.ndarray) -> None:
        """image: (H, W, 3) uint8 RGB."""
        path = self.cache / (hashlib.sha1(image.tobytes() + str(image.shape).encode()).hexdigest() + ".st")
        if path.is_file():
            self.predictor.load_embedding(path)
        else:
            self.predictor.set_image(image)
            self.predictor.save_embedding(path)

    def predict(self, *args, **kwargs):
        return self.predictor.predict(*args, **kwargs)


def val_subset():
    """dsb2018/val: the first VAL_IMAGES images (by id), up to VAL_PER_IMAGE objects each (seeded choice)."""
    from samkit.eval.datasets import CocoInstances, ImageItem

    class Subset(CocoInstances):
        def images(self):
            for n, item in enumerate(super().images()):
                if n == VAL_IMAGES:
                    return
                pick = np.random.default_rng(n).permutation(len(item.masks))[:VAL_PER_IMAGE]
                yield ImageItem(item.id, item.image, [item.masks[k] for k in sorted(pick)], item.ignore)

    return Subset(DATA / "instances" / "dsb2018" / "val" / "annotations.json")


def cmd_eval(name: str, spec: str, sets: list[str]) -> None:
    """Single-point and box on each set for one model; one JSON report per (set, protocol), skipped if done."""
    import torch

    from samkit.eval import run_eval

    torch.set_num_threads(1)
    model = CachedPredictor(spec)
    for set_name in sets:
        data = val_subset() if set_name == "dsb2018" else DATA / "interactive" / set_name
        limit = None if set_name == "dsb2018" else FORGET_LIMIT
        for protocol in ("single-point", "box"):
            out = OUT / f"eval_{name}_{set_name}_{protocol}.json"
            if out.is_file():
                continue
            t0 = time.perf_counter()
            report = run_eval(protocol, data, model, limit=limit, progress=False)
            report["meta"]["model"] = spec
            report["meta"]["wall_s"] = time.perf_counter() - t0
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(report))
            os.replace(tmp, out)
            print(name, set_name, protocol, report["summary"], f"{report['meta']['wall_s']:.0f}s", flush=True)


def cmd_baseline_val() -> None:
    """Zero-shot vit_t on the held-out train images, with the objects each variant's validation used
    (decoder: 60, lora/full short runs: 15), from the decoder run's cached embeddings."""
    from samkit.train import Trainer, load_config

    out = {}
    for variant in CONFIGS:
        cfg = load_config(CONFIGS[variant], mode="decoder", data={"cache_dir": "runs/dsb2018_embeddings"})
        trainer = Trainer(cfg, progress=False)
        out[variant] = trainer.validate()
    (OUT / "val_zero_shot.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


def cmd_ceiling() -> None:
    """Best mIoU a 256x256 low-res logit grid can reach on the dsb2018/val subset: each ground-truth mask
    taken to the model input (1024), area-downsampled to 256, upsampled back as the Predictor does, > 0.5."""
    import torch
    import torch.nn.functional as F

    from samkit.eval.metrics import iou

    ious = []
    for item in val_subset().images():
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


def _summary(name: str, set_name: str, protocol: str) -> dict | None:
    path = OUT / f"eval_{name}_{set_name}_{protocol}.json"
    return json.loads(path.read_text())["summary"] if path.is_file() else None


def _fmt(value: float | None, base: float | None = None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.1f}"
    return text if base is None else f"{text} ({100 * (value - base):+.1f})"


def cmd_table(names: list[str]) -> None:
    """Markdown tables: quality on dsb2018/val, forgetting on GrabCut/Berkeley, training cost."""
    base = {
        (s, p, k): (_summary("vit_t", s, p) or {}).get(k)
        for s in ("dsb2018", "GrabCut", "Berkeley")
        for p, k in (("single-point", "mIoU_top"), ("single-point", "mIoU_oracle"), ("box", "mIoU"))
    }
    print(
        f"dsb2018/val, first {VAL_IMAGES} images x up to {VAL_PER_IMAGE} nuclei (mIoU x 100; vs zero-shot vit_t)"
    )
    print("| model | objects | 1-point top-1 | 1-point oracle | box |")
    print("|---|---|---|---|---|")
    for name in names:
        sp, bx = _summary(name, "dsb2018", "single-point"), _summary(name, "dsb2018", "box")
        if sp is None and bx is None:
            continue
        ref = None if name == "vit_t" else base
        cells = [
            _fmt(sp and sp["mIoU_top"], ref and ref[("dsb2018", "single-point", "mIoU_top")]),
            _fmt(sp and sp["mIoU_oracle"], ref and ref[("dsb2018", "single-point", "mIoU_oracle")]),
            _fmt(bx and bx["mIoU"], ref and ref[("dsb2018", "box", "mIoU")]),
        ]
        print(f"| {name} | {(sp or bx)['n_items']} | " + " | ".join(cells) + " |")
    print(f"\nForgetting: first {FORGET_LIMIT} objects of each set (mIoU x 100; vs zero-shot vit_t)")
    print("| model | GrabCut 1-point top-1 | GrabCut box | Berkeley 1-point top-1 | Berkeley box |")
    print("|---|---|---|---|---|")
    for name in names:
        cells = []
        for set_name in ("GrabCut", "Berkeley"):
            sp, bx = _summary(name, set_name, "single-point"), _summary(name, set_name, "box")
            ref = None if name == "vit_t" else base
            cells.append(_fmt(sp and sp["mIoU_top"], ref and ref[(set_name, "single-point", "mIoU_top")]))
            cells.append(_fmt(bx and bx["mIoU"], ref and ref[(set_name, "box", "mIoU")]))
        if any(c != "-" for c in cells):
            print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nTraining cost on this CPU (samkit train in a subprocess; peak RSS = ru_maxrss of the child)")
    print(
        "| variant | steps | wall (s) | median s/step | peak RSS (MB) | held-out train 1-point top-1 by step |"
    )
    print("|---|---|---|---|---|---|")
    zs_path = OUT / "val_zero_shot.json"
    for variant in CONFIGS:
        rec_path = OUT / f"train_{variant}.json"
        metrics = ROOT / "runs" / f"dsb2018_{variant}" / "metrics.jsonl"
        if not rec_path.is_file() or not metrics.is_file():
            continue
        from samkit.train import read_metrics

        rec = json.loads(rec_path.read_text())
        rows, vals = read_metrics(metrics)
        zero = json.loads((OUT / "val_zero_shot.json").read_text())[variant] if zs_path.is_file() else None
        curve = (f"zero-shot {100 * zero['mIoU_top']:.1f}; " if zero else "") + ", ".join(
            f"{v['step']}: {100 * v['val']['mIoU_top']:.1f}" for v in vals if v["val"]
        )
        s_step = float(np.median([r["sec_per_step"] for r in rows])) if rows else float("nan")
        steps = rows[-1]["step"] if rows else 0
        print(
            f"| {variant} | {steps} | {rec['wall_s']:.0f} | {s_step:.1f} | {rec['peak_rss_mb']:.0f} | {curve} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("train")
    p.add_argument("variant", choices=list(CONFIGS))
    p.add_argument("--set", action="append", default=[])
    p = sub.add_parser("eval")
    p.add_argument("name", help="row name, e.g. vit_t or decoder")
    p.add_argument("spec", help="zoo name or checkpoint path")
    p.add_argument("--sets", nargs="+", default=["dsb2018", "GrabCut", "Berkeley"])
    sub.add_parser("baseline-val")
    sub.add_parser("ceiling")
    p = sub.add_parser("table")
    p.add_argument("--names", nargs="+", default=["vit_t", "medsam_lite", "decoder", "lora", "full"])
    args = ap.parse_args()
    if args.stage == "train":
        cmd_train(args.variant, args.set)
    elif args.stage == "eval":
        cmd_eval(args.name, args.spec, args.sets)
    elif args.stage == "baseline-val":
        cmd_baseline_val()
    elif args.stage == "ceiling":
        cmd_ceiling()
    else:
        cmd_table(args.names)


if __name__ == "__main__":
    main()
