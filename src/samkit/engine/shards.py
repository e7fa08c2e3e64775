"""Packing finished images into tar shards, the way SA-1B is distributed: each `sa_NNNNNN.tar` holds K
images with their SA-1B JSON next to them, and `index.json` lists what every shard holds.

Shard s covers input images [s*K, (s+1)*K) in input order, so a shard's members do not depend on which
worker finished first. A shard is packed once all its images are resolved (done, or failed and left
out); tars are written to a temp file and renamed, and a rerun keeps a shard whose tar exists and whose
index entry lists the same members.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samkit.errors import InputError
from samkit.formats import atomic_write_json

INDEX = "index.json"


class Sharder:
    """Packs shards as their images resolve. `images[i]` is the input path, `json_rels[i]` its JSON path
    relative to `out_dir`; shards go to `out_dir / "shards"`."""

    def __init__(self, images: Sequence[Path], json_rels: Sequence[Path], out_dir: Path, shard_size: int):
        if shard_size < 1:
            raise InputError(f"shard size must be at least 1 image, got {shard_size}")
        self.images = [Path(p) for p in images]
        self.rels = [Path(r) for r in json_rels]
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / "shards"
        self.size = shard_size
        self.n_shards = (len(self.images) + shard_size - 1) // shard_size
        self._resolved: list[dict[int, bool]] = [{} for _ in range(self.n_shards)]
        self.index = self._read_index()
        self.packed = 0

    def mark(self, i: int, ok: bool) -> Path | None:
        """Record that image i is resolved (`ok`: its JSON exists). Returns the shard's tar when this
        completed it and it had to be (re)written, else None."""
        s = i // self.size
        self._resolved[s][i] = ok
        if len(self._resolved[s]) < len(self._members(s)):
            return None
        return self._pack(s)

    def _members(self, s: int) -> range:
        return range(s * self.size, min((s + 1) * self.size, len(self.images)))

    def _pack(self, s: int) -> Path | None:
        name = f"sa_{s:06d}.tar"
        entries = [
            {"image": str(self.rels[i].parent / self.images[i].name), "json": str(self.rels[i])}
            for i in self._members(s)
            if self._resolved[s][i]
        ]
        failed = [str(self.images[i]) for i in self._members(s) if not self._resolved[s][i]]
        entry = {"file": name, "first": s * self.size, "images": entries, "failed": failed}
        tar_path = self.dir / name
        if tar_path.exists() and self.index.get(name) == entry:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for i, e in zip(
                        (i for i in self._members(s) if self._resolved[s][i]), entries, strict=True
                    ):
                        tar.add(self.images[i], arcname=e["image"], recursive=False)
                        tar.add(self.out_dir / self.rels[i], arcname=e["json"], recursive=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, tar_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.index[name] = entry
        atomic_write_json(
            self.dir / INDEX,
            {"shard_size": self.size, "shards": [self.index[k] for k in sorted(self.index)]},
            indent=1,
        )
        self.packed += 1
        return tar_path

    def _read_index(self) -> dict[str, dict[str, Any]]:
        path = self.dir / INDEX
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {}  # written atomically, so this is someone else's file: repack everything
        if data.get("shard_size") != self.size:
            return {}
        return {e["file"]: e for e in data.get("shards", [])}


def read_shard_index(out_dir: str | Path) -> dict[str, Any]:
    """The shard index of a run: {"shard_size": K, "shards": [{file, first, images: [{image, json}],
    failed: [paths]}]}."""
    path = Path(out_dir) / "shards" / INDEX
    if not path.exists():
        raise InputError(f"no shard index at {path}; run with --shard-size K to write shards")
    return json.loads(path.read_text(encoding="utf-8"))
