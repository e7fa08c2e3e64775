"""Issue 4, point 6: image-encoder throughput on a GPU (images/s), samkit vs Meta's reference, same run.

    python benchmarks/bench_gpu.py [--models vit_b vit_h] [--batch 8] [--iters 10] [--no-compile]

Random weights (speed does not depend on them). Rows: the reference in fp32; the reference in bf16
(weights and input cast, as segment-anything-fast's baseline); samkit fp32; samkit bf16; samkit bf16 +
torch.compile. Also the one-click decoder latency (predict_torch, one point, masks at 1500 x 1000).
Each row is timed with CUDA events after warm-up; peak allocated GPU memory per row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REFSHIM = ROOT.parent / "shared" / "refshim"


def _throughput(fn, x: torch.Tensor, iters: int) -> tuple[float, float]:
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn(x)
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return x.shape[0] * iters / dt, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    from samkit.hardware import run_header

    print(run_header("fp32", "bf16", device="cuda"), flush=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["vit_b", "vit_h"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument(
        "--reference", default="", help="folder holding the segment_anything package, if not installed"
    )
    args = ap.parse_args()
    sys.path.insert(0, str(REFSHIM))
    if args.reference:
        sys.path.insert(0, args.reference)
    from segment_anything import sam_model_registry

    import samkit
    from samkit.models.build import VIT_B, VIT_H, VIT_L, build_sam

    configs = {"vit_b": VIT_B, "vit_l": VIT_L, "vit_h": VIT_H}
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  batch {args.batch}")
    print("| model | impl | images/s | vs reference fp32 | peak GPU GiB |")
    print("|---|---|---|---|---|")
    for name in args.models:
        ref = sam_model_registry[name]().cuda().eval()
        ours = build_sam(configs[name]).cuda().eval()
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(args.batch, 3, 1024, 1024, device="cuda")
        rows = [("reference fp32", ref.image_encoder, x)]
        ref_bf16 = sam_model_registry[name]().cuda().eval().to(torch.bfloat16)
        rows.append(("reference bf16", ref_bf16.image_encoder, x.bfloat16()))
        rows.append(("samkit fp32", ours.image_encoder, x))
        ours_bf16 = build_sam(configs[name]).cuda().eval().to(torch.bfloat16)
        rows.append(("samkit bf16", ours_bf16.image_encoder, x.bfloat16()))
        if not args.no_compile:
            rows.append(("samkit bf16 + compile", torch.compile(ours_bf16.image_encoder), x.bfloat16()))
        base = None
        for label, fn, inp in rows:
            t0 = time.perf_counter()
            ips, mem = _throughput(fn, inp, args.iters)
            base = base or ips
            print(
                f"| {name} | {label} | {ips:.2f} | {ips / base:.2f}x | {mem:.1f} |  (row took {time.perf_counter() - t0:.0f} s)"
            )
            sys.stdout.flush()
        del ref, ref_bf16, ours, ours_bf16, rows
        torch.cuda.empty_cache()

    # One click on a cached embedding, masks at 1500 x 1000 (vit_b decoder; decoders are the same for all).

    pred = samkit.Predictor(build_sam(VIT_B).cuda().eval())
    image = (torch.rand(1000, 1500, 3) * 255).byte().numpy()
    pred.set_image(image)
    import numpy as np

    times = []
    for i in range(60):
        torch.cuda.synchronize()
        t = time.perf_counter()
        pred.predict(np.array([[700.0 + i, 500.0]]), np.array([1]))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times = sorted(times[10:])
    print(
        f"one-click predict (masks to numpy at 1500x1000): p50 {times[len(times) // 2] * 1000:.1f} ms, "
        f"p95 {times[int(0.95 * len(times))] * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
