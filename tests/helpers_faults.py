"""Helpers of the fault tests: images that lie about their size or orientation, and small file systems
(a read-only or a nearly full tmpfs) to write outputs into."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A few-hundred-byte PNG whose header claims width x height (its pixel data is a 1x1 image's)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[16:29])  # after the signature (8) and IHDR's length + type (8)
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def jpeg_with_orientation(path: Path, orientation: int) -> np.ndarray:
    """A 40 x 20 (W x H) JPEG stored with a bright top-left corner and the given EXIF orientation.
    Returns the stored pixels."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:6, :12] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    return stored


def tmpfs_mounts(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Body of a `tmpfs` fixture: a factory that mounts a tmpfs with `options` (e.g. "ro" or "size=64k")
    on a fresh folder, skipping the test in one line where mounting is not allowed; unmounted after."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=False)


def fill(folder: Path, leave_bytes: int) -> None:
    """Fill the file system of `folder` until about `leave_bytes` are free."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
