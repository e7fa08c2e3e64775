"""Atomic file writes: write a temp file in the target's folder, fsync, then rename over the target.

A reader (or a rerun after a crash) sees either the old file or the complete new one, never a half file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

PathLike = Union[str, "os.PathLike[str]"]

# mkstemp creates files as 0600; written files should get the usual mode, so read the umask once.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically, creating parent folders. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a stray temp file next to the results.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def staged_files(directory: PathLike) -> Iterator[Path]:
    """Write a group of files all or nothing: yields a temp folder inside `directory` (created if
    needed); when the block ends without an error its files are renamed into `directory`, otherwise
    the temp folder is removed and `directory` is left as it was."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=directory, prefix=".staged-"))
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = None) -> Path:
    """Serialise `obj` to JSON (numpy and torch scalars/arrays become numbers/lists) and write atomically."""
    text = json.dumps(obj, indent=indent, default=_to_builtin)
    return atomic_write_bytes(path, text.encode("utf-8"))


def _to_builtin(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
