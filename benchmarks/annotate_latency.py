"""Click-to-mask latency of `samkit annotate`, measured in a real headless chromium.

A `samkit annotate` server (its own process, default model vit_t with the real MobileSAM weights) serves one
real photo whose embedding is cached; Playwright clicks N random points on the object-rich middle of the
image, each a fresh single-point prompt (3 candidates, the heaviest case). The page times each click with
performance.now() from the mouse-up to the animation frame after the mask is drawn. Interleaved with the
clicks, the same prompts run in this process through the reference MobileSAM `SamPredictor.predict` and
through `samkit.Predictor.predict`, both on the same cached embedding, as the baselines.

    python benchmarks/annotate_latency.py [--clicks 50] [--threads N] [--image PATH]

Needs Debian's chromium at /usr/bin/chromium and the `playwright` package (no browser download).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PHOTO = SHARED / "datasets" / "instances" / "coco_mini" / "train" / "images" / "000000000790.jpg"
sys.path.insert(0, str(ROOT / "tests"))
from helpers_annotate import free_port, launch_chromium  # noqa: E402  (one copy of the browser set-up)


def _start_server(
    images: Path, db: Path, threads: int | None, cpus: set[int] | None
) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pre = f"import torch; torch.set_num_threads({threads}); " if threads else ""
    code = pre + "import sys; from samkit.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "annotate", str(images), "--db", str(db), "--port", str(port)]
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the annotate server exited with status {proc.returncode}")
        try:
            progress = httpx.get(f"{url}/api/progress", timeout=2).json()
            if progress["done"] == progress["total"]:
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the annotate server did not start or embed the image within 10 minutes")


def _reference_predictor(embedding: Path):
    """The reference MobileSAM SamPredictor, fed samkit's cached embedding (same weights, same features)."""
    sys.path.insert(0, str(SHARED / "refshim"))
    from mobile_sam import SamPredictor, sam_model_registry
    from safetensors import safe_open

    from samkit.zoo import checkpoint_path

    ref = SamPredictor(sam_model_registry["vit_t"](checkpoint=str(checkpoint_path("vit_t"))).eval())
    with safe_open(str(embedding), framework="pt") as f:
        meta = f.metadata()
        ref.features = f.get_tensor("embedding")
    ref.original_size = tuple(int(v) for v in meta["original_size"].split(","))
    ref.input_size = tuple(int(v) for v in meta["input_size"].split(","))
    ref.is_image_set = True
    return ref


def _pct(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50)), float(np.percentile(values, 95))


def main() -> None:
    from samkit.hardware import run_header

    print(run_header("auto"), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clicks", type=int, default=50)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads in the server (default: torch's)"
    )
    ap.add_argument("--image", type=Path, default=PHOTO)
    ap.add_argument(
        "--http",
        action="store_true",
        help="no browser: time POST /predict round trips from Python (no chromium)",
    )
    ap.add_argument("--cpus", default=None, help="pin the server and the baselines to these cores, e.g. 0,1")
    args = ap.parse_args()
    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None

    import samkit

    tmp = Path(tempfile.mkdtemp(prefix="samkit-annotate-bench-"))
    (tmp / "images").mkdir()
    shutil.copy2(args.image, tmp / "images" / args.image.name)
    proc, url = _start_server(tmp / "images", tmp / "p.sqlite", args.threads, cpus)
    (embedding,) = (tmp / "p.embeddings").glob("*.safetensors")

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ref = _reference_predictor(embedding)
    except ImportError:  # the reference is a test-only install
        ref = None
    ours = samkit.Predictor(samkit.load("vit_t", dtype="fp32"))
    ours.load_embedding(embedding)
    h, w = ours.original_size
    rng = np.random.default_rng(0)
    # The middle of the frame, where the objects are; each click a new single-point prompt.
    points = np.stack(
        [rng.uniform(0.15 * w, 0.85 * w, args.clicks), rng.uniform(0.2 * h, 0.9 * h, args.clicks)], 1
    )
    baselines = [("in-process samkit Predictor.predict", ours)]
    if ref is not None:
        baselines.append(("in-process reference MobileSAM SamPredictor.predict", ref))
    timings: dict[str, list[float]] = {name: [] for name, _ in baselines}

    # The server decodes in a worker thread (FastAPI runs plain endpoints in a thread pool); the baselines
    # run in one too, pinned like the server. On an oversubscribed machine, torch ops started from the
    # main thread were seen to run several times slower than the same ops from a worker thread.
    pool = ThreadPoolExecutor(1, initializer=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)

    def timed(predictor, x: float, y: float) -> float:
        t = time.perf_counter()
        predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
        return (time.perf_counter() - t) * 1000

    def run_baselines(x: float, y: float) -> None:
        """The same prompt through each in-process baseline."""
        for name, predictor in baselines:
            timings[name].append(pool.submit(timed, predictor, x, y).result())

    for _ in range(3):  # warm-up: first calls allocate
        run_baselines(*points[0])
    for values in timings.values():
        values.clear()
    try:
        if args.http:
            client_ms, server_ms = _http_clicks(url, points, run_baselines)
            client_name = "HTTP: POST /predict round trip (samkit annotate)"
        else:
            client_ms, server_ms = _browser_clicks(url, points, run_baselines)
            client_name = "browser: click -> mask drawn (samkit annotate)"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    rows = [(client_name, client_ms), ("server: inside POST /predict (decode + upsample + RLE)", server_ms)]
    rows += list(timings.items())
    base = timings[baselines[-1][0]]
    print(
        f"{args.clicks} clicks on {args.image.name} ({w}x{h}), vit_t, cached embedding, torch threads "
        f"{args.threads or torch.get_num_threads()}, server cores {sorted(cpus) if cpus else 'any'} of "
        f"{os.cpu_count()}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'path':58s} {'p50 ms':>8s} {'p95 ms':>8s} {'p50 / last':>10s}")
    for name, values in rows:
        p50, p95 = _pct(values)
        print(f"{name:58s} {p50:8.1f} {p95:8.1f} {p50 / _pct(base)[0]:10.2f}")


def _browser_clicks(url: str, points: np.ndarray, between) -> tuple[list[float], list[float]]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 800})
        page.goto(url)
        page.wait_for_function("window.samkit.img !== null", timeout=120_000)
        page.wait_for_timeout(500)
        view = page.evaluate("window.samkit.view")
        box = page.locator("#canvas").bounding_box()
        for i, (x, y) in enumerate(points):
            page.mouse.click(box["x"] + view["tx"] + x * view["s"], box["y"] + view["ty"] + y * view["s"])
            page.wait_for_function(f"window.samkit.latencies.length === {i + 1}", timeout=120_000)
            page.keyboard.press("Escape")
            between(x, y)
        out = page.evaluate("window.samkit.latencies"), page.evaluate("window.samkit.serverMs")
        browser.close()
    return out


def _http_clicks(url: str, points: np.ndarray, between) -> tuple[list[float], list[float]]:
    import httpx

    client_ms, server_ms = [], []
    with httpx.Client(base_url=url, timeout=120) as client:
        image_id = client.get("/api/images").json()[0]["id"]
        for x, y in points:
            t = time.perf_counter()
            res = client.post(f"/api/images/{image_id}/predict", json={"points": [[float(x), float(y), 1]]})
            res.raise_for_status()
            body = res.json()
            client_ms.append((time.perf_counter() - t) * 1000)
            server_ms.append(body["server_ms"])
            between(x, y)
    return client_ms, server_ms


if __name__ == "__main__":
    main()
