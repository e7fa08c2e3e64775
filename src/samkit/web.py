"""What every samkit web app (`samkit serve`, `samkit annotate`, `samkit labelstudio`) puts in front of
its routes.

- `Access` and `Guard`: who may call. An optional token (Authorization: Bearer, an X-Samkit-Token header,
  or a cookie that a browser gets by opening the app once with `?token=...`), compared in constant time;
  and a Host check (with the Origin header of browsers' cross-site requests) that refuses unknown names,
  by default whenever the server listens on a loopback address, so that DNS rebinding cannot reach it.
- `BodyLimit`: how much a request may send (413 beyond) and how long it may take to send it (408).
- `install_error_handlers`: every error as one line of JSON, `{"error": "<message>"}`, with the status of
  `STATUS_OF_ERROR` for samkit's own errors (docs/security.md#errors lists them).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from samkit.errors import AccessError, GoneError, InputError, NotFoundError, SamkitError, StateError

TOKEN_ENV = "SAMKIT_TOKEN"
TOKEN_HEADER = "x-samkit-token"
TOKEN_QUERY = "token"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# JSON bodies: 64 points or a box are well under a kilobyte; annotators' event details a few.
MAX_JSON_BYTES = 256 * 1024
# A client has this long to send its request body (a slow sender holds a connection and a buffer).
BODY_SECONDS = 60.0
# Connections and requests uvicorn handles at once; beyond, it answers 503 at once.
UVICORN_CONNECTIONS = 128


# The HTTP status of samkit's own errors in every web app, the first class that matches; any other
# SamkitError (a corrupt checkpoint, an unwritable output) is the server's fault: 500.
STATUS_OF_ERROR: tuple[tuple[type[SamkitError], int], ...] = (
    (GoneError, 410),
    (NotFoundError, 404),
    (AccessError, 403),
    (InputError, 400),
    (StateError, 503),
)


class ErrorBody(BaseModel):
    """The body of every error answer of samkit's web apps."""

    error: str = Field(description="what was wrong and what to do, in one line")


def status_of(exc: SamkitError) -> int:
    """The HTTP status a web app answers `exc` with (`STATUS_OF_ERROR`)."""
    return next((status for cls, status in STATUS_OF_ERROR if isinstance(exc, cls)), 500)


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The error answer of the web apps: `{"error": "<one line>"}`."""
    line = " ".join(str(message).split())
    body = ErrorBody(error=line).model_dump()
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def install_error_handlers(app: FastAPI, log_as: str | None = None) -> None:
    """One-line `ErrorBody` answers for samkit's own errors (status from `status_of`), HTTP errors,
    malformed requests (422: FastAPI's list of validation errors becomes its first, in one line) and
    anything unexpected (500; the traceback goes to the server's log); the OpenAPI document describes
    422 answers as `ErrorBody` too. With `log_as`, samkit's errors are also printed to stderr as
    `<log_as>: <message>` (for servers whose clients do not show the answer to a person)."""

    @app.exception_handler(SamkitError)
    def _samkit(_: Request, exc: SamkitError) -> JSONResponse:
        if log_as:
            print(f"{log_as}: {exc}", file=sys.stderr, flush=True)
        return error_response(status_of(exc), str(exc))

    @app.exception_handler(StarletteHTTPException)
    def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    def _malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"malformed request: {where + ': ' if where else ''}{first.get('msg', 'invalid input')}"
        return error_response(422, msg)

    @app.exception_handler(Exception)
    def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette raises the exception again after this answer, so the server logs its traceback.
        msg = f"internal error ({type(exc).__name__}) in {request.url.path}; see the server's log"
        return error_response(500, msg)

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        # FastAPI documents its own 422 body (a "detail" list); these apps answer an ErrorBody.
        schema = default_openapi()  # cached by FastAPI: changed in place, once
        schemas = schema.get("components", {}).get("schemas", {})
        if "HTTPValidationError" in schemas:
            schemas["HTTPValidationError"] = ErrorBody.model_json_schema()
            schemas.pop("ValidationError", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def is_loopback(bind: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost."""
    if bind.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name in a Host header, lower case, without the port: `[::1]:8000` -> `::1`."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(frozen=True)
class Access:
    """Who may call a web app.

    token: the shared secret every request must carry (None: no token). hosts: the Host header names
    accepted (lower case, without port; None: any).
    """

    token: str | None = None
    hosts: frozenset[str] | None = None

    @classmethod
    def for_bind(cls, bind: str, token: str | None = None, allow_hosts: Collection[str] = ()) -> Access:
        """The default policy of a server listening on `bind`.

        token None: $SAMKIT_TOKEN if set. Host names: on a loopback address, only localhost, 127.0.0.1
        and [::1] (any port) plus `allow_hosts`; on another address, any name unless `allow_hosts` is
        given. `*` in `allow_hosts` turns the check off.
        """
        if token is None:
            token = os.environ.get(TOKEN_ENV) or None
        allow = {host_name(h) if h != "*" else h for h in allow_hosts if h}
        if "*" in allow:
            hosts = None
        elif is_loopback(bind) or allow:
            hosts = LOOPBACK_NAMES | allow
        else:
            hosts = None
        return cls(token or None, None if hosts is None else frozenset(hosts))


def warn_if_open(bind: str, access: Access) -> None:
    """Say on stderr when a server anyone on the network can reach answers without a token."""
    if not is_loopback(bind) and not access.token:
        print(
            f"warning: listening on {bind} without a token: anyone who can reach this port can use the "
            f"server; set ${TOKEN_ENV} (or --token), or listen on 127.0.0.1 (see docs/security.md)",
            file=sys.stderr,
            flush=True,
        )


class Guard:
    """ASGI middleware applying an `Access`: 400 for an unknown Host, 403 for a cross-site Origin, 401
    without the token. A browser GET with a valid `?token=` gets the token as a cookie (HttpOnly,
    SameSite=Lax) and is redirected to the same URL without it, so the page and its requests work."""

    def __init__(self, app: Any, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._refusal(headers)
        if refusal is None and self.access.token:
            refusal, via_query = self._token_refusal(scope, headers)
            if refusal is None and via_query and _browser_get(scope, headers):
                await self._store_cookie(scope, receive, send)
                return
        if refusal is not None:
            status, message = refusal
            extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await error_response(status, message, extra)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, headers: Headers) -> tuple[int, str] | None:
        hosts = self.access.hosts
        if hosts is None:
            return None
        raw = headers.get("host", "")
        if host_name(raw) not in hosts:
            return 400, (
                f"Host header {raw!r} is not one this server answers to; open it as http://localhost:PORT, "
                "or start it with --allow-host NAME"
            )
        origin = headers.get("origin")
        if origin is not None and (urlsplit(origin).hostname or "") not in hosts:
            return 403, f"cross-site request from origin {origin!r} refused"
        return None

    def _token_refusal(self, scope: dict, headers: Headers) -> tuple[tuple[int, str] | None, bool]:
        token = self.access.token or ""
        auth = headers.get("authorization", "")
        given = [auth[7:].strip()] if auth[:7].lower() == "bearer " else []
        given.append(headers.get(TOKEN_HEADER, ""))
        given.append(unquote(_cookies(headers).get(_cookie_name(scope), "")))
        if any(_same(g, token) for g in given if g):
            return None, False
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if _same(query.get(TOKEN_QUERY, ""), token):
            return None, True
        return (
            401,
            "this server needs its token: send 'Authorization: Bearer TOKEN' (or open the page once "
            "with ?token=TOKEN in a browser)",
        ), False

    async def _store_cookie(self, scope: dict, receive: Any, send: Any) -> None:
        query = [
            (k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1")) if k != TOKEN_QUERY
        ]
        # One leading slash: "//host/..." would send the browser to another site.
        path = "/" + quote(scope.get("root_path", "") + scope["path"]).lstrip("/")
        location = path + (f"?{urlencode(query)}" if query else "")
        token = quote(self.access.token or "", safe="")
        cookie = f"{_cookie_name(scope)}={token}; Path=/; HttpOnly; SameSite=Lax"
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", location.encode("latin-1")),
                    (b"set-cookie", cookie.encode("latin-1")),
                    (b"cache-control", b"no-store"),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})


def _same(given: str, token: str) -> bool:
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


def _cookie_name(scope: dict) -> str:
    # Cookies ignore ports: two servers on one machine must not overwrite each other's token.
    server = scope.get("server") or ("", 0)
    return f"samkit_token_{server[1] or 0}"


def _cookies(headers: Headers) -> dict[str, str]:
    out = {}
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out[name] = value
    return out


def _browser_get(scope: dict, headers: Headers) -> bool:
    return scope["type"] == "http" and scope["method"] == "GET" and "text/html" in headers.get("accept", "")


def size_text(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"


def too_large_message(limit: int) -> str:
    return f"request body is larger than the {size_text(limit)} limit; send less"


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class BodyLimit:
    """ASGI middleware bounding request bodies: 413 above `max_bytes` (or `per_path[path]`), checked by
    Content-Length and while streaming; 408 if the body takes longer than `seconds` to arrive."""

    def __init__(
        self,
        app: Any,
        max_bytes: int = MAX_JSON_BYTES,
        per_path: Mapping[str, int] | None = None,
        seconds: float = BODY_SECONDS,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = dict(per_path or {})
        self.seconds = seconds

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.max_bytes)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await error_response(413, too_large_message(limit))(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        seen = 0
        failed: Exception | None = None
        body_done = started = False

        async def limited() -> dict:
            nonlocal seen, failed, body_done
            if body_done:  # after the body, receive() only waits for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                failed = _TooSlow()
                raise failed from None
            seen += len(message.get("body", b""))
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            if seen > limit:
                failed = _TooLarge()
                raise failed
            return message

        async def guarded(message: dict) -> None:
            # Body parsers may turn the error raised in `limited` into their own 400: answer ours instead.
            nonlocal started
            if failed is not None:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._reject(failed, limit, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, guarded)
        except (_TooLarge, _TooSlow) as exc:
            if not started:
                await self._reject(exc, limit, send)

    async def _reject(self, exc: Exception, limit: int, send: Any) -> None:
        if isinstance(exc, _TooSlow):
            response = error_response(408, f"request body not received within {self.seconds:g} s")
        else:
            response = error_response(413, too_large_message(limit))
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> dict:
    return {"type": "http.disconnect"}
