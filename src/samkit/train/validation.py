"""Validation during training: samkit.eval's single-point protocol on the held-out source."""

from __future__ import annotations

from pathlib import Path

import torch

from samkit.models.sam import Sam
from samkit.predictor import Predictor
from samkit.train.embeddings import EmbeddingCache
from samkit.train.source import Source


@torch.no_grad()
def validate(
    model: Sam, source: Source, limit: int, per_image: int | None = None, cache: EmbeddingCache | None = None
) -> dict[str, float]:
    """mIoU top-1, oracle and single-mask on up to `limit` objects of `source`, at most `per_image` per
    image. With `cache` (an encoder that does not train) image embeddings come from it."""
    from samkit.eval.datasets import ObjectItem
    from samkit.eval.protocols import single_point, summarize_single_point

    per_image = per_image or limit
    model.eval()
    pred = Predictor(model)
    results = []
    for i in range(len(source)):
        if len(results) >= limit:
            break
        sample = source[i]
        if cache is not None:
            pred.load_embedding(cache.validation(sample))
        else:
            pred.set_image(sample.image)
        for k, mask in enumerate(sample.masks[: min(per_image, limit - len(results))]):
            results.append(single_point(pred, ObjectItem(f"{sample.key}:{k}", Path(sample.key), mask, None)))
    summary = summarize_single_point(results)
    summary["objects"] = len(results)
    return summary
