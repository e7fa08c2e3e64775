"""Image embeddings cached on disk across evaluation runs and across models that share an image encoder.

A fine-tune that leaves the image encoder untouched (decoder only) produces the same embeddings as the
model it started from, so measuring both should encode every image once. The cache folder is keyed by a
fingerprint of the encoder's weights and the model's input normalisation, never by the model's name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from samkit.embedding_file import fingerprint
from samkit.image import ImageLike, load_image
from samkit.models.sam import Sam
from samkit.predictor import Predictor


class CachedPredictor(Predictor):
    """A `Predictor` whose `set_image` reads the embedding from `root/<encoder fingerprint>/` when present.

    Files are Predictor embedding files (`save_embedding`), one per image, named by a hash of the
    image's pixels; a miss encodes the image and writes the file (atomically). `hits` / `misses` count
    the `set_image` calls answered from disk / by the encoder.
    """

    def __init__(self, model: Sam, root: str | Path) -> None:
        super().__init__(model)
        self.root = Path(root) / fingerprint(model)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def path_for(self, image: np.ndarray) -> Path:
        """Cache file of an (H, W, 3) uint8 RGB image."""
        h = hashlib.sha1(f"{image.shape}{image.dtype}".encode())
        h.update(np.ascontiguousarray(image).tobytes())
        return self.root / f"{h.hexdigest()[:24]}.safetensors"

    def set_image(self, image: ImageLike) -> None:
        """Set `image` ((H, W, 3) uint8 RGB, gray, PIL image or path), from the cache when possible."""
        arr = load_image(image)
        path = self.path_for(arr)
        if path.is_file():
            self.load_embedding(path)
            self.hits += 1
            return
        super().set_image(arr)
        self.save_embedding(path)
        self.misses += 1
