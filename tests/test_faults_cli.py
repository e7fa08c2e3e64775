"""Faults and bad input at the command line: each case ends in one `samkit: error:` line and a non-zero
exit status, never a traceback, and leaves no half-written output behind."""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers_faults import fill, png_claiming, tmpfs_mounts
from PIL import Image

from samkit.cli import main
from samkit.engine.local import LOCK, MANIFEST

FAST = ["--points-per-side", "2", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def run(capsys, *args: str) -> tuple[int, str]:
    """`samkit ARGS` in this process: (exit status, the last line of stderr)."""
    status = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return status, err[-1] if err else ""


@pytest.fixture(name="tmpfs")
def _tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    yield from tmpfs_mounts(tmp_path)


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_segment_refuses_a_pixel_bomb_before_decoding(capsys, tiny_ckpt, tmp_path) -> None:
    bomb = png_claiming(tmp_path / "bomb.png", 20000, 20000)
    status, line = run(
        capsys, "segment", bomb, "--point", "5,5", "--model", tiny_ckpt, "--out", tmp_path / "o"
    )
    assert status == 2
    assert line.startswith("samkit: error: image ") and "more than the limit of 100,000,000" in line
    assert not (tmp_path / "o").exists()


def test_everything_exits_non_zero_when_every_image_failed(capsys, tiny_ckpt, tmp_path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image\n")
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(good)
    (bad / "truncated.png").write_bytes(good.read_bytes()[:60])
    png_claiming(bad / "bomb.png", 20000, 20000)
    status, line = run(capsys, "everything", bad, "--out", tmp_path / "out", "--model", tiny_ckpt, *FAST)
    assert status == 2
    assert line == "samkit: error: all 4 image(s) failed (listed above); nothing was written"
    assert not list((tmp_path / "out").rglob("*.json"))


def test_segment_on_a_full_disk_writes_nothing(capsys, tiny_ckpt, photo, tmpfs) -> None:
    out = tmpfs("size=64k")
    fill(out, 6000)  # room for a mask or two, not for all outputs
    status, line = run(capsys, "segment", photo, "--point", "20,20", "--model", tiny_ckpt, "--out", out)
    assert status == 2
    assert line.startswith("samkit: error: ") and "No space left on device" in line
    assert sorted(p.name for p in out.iterdir()) == ["filler"]


def test_segment_into_a_path_under_a_file_is_one_line(capsys, tiny_ckpt, photo, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    status, line = run(capsys, "segment", photo, "--point", "20,20", "--model", tiny_ckpt, "--out", out)
    assert status == 2 and line.startswith("samkit: error: ") and "Not a directory" in line


def test_everything_on_a_read_only_disk_is_one_line(capsys, tiny_ckpt, photo, tmpfs) -> None:
    out = tmpfs("ro,size=1m")
    status, line = run(capsys, "everything", photo, "--out", out, "--model", tiny_ckpt, *FAST)
    assert status == 2
    assert line.startswith("samkit: error: cannot write to the output folder") and "Read-only" in line


def test_everything_on_a_full_disk_leaves_no_empty_manifest(capsys, tiny_ckpt, photo, tmpfs) -> None:
    out = tmpfs("size=64k")
    fill(out, 1024)
    status, line = run(capsys, "everything", photo, "--out", out, "--model", tiny_ckpt, "--overlay", *FAST)
    assert status == 2 and "No space left on device" in line
    assert not (out / MANIFEST).exists() or (out / MANIFEST).stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == [LOCK, "filler"]


def test_everything_into_a_folder_another_run_holds(capsys, tiny_ckpt, photo, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK, "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        status, line = run(capsys, "everything", photo, "--out", out, "--model", tiny_ckpt, *FAST)
    assert status == 2
    assert line == f"samkit: error: another samkit run is writing to {out} (it holds {out / LOCK}); " + (
        "wait for it to finish or give another --out"
    )
    assert not (out / "photo.json").exists()


def test_export_to_an_unwritable_folder_is_one_line(capsys, tmp_path) -> None:
    from samkit.annotate import Store

    Store(tmp_path / "p.sqlite")
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "dataset"
    status, line = run(capsys, "export", "--db", tmp_path / "p.sqlite", "--out", out)
    assert status == 2 and line.startswith("samkit: error: ") and str(out.parent) in line
