"""Task images: read from local storage on this machine, or fetched from the Label Studio server.

A task's image field holds a URL that Label Studio resolves for the browser:
- `/data/local-files/?d=<relative path>`: local storage, a file under Label Studio's
  LOCAL_FILES_DOCUMENT_ROOT. Read from disk when that file is under one of the allowed roots;
  otherwise (no roots given) fetched through the server like an upload.
- `/data/upload/<project>/<file>` (and any other path on the server): fetched from the Label Studio URL
  with its API token.
- an absolute local path: read from disk, only under an allowed root.
Anything else (another host, `s3://`, a path outside the roots) is refused: the backend never reads
what its operator did not open to it.
"""

from __future__ import annotations

import threading
import urllib.parse
from pathlib import Path

from samkit.errors import AccessError, InputError

LOCAL_FILES_PREFIX = "/data/local-files/"


class ImageAccessError(AccessError):
    """A task image the backend may not read, or could not get."""


class ImageReader:
    """Bytes of task images.

    url: the Label Studio server's base URL (e.g. http://127.0.0.1:8080), or None when unknown (it is
    also learnt from `/setup`). api_key: a legacy token (sent as `Token <key>`) or a personal access
    token (a JWT, exchanged for short-lived access tokens). document_root: Label Studio's
    LOCAL_FILES_DOCUMENT_ROOT. roots: folders whose files may be read from disk. max_bytes: larger images
    are refused.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        document_root: str | Path | None = None,
        roots: list[str | Path] | None = None,
        max_bytes: int = 64 << 20,
        timeout: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/") if url else None
        self.api_key = api_key or None
        self.document_root = Path(document_root).resolve() if document_root else None
        self.roots = [Path(r).resolve() for r in roots or []]
        self.max_bytes = int(max_bytes)
        self.timeout = timeout
        self._access: str | None = None
        self._lock = threading.Lock()

    def connect(self, url: str | None, api_key: str | None) -> None:
        """Use this server and token where none was configured (as sent by Label Studio's `/setup`)."""
        with self._lock:
            if url and not self.url:
                self.url = url.rstrip("/")
            if api_key and not self.api_key:
                self.api_key = api_key
                self._access = None

    def read(self, ref: str) -> bytes:
        """The bytes of the image that a task field `ref` names."""
        if not isinstance(ref, str) or not ref:
            raise InputError("the task's image field is empty")
        parsed = urllib.parse.urlsplit(ref)
        if parsed.scheme in ("http", "https"):
            if not self._on_server(parsed):
                raise ImageAccessError(
                    f"image {ref} is not on the Label Studio server {self.url or '(unknown)'}; "
                    "import images by upload or local storage"
                )
            return self._fetch(parsed.path + (f"?{parsed.query}" if parsed.query else ""))
        if parsed.scheme or parsed.netloc:
            raise ImageAccessError(f"cannot read image {ref}: only uploads and local storage are supported")
        if ref.startswith(LOCAL_FILES_PREFIX):
            rel = urllib.parse.parse_qs(parsed.query).get("d", [""])[0]
            if not rel:
                raise InputError(f"local-files URL {ref} has no ?d=<path>")
            if self.roots:
                if self.document_root is None:
                    raise ImageAccessError(
                        "local-files images need --document-root (Label Studio's LOCAL_FILES_DOCUMENT_ROOT)"
                    )
                return self._read_file(self.document_root / rel)
            return self._fetch(ref)
        if ref.startswith("/data/") or ref.startswith("/storage-data/"):
            return self._fetch(ref)
        return self._read_file(Path(ref))

    # --- disk ------------------------------------------------------------------------------------------

    def _read_file(self, path: Path) -> bytes:
        real = path.resolve()
        if not any(real.is_relative_to(root) for root in self.roots):
            allowed = ", ".join(str(r) for r in self.roots) or "none (pass --allow-root DIR)"
            raise ImageAccessError(f"image {path} is outside the allowed roots: {allowed}")
        try:
            size = real.stat().st_size
            if size > self.max_bytes:
                raise ImageAccessError(f"image {path} is {size} bytes, over the {self.max_bytes} limit")
            return real.read_bytes()
        except OSError as exc:
            raise ImageAccessError(f"cannot read image {path}: {exc.strerror or exc}") from None

    # --- server ----------------------------------------------------------------------------------------

    def _on_server(self, parsed: urllib.parse.SplitResult) -> bool:
        if not self.url:
            return False
        base = urllib.parse.urlsplit(self.url)
        return (parsed.scheme, parsed.netloc) == (base.scheme, base.netloc)

    def _fetch(self, path: str) -> bytes:
        import httpx

        if not self.url:
            raise ImageAccessError(
                f"cannot fetch {path}: the Label Studio URL is unknown (pass --label-studio-url)"
            )
        if not self.api_key:
            raise ImageAccessError(f"cannot fetch {path}: no Label Studio API token (pass --api-key)")
        url = self.url + "/" + path.lstrip("/")
        try:
            response = httpx.get(url, headers=self._headers(), timeout=self.timeout)
            if response.status_code == 401 and self._access is not None:
                self._access = None  # a personal access token's short-lived token expired: get another
                response = httpx.get(url, headers=self._headers(), timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise ImageAccessError(f"cannot fetch {url}: {exc}") from None
        if response.status_code in (401, 403):
            raise ImageAccessError(
                f"cannot fetch {url}: Label Studio refused the API token ({response.status_code}); pass a valid "
                "--api-key (legacy token or personal access token)"
            )
        if response.status_code != 200:
            raise ImageAccessError(f"cannot fetch {url}: Label Studio answered {response.status_code}")
        if len(response.content) > self.max_bytes:
            raise ImageAccessError(f"image {url} is over the {self.max_bytes} byte limit")
        return response.content

    def _headers(self) -> dict[str, str]:
        key = self.api_key or ""
        if key.count(".") != 2:  # a legacy token
            return {"Authorization": f"Token {key}"}
        with self._lock:
            if self._access is None:
                self._access = self._refresh(key)
            return {"Authorization": f"Bearer {self._access}"}

    def _refresh(self, token: str) -> str:
        import httpx

        try:
            response = httpx.post(
                f"{self.url}/api/token/refresh", json={"refresh": token}, timeout=self.timeout
            )
            access = response.json().get("access") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            access = None
        if not access:
            raise ImageAccessError(
                "Label Studio refused the API token (personal access token refresh failed)"
            )
        return str(access)
