"""Where segment-everything prompts go: point grids and the crop boxes of each crop layer.

Grids are in [0, 1] x [0, 1] (x, y), scaled to a crop's pixels by the caller. Crop boxes are XYXY in
original-image pixels; layer 0 is the whole image, layer i > 0 has (2**i)**2 overlapping crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from samkit.errors import InputError


@dataclass(frozen=True)
class Crop:
    """One crop of the image: `box` XYXY in original-image pixels, and its crop `layer` (0 = whole image)."""

    box: tuple[int, int, int, int]
    layer: int

    @property
    def area(self) -> int:
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)


def point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) float64 (x, y) in [0, 1]: cell centres of an n x n grid, x varying fastest."""
    if n_per_side < 1:
        raise InputError(f"points_per_side must be at least 1, got {n_per_side}")
    half_cell = 1 / (2 * n_per_side)
    side = np.linspace(half_cell, 1 - half_cell, n_per_side)
    xs, ys = np.meshgrid(side, side)  # xs varies along columns, so the flattening walks rows of points
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def layer_point_grids(n_per_side: int, n_layers: int, downscale: int) -> list[np.ndarray]:
    """One grid per crop layer 0..n_layers; layer i has int(n_per_side / downscale**i) points per side."""
    if downscale < 1:
        raise InputError(f"crop_n_points_downscale_factor must be at least 1, got {downscale}")
    return [point_grid(int(n_per_side / downscale**i)) for i in range(n_layers + 1)]


def crop_boxes(image_size: tuple[int, int], n_layers: int, overlap_ratio: float) -> list[Crop]:
    """The whole image, then for each layer i = 1..n_layers a (2**i) x (2**i) set of overlapping crops.

    image_size: (H, W). Neighbouring crops of layer i overlap by int(overlap_ratio * min(H, W) * 2 / 2**i)
    pixels. Crops are listed column by column (x0 outer, y0 inner), the order the reference uses.
    """
    h, w = image_size
    crops = [Crop((0, 0, w, h), 0)]
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * min(h, w) * (2 / per_side))
        crop_w = _crop_len(w, per_side, overlap)
        crop_h = _crop_len(h, per_side, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0 in x0s:
            for y0 in y0s:
                x1, y1 = min(x0 + crop_w, w), min(y0 + crop_h, h)
                if x1 > x0 and y1 > y0:  # crops of an image a few pixels wide can fall outside it
                    crops.append(Crop((x0, y0, x1, y1), layer))
    return crops


def _crop_len(full: int, n_crops: int, overlap: int) -> int:
    """Side of each of n_crops crops that tile `full` pixels with `overlap` pixels between neighbours."""
    return int(math.ceil((overlap * (n_crops - 1) + full) / n_crops))
