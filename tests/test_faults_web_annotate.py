"""Faults and hostile clients of `samkit annotate`: odd paths and ids, links out of the images folder,
oversized bodies and prompts, the token and Host check (in the app and from the command line)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers_annotate import PHOTOS, free_port, make_project_dir, model

from samkit.annotate import Project
from samkit.annotate import project as project_module
from samkit.annotate.app import create_app
from samkit.prompts import MAX_POINTS
from samkit.web import LOOPBACK_NAMES, TOKEN_ENV, Access

pytestmark = pytest.mark.skipif(
    not PHOTOS[0].is_file(), reason=f"missing folder {PHOTOS[0].parent} (../shared/datasets)"
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    images, db = make_project_dir(tmp_path_factory.mktemp("annotate-faults"))
    project = Project(images, db, model(), log=lambda _: None)
    with TestClient(create_app(project), raise_server_exceptions=False) as client:
        ids = {im["path"]: im["id"] for im in client.get("/api/images").json()}
        yield project, client, ids


def _error(res, status: int) -> str:
    assert res.status_code == status, res.text
    assert list(res.json()) == ["error"], res.text
    msg = res.json()["error"]
    assert isinstance(msg, str) and "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "url",
    [
        "/files/a.jpg%00.png",
        "/files/000000000790.jpg%00",
        "/files/" + "a" * 400 + ".jpg",
        "/files/" + "/".join(["d" * 250] * 20) + ".jpg",
        "/api/images/99999999999999999999999/file",
        "/api/images/99999999999999999999999",
        "/api/images/-99999999999999999999999/file",
    ],
)
def test_odd_paths_and_huge_ids_are_404_not_500(env, url) -> None:
    _, client, _ = env
    _error(client.get(url), 404)


def test_huge_ids_in_every_route_are_404(env) -> None:
    _, client, _ = env
    big = 10**22
    _error(client.patch(f"/api/objects/{big}", json={"label": "x"}), 404)
    _error(client.delete(f"/api/objects/{big}"), 404)
    _error(client.post(f"/api/images/{big}/predict", json={"points": [[1, 1, 1]]}), 404)
    _error(client.post(f"/api/images/{big}/open"), 404)
    _error(client.post(f"/api/images/{big}/status", json={"status": "done"}), 404)
    _error(client.post("/api/events", json={"kind": "x", "image_id": big}), 404)


def test_event_details_and_bodies_are_limited(env) -> None:
    project, client, ids = env
    before = len(project.store.events("flood"))
    detail = {"blob": "x" * (2 * 2**20)}  # was stored as is (a 50 MB one too)
    assert "limit" in _error(client.post("/api/events", json={"kind": "flood", "detail": detail}), 413)
    assert len(project.store.events("flood")) == before
    ok = client.post("/api/events", json={"kind": "flood", "detail": {"note": "fine"}})
    assert ok.status_code == 200
    name = client.post("/api/events", json={"kind": "flood", "annotator": "n" * 5000})
    assert "malformed request" in _error(name, 422)
    opened = client.post(f"/api/images/{ids['0001.jpg']}/open", params={"annotator": "n" * 5000})
    assert "malformed request" in _error(opened, 422)


def test_prompts_are_capped_and_numbers_checked(env) -> None:
    _, client, ids = env
    url = f"/api/images/{ids['000000000790.jpg']}/predict"
    pts = [[10 + i, 10 + i, 1] for i in range(MAX_POINTS + 1)]
    assert "too many points" in _error(client.post(url, json={"points": pts}), 400)
    for body in (
        f'{{"points": [[{10**400}, 10, 1]]}}',
        f'{{"box": [0, 0, {10**400}, 10]}}',
        '{"points": [[NaN, 10, 1]]}',
        f'{{"points": [[10, 10, {2**70}]]}}',
    ):
        res = client.post(url, content=body, headers={"content-type": "application/json"})
        assert 400 <= res.status_code < 500
        _error(res, res.status_code)


def test_auto_mode_waits_a_bounded_time_for_another_run(env, monkeypatch) -> None:
    project, client, ids = env
    monkeypatch.setattr(project_module, "AUTO_WAIT_SECONDS", 0.2)
    assert project._auto_lock.acquire(timeout=5)
    try:
        res = client.post(f"/api/images/{ids['0001.jpg']}/auto", json={"points_per_side": 2})
    finally:
        project._auto_lock.release()
    assert "auto mode is running" in _error(res, 503)


def test_link_out_of_the_images_folder_is_skipped_at_start_up(tmp_path) -> None:
    """It crashed `Project()` (and `samkit annotate`) with a ValueError; now: a warning, then 404."""
    images, db = make_project_dir(tmp_path)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes((images / "0001.jpg").read_bytes())
    (images / "link.jpg").symlink_to(outside)
    (images / "inner.jpg").symlink_to(images / "0001.jpg")  # inside: the target is listed once
    logs: list[str] = []
    project = Project(images, db, model(), log=logs.append)
    try:
        assert any("link.jpg" in line and "outside" in line for line in logs)
        paths = [im["path"] for im in project.store.images()]
        assert "link.jpg" not in paths and sorted(paths) == ["000000000790.jpg", "0001.jpg"]
        with TestClient(create_app(project)) as client:
            assert client.get("/files/link.jpg").status_code == 404
            assert client.get("/files/inner.jpg").status_code == 200
    finally:
        project.close()


def test_token_and_host_check_with_the_browser_front_end(env) -> None:
    project, _, ids = env
    access = Access(token="annotate-token", hosts=LOOPBACK_NAMES)
    html = {"accept": "text/html"}
    with TestClient(create_app(project, access), base_url="http://127.0.0.1:8000") as browser:
        assert "token" in _error(browser.get("/api/images"), 401)
        _error(browser.get("/", headers=html), 401)
        first = browser.get("/?token=annotate-token", headers=html, follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"] == "/"
        page = browser.get("/", headers=html)  # the cookie from now on: page, script, API, images
        assert page.status_code == 200 and "samkit annotate" in page.text
        assert browser.get("/static/app.js").status_code == 200
        assert browser.get("/api/images").status_code == 200
        assert browser.get(f"/api/images/{ids['0001.jpg']}/file").status_code == 200
        cross = browser.post("/api/events", json={"kind": "x"}, headers={"origin": "http://evil.example"})
        assert "cross-site" in _error(cross, 403)
    with TestClient(create_app(project, access), base_url="http://evil.example:8000") as rebound:
        assert "Host header" in _error(rebound.get("/api/images?token=annotate-token"), 400)


def _start(images, db, port, *extra, env_token=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop(TOKEN_ENV, None)
    if env_token:
        env[TOKEN_ENV] = env_token
    cmd = [sys.executable, "-m", "samkit.cli", "annotate", str(images), "--db", str(db), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    line = proc.stdout.readline()
    while "samkit annotate: http" not in line and line:
        line = proc.stdout.readline()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/progress", timeout=2)
            return proc, line
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not answer: {line}")


def test_command_line_token_and_host_check(tmp_path) -> None:
    images, db = make_project_dir(tmp_path)
    port = free_port()
    proc, line = _start(images, db, port, env_token="from-the-environment")
    base = f"http://127.0.0.1:{port}"
    try:
        assert f"{base}/?token=from-the-environment" in line  # the URL to open, printed once
        assert httpx.get(f"{base}/api/images").status_code == 401
        bearer = {"authorization": "Bearer from-the-environment"}
        assert httpx.get(f"{base}/api/images", headers=bearer).status_code == 200
        rebound = httpx.get(f"{base}/api/images", headers={**bearer, "host": f"evil.example:{port}"})
        assert rebound.status_code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
    port = free_port()
    proc, line = _start(images, db, port, "--token", "given", "--allow-host", "box.lan")
    try:
        headers = {"x-samkit-token": "given", "host": f"box.lan:{port}"}
        assert httpx.get(f"http://127.0.0.1:{port}/api/images", headers=headers).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_phone_photo_sizes_are_the_viewed_frame(tmp_path) -> None:
    """A JPEG stored 40x20 with EXIF orientation 6 shows as 20x40: the annotator (and its SA-1B/COCO
    exports) must use that frame, the one its masks are in."""
    from PIL import Image

    images, db = make_project_dir(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (40, 20), (10, 200, 30)).save(images / "phone.jpg", exif=exif)
    project = Project(images, db, model(), log=lambda _: None)
    try:
        phone = next(im for im in project.store.images() if im["path"] == "phone.jpg")
        assert (phone["width"], phone["height"]) == (20, 40)
        assert project._sam.load_image(images / "phone.jpg").shape[:2] == (40, 20)
    finally:
        project.close()
