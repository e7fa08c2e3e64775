"""Where a step's image embeddings come from: the on-disk cache of a frozen encoder, or an encoder run on
the batch through the model's own image pipeline (the same resize -> normalise -> pad as inference)."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from samkit import embedding_file
from samkit.embedding_file import EncoderId, fingerprint
from samkit.models.sam import Sam
from samkit.predictor import Predictor
from samkit.train.data import Batch, BatchDrawer, to_input_frame
from samkit.train.source import Sample, Source
from samkit.transforms import ImagePipeline


class EmbeddingCache:
    """Image embeddings of a frozen encoder on disk, one embedding file per (image, variant).

    Files live in `root/<encoder fingerprint>/` (`samkit.embedding_file.fingerprint`), so a changed
    encoder never reuses stale embeddings and several runs (or configs) can share one cache folder.
    """

    def __init__(self, model: Sam, root: Path, max_memory_items: int = 64) -> None:
        self.predictor = Predictor(model)
        self.root = root / fingerprint(model)
        self.root.mkdir(parents=True, exist_ok=True)
        self.encoder = EncoderId.of(model)
        self.memory: dict[str, torch.Tensor] = {}
        self.max_memory_items = max_memory_items

    def path(self, key: str, encode: Callable[[Predictor], None]) -> Path:
        """The embedding file of `key`, calling `encode(predictor)` (which sets the image) if missing."""
        path = self.root / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".safetensors")
        if not path.is_file():
            encode(self.predictor)
            self.predictor.save_embedding(path)
        return path

    def get(self, key: str, image: Callable[[], np.ndarray]) -> torch.Tensor:
        """(1, 256, g, g) embedding of the input-frame image `image()` (h, w, 3) uint8, longest side <= S."""
        if key in self.memory:
            return self.memory[key]

        path = self.path(key, lambda p: encode_input_frame(p, image()))
        emb = torch.from_numpy(embedding_file.load(path, self.encoder)[0])
        if len(self.memory) < self.max_memory_items:
            self.memory[key] = emb
        return emb

    def batch(self, batch: Batch) -> torch.Tensor:
        """(B, 256, g, g) embeddings of a batch's input-frame images, on the CPU."""
        return torch.cat([self.get(key, lambda img=img: img) for key, img, _ in batch])

    def validation(self, sample: Sample) -> Path:
        """The embedding file of a validation image (original pixels, encoded as the Predictor does)."""
        return self.path(f"val:{sample.key}", lambda p: p.set_image(sample.image))


def encode_input_frame(pred: Predictor, image: np.ndarray) -> None:
    """Set an input-frame image (h, w, 3) uint8, longest side <= S, on the predictor."""
    x = torch.tensor(image, device=pred.model.device).permute(2, 0, 1)[None]
    pred.set_torch_image(x, image.shape[:2])


def encoder_input(batch: Batch, pipeline: ImagePipeline, device: torch.device) -> torch.Tensor:
    """(B, 3, S, S) encoder input of the batch's input-frame images by a model's image pipeline: the same
    normalise-then-pad as inference."""
    return torch.cat(
        [
            pipeline.to_input_torch(torch.tensor(img, device=device).permute(2, 0, 1)[None].float())
            for _, img, _ in batch
        ]
    )


def batch_embeddings(
    batch: Batch, model: Sam, pipeline: ImagePipeline, cache: EmbeddingCache | None, frozen: bool
) -> torch.Tensor:
    """(B, 256, g, g) image embeddings: from the cache, or `model`'s encoder (with grad unless `frozen`)."""
    if cache is not None:
        return cache.batch(batch).to(model.device)
    x = encoder_input(batch, pipeline, model.device)
    if frozen:
        with torch.no_grad():
            return model.image_encoder(x)
    return model.image_encoder(x)


def precache(
    cache: EmbeddingCache, drawer: BatchDrawer, val: Source | None = None, progress: bool = True
) -> int:
    """Encode every (training image, cache variant) of the drawer's sources and every image of `val` into
    the cache now, instead of on first use; returns how many images were looked at."""
    from tqdm import tqdm

    jobs = [
        (s, i, v)
        for s, src in enumerate(drawer.sources)
        for i in range(len(src))
        for v in range(drawer.data.cache_variants)
    ]
    total = len(jobs) + (len(val) if val is not None else 0)
    with tqdm(  # closed on an interrupt too, so that the CLI's message starts a line of its own
        total=total, desc="caching embeddings", unit="img", disable=not progress, file=sys.stderr
    ) as bar:
        for s, i, v in jobs:
            sample = drawer.sources[s][i]
            key, params = drawer.variant(s, i, v, sample)
            image = to_input_frame(sample.image, sample.masks[:0], drawer.image_size, params, drawer.resize)[
                0
            ]
            cache.path(key, lambda p, img=image: encode_input_frame(p, img))
            bar.update(1)
        for i in range(len(val) if val is not None else 0):
            cache.validation(val[i])
            bar.update(1)
    return total
