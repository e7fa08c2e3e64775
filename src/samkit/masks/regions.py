"""Connected-component cleanup of a single mask (small holes and islands)."""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from samkit.errors import InputError


def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: Literal["holes", "islands"]
) -> tuple[np.ndarray, bool]:
    """Fill holes or drop islands smaller than `area_thresh` pixels (8-connectivity).

    mask: bool (H, W). In "islands" mode, if every island is small the largest one is kept.
    Returns (mask, changed); when nothing changes the input array itself is returned.
    """
    if mode not in ("holes", "islands"):
        raise InputError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    # For holes, the components of the inverted mask are the holes (plus the outside background).
    work = (mask != holes).astype(np.uint8)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(work, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    # Label 0 is the complement of `work`: the mask itself for holes, the background for islands.
    if holes:
        fill = np.concatenate([[True], small])
    else:
        fill = np.concatenate([[False], ~small])
        if not fill.any():
            fill[int(np.argmax(sizes)) + 1] = True
    return fill[labels], True
