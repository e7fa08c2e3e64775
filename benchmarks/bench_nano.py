"""samkit-nano vs samkit vit_t (MobileSAM) on the CPU: same run, same photos, measured interleaved.

    python benchmarks/bench_nano.py [--rounds 5] [--threads 2] [--bf16] [--everything] [IMAGE ...]

Both models live in this one process; every round times each photo with both models, alternating which goes
first, and the table shows medians over all (round, photo) pairs. Rows: image embedding (set_image: resize,
normalise, encoder) in fp32 and, with --bf16, with the image encoder in bf16; one-click latency (set_image
then a one-point predict with 3 masks at full size: what a user waits for after opening a photo); and with
--everything segment-everything with default settings (32 x 32 grid) on the first photo, once per round.
Wall time is what a user sees; CPU time (process seconds) is less sensitive to a busy shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
COCO_TRAIN = ROOT.parent / "shared" / "datasets" / "instances" / "coco_mini" / "train" / "images"


def _timed(fn) -> tuple[float, float]:
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        fn()
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    from samkit.hardware import run_header

    print(run_header("fp32", "bf16"), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="*", help="photos (default: the first 4 of coco_mini/train)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also time the image encoders in bf16")
    ap.add_argument("--everything", action="store_true", help="also time segment-everything (minutes)")
    args = ap.parse_args()

    import samkit
    from samkit.image import load_image

    torch.set_num_threads(args.threads)
    paths = [Path(p) for p in args.images] or sorted(COCO_TRAIN.iterdir())[:4]
    photos = [load_image(p) for p in paths]
    names = ("vit_t", "nano")
    dtypes = {"fp32": None, **({"bf16": "bf16"} if args.bf16 else {})}
    preds = {
        (n, d): samkit.Predictor(samkit.load(n, dtype=dt, progress=False))
        for n in names
        for d, dt in dtypes.items()
    }
    tasks = {f"embedding {d}": ("embed", d) for d in dtypes}
    tasks["one-click latency fp32"] = ("click", "fp32")
    if args.everything:
        tasks["segment-everything fp32 (32x32)"] = ("everything", "fp32")
    gens = {n: samkit.MaskGenerator(preds[(n, "fp32")].model) for n in names} if args.everything else {}

    def run(task: str, name: str, dtype: str, image: np.ndarray) -> None:
        pred = preds[(name, dtype)]
        if task == "everything":
            gens[name].generate(image)
            return
        pred.set_image(image)
        if task == "click":
            h, w = image.shape[:2]
            pred.predict([[w // 2, h // 2]], [1])

    for pred in preds.values():  # warm-up
        with torch.inference_mode():
            pred.set_image(photos[0])
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for label, (task, dtype) in tasks.items():
            for i, image in enumerate(photos[:1] if task == "everything" else photos):
                order = names if (r + i) % 2 == 0 else names[::-1]
                for name in order:
                    times.setdefault((label, name), []).append(
                        _timed(lambda t=task, n=name, d=dtype, im=image: run(t, n, d, im))
                    )
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    sizes = ", ".join(f"{p.name} {im.shape[1]}x{im.shape[0]}" for p, im in zip(paths, photos, strict=True))
    print(f"samkit-nano vs vit_t, CPU, torch threads {args.threads}, {args.rounds} rounds; photos: {sizes}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    head = (
        f"{'task':34s} {'vit_t wall':>10s} {'nano':>8s} {'nano/vit_t':>10s} {'vit_t CPU':>10s} {'nano':>8s}"
    )
    print(head + f" {'nano/vit_t':>10s}")
    for label in tasks:
        (tw, tc), (nw, nc) = (
            [statistics.median(x[k] for x in times[(label, n)]) for k in (0, 1)] for n in names
        )
        print(f"{label:34s} {tw:9.3f}s {nw:7.3f}s {nw / tw:10.3f} {tc:9.3f}s {nc:7.3f}s {nc / tc:10.3f}")
    print("nano/vit_t < 0.333 meets the issue's speed aim (at most 1/3 of vit_t's embedding time)")


if __name__ == "__main__":
    main()
