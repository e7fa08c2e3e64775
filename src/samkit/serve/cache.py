"""A disk cache of image embeddings, bounded by count, evicting the least recently used first."""

from __future__ import annotations

import os
import threading
from pathlib import Path

SUFFIX = ".safetensors"


class EmbeddingCache:
    """Embeddings as `<id>.safetensors` files in `root`; a file's mtime is its last use.

    Safe for threads of one process and for several worker processes sharing `root`: files appear by
    atomic rename, and a file evicted by another process is simply a cache miss.
    """

    def __init__(self, root: str | Path, max_items: int = 256) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_items = max(1, int(max_items))
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def get(self, key: str) -> Path | None:
        """The file of `key`, marked as just used, or None if it is not cached (or was evicted)."""
        path = self.path(key)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def added(self, key: str) -> None:
        """Call after writing `path(key)`: evicts the least recently used files beyond `max_items`."""
        with self._lock:
            files = []
            for p in self.root.glob(f"*{SUFFIX}"):
                try:
                    files.append((p.stat().st_mtime_ns, p))
                except FileNotFoundError:
                    continue
            files.sort(reverse=True)
            for _, p in files[self.max_items :]:
                if p.stem != key:
                    p.unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob(f"*{SUFFIX}"))
