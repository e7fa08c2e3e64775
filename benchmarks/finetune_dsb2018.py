"""Issue 12: fine-tune MobileSAM (vit_t) on dsb2018 nuclei and measure it with samkit's eval protocols.

Stages (each resumable; results go to runs/finetune_dsb2018/):

  python benchmarks/finetune_dsb2018.py train decoder [--set KEY=VALUE ...]   # samkit train in a subprocess:
                                                                              # wall time, peak RSS (ru_maxrss)
  python benchmarks/finetune_dsb2018.py eval MODEL_NAME MODEL_SPEC            # dsb2018/val + GrabCut/Berkeley
  python benchmarks/finetune_dsb2018.py table                                 # prints the README table

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
    args = ap.parse_args()
    if args.stage == "train":
        cmd_train(args.variant, args.set)
    elif args.stage == "eval":
        cmd_eval(args.name, args.spec, args.sets)


if __name__ == "__main__":
    main()
