"""`samkit serve` in a real uvicorn process on 127.0.0.1: embed, predict (50 concurrent), limits, errors."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTO, ROOT
from helpers_annotate import free_port, launch_chromium

import samkit
from samkit.errors import ImageError
from samkit.masks import rle_to_mask
from samkit.serve.app import decode_upload
from samkit.serve.cache import EmbeddingCache

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, embedding cache folder) of a `samkit serve --model vit_t` subprocess with a 1 MiB body limit."""
    try:
        samkit.zoo.checkpoint_path("vit_t", progress=False)
    except samkit.SamkitError as exc:
        pytest.skip(f"vit_t weights not available: {exc}")
    cache = tmp_path_factory.mktemp("serve_cache")
    port = free_port()
    cmd = [sys.executable, "-m", "samkit.cli", "serve", "--model", "vit_t", "--port", str(port)]
    # fp32 on every machine: its answers are compared with fp32 decoders (in-process, ONNX in a browser);
    # where bf16 is native, "auto" would decode in bf16, which rounds differently.
    cmd += ["--cache-dir", str(cache), "--max-upload-mb", "1", "--max-embeddings", "8", "--dtype", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            pytest.fail(f"server did not start: {out[-2000:]}")
        time.sleep(0.5)
    yield base, cache
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def embedded(server):
    base, cache = server
    data = PHOTO.read_bytes()
    r = httpx.post(base + "/embed", files={"file": ("photo.jpg", data, "image/jpeg")}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_models_and_openapi(server) -> None:
    base, _ = server
    assert httpx.get(base + "/health", timeout=60).json()["model"] == "vit_t"
    models = httpx.get(base + "/models", timeout=60).json()
    assert models["serving"] == "vit_t" and "vit_b" in {m["name"] for m in models["models"]}
    paths = httpx.get(base + "/openapi.json", timeout=60).json()["paths"]
    assert {"/embed", "/predict", "/everything", "/models", "/health"} <= set(paths)


def test_embed_is_cached_by_content(server, embedded) -> None:
    base, cache = server
    assert (embedded["height"], embedded["width"]) == (422, 640)
    assert (cache / f"{embedded['embedding_id']}.safetensors").is_file()
    again = httpx.post(base + "/embed", files={"file": ("x.jpg", PHOTO.read_bytes())}, timeout=60).json()
    assert again["embedding_id"] == embedded["embedding_id"] and again["cached"] is True
    raw = httpx.get(base + f"/embeddings/{embedded['embedding_id']}", timeout=60)
    assert raw.headers["x-image-size"] == "422,640"
    assert len(raw.content) == 256 * 64 * 64 * 4


def test_50_concurrent_predicts_match_the_predictor(server, embedded) -> None:
    base, cache = server
    key = embedded["embedding_id"]
    rng = np.random.default_rng(0)
    distinct = np.stack([rng.uniform(0, 640, 10), rng.uniform(0, 422, 10)], axis=1).round(1)
    clicks = np.concatenate([distinct] * 5)  # 50 requests; repeats must get the same answer
    pred = samkit.Predictor(samkit.load("vit_t", progress=False, dtype="fp32"))
    pred.load_embedding(cache / f"{key}.safetensors")
    expected = [pred.predict(c[None], [1]) for c in distinct] * 5

    def ask(click: np.ndarray) -> dict:
        body = {"embedding_id": key, "points": [click.tolist()], "labels": [1]}
        r = client.post(base + "/predict", json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()

    with httpx.Client() as client, ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(ask, clicks))
    for (masks, scores, _), answer in zip(expected, answers, strict=True):
        assert len(answer["masks"]) == 3
        got = [m["predicted_iou"] for m in answer["masks"]]
        assert got == sorted(got, reverse=True)
        for m in answer["masks"]:
            i = m["candidate"]
            decoded = rle_to_mask(m["segmentation"])
            assert decoded.shape == (422, 640) and m["area"] == int(decoded.sum())
            assert (decoded == masks[i]).mean() >= 0.999
            assert abs(m["predicted_iou"] - float(scores[i])) < 1e-4


def test_box_prompt_and_single_mask(server, embedded) -> None:
    base, _ = server
    body = {"embedding_id": embedded["embedding_id"], "box": [100, 80, 420, 330], "multimask": False}
    answer = httpx.post(base + "/predict", json=body, timeout=120).json()
    assert len(answer["masks"]) == 1 and answer["masks"][0]["area"] > 0


def test_oversize_upload_is_413(server) -> None:
    base, _ = server
    big = b"\xff\xd8" + os.urandom(3 * 2**20 // 2)
    r = httpx.post(base + "/embed", files={"file": ("big.jpg", big)}, timeout=60)
    assert r.status_code == 413 and "1 MiB limit" in r.json()["error"]

    def chunks():  # a valid multipart body without Content-Length: the limit applies while streaming
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'
        for _ in range(24):
            yield b"x" * 65536
        yield b"\r\n--b--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=b"}
    r = httpx.post(base + "/embed", content=chunks(), headers=headers, timeout=60)
    assert r.status_code == 413 and "1 MiB limit" in r.json()["error"]


def test_corrupt_or_missing_images_are_400(server) -> None:
    base, _ = server
    r = httpx.post(base + "/embed", files={"file": ("a.jpg", b"this is not an image")}, timeout=60)
    assert r.status_code == 400 and "not a readable image" in r.json()["error"]
    truncated = PHOTO.read_bytes()[:3000]
    r = httpx.post(base + "/embed", files={"file": ("t.jpg", truncated)}, timeout=60)
    assert r.status_code == 400 and "corrupt or truncated" in r.json()["error"]
    assert httpx.post(base + "/embed", timeout=60).status_code == 422  # no file field


def test_bad_prompts_and_unknown_ids(server, embedded) -> None:
    base, _ = server
    body = {"embedding_id": "0" * 32, "points": [[1, 1]], "labels": [1]}
    r = httpx.post(base + "/predict", json=body, timeout=60)
    assert r.status_code == 404 and "POST the image to /embed" in r.json()["error"]
    body = {"embedding_id": embedded["embedding_id"], "points": [[900, 10]], "labels": [1]}
    r = httpx.post(base + "/predict", json=body, timeout=60)
    assert r.status_code == 400 and "outside the 640x422 image" in r.json()["error"]
    r = httpx.post(base + "/predict", json={"embedding_id": embedded["embedding_id"]}, timeout=60)
    assert r.status_code == 400 and "no prompt" in r.json()["error"]


def test_everything_returns_sa1b(server) -> None:
    base, _ = server
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(samkit.load_image(PHOTO)).resize((320, 211)).save(buf, "PNG")
    r = httpx.post(
        base + "/everything?points_per_side=4", files={"file": ("s.png", buf.getvalue())}, timeout=300
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["image"]["width"] == 320 and doc["image"]["file_name"] == "s.png"
    for ann in doc["annotations"]:
        assert set(ann) >= {"segmentation", "bbox", "area", "predicted_iou", "point_coords", "crop_box"}
        assert rle_to_mask(ann["segmentation"]).shape == (211, 320)


def test_everything_with_learned_prompts(server) -> None:
    """`prompts=learned` runs the shipped head (the server's model is vit_t): fewer prompts, same records."""
    base, _ = server
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(samkit.load_image(PHOTO)).resize((320, 211)).save(buf, "PNG")
    files = {"file": ("s.png", buf.getvalue())}
    r = httpx.post(base + "/everything?prompts=learned", files=files, timeout=300)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["annotations"] and doc["image"]["height"] == 211
    for ann in doc["annotations"]:
        assert rle_to_mask(ann["segmentation"]).shape == (211, 320) and ann["predicted_iou"] > 0.88
    bad = httpx.post(base + "/everything?prompts=boxes", files=files, timeout=300)
    assert bad.status_code == 422 and "prompts" in bad.json()["error"]


def test_learned_prompts_need_a_head_for_the_served_model(tiny_ckpt, photo, tmp_path) -> None:
    """A model other than vit_t: the shipped head is refused per request (400's InputError), a head file
    trained for another architecture stops the service at start, and one trained for this model runs."""
    from PIL import Image

    from samkit.errors import InputError
    from samkit.everything.learned import HEAD_FILE, head_metadata, save_head
    from samkit.models.prompt_head import PromptHead
    from samkit.serve.app import ServeConfig, Service

    buf = io.BytesIO()
    Image.fromarray(photo).resize((320, 211)).save(buf, "PNG")
    config = ServeConfig(model=tiny_ckpt, cache_dir=str(tmp_path / "cache"), decode_threads=1)
    service = Service(config)
    try:
        with pytest.raises(InputError, match="trained on vit_t"):
            service.everything(buf.getvalue(), "s.png", 4, "learned")
        assert service.everything(buf.getvalue(), "s.png", 4)["image"]["width"] == 320  # grid still runs
    finally:
        service.close()
    from dataclasses import replace

    with pytest.raises(InputError, match="trained on vit_t"):
        Service(replace(config, prompt_head=str(HEAD_FILE)))
    own = save_head(PromptHead(), tmp_path / "own.safetensors", head_metadata(samkit.load(tiny_ckpt)))
    service = Service(replace(config, prompt_head=str(own)))
    try:
        doc = service.everything(buf.getvalue(), "s.png", 4, "learned")
        assert doc["image"]["height"] == 211 and isinstance(doc["annotations"], list)
    finally:
        service.close()


def test_embedding_cache_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, max_items=2)
    for i, key in enumerate("abc"):
        cache.path(key).write_bytes(b"x")
        os.utime(cache.path(key), ns=(i * 10**9, i * 10**9))
        if key == "b":
            assert cache.get("a") is not None  # "a" becomes the most recently used
        cache.added(key)
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2


def test_decode_upload_limits_pixels() -> None:
    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (300, 200)).save(buf, "PNG")
    assert decode_upload(buf.getvalue(), 60_000).shape == (200, 300, 3)
    with pytest.raises(ImageError, match="accepts up to 50000"):
        decode_upload(buf.getvalue(), 50_000)
    with pytest.raises(ImageError, match="empty"):
        decode_upload(b"", 10)


WEB = ROOT / "tests" / "web"
ORT_DIST = WEB / "node_modules" / "onnxruntime-web" / "dist"


def _ort_web() -> Path:
    """onnxruntime-web from npm into tests/web/node_modules (once), or skip."""
    if not (ORT_DIST / "ort.wasm.min.js").is_file():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm not installed: cannot install onnxruntime-web")
        res = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=WEB, capture_output=True, timeout=600
        )
        if res.returncode != 0:
            pytest.skip(f"npm ci failed: {res.stderr.decode(errors='replace')[-300:]}")
    return ORT_DIST


@contextmanager
def _static_site(routes: dict[str, Path]):
    """Serve files on 127.0.0.1: URL prefix -> folder or file."""

    class Handler(SimpleHTTPRequestHandler):
        extensions_map = {
            **SimpleHTTPRequestHandler.extensions_map,
            ".mjs": "text/javascript",
            ".wasm": "application/wasm",
        }

        def translate_path(self, path: str) -> str:
            path = path.split("?", 1)[0]
            for prefix, target in routes.items():
                if path == prefix or (target.is_dir() and path.startswith(prefix)):
                    return str(target / path[len(prefix) :].lstrip("/")) if target.is_dir() else str(target)
            return str(WEB / "missing")

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="Debian chromium not installed")
def test_browser_decodes_a_click_like_the_server(server, embedded, tmp_path) -> None:
    """decoder.onnx in chromium (onnxruntime-web, wasm) on the server's cached embedding == server's mask."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    dist = _ort_web()
    from samkit.export import export_onnx

    base, _ = server
    export_onnx(samkit.load("vit_t", progress=False), tmp_path / "model", parts=("decoder",))
    raw = httpx.get(base + f"/embeddings/{embedded['embedding_id']}", timeout=60)
    (tmp_path / "embedding.bin").write_bytes(raw.content)
    h, w = (int(v) for v in raw.headers["x-image-size"].split(","))
    (tmp_path / "embedding.json").write_text(json.dumps({"height": h, "width": w}))
    routes = {
        "/decode.html": WEB / "decode.html",
        "/ort/": dist,
        "/model/": tmp_path / "model",
        "/embedding.bin": tmp_path / "embedding.bin",
        "/embedding.json": tmp_path / "embedding.json",
    }
    click = [270.0, 250.0]
    with _static_site(routes) as site, playwright_api.sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            page = browser.new_page()
            page.goto(site + "/decode.html")
            result = page.evaluate("click => decode(click)", click)
        finally:
            browser.close()
    body = {"embedding_id": embedded["embedding_id"], "points": [click], "labels": [1]}
    answer = httpx.post(base + "/predict", json=body, timeout=120).json()
    by_candidate = {m["candidate"]: m for m in answer["masks"]}
    for i in range(3):  # the server's candidate i is the decoder's output i + 1
        assert abs(by_candidate[i]["predicted_iou"] - result["iou"][i + 1]) < 1e-3
    browser_mask = np.frombuffer(base64.b64decode(result["mask"]), np.uint8).reshape(h, w).astype(bool)
    server_mask = rle_to_mask(by_candidate[result["best"] - 1]["segmentation"])
    assert answer["masks"][0]["candidate"] == result["best"] - 1  # both pick the same best candidate
    agree = (browser_mask == server_mask).mean()
    assert agree >= 0.999, f"browser and server masks agree on {agree:.5f} of pixels"
    assert server_mask.sum() > 0


def test_fine_tune_does_not_reuse_the_stock_models_embeddings(tiny_ckpt, tmp_path, monkeypatch) -> None:
    """A fine-tuned checkpoint loads under its base architecture's name: served on the default cache folder it
    used to be answered from the stock model's embeddings. Ids and folders follow the encoder's weights."""
    import io as _io

    import torch
    from PIL import Image

    from samkit.serve.app import ServeConfig, Service

    tuned = samkit.load(tiny_ckpt, dtype="fp32")
    with torch.no_grad():
        next(tuned.image_encoder.parameters()).add_(0.5)
    tuned_path = tmp_path / "tuned.safetensors"
    samkit.save(tuned, tuned_path)
    monkeypatch.setenv("SAMKIT_HOME", str(tmp_path / "home"))
    buf = _io.BytesIO()
    Image.fromarray(np.full((40, 60, 3), 120, np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()

    answers, embeddings = [], []
    for path in (tiny_ckpt, str(tuned_path)):
        service = Service(ServeConfig(model=path, dtype="fp32"))
        try:
            assert service.name == samkit.load(tiny_ckpt).arch  # both load under one architecture name
            answer = service.embed(data)
            assert answer["cached"] is False, "the second model was answered from the first one's cache"
            answers.append(answer)
            embeddings.append(service.predictor(answer["embedding_id"]).embedding.clone())
        finally:
            service.close()
    assert answers[0]["embedding_id"] != answers[1]["embedding_id"]
    assert not torch.equal(embeddings[0], embeddings[1])


def test_decode_threads_leave_other_threads_torch_thread_count_alone(
    tiny_ckpt, tmp_path, monkeypatch
) -> None:
    """Decode threads run on one torch thread each; the rest of the process (encodes, the main thread,
    threads started later) keeps its own count. torch.set_num_threads(1) in the pool changed everyone's."""
    import torch

    from samkit.devices import can_limit_threads
    from samkit.serve.app import ServeConfig, Service

    if not can_limit_threads():
        pytest.skip("this torch build cannot set one thread's torch thread count on its own")
    monkeypatch.setenv("SAMKIT_HOME", str(tmp_path / "home"))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    service = Service(ServeConfig(model=tiny_ckpt, dtype="fp32", decode_threads=2))
    try:
        assert service.decoders.submit(torch.get_num_threads).result() == 1
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert (torch.get_num_threads(), later) == (2, [2])
    finally:
        service.close()
        torch.set_num_threads(before)
