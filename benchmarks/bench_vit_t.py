"""vit_t (MobileSAM, real weights) on the CPU: samkit vs the MobileSAM reference, same photo, same run.

Each measurement runs in its own subprocess (so peak RSS, `ru_maxrss`, belongs to that measurement alone),
with torch.set_num_threads(2); reference and samkit subprocesses alternate, round after round, and the
table shows the median over rounds of each subprocess's median time.

    python benchmarks/bench_vit_t.py [--rounds 5] [--repeats 3] [--everything] [--image PATH]

Rows: image embedding (set_image: resize, normalise, encoder), one-point predict (3 candidates, masks at
the image's full size, on a cached embedding), and with --everything segment-everything with default
settings (32 x 32 grid; samkit MaskGenerator vs the reference SamAutomaticMaskGenerator).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFSHIM = ROOT.parent / "shared" / "refshim"
# The largest photo in the shared data sets (DAVIS frames are 854 x 480; nothing there is ~1500 x 1000).
DEFAULT_IMAGE = ROOT.parent / "shared" / "datasets" / "interactive" / "DAVIS345" / "images" / "000.jpg"


def _child(impl: str, task: str, image_path: str, repeats: int) -> None:
    """Run one measurement in this process and print {"times": [...], "maxrss_mb": ...} as JSON."""
    import resource
    import time

    sys.path.insert(0, str(REFSHIM))
    import numpy as np
    import torch

    torch.set_num_threads(2)
    from samkit.image import load_image
    from samkit.zoo import checkpoint_path

    image = load_image(image_path)
    h, w = image.shape[:2]
    point = dict(point_coords=np.array([[w // 2, h // 2]]), point_labels=np.array([1]))
    if impl == "samkit":
        import samkit

        model = samkit.load("vit_t", dtype="fp32", progress=False)
        predictor = samkit.Predictor(model)
        if task == "everything":
            generator = samkit.MaskGenerator(model)
    else:
        from mobile_sam import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

        model = sam_model_registry["vit_t"](checkpoint=str(checkpoint_path("vit_t", progress=False))).eval()
        predictor = SamPredictor(model)
        if task == "everything":
            generator = SamAutomaticMaskGenerator(model)

    def run() -> None:
        with torch.inference_mode():
            if task == "embed":
                predictor.set_image(image)
            elif task == "predict":
                predictor.predict(**point, multimask_output=True)
            else:
                generator.generate(image)

    if task == "predict":
        with torch.inference_mode():
            predictor.set_image(image)
    run()  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"times": times, "cpu": cpu, "maxrss_mb": rss}))


def _measure(impl: str, task: str, image: str, repeats: int) -> tuple[float, float, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", impl, task, "--image", image, "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        check=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return statistics.median(res["times"]), statistics.median(res["cpu"]), res["maxrss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--everything", action="store_true", help="also time segment-everything (minutes)")
    ap.add_argument("--image", default=str(DEFAULT_IMAGE))
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "TASK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child, args.image, args.repeats)
        return
    from samkit.hardware import run_header

    print(run_header("fp32"), flush=True)

    from PIL import Image

    tasks = {"embed": "image embedding", "predict": "one-point predict (3 masks, full size)"}
    if args.everything:
        tasks["everything"] = "segment-everything (32x32 grid)"
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in range(args.rounds):
        for task in tasks:
            # Alternate which implementation goes first so slow drifts of the shared machine cancel out.
            order = ("mobile_sam", "samkit") if r % 2 == 0 else ("samkit", "mobile_sam")
            for impl in order:
                reps = 1 if task == "everything" else args.repeats
                results.setdefault((impl, task), []).append(_measure(impl, task, args.image, reps))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    w, h = Image.open(args.image).size
    print(f"vit_t on {Path(args.image).name} ({w}x{h}), CPU, torch threads 2, {args.rounds} rounds")
    print(
        f"{'task':40s} {'ref wall':>9s} {'samkit':>9s} {'ratio':>6s} {'ref CPU':>9s} {'samkit':>9s} {'ratio':>6s}"
        f" {'ref RSS':>8s} {'samkit':>7s}"
    )
    for task, label in tasks.items():
        ref, ours = results[("mobile_sam", task)], results[("samkit", task)]
        (rw, rc), (ow, oc) = ([statistics.median(x[i] for x in rs) for i in (0, 1)] for rs in (ref, ours))
        rm, om = max(x[2] for x in ref), max(x[2] for x in ours)
        print(
            f"{label:40s} {rw:8.3f}s {ow:8.3f}s {rw / ow:5.2f}x {rc:8.3f}s {oc:8.3f}s {rc / oc:5.2f}x"
            f" {rm:6.0f}MB {om:5.0f}MB"
        )
    print(
        "ratio = reference / samkit (> 1: samkit faster); CPU = process CPU seconds (less sensitive to a busy"
    )
    print("machine than wall time); RSS = peak resident memory of the measuring process")


if __name__ == "__main__":
    main()
