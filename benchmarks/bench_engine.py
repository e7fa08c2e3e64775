"""Issue 11, point 2: segment-everything throughput of the local engine vs the Ray engine (1 and 2
workers) on this machine, and what Ray adds (cluster start, worker start, per-image overhead).

    python benchmarks/bench_engine.py [--model vit_t] [--images 4] [--points-per-side 8] [--repeats 1]
                                      [--two-threads]

Default model and generator settings except the grid: 8 x 8 = 64 prompts, one decoder batch (the
default 32 x 32 is 16 such batches, ~5 min per image on the shared 2-core CPU). Small train-split
photos (CamVid street scenes, 480 x 360).
Rows are interleaved per repeat and the median is reported; every configuration writes to a fresh
folder, so each run does all the work. Ray runs on a local instance with 2 CPUs; "steady" excludes
starting the workers (model load), "wall" includes it. Torch threads: local rows state theirs; a Ray
worker uses as many as its CPUs. `--two-threads` adds local-2-threads and 1-worker-x-2-CPUs rows (on a
loaded machine 2 threads can be ~10x slower than 1, so they are off by default).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "datasets" / "instances" / "camvid" / "train" / "images"


def main() -> None:
    from samkit.hardware import run_header

    print(run_header("auto"), flush=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_t")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--points-per-side", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--two-threads", action="store_true")
    args = ap.parse_args()

    import ray

    import samkit
    from samkit.engine.local import run_local
    from samkit.engine.ray_engine import RayEngine

    images = sorted(IMAGES.glob("*.jpg"))[: args.images]
    options = {"points_per_side": args.points_per_side}
    tmp = Path(tempfile.mkdtemp(prefix="bench_engine_"))

    t = time.perf_counter()
    model = samkit.load(args.model, progress=False)
    load_s = time.perf_counter() - t
    generator = samkit.MaskGenerator(model, output_mode="coco_rle", **options)

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="warning")
    ray_init_s = time.perf_counter() - t

    def local(threads: int) -> tuple[float, float]:
        torch.set_num_threads(threads)
        out = Path(tempfile.mkdtemp(dir=tmp))
        t = time.perf_counter()
        run_local(images, generator, out, progress=False)
        dt = time.perf_counter() - t
        return dt, dt  # the model is already loaded: steady == wall (its load time is reported apart)

    def on_ray(workers: int, cpus: float) -> tuple[float, float]:
        engine = RayEngine(args.model, options, workers=workers, cpus_per_worker=cpus, batch_size=1)
        out = Path(tempfile.mkdtemp(dir=tmp))
        t0 = time.perf_counter()
        engine.start()
        t1 = time.perf_counter()
        engine.run(images, out, progress=False)
        t2 = time.perf_counter()
        engine.close()
        return t2 - t1, t2 - t0

    rows = {
        "local, 1 thread": lambda: local(1),
        "ray, 1 worker x 1 CPU": lambda: on_ray(1, 1),
        "ray, 2 workers x 1 CPU": lambda: on_ray(2, 1),
    }
    if args.two_threads:
        rows["local, 2 threads"] = lambda: local(2)
        rows["ray, 1 worker x 2 CPUs"] = lambda: on_ray(1, 2)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            times[name].append(fn())
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)

    n = len(images)
    steady = {k: statistics.median(s for s, _ in v) for k, v in times.items()}
    wall = {k: statistics.median(w for _, w in v) for k, v in times.items()}
    base = steady["local, 1 thread"]
    print(
        f"model {args.model}, points_per_side {args.points_per_side}, {n} images {IMAGES.parent.parent.name} "
        f"480x360, median of {args.repeats}; torch {torch.__version__}"
    )
    print(f"model load in-process {load_s:.1f} s; ray.init (2 CPUs, local) {ray_init_s:.1f} s")
    print("| engine | steady images/min | s/image | wall incl. worker start (s) | vs local 1 thread |")
    print("|---|---|---|---|---|")
    for k in rows:
        print(
            f"| {k} | {60 * n / steady[k]:.1f} | {steady[k] / n:.2f} | {wall[k]:.1f} | {base / steady[k]:.2f}x |"
        )
    overhead = (steady["ray, 1 worker x 1 CPU"] - base) / n
    start = wall["ray, 1 worker x 1 CPU"] - steady["ray, 1 worker x 1 CPU"]
    print(
        f"Ray overhead, 1 worker x 1 CPU vs local 1 thread: {overhead:+.2f} s/image steady "
        f"({100 * overhead * n / base:+.0f}%), worker start (process + model load) {start:.1f} s, "
        f"cluster start {ray_init_s:.1f} s"
    )


if __name__ == "__main__":
    main()
