"""Issue 4's speed table: encoder (fp32, bf16) and one-prompt latency, samkit vs the reference, same run.

    python benchmarks/bench_speed.py [--models vit_b vit_t] [--rounds 2] [--repeats 3] [--device cpu|cuda]

vit_b uses a random-weight checkpoint built by Meta's `segment-anything` (saved once, loaded by both);
vit_t uses the real MobileSAM weights and the MobileSAM reference. The photo is a real 640 x 422 COCO
train photo upscaled (bicubic) to 1500 x 1000, since no photo in ../shared/datasets is that large.
Each measurement is its own subprocess (peak RSS = `ru_maxrss` of that process; on CUDA, peak allocated
GPU memory) with torch.set_num_threads(2); reference and samkit alternate, round after round.
Rows: encoder fp32 (samkit also checks max |embedding diff| vs the reference), encoder bf16, encoder
auto (`samkit.load`'s default: bf16 where the CPU runs it natively, else fp32), one point `predict()` with
3 masks at full size on a cached embedding (p50 / p95 over `--clicks` calls): `predict` with the model
loaded in fp32, `predict_auto` with the default dtype (where bf16 is native, the mask decoder runs in bf16
too; elsewhere the same as `predict`); both ratios are to the reference's fp32 click. `--tasks` picks rows (the
reference's fp32 encoder, the encoder ratios' base, always runs). The output starts with the CPU, its flags and what each
dtype resolves to here (`samkit.hardware.run_header`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFSHIM = ROOT.parent / "shared" / "refshim"
PHOTO = (
    ROOT.parent / "shared" / "datasets" / "instances" / "coco_mini" / "train" / "images" / "000000000790.jpg"
)


TASKS = ("encoder_fp32", "encoder_bf16", "encoder_auto", "predict", "predict_auto")
TASK_DTYPE = {
    "encoder_fp32": "fp32",
    "encoder_bf16": "bf16",
    "encoder_auto": "auto",
    "predict": "fp32",
    "predict_auto": "auto",
}


def _photo():
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(PHOTO).convert("RGB").resize((1500, 1000), Image.BICUBIC))


def _reference(model: str, ckpt: str):
    sys.path.insert(0, str(REFSHIM))
    if model == "vit_t":
        from mobile_sam import SamPredictor, sam_model_registry
    else:
        from segment_anything import SamPredictor, sam_model_registry
    return SamPredictor(sam_model_registry[model](checkpoint=ckpt).eval())


def _child(impl: str, model: str, task: str, ckpt: str, device: str, repeats: int, clicks: int) -> None:
    import resource
    import time

    import numpy as np
    import torch

    torch.set_num_threads(2)
    import samkit

    image = _photo()
    if impl == "reference":
        pred = _reference(model, ckpt)
        pred.model.to(device)
    else:
        pred = samkit.Predictor(samkit.load(ckpt, device=device, dtype=TASK_DTYPE.get(task, "fp32")))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    times: list[float] = []
    extra: dict = {}
    with torch.inference_mode():
        pred.set_image(image)
        sync()
        if task.startswith("encoder"):
            for _ in range(repeats):
                t = time.perf_counter()
                pred.set_image(image)
                sync()
                times.append(time.perf_counter() - t)
            feats = pred.features if impl == "reference" else pred.embedding
            extra["embedding"] = feats.float().cpu().numpy().tolist() if task == "encoder_fp32" else None
        else:
            point = np.array([[750.0, 500.0]])
            label = np.array([1])
            for _ in range(3):
                pred.predict(point_coords=point, point_labels=label)
            for i in range(clicks):
                p = point + np.array([[(i * 37) % 200 - 100, (i * 53) % 200 - 100]])
                t = time.perf_counter()
                pred.predict(point_coords=p, point_labels=label, multimask_output=True)
                sync()
                times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    print(json.dumps({"times": times, "maxrss_mb": rss, "gpu_mb": gpu, **extra}))


def _run(impl, model, task, ckpt, device, repeats, clicks) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, model, task, ckpt, device, str(repeats), str(clicks)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{impl} {model} {task} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _checkpoint(model: str, tmp: Path) -> str:
    if model == "vit_t":
        from samkit.zoo import checkpoint_path

        return str(checkpoint_path("vit_t", progress=False))
    import torch

    sys.path.insert(0, str(REFSHIM))
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    ref = sam_model_registry[model]()
    with torch.no_grad():  # the zero-initialised rel-pos tables and pos_embed get values
        for name, p in ref.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.02)
    path = tmp / f"{model}_random.pth"
    torch.save(ref.state_dict(), path)
    return str(path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        a = sys.argv[2:]
        _child(a[0], a[1], a[2], a[3], a[4], int(a[5]), int(a[6]))
        return
    from samkit.hardware import auto_dtype, run_header

    print(run_header("fp32", "bf16", "auto"), flush=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_b", "vit_t"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clicks", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    args = ap.parse_args()
    print(f"mask decoder: fp32 under dtype fp32; {auto_dtype(args.device)} under dtype auto", flush=True)
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            ckpt = _checkpoint(model, Path(tmp))
            plan = [
                ("reference", "encoder_fp32"),
                *(("samkit", t) for t in TASKS if t.startswith("encoder") and t in args.tasks),
                *([("reference", "predict")] if any(t.startswith("predict") for t in args.tasks) else []),
                *(("samkit", t) for t in TASKS if t.startswith("predict") and t in args.tasks),
            ]
            res: dict = {key: [] for key in plan}
            for _ in range(args.rounds):
                for impl, task in plan:
                    res[(impl, task)].append(
                        _run(impl, model, task, ckpt, args.device, args.repeats, args.clicks)
                    )
            ref_enc = statistics.median(
                statistics.median(r["times"]) for r in res[("reference", "encoder_fp32")]
            )
            diff = (
                float(
                    np.abs(
                        np.array(res[("samkit", "encoder_fp32")][0]["embedding"])
                        - np.array(res[("reference", "encoder_fp32")][0]["embedding"])
                    ).max()
                )
                if ("samkit", "encoder_fp32") in res
                else float("nan")
            )
            for impl, task in plan:
                runs = res[(impl, task)]
                alltimes = sorted(t for r in runs for t in r["times"])
                med = statistics.median(statistics.median(r["times"]) for r in runs)
                base = (
                    ref_enc
                    if task.startswith("encoder")
                    else statistics.median(
                        statistics.median(r["times"]) for r in res[("reference", "predict")]
                    )
                )
                p95 = alltimes[min(len(alltimes) - 1, int(0.95 * len(alltimes)))]
                mem = max((r["gpu_mb"] if r["gpu_mb"] is not None else r["maxrss_mb"]) for r in runs)
                note = f"max|diff| {diff:.1e}" if (impl, task) == ("samkit", "encoder_fp32") else ""
                rows.append((model, task, impl, med * 1000, p95 * 1000, med / base, mem, note))
    mem_label = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    print(f"| model | task | impl | p50 ms | p95 ms | ratio vs reference fp32 | {mem_label} | note |")
    print("|---|---|---|---|---|---|---|---|")
    for m, t, i, med, p95, ratio, mem, note in rows:
        print(f"| {m} | {t} | {i} | {med:.1f} | {p95:.1f} | {ratio:.2f} | {mem:.0f} | {note} |")


if __name__ == "__main__":
    main()
