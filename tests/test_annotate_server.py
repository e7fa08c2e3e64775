"""`samkit annotate` as a real uvicorn process: killed with SIGKILL and restarted on the same database."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
from helpers_annotate import free_port, make_project_dir


def _start(images, db, port):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "samkit.cli", "annotate", str(images), "--db", str(db), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    lines = [proc.stdout.readline() for _ in range(1)]
    while url not in lines[-1] and lines[-1] and len(lines) < 50:  # the command prints its URL
        lines.append(proc.stdout.readline())
    assert url in lines[-1], "".join(lines)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/progress", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not answer: {proc.stdout.read()}")


def test_killed_server_restarts_with_every_accepted_object(tmp_path):
    images, db = make_project_dir(tmp_path)
    port = free_port()
    proc, url = _start(images, db, port)
    try:
        ids = {im["path"]: im["id"] for im in httpx.get(f"{url}/api/images").json()}
        accepted = []
        for image, point in (("000000000790.jpg", [520, 300, 1]), ("0001.jpg", [170, 250, 1])):
            res = httpx.post(
                f"{url}/api/images/{ids[image]}/objects",
                json={"points": [point], "label": "person"},
                timeout=120,
            )
            assert res.status_code == 200, res.text
            accepted.append(res.json())
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown handler runs: only committed data survives
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()

    proc, url = _start(images, db, free_port())
    try:
        seen = {}
        for im in httpx.get(f"{url}/api/images").json():
            for o in httpx.get(f"{url}/api/images/{im['id']}").json()["objects"]:
                seen[o["id"]] = o
        for obj in accepted:
            assert seen[obj["id"]]["rle"] == obj["rle"]
            assert seen[obj["id"]]["label"] == "person"
        statuses = {im["path"]: im["status"] for im in httpx.get(f"{url}/api/images").json()}
        assert statuses == {"000000000790.jpg": "in progress", "0001.jpg": "in progress"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        proc.stdout.close()
