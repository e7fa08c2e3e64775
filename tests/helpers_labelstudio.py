"""A real Label Studio server and a samkit backend, both on 127.0.0.1, for the end-to-end test and benchmark.

Label Studio runs from its own environment (`.venv-labelstudio`, made by scripts/test.sh: it pins numpy,
Django etc.) with SQLite in a temporary folder, a test user with a fixed legacy API token, and local-files
serving rooted at ../shared/datasets. The backend is `samkit labelstudio` in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from helpers_annotate import free_port

ROOT = Path(__file__).resolve().parents[1]
LS_VENV = ROOT / ".venv-labelstudio"
LS_BIN = LS_VENV / "bin" / "label-studio"
DATASETS = ROOT.parent / "shared" / "datasets"
USER, PASSWORD, TOKEN = "test@samkit.local", "samkit-test-password", "samkit-test-token-0123456789"

CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Object" background="#ff3b30"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="Object" smart="true" background="#34c759"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Object" background="#007aff"/>
  </RectangleLabels>
</View>"""


def _wait(url: str, proc: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LabelStudio:
    """`label-studio start` on a free loopback port with a fresh SQLite database; `api` is a client with
    the test user's token. Use as a context manager."""

    def __init__(self, tmp: Path | None = None) -> None:
        self.tmp = Path(tmp or tempfile.mkdtemp(prefix="samkit-ls-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.tmp / "label-studio.log"
        self.proc: subprocess.Popen | None = None
        self.api = httpx.Client(base_url=self.url, headers={"Authorization": f"Token {TOKEN}"}, timeout=120)

    def __enter__(self) -> LabelStudio:
        data = self.tmp / "data"
        data.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
        env.update(
            LABEL_STUDIO_BASE_DATA_DIR=str(data),
            LABEL_STUDIO_USERNAME=USER,
            LABEL_STUDIO_PASSWORD=PASSWORD,
            LABEL_STUDIO_USER_TOKEN=TOKEN,
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
            LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
            LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(DATASETS),
            # The backend and this server are both on 127.0.0.1, which Label Studio refuses by default.
            ML_BLOCK_LOCAL_IP="false",
            SSRF_PROTECTION_ENABLED="false",
            LATEST_VERSION_CHECK="false",
            COLLECT_ANALYTICS="false",
            SENTRY_DSN="",
            FRONTEND_SENTRY_DSN="",
        )
        cmd = [
            str(LS_BIN),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(data),
            "--database",
            str(data / "label_studio.sqlite3"),
            "--enable-legacy-api-token",
            "--username",
            USER,
            "--password",
            PASSWORD,
            "--user-token",
            TOKEN,
        ]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.tmp)
        try:
            _wait(self.url, self.proc, self.log, 240)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.api.close()
        if self.proc is not None:
            _stop(self.proc)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- REST calls (the same the SDK makes) -----------------------------------------------------------

    def call(self, method: str, path: str, **kwargs) -> dict | list:
        r = self.api.request(method, path, **kwargs)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else {}

    def create_project(self, title: str = "samkit", config: str = CONFIG) -> int:
        return int(self.call("POST", "/api/projects", json={"title": title, "label_config": config})["id"])

    def connect_backend(self, project: int, url: str) -> int:
        body = {"url": url, "project": project, "title": "samkit", "is_interactive": True}
        return int(self.call("POST", "/api/ml", json=body)["id"])

    def upload(self, project: int, path: Path) -> int:
        with open(path, "rb") as f:
            self.call("POST", f"/api/projects/{project}/import", files={"file": (path.name, f)})
        tasks = self.call("GET", "/api/tasks", params={"project": project, "page_size": 1000})["tasks"]
        return max(int(t["id"]) for t in tasks)

    def add_local_files(self, project: int, folder: Path) -> None:
        """Local storage over `folder` (under ../shared/datasets), synced: one task per image."""
        body = {"project": project, "path": str(folder), "use_blob_urls": True, "title": folder.name}
        storage = self.call("POST", "/api/storages/localfiles", json=body)
        self.call("POST", f"/api/storages/localfiles/{storage['id']}/sync")

    def tasks(self, project: int) -> list[dict]:
        return self.call("GET", "/api/tasks", params={"project": project, "page_size": 1000})["tasks"]

    def interactive(self, backend: int, task: int, results: list[dict]) -> dict:
        """What the labelling UI asks on a smart keypoint/rectangle: the backend's prediction for it."""
        out = self.call(
            "POST",
            f"/api/ml/{backend}/interactive-annotating",
            json={"task": task, "context": {"result": results}},
        )
        if "data" not in out:
            raise RuntimeError(f"interactive annotating failed: {out}")
        return out["data"]


class Backend:
    """`samkit labelstudio` in a subprocess on a free loopback port."""

    def __init__(self, *args: str, tmp: Path, threads: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "backend.log"
        pre = f"import torch; torch.set_num_threads({threads}); " if threads else ""
        code = pre + "import sys; from samkit.cli import main; sys.exit(main(sys.argv[1:]))"
        self.cmd = [sys.executable, "-c", code, "labelstudio", "--port", str(self.port), *args]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Backend:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait(self.url, self.proc, self.log, 120)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            _stop(self.proc)


def keypoint(x: float, y: float, w: int, h: int, positive: bool = True) -> dict:
    """A smart keypoint at pixel (x, y) of a w x h image, as the labelling UI sends it (percent)."""
    return {
        "type": "keypointlabels",
        "from_name": "click",
        "to_name": "image",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "is_positive": positive,
        "value": {"x": 100 * x / w, "y": 100 * y / h, "width": 0.6, "keypointlabels": ["Object"]},
    }


def rectangle(box: tuple[float, float, float, float], w: int, h: int) -> dict:
    """A smart rectangle over the XYXY pixel `box` of a w x h image (percent x, y, width, height)."""
    x0, y0, x1, y1 = box
    value = {
        "x": 100 * x0 / w,
        "y": 100 * y0 / h,
        "width": 100 * (x1 - x0) / w,
        "height": 100 * (y1 - y0) / h,
        "rotation": 0,
        "rectanglelabels": ["Object"],
    }
    return {
        "type": "rectanglelabels",
        "from_name": "box",
        "to_name": "image",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": value,
    }
