"""Segment everything, the image encoder and one click on a GPU: the reference (MobileSAM / segment-anything)
and samkit in the same run, one table.

    python benchmarks/bench_everything_gpu.py                      # CUDA, 8 coco_mini/val photos
    python benchmarks/bench_everything_gpu.py --device cpu --quick # 1 photo, an 8 x 8 grid: a smoke run

Rows (vit_t with its real weights unless said; median per image after one warm-up image):
- segment everything, fp32: the reference's SamAutomaticMaskGenerator vs samkit's MaskGenerator at the
  same settings (the defaults: 32 x 32 points, 64 per batch), with how many of the reference's masks
  samkit matches at IoU > 0.9 and both mask counts;
- segment everything, samkit with learned prompts (`prompts="learned"`, vit_t), timed against samkit's grid,
  decoded in rounds of 4 points (the default) and of 32;
- segment everything, samkit with a bf16 encoder, and bf16 with `--big-batch` points per batch;
- image encoder alone, a batch of `--encoder-batch` images: images/s, fp32 (both) and bf16 (samkit);
- one click on a cached embedding: `predict()` with one point, masks as numpy at the image size;
- vit_b and vit_h with random weights (timing only; `--models`): segment everything fp32 and the encoder.

The first lines say where it ran (CPU model, GPU, torch, which form of samkit's hot paths ran: the
CPU-tuned one or the plain GPU one). The table and those lines also go to `--out`.

On a machine without network or ../shared, pass --images, --refshim and --vit-t-weights (MobileSAM's
mobile_sam.pt) explicitly.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="1 image, 8 x 8 points, encoder batch 2, vit_t only")
    p.add_argument("--images", default=str(SHARED / "datasets/instances/coco_mini/val/images"))
    p.add_argument("--n-images", type=int, default=8)
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--big-batch", type=int, default=1024, help="points_per_batch of the second bf16 row")
    p.add_argument("--encoder-batch", type=int, default=16)
    p.add_argument("--clicks", type=int, default=50, help="timed one-click predictions")
    p.add_argument("--models", default="vit_t,vit_b,vit_h")
    p.add_argument("--refshim", default=str(SHARED / "refshim"), help="stand-ins for torchvision/timm")
    p.add_argument("--vit-t-weights", default=None, help="mobile_sam.pt (default: samkit's model cache)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--gpu-form", action="store_true", help="samkit runs the GPU form of its hot paths on the CPU too"
    )
    p.add_argument(
        "--out", default=None, help="results file (default: benchmarks/results/everything_gpu_*.txt)"
    )
    args = p.parse_args()
    if args.quick:  # new defaults; options given explicitly still win
        p.set_defaults(n_images=1, points_per_side=8, encoder_batch=2, clicks=5, models="vit_t")
        args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # The installed torchvision wins where it imports (a CUDA machine); else the CPU stand-ins.
    sys.path.append(args.refshim)
    device = torch.device(args.device)
    default = f"everything_gpu_{device.type}{'_quick' if args.quick else ''}.txt"
    out = Path(args.out or ROOT / "benchmarks" / "results" / default)

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    from samkit.devices import plain_ops

    images = _images(Path(args.images), args.n_images + 1)  # the first one warms up
    with plain_ops() if args.gpu_form else nullcontext():
        for line in _where(device):
            say(line)
        say(
            f"images: {len(images) - 1} of {args.images} (+1 warm-up), points_per_side {args.points_per_side}"
        )
        say()
        say("| model | row | reference | samkit | samkit / reference | notes |")
        say("|---|---|---|---|---|---|")
        for name in args.models.split(","):
            for row in _model_rows(name, device, images, args):
                say("| " + " | ".join(row) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"-> {out}")


# --- where it ran ------------------------------------------------------------------------------------


def _where(device: torch.device) -> list[str]:
    from samkit.devices import cpu_tuned
    from samkit.hardware import cpu_info, run_header

    cpu = cpu_info().model
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none used"
    try:
        import torchvision

        tv = getattr(torchvision, "__version__", "the CPU stand-ins (refshim)")
    except ImportError:
        tv = "not importable"
    form = "CPU-tuned" if cpu_tuned(device) else "plain batched torch (GPU form)"
    return [
        run_header("fp32", "bf16", device=device),
        f"device {device}; GPU: {gpu}; CPU: {cpu} ({torch.get_num_threads()} torch threads)",
        f"torch {torch.__version__}; torchvision for the reference: {tv}; samkit hot paths: {form}",
        f"command: python {' '.join(sys.argv)}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
    ]


def _images(folder: Path, n: int) -> list[np.ndarray]:
    from samkit.image import load_image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(files) < n:
        raise SystemExit(f"{folder} holds {len(files)} images, {n} needed")
    return [load_image(f) for f in files[:n]]


# --- the models --------------------------------------------------------------------------------------


def _reference(name: str, weights: Path | None) -> tuple[Any, Any, Any]:
    """The reference model (eval, CPU), its automatic mask generator class and its predictor class."""
    if name == "vit_t":
        from mobile_sam import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
    else:
        from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
    torch.manual_seed(0)
    model = sam_model_registry[name]()
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu"))
    return model.eval(), SamAutomaticMaskGenerator, SamPredictor


def _samkit(name: str, ref: Any, weights: Path | None, device: torch.device, dtype: str) -> Any:
    """samkit's model with the reference's weights (the same tensors); dtype "fp32" or "bf16" (encoder)."""
    import samkit
    from samkit.models.build import VIT_B, VIT_H, VIT_L, build_sam

    if weights is not None:
        return samkit.load(weights, device=device, dtype=dtype, progress=False)
    model = build_sam({"vit_b": VIT_B, "vit_l": VIT_L, "vit_h": VIT_H}[name])
    model.load_state_dict(ref.state_dict())
    model.arch = name
    if dtype == "bf16":  # as samkit.load does it
        model.encoder_amp = torch.bfloat16
        if device.type != "cpu":
            model.image_encoder.to(torch.bfloat16)
    return model.to(device).eval()


def _model_rows(name: str, device: torch.device, images: list[np.ndarray], args: argparse.Namespace):
    weights = None
    if name == "vit_t":
        from samkit.zoo import checkpoint_path

        weights = Path(args.vit_t_weights) if args.vit_t_weights else checkpoint_path("vit_t", progress=False)
    label = f"{name} ({'real' if weights else 'random'} weights)"
    ref_model, RefAMG, RefPredictor = _reference(name, weights)
    ref_model.to(device)
    ours = _samkit(name, ref_model, weights, device, "fp32")
    settings = {"points_per_side": args.points_per_side, "output_mode": "coco_rle"}

    import samkit

    ref_gen = RefAMG(ref_model, **settings)
    our_gen = samkit.MaskGenerator(ours, **settings)
    ref_ms, ref_records = _per_image(device, images, ref_gen.generate)
    our_ms, our_records = _per_image(device, images, our_gen.generate)
    matched, n_ref = _matched(ref_records, our_records)
    n_ours = sum(len(r) for r in our_records)
    note = f"{n_ours} / {n_ref} masks (samkit / reference)"
    if n_ref:
        note += f"; {100 * matched / n_ref:.1f}% of the reference's matched at IoU > 0.9"
    yield [label, "segment everything, fp32 (ms/img)", _ms(ref_ms), _ms(our_ms), _ratio(our_ms, ref_ms), note]

    if name == "vit_t":
        # the learned prompts (the shipped head reads vit_t's embedding) against samkit's grid: the default
        # rounds of 4 points (each round waits for the last one's masks), and rounds of 32 (fewer waits; on
        # held-out training images the same recall for ~20% more points)
        from samkit.everything.learned import PEAK_DEFAULTS

        for rounds in dict.fromkeys((PEAK_DEFAULTS.round_points, 32)):
            peaks = dataclasses.replace(PEAK_DEFAULTS, round_points=rounds)
            learned = samkit.MaskGenerator(ours, prompts="learned", peaks=peaks, output_mode="coco_rle")
            l_ms, l_records = _per_image(device, images, learned.generate)
            row = f"segment everything, learned prompts, rounds of {rounds}, fp32 (ms/img)"
            note = f"{sum(len(r) for r in l_records)} masks; the ratio is to samkit's grid row above"
            yield [label, row, "–", _ms(l_ms), _ratio(l_ms, our_ms), note]
            del learned
        bf16 = _samkit(name, ref_model, weights, device, "bf16")
        for ppb in dict.fromkeys((64, args.big_batch)):
            gen = samkit.MaskGenerator(bf16, points_per_batch=ppb, **settings)
            ms, records = _per_image(device, images, gen.generate)
            row = f"segment everything, bf16, points_per_batch {ppb} (ms/img)"
            yield [label, row, "–", _ms(ms), "", f"{sum(len(r) for r in records)} masks"]

    x = torch.randn(args.encoder_batch, 3, 1024, 1024, device=device)
    ref_ips = _encoder(device, ref_model.image_encoder, x)
    our_ips = _encoder(device, partial(_encode, ours), x)
    row = f"image encoder, batch {args.encoder_batch}, fp32 (img/s)"
    yield [label, row, f"{ref_ips:.3g}", f"{our_ips:.3g}", f"{our_ips / ref_ips:.2f}x throughput", ""]
    bf_ips = _encoder(device, partial(_encode, _samkit(name, ref_model, weights, device, "bf16")), x)
    row = f"image encoder, batch {args.encoder_batch}, bf16 (img/s)"
    yield [label, row, "–", f"{bf_ips:.3g}", f"{bf_ips / ref_ips:.2f}x the reference's fp32", ""]
    del x

    ref_click, our_click = _one_click(device, images[1], ref_model, RefPredictor, ours, args.clicks)
    yield [
        label,
        "one click on a cached embedding (ms)",
        _ms(ref_click),
        _ms(our_click),
        _ratio(our_click, ref_click),
        "3 masks as numpy, image size",
    ]
    del ref_model, ours, ref_gen, our_gen
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- measurements ------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_image(
    device: torch.device, images: list[np.ndarray], generate: Callable[[np.ndarray], list[dict]]
) -> tuple[list[float], list[list[dict]]]:
    """ms per image (the first image only warms up) and every image's records."""
    times, records = [], []
    with torch.inference_mode():
        for i, image in enumerate(images):
            _sync(device)
            start = time.perf_counter()
            result = generate(image)
            _sync(device)
            if i:
                times.append(1000 * (time.perf_counter() - start))
                records.append(result)
    return times, records


def _encode(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """samkit's encoder as the Predictor runs it (autocast where the model has a bf16 encoder)."""
    amp = model.encoder_amp
    dtype = next(model.image_encoder.parameters()).dtype
    with torch.autocast(batch.device.type, dtype=amp, enabled=amp is not None):
        return model.image_encoder(batch.to(dtype))


def _encoder(device: torch.device, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """Images per second over 3 timed batches after one warm-up batch."""
    with torch.inference_mode():
        fn(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(3):
            fn(x)
        _sync(device)
    return 3 * x.shape[0] / (time.perf_counter() - start)


def _one_click(device: torch.device, image: np.ndarray, ref_model: Any, RefPredictor: Any, ours: Any, n: int):
    """ms per `predict()` of one point (3 masks, numpy at the image size) on an already set image."""
    import samkit

    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    points = rng.uniform([0, 0], [w, h], size=(n + 3, 2))
    result = []
    for pred in (RefPredictor(ref_model), samkit.Predictor(ours)):
        pred.set_image(image)
        times = []
        for i, point in enumerate(points):
            _sync(device)
            start = time.perf_counter()
            pred.predict(point_coords=point[None], point_labels=np.ones(1), multimask_output=True)
            _sync(device)
            if i >= 3:  # 3 warm-up clicks
                times.append(1000 * (time.perf_counter() - start))
        result.append(times)
    return result[0], result[1]


def _matched(ref_records: list[list[dict]], our_records: list[list[dict]]) -> tuple[int, int]:
    """How many of the reference's masks have a samkit mask of the same image at IoU > 0.9, and of how many."""
    from pycocotools import mask as mask_utils

    def rles(records: list[dict]) -> list[dict]:
        return [
            {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
            if isinstance(r["segmentation"]["counts"], str)
            else r["segmentation"]
            for r in records
        ]

    matched = total = 0
    for ref, ours in zip(ref_records, our_records, strict=True):
        total += len(ref)
        if ref and ours:
            iou = mask_utils.iou(rles(ours), rles(ref), [0] * len(ref))  # (samkit, reference)
            matched += int((np.asarray(iou).max(0) > 0.9).sum())
    return matched, total


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}"


def _ratio(ours: list[float], ref: list[float]) -> str:
    return f"{statistics.median(ours) / statistics.median(ref):.2f}x time"


if __name__ == "__main__":
    main()
