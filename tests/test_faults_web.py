"""Faults and hostile clients of the web apps: `samkit.web` (token, Host check, body limits, error bodies,
shared by every app), the prompt schema `serve` and `annotate` share, and `samkit serve` (prompt caps,
huge numbers, tiny images, queues, concurrency).

The annotator's cases are in test_faults_web_annotate.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers_annotate import free_port
from PIL import Image

import samkit
from samkit.errors import (
    AccessError,
    CheckpointError,
    GoneError,
    ImageError,
    InputError,
    NotFoundError,
    PromptError,
    SamkitError,
    StateError,
)
from samkit.prompts import MAX_POINTS
from samkit.web import (
    LOOPBACK_NAMES,
    MAX_JSON_BYTES,
    TOKEN_ENV,
    Access,
    BodyLimit,
    ErrorBody,
    Guard,
    host_name,
    install_error_handlers,
    status_of,
)

PHOTO = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "instances" / "coco_mini"
PHOTO = PHOTO / "train" / "images" / "000000000790.jpg"


def _tiny_app(access: Access | None = None, **limits) -> FastAPI:
    """An app with the shared middleware and error handlers: GET /ok, POST /echo, GET /boom."""
    app = FastAPI()
    app.add_middleware(BodyLimit, **limits)
    app.add_middleware(Guard, access=access or Access())
    install_error_handlers(app)

    @app.get("/ok")
    def ok() -> dict:
        return {"ok": True}

    @app.post("/echo")
    def echo(body: dict) -> dict:
        return {"keys": len(body)}

    @app.get("/boom")
    def boom() -> dict:
        raise KeyError("unexpected\nover two lines")

    @app.get("/bad")
    def bad() -> dict:
        raise InputError("a one-line message")

    return app


def _one_line_error(res, status: int) -> str:
    """The message of an error answer, checked to be samkit's one shape: {"error": "<one line>"}."""
    assert res.status_code == status, res.text
    body = res.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and "\n" not in body["error"], body
    return body["error"]


# --- Host check -----------------------------------------------------------------------------------------


def test_loopback_server_refuses_unknown_host_names() -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    access = Access.for_bind("127.0.0.1")
    assert access.hosts == LOOPBACK_NAMES and access.token is None
    for base in ("http://localhost:8000", "http://127.0.0.1:1234", "http://[::1]:8000", "http://LOCALHOST"):
        with TestClient(_tiny_app(access), base_url=base) as client:
            assert client.get("/ok").status_code == 200, base
    for base in ("http://evil.example:8000", "http://127.0.0.1.evil.example", "http://localhost.evil"):
        with TestClient(_tiny_app(access), base_url=base) as client:
            msg = _one_line_error(client.get("/ok"), 400)
            assert "--allow-host" in msg
    with TestClient(_tiny_app(access), base_url="http://localhost") as client:
        assert client.get("/ok", headers={"host": ""}).status_code == 400


def test_allow_host_and_bind_policies(monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert Access.for_bind("127.0.0.1", allow_hosts=["Box.LAN:8000"]).hosts == LOOPBACK_NAMES | {"box.lan"}
    assert Access.for_bind("::1").hosts == LOOPBACK_NAMES
    assert Access.for_bind("localhost").hosts == LOOPBACK_NAMES
    assert Access.for_bind("0.0.0.0").hosts is None  # any name on a network address (use a token)
    assert Access.for_bind("0.0.0.0", allow_hosts=["box.lan"]).hosts == LOOPBACK_NAMES | {"box.lan"}
    assert Access.for_bind("127.0.0.1", allow_hosts=["*"]).hosts is None
    assert host_name("[::1]:80") == "::1" and host_name("Example.COM:1") == "example.com"
    with TestClient(
        _tiny_app(Access.for_bind("127.0.0.1", allow_hosts=["box.lan"])), base_url="http://box.lan:9"
    ) as c:
        assert c.get("/ok").status_code == 200
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert Access.for_bind("127.0.0.1").token == "from-env"
    assert Access.for_bind("127.0.0.1", token="given").token == "given"


def test_cross_site_origin_is_refused() -> None:
    access = Access.for_bind("127.0.0.1")
    with TestClient(_tiny_app(access), base_url="http://localhost:8000") as client:
        ok = client.post("/echo", json={"a": 1}, headers={"origin": "http://localhost:8000"})
        assert ok.status_code == 200
        res = client.post("/echo", json={"a": 1}, headers={"origin": "https://evil.example"})
        assert "cross-site" in _one_line_error(res, 403)


# --- token ----------------------------------------------------------------------------------------------


def test_token_is_required_in_a_header_or_cookie() -> None:
    access = Access(token="s3cret-token", hosts=LOOPBACK_NAMES)
    with TestClient(_tiny_app(access), base_url="http://localhost:8000") as client:
        res = client.get("/ok")
        assert "token" in _one_line_error(res, 401) and res.headers["www-authenticate"] == "Bearer"
        assert client.get("/ok", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/ok", headers={"authorization": "Bearer s3cret-tok"}).status_code == 401
        assert client.get("/ok", headers={"authorization": "Bearer s3cret-token"}).status_code == 200
        assert client.get("/ok", headers={"x-samkit-token": "s3cret-token"}).status_code == 200
        assert client.get("/ok?token=s3cret-token").status_code == 200  # an API client's GET
        assert client.post("/echo?token=nope", json={}).status_code == 401


def test_browser_gets_the_token_once_in_the_url_then_a_cookie() -> None:
    access = Access(token="s3cret-token", hosts=LOOPBACK_NAMES)
    html = {"accept": "text/html,application/xhtml+xml"}
    with TestClient(_tiny_app(access), base_url="http://localhost:8000") as client:
        res = client.get("/ok?x=1&token=s3cret-token", headers=html, follow_redirects=False)
        assert res.status_code == 303 and res.headers["location"] == "/ok?x=1"  # token gone from the URL
        cookie = res.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
        name, value = cookie.split(";")[0].split("=", 1)
        assert value == "s3cret-token"
        assert client.get("/ok").status_code == 200  # the cookie jar, as a browser's, sends it back
    with TestClient(_tiny_app(access), base_url="http://localhost:8000") as client:
        assert client.get("/ok", headers={"cookie": f"{name}=wrong"}).status_code == 401
        assert client.get("/ok?token=bad", headers=html, follow_redirects=False).status_code == 401
        assert client.get("/ok", headers={"cookie": f"{name}={value}"}).status_code == 200
    sent = _call(
        _tiny_app(access), "GET", "//evil.example/ok", b"token=s3cret-token", [(b"accept", b"text/html")]
    )
    location = dict(sent[0]["headers"])[b"location"]
    assert sent[0]["status"] == 303 and location == b"/evil.example/ok"  # a path here, not another site
    odd = Access(token="a b;c=d", hosts=None)  # any characters survive the cookie
    with TestClient(_tiny_app(odd)) as client:
        res = client.get("/ok?token=a%20b%3Bc%3Dd", headers=html, follow_redirects=False)
        assert res.status_code == 303
        assert client.get("/ok").status_code == 200


# --- bodies and errors ----------------------------------------------------------------------------------


def test_json_bodies_are_limited_to_413() -> None:
    with TestClient(_tiny_app()) as client:
        small = client.post("/echo", json={"a": "x" * 1000})
        assert small.status_code == 200
        big = client.post("/echo", json={"a": "x" * (MAX_JSON_BYTES + 10)})
        assert "KiB limit" in _one_line_error(big, 413)

        def chunks():  # no Content-Length: the limit applies while the body streams in
            yield b'{"a": "'
            for _ in range(40):
                yield b"x" * 16384
            yield b'"}'

        streamed = client.post("/echo", content=chunks(), headers={"content-type": "application/json"})
        _one_line_error(streamed, 413)


def _call(app, method: str, path: str, query: bytes = b"", headers=(), messages=()) -> list[dict]:
    """Run one raw ASGI request (paths and timings no HTTP client would send); returns the messages sent."""
    sent: list[dict] = []
    messages = list(messages) or [{"type": "http.request", "body": b""}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(5)  # the rest of the body never comes
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"localhost"), *headers],
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5000),
        "http_version": "1.1",
        "app": app,
    }
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_body_sent_too_slowly_gets_408() -> None:
    started = time.monotonic()
    first = [{"type": "http.request", "body": b'{"a":', "more_body": True}]
    sent = _call(_tiny_app(seconds=0.3), "POST", "/echo", messages=first)
    assert time.monotonic() - started < 3
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"]) == {"error": "request body not received within 0.3 s"}


def test_unexpected_errors_are_one_line_json_500() -> None:
    with TestClient(_tiny_app(), raise_server_exceptions=False) as client:
        msg = _one_line_error(client.get("/boom"), 500)
        assert "KeyError" in msg and "/boom" in msg
        assert _one_line_error(client.get("/bad"), 400) == "a one-line message"
        assert "malformed request" in _one_line_error(client.post("/echo", json=[1]), 422)
    with TestClient(_tiny_app()) as client, pytest.raises(KeyError):
        client.get("/boom")  # raised again after the answer: servers log the traceback


# --- samkit serve ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_app(tmp_path_factory):
    """(TestClient, embedding id of the photo) for `samkit serve --model vit_t` in this process."""
    from samkit.serve import ServeConfig, create_app

    try:
        samkit.zoo.checkpoint_path("vit_t", progress=False)
    except SamkitError as exc:
        pytest.skip(f"vit_t weights not available: {exc}")
    if not PHOTO.is_file():
        pytest.skip(f"missing folder {PHOTO.parent} (../shared/datasets)")
    config = ServeConfig(model="vit_t", cache_dir=str(tmp_path_factory.mktemp("serve")), decode_threads=4)
    with TestClient(create_app(config)) as client:
        res = client.post("/embed", files={"file": ("p.jpg", PHOTO.read_bytes())})
        assert res.status_code == 200, res.text
        yield client, res.json()["embedding_id"]


def test_points_per_prompt_are_capped(serve_app) -> None:
    """50,000 points made the server allocate ~20 GB and die; the cap is MAX_POINTS (shared with annotate)."""
    client, key = serve_app
    pts = [[10.0 + i % 600, 10.0 + i % 400] for i in range(MAX_POINTS)]
    ok = client.post("/predict", json={"embedding_id": key, "points": pts, "labels": [1] * MAX_POINTS})
    assert ok.status_code == 200, ok.text
    over = {"embedding_id": key, "points": [*pts, [5, 5]], "labels": [1] * (MAX_POINTS + 1)}
    msg = _one_line_error(client.post("/predict", json=over), 400)
    assert msg == f"too many points ({MAX_POINTS + 1}) in one prompt; {MAX_POINTS} at most"
    n = 50_000
    huge = {"embedding_id": key, "points": [[1.0, 1.0]] * n, "labels": [1] * n}
    started = time.monotonic()
    res = client.post("/predict", json=huge)
    assert "KiB limit" in _one_line_error(res, 413) and time.monotonic() - started < 10


def test_predictor_refuses_more_points_than_the_cap(serve_app) -> None:
    """The cap is in the shared prompt check, so every front end (CLI, ONNX, annotate) has it."""
    pred = samkit.Predictor(samkit.load("vit_t", progress=False))
    pred.set_image(np.zeros((32, 32, 3), np.uint8))
    n = MAX_POINTS + 1
    with pytest.raises(samkit.errors.PromptError, match="too many points"):
        pred.predict(np.ones((n, 2)), np.ones(n, int))


@pytest.mark.parametrize(
    "fields",
    [
        f'"points": [[10, 10]], "labels": [{2**70}]',
        '"points": [[10, 10]], "labels": [2]',
        '"points": [[10, 10]], "labels": [1.5]',
        '"points": [[1e400, 10]], "labels": [1]',
        '"points": [[NaN, 10]], "labels": [1]',
        f'"points": [[{10**400}, 10]], "labels": [1]',
        '"box": [0, 0, Infinity, 10]',
        '"points": "nope"',
        '"embedding_id": "../../etc/passwd", "points": [[1, 1]], "labels": [1]',
        f'"embedding_id": "{"f" * 64}", "points": [[1, 1]], "labels": [1]',
        f'"embedding_id": "{"f" * 5000}", "points": [[1, 1]], "labels": [1]',
    ],
)
def test_hostile_prompts_get_a_one_line_4xx(serve_app, fields) -> None:
    """label 2**70 used to be a 500; every one of these is the client's fault: 4xx, one line."""
    client, key = serve_app
    body = f'{{"embedding_id": "{key}", {fields}}}'  # raw JSON: NaN, 1e400 and big ints as sent
    res = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert 400 <= res.status_code < 500, res.text
    _one_line_error(res, res.status_code)


def test_unknown_embedding_ids_are_404(serve_app) -> None:
    client, _ = serve_app
    for key in ("0" * 32, "x" * 300, "a" * 40):
        assert client.get(f"/embeddings/{key}").status_code == 404


def test_everything_on_a_tiny_image_is_a_clean_answer(serve_app) -> None:
    client, _ = serve_app
    for size in ((1, 1), (3, 2)):
        buf = io.BytesIO()
        Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
        res = client.post("/everything?points_per_side=4", files={"file": ("t.png", buf.getvalue())})
        if res.status_code == 200:
            assert res.json()["annotations"] == []
        else:
            assert "too small" in _one_line_error(res, 400)


def test_clicks_on_different_embeddings_decode_in_parallel(serve_app, monkeypatch) -> None:
    """Clicks used to queue behind one model lock; four slow decodes must overlap, not add up."""
    client, key = serve_app
    real = samkit.Predictor.predict
    active, most = [0], [0]
    lock = threading.Lock()

    def slow(self, *args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.4)
        try:
            return real(self, *args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(samkit.Predictor, "predict", slow)

    def click(i: int) -> int:
        body = {"embedding_id": key, "points": [[100 + 50 * i, 200]], "labels": [1]}
        return client.post("/predict", json=body).status_code

    threads_out: list[int] = []
    workers = [threading.Thread(target=lambda i=i: threads_out.append(click(i))) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert threads_out == [200] * 4
    assert most[0] >= 2, "clicks were decoded one at a time"


def test_encode_queue_is_bounded() -> None:
    from samkit.serve.app import Busy, EncodeGate

    gate = EncodeGate(running=1, waiting=1, timeout=0.2)
    with gate.admitted(), gate.running():
        with gate.admitted():
            with pytest.raises(Busy):  # a third request: no room even to wait
                with gate.admitted():
                    pass
            with pytest.raises(Busy) as err:  # the waiting one gives up after `timeout`
                with gate.running():
                    pass
            assert err.value.status_code == 503 and err.value.headers["Retry-After"]
    with gate.admitted(), gate.running():  # everything released
        pass
    with pytest.raises(InputError):
        EncodeGate(running=0, waiting=1)


def test_connection_reset_mid_body_leaves_the_server_answering(serve_app) -> None:
    """A client that sends half a request and resets the connection must not take the server down."""
    import httpx
    import uvicorn

    client, key = serve_app
    port = free_port()
    config = uvicorn.Config(client.app, host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b'Content-Length: 5000\r\n\r\n{"embedding_id": "'
            )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # with linger 0: a reset, not a clean close
        body = {"embedding_id": key, "points": [[100, 100]], "labels": [1]}
        res = httpx.post(f"http://127.0.0.1:{port}/predict", json=body, timeout=60)
        assert res.status_code == 200 and len(res.json()["masks"]) == 3
    finally:
        server.should_exit = True
        thread.join(10)


def test_worker_processes_get_the_same_access(serve_app, monkeypatch, tmp_path) -> None:
    """`--workers N` hands the config to each process as JSON: the token and Host names go with it."""
    from samkit.serve.app import CONFIG_ENV, app_from_env

    config = {"model": "vit_t", "cache_dir": str(tmp_path), "token": "w-token", "hosts": ["localhost"]}
    monkeypatch.setenv(CONFIG_ENV, json.dumps(config))
    app = app_from_env()
    with TestClient(app, base_url="http://localhost:8000") as client:
        assert client.get("/health").status_code == 401
        assert client.get("/health", headers={"authorization": "Bearer w-token"}).status_code == 200
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/health", headers={"authorization": "Bearer w-token"}).status_code == 400


def test_serve_on_loopback_checks_hosts_by_default(serve_app, monkeypatch, tmp_path, capsys) -> None:
    import uvicorn

    from samkit.serve import ServeConfig, serve

    ran: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: ran.update(app=app, **options))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    serve(ServeConfig(model="vit_t", cache_dir=str(tmp_path)), host="127.0.0.1", allow_hosts=["box.lan"])
    assert ran["limit_concurrency"] > 0 and "warning" not in capsys.readouterr().err
    for base, status in (("http://box.lan:8000", 200), ("http://[::1]:1", 200), ("http://evil.example", 400)):
        with TestClient(ran["app"], base_url=base) as client:
            assert client.get("/health").status_code == status, base
    serve(ServeConfig(model="vit_t", cache_dir=str(tmp_path)), host="0.0.0.0")
    assert "without a token" in capsys.readouterr().err  # anyone on the network could use it
    with TestClient(ran["app"], base_url="http://evil.example") as client:
        assert client.get("/health").status_code == 200  # on a network address: any name, use a token


def test_uploads_use_samkit_image_limit_from_the_header(monkeypatch) -> None:
    """The same pixel limit as every other image samkit reads ($SAMKIT_MAX_PIXELS), before decoding."""
    from samkit.errors import ImageError
    from samkit.serve.app import decode_upload

    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, "PNG")
    monkeypatch.setenv("SAMKIT_MAX_PIXELS", "60000")
    assert decode_upload(buf.getvalue()).shape == (200, 300, 3)
    monkeypatch.setenv("SAMKIT_MAX_PIXELS", "59999")
    with pytest.raises(ImageError, match="SAMKIT_MAX_PIXELS"):
        decode_upload(buf.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (40, 20)).save(buf, "JPEG", exif=exif)
    monkeypatch.delenv("SAMKIT_MAX_PIXELS")
    assert decode_upload(buf.getvalue()).shape == (40, 20, 3)  # the viewed frame


# --- one error shape and one prompt schema for every app -------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (GoneError("the file was deleted"), 410),
        (NotFoundError("no such id"), 404),
        (AccessError("outside the allowed roots"), 403),
        (PromptError("point outside"), 400),
        (ImageError("not an image"), 400),
        (InputError("bad option"), 400),
        (StateError("still embedding; try again"), 503),
        (CheckpointError("corrupt weights"), 500),
        (SamkitError("anything else"), 500),
    ],
)
def test_every_samkit_error_has_one_status_in_every_app(error, status) -> None:
    assert status_of(error) == status
    app = _tiny_app()

    @app.get("/raise")
    def _raise() -> dict:
        raise error

    with TestClient(app) as client:
        assert _one_line_error(client.get("/raise"), status) == str(error)


def test_fastapis_validation_lists_become_one_line_and_the_openapi_says_so() -> None:
    app = _tiny_app()

    @app.get("/items/{n}")
    def item(n: int, q: int) -> dict:
        return {"n": n, "q": q}

    with TestClient(app) as client:
        assert _one_line_error(client.get("/items/x?q=y"), 422).startswith("malformed request: path.n: ")
        assert _one_line_error(client.get("/items/1"), 422) == "malformed request: query.q: Field required"
        broken = client.post("/echo", content=b'{"a": ', headers={"content-type": "application/json"})
        assert "JSON decode error" in _one_line_error(broken, 422)
        assert _one_line_error(client.delete("/ok"), 405) == "Method Not Allowed"
        assert _one_line_error(client.get("/nowhere"), 404) == "Not Found"
        openapi = client.get("/openapi.json").json()
    assert openapi["components"]["schemas"]["HTTPValidationError"] == ErrorBody.model_json_schema()
    assert "ValidationError" not in openapi["components"]["schemas"] and '"detail"' not in json.dumps(openapi)


@pytest.fixture(scope="module")
def annotate_app(tmp_path_factory):
    """(TestClient, image id of the photo) for `samkit annotate` on the same photo as `serve_app`."""
    from helpers_annotate import PHOTOS, make_project_dir

    from samkit.annotate import Project
    from samkit.annotate.app import create_app

    if not PHOTOS[0].is_file():
        pytest.skip(f"missing folder {PHOTOS[0].parent} (../shared/datasets)")
    images, db = make_project_dir(tmp_path_factory.mktemp("annotate-schema"))
    project = Project(images, db, samkit.load("vit_t", progress=False), log=lambda _: None)
    with TestClient(create_app(project)) as client:
        ids = {im["path"]: im["id"] for im in client.get("/api/images").json()}
        project.embeddings.wait(ids[PHOTO.name], 300)
        yield client, ids[PHOTO.name]


@pytest.mark.parametrize(
    ("prompt", "status", "message"),
    [
        ({"points": [[900, 10]], "labels": [1]}, 400, "point (900, 10) is outside the 640x422 image"),
        ({"points": [[10, 10]], "labels": [2]}, 400, "point label 2 is not 1 (foreground) or 0 (background)"),
        ({"points": [[10, 10]], "labels": [-7]}, 400, "point label -7 is not 1"),
        ({"points": [[10, 10, 2]]}, 400, "point label 2 is not 1"),
        ({"points": [[10, 10]]}, 400, "point_coords and point_labels must be given together"),
        ({"points": [[10, 10], [20, 20]], "labels": [1]}, 400, "one label per point"),
        ({"points": [[10, 10, 1], [5, 5]]}, 400, "rows of different lengths"),
        ({"points": [[1, 1]] * (MAX_POINTS + 1), "labels": [1] * (MAX_POINTS + 1)}, 400, "too many points"),
        ({}, 400, "no prompt"),
        ({"points": [], "box": None}, 400, "no prompt"),
        ({"box": [50, 50, 10, 10]}, 400, "box must be XYXY with x1 >= x0 and y1 >= y0"),
        ({"box": [1, 2, 3]}, 400, "box must be XYXY [x0, y0, x1, y1] pixels"),
        ({"box": [700, 500, 800, 600]}, 400, "lies outside the 640x422 image"),
        ({"points": "nope"}, 422, "malformed request: points: Input should be a valid list"),
        ({"points": [["a", 1]], "labels": [1]}, 422, "malformed request: points.0.0: "),
        ({"box": [0, 0, 10, True]}, None, None),
        ({"points": [[100, 100]], "labels": [1]}, 200, None),
        ({"points": [[100, 100, 1]]}, 200, None),
        ({"points": [[100, 100, 1], [300, 200, 0]], "box": [50, 50, 400, 300]}, 200, None),
    ],
)
def test_serve_and_annotate_share_one_prompt_schema(serve_app, annotate_app, prompt, status, message) -> None:
    """One schema (samkit.web_schema.PromptFields) and one check (samkit.prompts.check_prompts): the same
    prompt gets the same status and the same message from both apps, in both point forms."""
    serve, key = serve_app
    annotate, image_id = annotate_app
    served = serve.post("/predict", json={"embedding_id": key, **prompt})
    annotated = annotate.post(f"/api/images/{image_id}/predict", json=prompt)
    assert served.status_code == annotated.status_code, (served.text, annotated.text)
    if status is not None:
        assert served.status_code == status, served.text
    if served.status_code == 200:
        assert served.json()["masks"] and annotated.json()["candidates"]
        return
    assert _one_line_error(served, served.status_code) == _one_line_error(annotated, served.status_code)
    if message is not None:
        assert message in served.json()["error"]


def _labelstudio_app(monkeypatch, predict) -> FastAPI:
    """The Label Studio backend's app on a stand-in backend whose /predict runs `predict` (no model)."""
    from types import SimpleNamespace

    from samkit.labelstudio import app as ls_app

    def setup(body: dict) -> dict:
        raise InputError("the labelling config has no BrushLabels")

    monkeypatch.setattr(ls_app, "MAX_BODY_BYTES", 1024)
    return ls_app.create_app(backend=SimpleNamespace(model_version="v", setup=setup, predict=predict))


@pytest.mark.parametrize("name", ["serve", "annotate", "labelstudio"])
def test_every_app_answers_errors_in_one_shape(name, request, monkeypatch) -> None:
    """400, 404, 413, 422 and 500 from each app: {"error": "<one line>"} and nothing else."""

    def boom(*args, **kwargs):
        raise KeyError("a bug\nover two lines")

    big = {"kind": "x", "detail": {"blob": "x" * (MAX_JSON_BYTES + 10)}}
    if name == "serve":
        client, key = request.getfixturevalue("serve_app")
        app = client.app
        monkeypatch.setattr(samkit.Predictor, "predict", boom)
        calls = {
            400: ("post", "/embed", "not an image"),
            404: ("get", "/embeddings/" + "0" * 32, None),
            413: ("post", "/predict", {"embedding_id": key, **big}),
            422: ("post", "/predict", {"points": [[1, 1]], "labels": [1]}),
            500: ("post", "/predict", {"embedding_id": key, "points": [[9, 9]], "labels": [1]}),
        }
    elif name == "annotate":
        client, image_id = request.getfixturevalue("annotate_app")
        app = client.app
        calls = {
            400: ("post", f"/api/images/{image_id}/status", {"status": "finished"}),
            404: ("get", "/api/images/424242", None),
            413: ("post", "/api/events", big),
            422: ("post", "/api/images/abc/predict", {"points": [[1, 1, 1]]}),
            500: ("post", f"/api/images/{image_id}/predict", {"points": [[9, 9, 1]]}),
        }
        from samkit.annotate import Project

        monkeypatch.setattr(Project, "predict", boom)
    else:
        app = _labelstudio_app(monkeypatch, boom)
        calls = {
            400: ("post", "/setup", {"project": "1", "schema": "<View/>"}),
            404: ("get", "/nowhere", None),
            413: ("post", "/webhook", {"action": "x", "blob": "x" * 2000}),
            422: ("post", "/predict", [1, 2]),
            500: ("post", "/predict", {"tasks": []}),
        }
    raw = TestClient(app, raise_server_exceptions=False)  # no `with`: the fixture's app keeps running
    for status, (method, path, body) in calls.items():
        if isinstance(body, str):
            res = raw.post(path, files={"file": ("a.jpg", body.encode())})
        else:
            res = getattr(raw, method)(path, json=body) if body is not None else getattr(raw, method)(path)
        msg = _one_line_error(res, status)
        if status == 500:
            assert msg == f"internal error (KeyError) in {path}; see the server's log"
