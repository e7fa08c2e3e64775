"""Segment everything: samkit's MaskGenerator vs the reference's SamAutomaticMaskGenerator, same run.

Each measurement runs in its own subprocess (so peak RSS is that run's), samkit and the reference
interleaved, `--repeats` times; the table shows medians and samkit / reference ratios. Wall time is
`generate()` alone (image encoding of every crop included, model loading excluded).

    python benchmarks/bench_everything.py --model vit_t --weights real --repeats 3
    python benchmarks/bench_everything.py --model vit_b --weights random --repeats 2

The photo is a COCO train image (640 x 427) upscaled to 1500 x 1000 (bicubic): the data sets hold no
photo that large. Random weights give noise-like masks with predicted IoU near 0; to push several hundred
of them per crop through the post-processing, `--weights random` sets pred_iou_thresh to the value that
keeps ~`--survivors` of the 3 x 32 x 32 candidates of the whole image, and stability_score_thresh to 0;
with real weights `--survivors N` does the same (several hundred masks then survive NMS), else the
generator's default thresholds apply.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTO = (
    ROOT.parent / "shared" / "datasets" / "instances" / "coco_mini" / "train" / "images" / "000000000790.jpg"
)
REFSHIM = ROOT.parent / "shared" / "refshim"
CONFIGS = {"default": {}, "crop_n_layers=1": {"crop_n_layers": 1}}


def _image(size: tuple[int, int]):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(PHOTO).convert("RGB").resize(size, Image.BICUBIC))


def _reference(kind: str, weights: str, state_path: Path):
    import torch

    if kind == "vit_t":
        from mobile_sam import SamAutomaticMaskGenerator, sam_model_registry
    else:
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
    model = sam_model_registry[kind]()
    model.load_state_dict(torch.load(state_path, map_location="cpu"))
    return model.eval(), SamAutomaticMaskGenerator


def worker(args: argparse.Namespace) -> None:
    """One measurement; prints a JSON line."""
    sys.path.insert(0, str(REFSHIM))
    import torch

    torch.set_num_threads(args.threads)
    image = _image(args.size)
    kw = json.loads(args.kw)
    if args.impl == "reference":
        model, cls = _reference(args.model, args.weights, Path(args.state))
        gen = cls(model, **kw)
    else:
        import samkit

        gen = samkit.MaskGenerator(samkit.load(args.state, dtype="fp32"), **kw)
    # Peak RSS of this process from here on: ru_maxrss would also count the parent's size at fork
    # (Linux carries it across exec), so reset the kernel's high-water mark and read VmHWM instead.
    Path("/proc/self/clear_refs").write_text("5")
    rss_before = _status_kb("VmRSS")
    with torch.no_grad():
        start = time.perf_counter()
        records = gen.generate(image)
        wall = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    print(
        json.dumps(
            {"wall": wall, "peak_mb": peak / 1024, "before_mb": rss_before / 1024, "masks": len(records)}
        )
    )


def _status_kb(field: str) -> int:
    """A memory field of /proc/self/status, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _prepare(args: argparse.Namespace, workdir: Path) -> tuple[Path, dict]:
    """The checkpoint both sides load, and the thresholds of the run."""
    sys.path.insert(0, str(REFSHIM))
    import torch

    kw: dict = {"output_mode": "coco_rle"}
    if args.weights == "real":
        from samkit.zoo import checkpoint_path

        state = checkpoint_path(args.model)
        if args.survivors is not None:  # else the generator's default thresholds
            _keep_survivors(state, args, kw)
        return state, kw
    torch.manual_seed(0)
    if args.model == "vit_t":
        from mobile_sam import sam_model_registry
    else:
        from segment_anything import sam_model_registry
    state = workdir / f"{args.model}_random.pth"
    if not state.exists():
        torch.save(sam_model_registry[args.model]().state_dict(), state)
    if args.survivors is None:
        args.survivors = 300
    _keep_survivors(state, args, kw)
    return state, kw


def _keep_survivors(state: Path, args: argparse.Namespace, kw: dict) -> None:
    """Set pred_iou_thresh so that about `args.survivors` of the 3 x N x N whole-image candidates pass it,
    and stability_score_thresh to 0 (both sides get the same thresholds)."""
    import torch

    import samkit
    from samkit.everything.grids import point_grid

    pred = samkit.Predictor(samkit.load(state, dtype="fp32"))
    image = _image(args.size)
    pred.set_image(image)
    grid = point_grid(args.points_per_side) * [args.size[0], args.size[1]]
    coords = torch.as_tensor(pred.transform.apply_coords(grid, image.shape[:2]))[:, None]
    _, iou = pred.decode_low_res(coords, torch.ones(len(grid), 1, dtype=torch.int))
    ranked = iou.flatten().sort(descending=True).values
    kw.update(pred_iou_thresh=float(ranked[args.survivors]), stability_score_thresh=0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_t", choices=["vit_t", "vit_b"])
    p.add_argument("--weights", default="real", choices=["real", "random"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--survivors",
        type=int,
        default=None,
        help="thresholds that pass ~N whole-image candidates (default: 300 with random weights, the "
        "generator's own thresholds with real ones)",
    )
    p.add_argument("--points-per-side", type=int, default=32, help="fewer for a quick run on a busy machine")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--workdir", default="/tmp/samkit_bench")
    p.add_argument("--size", default="1500x1000")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    p.add_argument("--kw", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.size = tuple(int(v) for v in args.size.split("x"))
    if args.worker:
        worker(args)
        return
    from samkit.hardware import run_header

    print(run_header("fp32"), flush=True)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    state, base_kw = _prepare(args, workdir)
    if args.points_per_side != 32:
        base_kw["points_per_side"] = args.points_per_side
    print(
        f"model {args.model} ({args.weights} weights), photo {PHOTO.name} upscaled to {args.size[0]}x{args.size[1]}"
    )
    print(f"threads {args.threads}, repeats {args.repeats}, settings {base_kw}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    rows = []
    for name in args.configs.split(","):
        kw = {**base_kw, **CONFIGS[name]}
        runs: dict[str, list[dict]] = {"reference": [], "samkit": []}
        for _ in range(args.repeats):
            for impl in ("reference", "samkit"):
                cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--model", args.model]
                cmd += ["--weights", args.weights, "--state", str(state), "--kw", json.dumps(kw)]
                cmd += ["--threads", str(args.threads), "--size", f"{args.size[0]}x{args.size[1]}"]
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
                runs[impl].append(json.loads(out.strip().splitlines()[-1]))
                print(f"  {name:16s} {impl:9s} {runs[impl][-1]}", flush=True)
        med = {
            k: {m: statistics.median(r[m] for r in v) for m in ("wall", "peak_mb")} for k, v in runs.items()
        }
        masks = {k: v[0]["masks"] for k, v in runs.items()}
        rows.append((name, med, masks))
    print()
    print(
        "| settings | masks (samkit / ref) | ref wall s | samkit wall s | time ratio | ref peak RSS MB | samkit peak RSS MB | RSS ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, med, masks in rows:
        r, s = med["reference"], med["samkit"]
        print(
            f"| {name} | {masks['samkit']} / {masks['reference']} | {r['wall']:.1f} | {s['wall']:.1f} | "
            f"{s['wall'] / r['wall']:.2f} | {r['peak_mb']:.0f} | {s['peak_mb']:.0f} | {s['peak_mb'] / r['peak_mb']:.2f} |"
        )


if __name__ == "__main__":
    main()
