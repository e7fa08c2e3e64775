"""ONNX deployment speed and accuracy: torch vs onnxruntime fp32 vs onnxruntime int8 (2 threads by default).

Encoder: `set_image` on a real photo (resize, normalise, encode), torch `Predictor` vs `OnnxPredictor`.
Decoder: `predict` of one click with 3 candidate masks at the original size. Each timed call is
interleaved across the three back ends (same image, same prompt), median of --repeats. Also prints the
parity figures: fp32 vs torch (max |logit| difference, mask pixel agreement) and int8 vs fp32 (IoU of the
best-scoring mask per click).

    python benchmarks/bench_onnx.py [--model vit_t] [--repeats 5] [--clicks 8] [--threads 2] [--onnx-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import samkit
from samkit.export import SPEC_NAME, export_onnx
from samkit.export.onnx_export import quantize_export

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted(
    (ROOT.parent / "shared" / "datasets" / "instances" / "coco_mini" / "train" / "images").glob("*.jpg")
)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    from samkit.hardware import run_header

    print(run_header("fp32"), flush=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_t")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clicks", type=int, default=8, help="clicks per photo for the accuracy figures")
    ap.add_argument("--photos", type=int, default=2)
    ap.add_argument("--onnx-dir", default=None, help="reuse/keep exports here (default: a temp folder)")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = samkit.load(args.model)
    root = Path(args.onnx_dir) if args.onnx_dir else Path(tempfile.mkdtemp(prefix="samkit_onnx_"))
    fp32_dir, int8_dir = root / f"{args.model}_fp32", root / f"{args.model}_int8"
    if not (fp32_dir / SPEC_NAME).exists():
        t = time.perf_counter()
        export_onnx(model, fp32_dir)
        print(f"export fp32: {time.perf_counter() - t:.1f} s")
    if not (int8_dir / SPEC_NAME).exists():
        quantize_export(fp32_dir, int8_dir)
    sizes = {d.name: sum(f.stat().st_size for f in d.glob("*.onnx*")) / 2**20 for d in (fp32_dir, int8_dir)}

    backends = {
        "torch": samkit.Predictor(model),
        "ort fp32": samkit.OnnxPredictor(fp32_dir, num_threads=args.threads),
        "ort int8": samkit.OnnxPredictor(int8_dir, num_threads=args.threads),
    }
    image = samkit.load_image(PHOTOS[0])
    click = ([[image.shape[1] * 0.45, image.shape[0] * 0.5]], [1])
    for p in backends.values():  # warm up
        p.set_image(image)
        p.predict(*click)
    enc: dict[str, list[float]] = {k: [] for k in backends}
    dec: dict[str, list[float]] = {k: [] for k in backends}
    for _ in range(args.repeats):
        for name, p in backends.items():
            enc[name].append(_timed(lambda p=p: p.set_image(image)))
        for _ in range(5):
            for name, p in backends.items():
                dec[name].append(_timed(lambda p=p: p.predict(*click)))

    print(
        f"\nmodel {args.model}, photo {image.shape[1]}x{image.shape[0]}, {args.threads} thread(s), "
        f"median of {args.repeats}"
    )
    print(f"{'backend':<10} {'encoder ms':>11} {'vs torch':>9} {'decoder ms':>11} {'vs torch':>9}")
    te, td = np.median(enc["torch"]), np.median(dec["torch"])
    for name in backends:
        e, d = np.median(enc[name]), np.median(dec[name])
        print(f"{name:<10} {e * 1e3:>11.0f} {te / e:>8.2f}x {d * 1e3:>11.1f} {td / d:>8.2f}x")
    print(f"files: fp32 {sizes[fp32_dir.name]:.1f} MiB, int8 {sizes[int8_dir.name]:.1f} MiB")

    # Accuracy on several photos and random clicks in the middle 60% of each.
    rng = np.random.default_rng(0)
    max_logit, agree, ious, ious_all = 0.0, [], [], []
    for path in PHOTOS[: args.photos]:
        img = samkit.load_image(path)
        for p in backends.values():
            p.set_image(img)
        h, w = img.shape[:2]
        for _ in range(args.clicks):
            pt = ([[rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h]], [1])
            tm, _, tl = backends["torch"].predict(*pt, return_logits=True)
            fm, fs, fl = backends["ort fp32"].predict(*pt, return_logits=True)
            qm, _, _ = backends["ort int8"].predict(*pt, return_logits=True)
            max_logit = max(max_logit, float(np.abs(fl - tl).max()))
            agree.append(((fm > 0) == (tm > 0)).mean())
            a, b = fm > 0, qm > 0
            iou = (a & b).sum((1, 2)) / np.maximum((a | b).sum((1, 2)), 1)
            ious.append(iou[fs.argmax()])
            ious_all.extend(iou)
    n = args.photos * args.clicks
    print(f"\nparity over {n} clicks on {args.photos} photos:")
    print(
        f"  fp32 vs torch: max |low-res logit diff| {max_logit:.2e}, mask pixels agree {min(agree):.6f} (min)"
    )
    print(f"  int8 vs fp32: best-mask IoU mean {np.mean(ious):.4f} min {np.min(ious):.4f}; ")
    print(f"                all 3 candidates IoU mean {np.mean(ious_all):.4f} min {np.min(ious_all):.4f}")


if __name__ == "__main__":
    main()
