"""Background embedding of every image of a project, cached on disk, with the viewed image first.

One worker thread walks the images in listing order and writes `Predictor.save_embedding` files into the
cache folder; `wait(image_id)` moves an image to the front of the queue and blocks until its file exists.
A small LRU keeps the last few embeddings loaded in `Predictor`s, so a click only runs the mask decoder.
"""

from __future__ import annotations

import hashlib
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from samkit.errors import SamkitError, StateError
from samkit.predictor import Predictor


class EmbeddingCache:
    """Embeddings of a project's images: computed in the background, stored in `folder`, kept warm in an LRU.

    images: (image_id, path) in the order to embed; `path_of(image_id)` re-reads the path when needed.
    predictor_factory: makes a Predictor on the shared model (one per LRU slot and one for the worker).
    """

    def __init__(
        self,
        folder: Path,
        predictor_factory: Callable[[], Predictor],
        model_tag: str,
        lru_size: int = 4,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._factory = predictor_factory
        self._tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_tag)[:60] or "model"
        self._lru: OrderedDict[tuple[int, str], Predictor] = OrderedDict()
        self._lru_size = max(1, lru_size)
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._cond = threading.Condition()
        self._queue: list[int] = []
        self._paths: dict[int, Path] = {}
        self._errors: dict[int, str] = {}
        self._current: int | None = None
        self._total = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._worker_predictor: Predictor | None = None

    # --- files -----------------------------------------------------------------------------------------

    def file_for(self, path: Path) -> Path:
        """Cache file of an image; its name changes when the image file changes (size or mtime).

        The folder is left out of the key, so a project folder moved or copied with its times keeps its cache.
        """
        st = path.stat()
        key = f"{path.name}|{st.st_size}|{st.st_mtime_ns}|{self._tag}".encode()
        digest = hashlib.sha1(key).hexdigest()[:16]
        return self.folder / f"{path.stem[:40]}-{digest}.safetensors"

    def is_ready(self, image_id: int) -> bool:
        path = self._paths.get(image_id)
        try:
            return path is not None and self.file_for(path).is_file()
        except OSError:
            return False

    # --- worker ----------------------------------------------------------------------------------------

    def start(self, images: list[tuple[int, Path]]) -> None:
        """Queue every image not cached yet (in the given order) and start the worker thread."""
        with self._cond:
            self._paths = dict(images)
            self._total = len(images)
            self._queue = [i for i, _ in images if not self.is_ready(i)]
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="samkit-embed", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def prioritize(self, image_id: int) -> None:
        """Move an image to the front of the queue (the annotator is looking at it)."""
        with self._cond:
            if image_id in self._queue:
                self._queue.remove(image_id)
                self._queue.insert(0, image_id)
            elif image_id in self._paths and image_id not in self._errors and not self.is_ready(image_id):
                self._queue.insert(0, image_id)
            self._cond.notify_all()

    def progress(self) -> dict[str, object]:
        with self._cond:
            done = sum(1 for i in self._paths if self.is_ready(i))
            current = self._current
            return {
                "done": done,
                "total": self._total,
                "queued": len(self._queue),
                "current": None if current is None else str(self._paths[current].name),
                "errors": {str(k): v for k, v in self._errors.items()},
            }

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                image_id = self._queue.pop(0)
                self._current = image_id
                path = self._paths[image_id]
            started = time.perf_counter()
            try:
                if not self.is_ready(image_id):
                    if self._worker_predictor is None:
                        self._worker_predictor = self._factory()
                    self._worker_predictor.set_image(path)
                    self._worker_predictor.save_embedding(self.file_for(path))
                    done = sum(1 for i in self._paths if self.is_ready(i))
                    self._log(
                        f"samkit annotate: embedded {done}/{self._total} {path.name} "
                        f"({time.perf_counter() - started:.1f} s)"
                    )
            except (SamkitError, OSError) as exc:
                with self._cond:
                    self._errors[image_id] = str(exc)
                self._log(f"samkit annotate: cannot embed {path.name}: {exc}")
            finally:
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    # --- use -------------------------------------------------------------------------------------------

    def wait(self, image_id: int, timeout: float = 300.0) -> None:
        """Block until the image's embedding is on disk, moving it to the front of the queue."""
        deadline = time.monotonic() + timeout
        self.prioritize(image_id)
        with self._cond:
            while not self.is_ready(image_id):
                if image_id in self._errors:
                    raise StateError(f"cannot embed this image: {self._errors[image_id]}")
                if image_id not in self._paths:
                    raise StateError(f"image {image_id} is not in the embedding queue")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StateError("the image is still being embedded; try again in a few seconds")
                self._cond.wait(min(left, 0.5))

    def predictor(self, image_id: int, timeout: float = 300.0) -> Predictor:
        """A Predictor holding this image's embedding (waits for the embedding if needed)."""
        path = self._paths.get(image_id)
        if path is None:
            raise StateError(f"image {image_id} is not in the embedding queue")
        key = (image_id, self.file_for(path).name)
        with self._cond:
            pred = self._lru.get(key)
            if pred is not None:
                self._lru.move_to_end(key)
                return pred
        self.wait(image_id, timeout)
        pred = self._factory()
        pred.load_embedding(self.file_for(path))
        with self._cond:
            self._lru[key] = pred
            self._lru.move_to_end(key)
            while len(self._lru) > self._lru_size:
                self._lru.popitem(last=False)
        return pred
