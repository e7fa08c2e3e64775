"""Load test of `samkit serve`: one-click /predict latency (p50, p95) with concurrent clients, and the
server's memory over many requests.

Starts `samkit serve --model vit_t` on 127.0.0.1 (its own process), embeds one real photo, then
--clients client threads each send --clicks single-click /predict requests one after another (3
candidate masks, COCO RLE), every client waiting for its answer before the next click. Then
--memory-requests more requests from the same clients, with the server's resident memory (VmRSS) read
before and after them. Baseline in the same run: `Predictor.predict` called directly in this process on
the same embedding, one at a time, before and after the load phase (median).

    python benchmarks/bench_serve.py [--clients 8] [--clicks 40] [--memory-requests 1000] [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
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


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    from samkit.hardware import auto_dtype, run_header

    print(run_header("auto"), flush=True)
    print(f"mask decoder under dtype auto: {auto_dtype('cpu')}", flush=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--clicks", type=int, default=40, help="clicks per client in the latency phase")
    ap.add_argument("--memory-requests", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"cores available: {len(os.sched_getaffinity(0))}; load average at start: {os.getloadavg()}")

    cache = Path(tempfile.mkdtemp(prefix="samkit_serve_"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "samkit.cli", "serve", "--port", str(port), "--cache-dir", str(cache)]
    cmd += ["--model", "vit_t", "--workers", str(args.workers)]
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
        n = args.clients * args.clicks
        rng = np.random.default_rng(0)
        clicks = np.stack([rng.uniform(0, 640, n), rng.uniform(0, 422, n)], 1).round(1)

        pred = samkit.Predictor(samkit.load("vit_t", progress=False))
        pred.load_embedding(cache / f"{key}.safetensors")

        def direct_calls(count: int = 20) -> list[float]:
            out = []
            for c in clicks[:count]:
                t0 = time.perf_counter()
                pred.predict(c[None], [1])
                out.append(time.perf_counter() - t0)
            return out

        before = direct_calls()
        local = threading.local()

        def ask(click: np.ndarray) -> float:
            if not hasattr(local, "client"):
                local.client = httpx.Client()
            t0 = time.perf_counter()
            body = {"embedding_id": key, "points": [click.tolist()], "labels": [1]}
            r = local.client.post(base + "/predict", json=body, timeout=600)
            r.raise_for_status()
            return time.perf_counter() - t0

        def run_clients(points: np.ndarray) -> np.ndarray:
            """Each client sends its share of `points` one after another; all clients at once."""
            shares = np.array_split(points, args.clients)
            with ThreadPoolExecutor(args.clients) as pool:
                per_client = pool.map(lambda share: [ask(c) for c in share], shares)
                return np.array([t for client in per_client for t in client])

        for c in clicks[: 2 * args.clients]:  # warm up: every decode thread has run once
            ask(c)
        t = time.perf_counter()
        lat = run_clients(clicks)
        wall = time.perf_counter() - t
        # The baseline before and after the load phase, so that both see the same machine load.
        direct = float(np.median(before + direct_calls()))

        rss_before = rss_mb(proc.pid)
        more = np.resize(clicks, (args.memory_requests, 2))
        half = args.memory_requests // 2
        run_clients(more[:half])
        rss_half = rss_mb(proc.pid)
        run_clients(more[half:])
        rss_after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(
        f"vit_t, photo 640x422, {args.clients} clients x {args.clicks} clicks = {n} /predict requests "
        f"(each client waits for its answer), {args.workers} worker(s)"
    )
    print(f"{'':<30} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    print(
        f"{'samkit serve /predict':<30} {n / wall:>7.1f} {np.percentile(lat, 50) * 1e3:>7.0f} "
        f"{np.percentile(lat, 95) * 1e3:>7.0f} {np.percentile(lat, 99) * 1e3:>7.0f} {lat.max() * 1e3:>7.0f}"
    )
    print(f"{'Predictor.predict in-process':<30} {1 / direct:>7.1f} {direct * 1e3:>7.0f}")
    print(f"server throughput / in-process: {n / wall * direct:.2f}x")
    print(
        f"server RSS: {rss_before:.0f} MiB before {args.memory_requests} more requests, {rss_half:.0f} MiB "
        f"after {half}, {rss_after:.0f} MiB after all ({rss_after - rss_before:+.0f} MiB)"
    )
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
