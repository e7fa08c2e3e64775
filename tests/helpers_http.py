"""A fake file server and package index on 127.0.0.1 for download tests.

It serves `files` (path -> bytes) with HTTP Range support, can cut a transfer after N bytes, and answers
`/simple/<package>/` with PEP 691 JSON or PEP 503 HTML depending on the Accept header. Every request is
recorded as (path, headers).
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

JSON_TYPE = "application/vnd.pypi.simple.v1+json"


class FakeServer:
    """State shared with the request handler; start it with `serve()`."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate_after: dict[str, int] = {}
        self.index: dict[str, list[tuple[str, str]]] = {}
        self.json_index = True
        self.honour_range = True
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.base = ""

    def url(self, path: str) -> str:
        return self.base + path

    def publish(self, package: str, filename: str, data: bytes, listed_sha256: str | None = None) -> None:
        """Serve `data` as /files/<filename> and list it on /simple/<package>/ with its (or the given) sha256."""
        self.files["/files/" + filename] = data
        sha = listed_sha256 or hashlib.sha256(data).hexdigest()
        self.index.setdefault(package, []).append((filename, sha))

    def ranges_seen(self, path: str) -> list[str]:
        return [h["Range"] for p, h in self.requests if p == path and "Range" in h]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        state = self.server.state
        state.requests.append((self.path, dict(self.headers.items())))
        if self.path.startswith("/simple/"):
            self._index(state, self.path.removeprefix("/simple/").strip("/"))
        elif self.path in state.files:
            self._file(state, state.files[self.path])
        else:
            self.send_error(404)

    def _index(self, state: FakeServer, package: str) -> None:
        if package not in state.index:
            self.send_error(404)
            return
        entries = state.index[package]
        if state.json_index and JSON_TYPE in self.headers.get("Accept", ""):
            files = [{"filename": f, "url": f"/files/{f}", "hashes": {"sha256": s}} for f, s in entries]
            body = json.dumps({"meta": {"api-version": "1.0"}, "name": package, "files": files}).encode()
            content_type = JSON_TYPE
        else:
            links = "".join(
                f'<a href="../../files/{html.escape(f)}#sha256={s}">{html.escape(f)}</a><br>\n'
                for f, s in entries
            )
            body = f"<!DOCTYPE html><html><body>\n{links}</body></html>".encode()
            content_type = "text/html"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, state: FakeServer, data: bytes) -> None:
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and state.honour_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = state.truncate_after.get(self.path)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: FakeServer


@contextmanager
def serve() -> Iterator[FakeServer]:
    """A running FakeServer on an ephemeral 127.0.0.1 port, shut down on exit."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = FakeServer()
    server.state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def silent_port() -> Iterator[int]:
    """A 127.0.0.1 port whose kernel accepts connections but where nobody ever answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def refused_port() -> int:
    """A 127.0.0.1 port with nothing listening (connections are refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port
