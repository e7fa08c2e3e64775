"""Click-to-mask latency of `samkit labelstudio` through a real Label Studio server.

Starts Label Studio (from .venv-labelstudio, SQLite in a temporary folder, 127.0.0.1 only) and the samkit
backend (its own process), uploads one GrabCut image, and sends N smart-keypoint clicks at random pixels of
the object, each a fresh single-point prompt, as the labelling UI does: POST
/api/ml/<id>/interactive-annotating, which Label Studio forwards to the backend's /predict. The first click
(the image is encoded) is reported apart. Interleaved with them, the same prompts are timed straight at the
backend's /predict and in-process with `samkit.Predictor.predict`, to show where the time goes.

    python benchmarks/bench_labelstudio.py [--clicks 30] [--model vit_t] [--threads 2]
        [--out benchmarks/results/labelstudio_latency.txt] [--screenshot docs/images/labelstudio.png]

--screenshot also opens the task in Label Studio's labelling UI in Debian's chromium (Playwright) and
saves a screenshot with one samkit mask on it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import helpers_labelstudio as hls  # noqa: E402  (one copy of the Label Studio set-up)
from helpers_annotate import launch_chromium  # noqa: E402

GRABCUT = hls.DATASETS / "interactive" / "GrabCut"


def _cpu() -> str:
    from samkit.hardware import cpu_info

    return cpu_info().model


def _clicks(stem: str, n: int, seed: int = 0) -> list[tuple[float, float]]:
    """n random pixels inside the object's ground-truth mask."""
    from samkit.image import load_image

    gt = np.array(load_image(GRABCUT / "masks" / f"{stem}.png"))[..., 0] == 255
    ys, xs = np.nonzero(gt)
    pick = np.random.default_rng(seed).choice(len(xs), size=n, replace=False)
    return [(float(xs[i]), float(ys[i])) for i in pick]


def _timed(predictor, x: float, y: float) -> float:
    t = time.perf_counter()
    predictor.predict([[x, y]], [1])
    return 1000 * (time.perf_counter() - t)


def _stats(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def screenshot(ls: hls.LabelStudio, project: int, task: int, result: dict, path: Path) -> None:
    """The labelling UI of `task` with `result` (a samkit brush mask) as its prediction, in chromium."""
    from playwright.sync_api import sync_playwright

    ls.call(
        "POST",
        "/api/predictions",
        json={"task": task, "result": [result], "score": result["score"], "model_version": "samkit"},
    )
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{ls.url}/user/login/")
        page.fill("input[name=email]", hls.USER)
        page.fill("input[name=password]", hls.PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{ls.url}/projects/{project}/data?task={task}")
        page.wait_for_selector("canvas", timeout=60_000)
        page.wait_for_timeout(3000)
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path))
        browser.close()


def main() -> None:
    from samkit.hardware import run_header

    print(run_header("auto"), flush=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clicks", type=int, default=30)
    ap.add_argument("--model", default="vit_t")
    ap.add_argument("--image", default="banana1", help="GrabCut image stem (default banana1, 640x480)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the backend and in-process")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "labelstudio_latency.txt"))
    ap.add_argument("--screenshot", default=None, metavar="PNG")
    args = ap.parse_args()
    if not hls.LS_BIN.exists():
        raise SystemExit(f"missing {hls.LS_BIN}: run scripts/test.sh (or see docs/labelstudio.md)")

    import torch

    import samkit
    from samkit.image import load_image

    torch.set_num_threads(args.threads)
    path = next((GRABCUT / "images").glob(f"{args.image}.*"))
    image = load_image(path)
    h, w = image.shape[:2]
    clicks = _clicks(args.image, args.clicks)
    tmp = Path(tempfile.mkdtemp(prefix="samkit-bench-ls-"))
    backend_args = ["--model", args.model, "--cache-dir", str(tmp / "cache")]
    rows: list[tuple[str, list[float]]] = []
    with hls.LabelStudio(tmp / "ls") as ls, hls.Backend(*backend_args, tmp=tmp, threads=args.threads) as be:
        project = ls.create_project("samkit latency")
        ml = ls.connect_backend(project, be.url)
        task = ls.upload(project, path)
        t = time.perf_counter()
        first = ls.interactive(ml, task, [hls.keypoint(*clicks[0], w, h)])
        first_ms = 1000 * (time.perf_counter() - t)

        (task_data,) = [d for d in ls.tasks(project) if d["id"] == task]
        predictor = samkit.Predictor(samkit.load(args.model))
        predictor.set_image(image)
        through: list[float] = []
        direct: list[float] = []
        local: list[float] = []
        # In a worker thread, as the backend runs it (uvicorn's thread pool): on a busy 2-core machine torch's
        # threads from the main thread were several times slower.
        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(1) as worker:
            for x, y in clicks:  # the three paths interleaved, so that they share the machine's noise
                t = time.perf_counter()
                ls.interactive(ml, task, [hls.keypoint(x, y, w, h)])
                through.append(1000 * (time.perf_counter() - t))

                body = {
                    "tasks": [task_data],
                    "label_config": hls.CONFIG,
                    "project": f"{project}.0",
                    "params": {"context": {"result": [hls.keypoint(x, y, w, h)]}},
                }
                t = time.perf_counter()
                client.post(be.url + "/predict", json=body).raise_for_status()
                direct.append(1000 * (time.perf_counter() - t))

                local.append(worker.submit(_timed, predictor, x, y).result())
        rows.append(("through Label Studio: POST /api/ml/<id>/interactive-annotating", through))
        rows.append(("backend alone: POST /predict (image fetch + hash + brush RLE)", direct))
        rows.append(("in-process samkit Predictor.predict (worker thread)", local))

        if args.screenshot:
            screenshot(ls, project, task, first["result"][0], Path(args.screenshot))

    shutil.rmtree(tmp, ignore_errors=True)
    base = _stats(local)[0]
    lines = [
        f"{args.clicks} single-point clicks on GrabCut {path.name} ({w}x{h}), model {args.model}, "
        f"torch threads {args.threads}; {_cpu()}, {os.cpu_count()} cores (shared, noisy), "
        f"load average {os.getloadavg()[0]:.1f}; Label Studio and the backend on 127.0.0.1",
        f"first click (image encoded, embedding cached): {first_ms:.0f} ms",
        f"{'path':<66}{'p50 ms':>8}{'p95 ms':>8}{'p50 / in-process':>18}",
    ]
    for name, ms in rows:
        p50, p95 = _stats(ms)
        lines.append(f"{name:<66}{p50:>8.1f}{p95:>8.1f}{p50 / base:>18.2f}")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
