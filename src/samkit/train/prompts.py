"""Prompt simulation for training, all in the model-input frame (pixels of the resized, unpadded image).

First prompt: a point drawn uniformly from the object, or its box with every coordinate jittered. Later
rounds: one point drawn uniformly from the error region of the previous prediction, positive on a false
negative and negative on a false positive (the SAM paper's interactive training).
"""

from __future__ import annotations

import numpy as np
import torch


def first_points(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """masks: (M, h, w) bool, none empty -> (M, 1, 2) XY pixel indices, one uniform pixel of each mask."""
    out = np.zeros((len(masks), 1, 2), dtype=np.float32)
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        j = int(rng.integers(len(ys)))
        out[k, 0] = xs[j], ys[j]
    return out


def jittered_boxes(
    masks: np.ndarray, rng: np.random.Generator, noise: float = 0.1, max_noise: float = 20.0
) -> np.ndarray:
    """masks: (M, h, w) bool -> (M, 4) XYXY tight boxes with Gaussian noise on every coordinate.

    The noise's std is `noise` x the box side (width for x, height for y), clipped to +-`max_noise` px;
    boxes are then clipped to the image and kept non-empty.
    """
    h, w = masks.shape[1:]
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
        side = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dtype=np.float64) + 1
        jitter = np.clip(rng.normal(0.0, 1.0, 4) * noise * side, -max_noise, max_noise)
        b = np.array([x0, y0, x1, y1], dtype=np.float64) + jitter
        b[[0, 2]] = np.clip(b[[0, 2]], 0, w - 1)
        b[[1, 3]] = np.clip(b[[1, 3]], 0, h - 1)
        boxes[k] = min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])
    return boxes


def error_points(
    pred: torch.Tensor, gt: torch.Tensor, stride: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One corrective click per mask, drawn uniformly from the error region.

    pred, gt: (M, h, w) bool on a grid whose cells are `stride` input pixels wide (the low-res grid).
    Returns coords (M, 1, 2) XY in the input frame (cell centres) and labels (M, 1): 1 on a false negative,
    0 on a false positive, -1 (a padding point the model ignores) where the prediction is already exact.
    """
    fn = (gt & ~pred).cpu().numpy()
    fp = (pred & ~gt).cpu().numpy()
    coords = np.zeros((len(fn), 1, 2), dtype=np.float32)
    labels = -np.ones((len(fn), 1), dtype=np.int64)
    for k in range(len(fn)):
        ys, xs = np.nonzero(fn[k] | fp[k])
        if len(ys) == 0:
            continue
        j = int(rng.integers(len(ys)))
        coords[k, 0] = (xs[j] + 0.5) * stride - 0.5, (ys[j] + 0.5) * stride - 0.5
        labels[k, 0] = 1 if fn[k, ys[j], xs[j]] else 0
    return coords, labels


def round_plan(rounds: int, rng: np.random.Generator) -> list[bool]:
    """Which rounds add a new point. Round 0 is the first prompt (False here); the last round and one
    random round among the others after the first get no new point (only the previous mask)."""
    plan = [r > 0 for r in range(rounds)]
    if rounds >= 2:
        plan[-1] = False
    if rounds >= 4:
        plan[int(rng.integers(1, rounds - 1))] = False
    return plan
