"""Shared set-up of the annotate tests: two real photos with their vit_t embeddings computed once per run,
a uvicorn server in a thread, and a headless Debian chromium for Playwright."""

from __future__ import annotations

import functools
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
PHOTOS = [
    DATASETS
    / "instances"
    / "coco_mini"
    / "train"
    / "images"
    / "000000000790.jpg",  # 640x422, a birthday dinner
    DATASETS / "instances" / "ccp" / "train" / "images" / "0001.jpg",  # 338x512, a person
]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@functools.lru_cache(maxsize=1)
def model():
    """The real MobileSAM weights (cached offline), loaded once per test run."""
    import samkit

    return samkit.load("vit_t")


@functools.lru_cache(maxsize=1)
def _seed() -> Path:
    """A folder with images/ (the photos, times kept) and p.embeddings/ computed once per test run."""
    from samkit.annotate import Project

    root = Path(tempfile.mkdtemp(prefix="samkit-annotate-seed-"))
    (root / "images").mkdir()
    for p in PHOTOS:
        shutil.copy2(p, root / "images" / p.name)
    project = Project(root / "images", root / "p.sqlite", model(), log=lambda _: None)
    project.start()
    for im in project.store.images():
        project.embeddings.wait(im["id"])
    project.close()
    return root


def make_project_dir(tmp: Path) -> tuple[Path, Path]:
    """(images folder, database path) in `tmp`, with the embeddings already in the cache next to the db."""
    seed = _seed()
    shutil.copytree(seed / "images", tmp / "images", copy_function=shutil.copy2)
    shutil.copytree(seed / "p.embeddings", tmp / "p.embeddings")
    return tmp / "images", tmp / "p.sqlite"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadedServer:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; `url` once started."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def launch_chromium(playwright):
    """Debian's chromium, headless, never a downloaded browser."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
