"""The simulated user of the interactive protocols (RITM / SimpleClick / SAM papers).

Clicks are (x, y) in original-image pixels. Masks are (H, W) bool. Ignore pixels are never errors.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.ndimage import distance_transform_edt


class Click(NamedTuple):
    """One simulated click: (x, y) in original-image pixels, positive (object) or negative (background)."""

    x: int
    y: int
    positive: bool


def _inner_distance(region: np.ndarray) -> np.ndarray:
    """(H, W) Euclidean distance of each region pixel to the nearest non-region pixel or the image border.

    The padding makes the image border count as region boundary, so a click never hugs the frame.
    """
    padded = np.pad(region, 1, mode="constant", constant_values=False)
    return distance_transform_edt(padded)[1:-1, 1:-1]


def _argmax_rc(dist: np.ndarray) -> tuple[int, int]:
    # np.argmax returns the first maximum in row-major order: the deterministic tie-break.
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(r), int(c)


def first_click(gt: np.ndarray, ignore: np.ndarray | None = None) -> Click:
    """The object's interior point farthest from its boundary (max of the distance transform).

    Ties go to the first pixel in row-major order. Raises ValueError for an object with no valid pixel.
    """
    region = np.asarray(gt, dtype=bool)
    if ignore is not None:
        region = region & ~np.asarray(ignore, dtype=bool)
    if not region.any():
        raise ValueError("the object mask is empty (outside the ignore region); nothing to click on")
    r, c = _argmax_rc(_inner_distance(region))
    return Click(c, r, True)


def next_click(pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> Click | None:
    """The next corrective click for prediction `pred` of object `gt`, or None when there is no error.

    False negatives (object pixels missed) and false positives (background pixels taken) are split
    into two error maps; the click goes to the pixel farthest from the boundary of its error map (the
    centre of the largest error region measured by its inscribed distance, as RITM does). The click is
    positive if that pixel is a false negative, negative if a false positive; when both maps reach the
    same distance the click is negative (RITM's `fn_max > fp_max`). Ties inside a map: first pixel in
    row-major order. An empty `pred` gives the same click as `first_click`.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    valid = np.ones_like(gt) if ignore is None else ~np.asarray(ignore, dtype=bool)
    fn = gt & ~pred & valid
    fp = pred & ~gt & valid
    if not fn.any() and not fp.any():
        return None
    fn_dist = _inner_distance(fn)
    fp_dist = _inner_distance(fp)
    positive = bool(fn_dist.max() > fp_dist.max())
    r, c = _argmax_rc(fn_dist if positive else fp_dist)
    return Click(c, r, positive)
