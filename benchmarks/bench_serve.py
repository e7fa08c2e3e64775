"""Load test of `samkit serve`: /predict throughput (requests/s) and latency (p50, p95) under concurrency.

Starts `samkit serve --model vit_t` on 127.0.0.1 (its own process), embeds one real photo, then sends
--requests single-click /predict requests (3 candidate masks, COCO RLE) from --concurrency client threads.
Baseline in the same run: `Predictor.predict` called directly in this process on the same embedding,
one at a time, on the same clicks, before and after the load phase (median).

    python benchmarks/bench_serve.py [--requests 200] [--concurrency 8] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

import samkit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers_annotate import free_port  # noqa: E402  (one copy of the test helpers)

PHOTO = (
    ROOT.parent / "shared" / "datasets" / "instances" / "coco_mini" / "train" / "images" / "000000000790.jpg"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(2)

    cache = Path(tempfile.mkdtemp(prefix="samkit_serve_"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "samkit.cli", "serve", "--port", str(port), "--cache-dir", str(cache)]
    cmd += ["--workers", str(args.workers)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        key = httpx.post(base + "/embed", files={"file": PHOTO.read_bytes()}, timeout=600).json()[
            "embedding_id"
        ]
        rng = np.random.default_rng(0)
        clicks = np.stack([rng.uniform(0, 640, args.requests), rng.uniform(0, 422, args.requests)], 1).round(
            1
        )

        pred = samkit.Predictor(samkit.load("vit_t"))
        pred.load_embedding(cache / f"{key}.safetensors")

        def direct_calls(n: int = 20) -> list[float]:
            out = []
            for c in clicks[:n]:
                t0 = time.perf_counter()
                pred.predict(c[None], [1])
                out.append(time.perf_counter() - t0)
            return out

        before = direct_calls()

        def ask(click: np.ndarray) -> float:
            t0 = time.perf_counter()
            body = {"embedding_id": key, "points": [click.tolist()], "labels": [1]}
            r = client.post(base + "/predict", json=body, timeout=600)
            r.raise_for_status()
            return time.perf_counter() - t0

        with httpx.Client(limits=httpx.Limits(max_connections=args.concurrency)) as client:
            ask(clicks[0])  # warm up
            t = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                lat = np.array(list(pool.map(ask, clicks)))
            wall = time.perf_counter() - t
        # The baseline before and after the load phase, so that both see the same machine load.
        direct = float(np.median(before + direct_calls()))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(
        f"vit_t, photo 640x422, {args.requests} /predict requests, {args.concurrency} concurrent clients, "
        f"{args.workers} worker(s), 2-core CPU"
    )
    print(f"{'':<28} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8}")
    print(
        f"{'samkit serve /predict':<28} {args.requests / wall:>8.1f} {np.percentile(lat, 50) * 1e3:>8.0f} "
        f"{np.percentile(lat, 95) * 1e3:>8.0f}"
    )
    print(f"{'Predictor.predict in-process':<28} {1 / direct:>8.1f} {direct * 1e3:>8.0f} {'':>8}")
    print(f"server throughput / in-process: {args.requests / wall * direct:.2f}x")


if __name__ == "__main__":
    main()
