"""Small-region cleanup of one mask, done inside the mask's box instead of over the whole image.

Same result as `samkit.masks.remove_small_regions` on the full mask (holes first, then islands), at a
cost that scales with the mask's box rather than the image.
"""

from __future__ import annotations

import math

import numpy as np

from samkit.masks import remove_small_regions


def clean_mask(mask: np.ndarray, area_thresh: float) -> tuple[np.ndarray, bool]:
    """Fill holes, then drop islands, smaller than `area_thresh` pixels. mask: bool (H, W).

    Returns (mask, changed); the input array itself when nothing changed.
    """
    box = _bbox(mask)
    if box is None:
        out, changed_holes = remove_small_regions(mask, area_thresh, "holes")
        out, changed_islands = remove_small_regions(out, area_thresh, "islands")
        return out, changed_holes or changed_islands
    out, changed_holes = _fill_holes(mask, box, area_thresh)
    # Filling holes never leaves the box, and every island lies inside it, so the box bounds islands.
    x0, y0, x1, y1 = box
    sub, changed_islands = remove_small_regions(out[y0 : y1 + 1, x0 : x1 + 1], area_thresh, "islands")
    if changed_islands:
        if out is mask:
            out = mask.copy()
        out[y0 : y1 + 1, x0 : x1 + 1] = sub
    return out, changed_holes or changed_islands


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive XYXY box of a bool (H, W) mask, or None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not len(rows):
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _fill_holes(
    mask: np.ndarray, box: tuple[int, int, int, int], area_thresh: float
) -> tuple[np.ndarray, bool]:
    """Fill background components smaller than `area_thresh` (8-connectivity), looking only near the box.

    The window is the box grown by one pixel. Outside it everything is background, and that outside
    region touches every background component reaching a window side that is not an image edge. When
    each connected piece of the outside is at least `area_thresh` pixels, all such components are
    large; padding those sides with a band of background at least as large says the same to the
    component labelling. Otherwise (a box nearly as large as the image) the whole mask is labelled.
    """
    h, w = mask.shape
    x0, y0, x1, y1 = box
    wx0, wy0, wx1, wy1 = max(x0 - 1, 0), max(y0 - 1, 0), min(x1 + 1, w - 1), min(y1 + 1, h - 1)
    open_sides = {"left": wx0 > 0, "top": wy0 > 0, "right": wx1 < w - 1, "bottom": wy1 < h - 1}
    if not any(open_sides.values()):
        return remove_small_regions(mask, area_thresh, "holes")
    outside = h * w - (wx1 - wx0 + 1) * (wy1 - wy0 + 1)
    if open_sides["left"] or open_sides["right"]:
        if not (open_sides["top"] or open_sides["bottom"]) and open_sides["left"] and open_sides["right"]:
            # The window spans the full height: the outside is a left and a right piece.
            pieces = [wx0 * h, (w - 1 - wx1) * h]
        else:
            pieces = [outside]
    elif open_sides["top"] and open_sides["bottom"]:
        pieces = [wy0 * w, (h - 1 - wy1) * w]
    else:
        pieces = [outside]
    if min(pieces) < area_thresh:
        return remove_small_regions(mask, area_thresh, "holes")
    sub = mask[wy0 : wy1 + 1, wx0 : wx1 + 1]
    sh, sw = sub.shape
    band = max(1, math.ceil(area_thresh / max(1, min(sh, sw))))
    pad = (
        (band if open_sides["top"] else 0, band if open_sides["bottom"] else 0),
        (band if open_sides["left"] else 0, band if open_sides["right"] else 0),
    )
    padded = np.pad(sub, pad, constant_values=False)
    filled, changed = remove_small_regions(padded, area_thresh, "holes")
    if not changed:
        return mask, False
    out = mask.copy()
    out[wy0 : wy1 + 1, wx0 : wx1 + 1] = filled[pad[0][0] : pad[0][0] + sh, pad[1][0] : pad[1][0] + sw]
    return out, True
