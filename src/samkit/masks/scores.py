"""Mask quality numbers computed from logits and masks."""

from __future__ import annotations

import numpy as np
import torch


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU between the masks `logits > mask_threshold + offset` and `logits > mask_threshold - offset`.

    logits: (..., H, W). Returns float32 (...). The high mask lies inside the low one, so the IoU is the
    ratio of their pixel counts; an all-empty low mask gives NaN (0 / 0), which no threshold keeps.
    """
    high, low = mask_threshold + offset, mask_threshold - offset
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64, torch.float16):
        # On CPU numpy compares and counts about 2x faster than torch; the arrays share memory.
        arr = logits.detach().numpy().reshape(*logits.shape[:-2], -1)
        with np.errstate(invalid="ignore"):  # 0 / 0 -> NaN, as in torch
            return torch.from_numpy(_np_count(arr > high) / _np_count(arr > low)).float()
    return _count(logits > high) / _count(logits > low)


def _np_count(mask: np.ndarray) -> np.ndarray:
    """int32 (...) number of True entries along the last axis of a bool array."""
    return mask.view(np.uint8).sum(-1, dtype=np.int32)


def _count(mask: torch.Tensor) -> torch.Tensor:
    """int32 (...) number of True pixels of bool (..., H, W)."""
    # Summing rows into int16 first is ~2x faster than one int32 (or int64) reduction and keeps the
    # temporaries small; int16 cannot overflow while a row has at most 32767 pixels.
    row_dtype = torch.int16 if mask.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
    return mask.sum(-1, dtype=row_dtype).sum(-1, dtype=torch.int32)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of two sets of masks.

    a: bool (N, H, W), b: bool (M, H, W). Returns float32 (N, M); pairs of empty masks give 0.
    """
    fa = a.flatten(1).float()
    fb = b.flatten(1).float()
    # float32 counts are exact up to 2**24 pixels per mask, beyond any image SAM is run on.
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
