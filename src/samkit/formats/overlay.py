"""Pictures of masks over their image: translucent fills in distinct colours, outlines, prompts and boxes."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from samkit.errors import InputError
from samkit.formats._atomic import PathLike, atomic_write_bytes
from samkit.formats.png import label_map
from samkit.image import ImageLike, load_image

_GOLDEN = 0.618033988749895
POSITIVE_COLOR = (0, 220, 0)
NEGATIVE_COLOR = (230, 0, 0)
BOX_COLOR = (30, 144, 255)


def palette(n: int) -> np.ndarray:
    """n distinct RGB colours, uint8 (n, 3); colour i is the same for every n (golden-ratio hue steps)."""
    colors = [colorsys.hsv_to_rgb((0.1 + i * _GOLDEN) % 1.0, 0.7, 0.95) for i in range(n)]
    return (np.array(colors, dtype=np.float64).reshape(n, 3) * 255).round().astype(np.uint8)


def overlay(
    image: ImageLike,
    masks: Sequence[Any] = (),
    alpha: float = 0.5,
    outline: bool = True,
    points: Any = None,
    point_labels: Any = None,
    boxes: Any = None,
) -> np.ndarray:
    """Draw masks, prompt points and boxes over an image; returns a new (H, W, 3) uint8 RGB array.

    image: (H, W, 3) uint8 RGB (or anything `load_image` reads). masks: bool (H, W) arrays, RLE dicts or
    mask-generator records; mask i gets colour `palette(n)[i]`, larger masks are drawn under smaller ones.
    points: (N, 2) (x, y) original-image pixels, drawn green where point_labels is 1 (the default) and red
    where it is 0. boxes: (M, 4) XYXY original-image pixels.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    out = load_image(image).copy()
    h, w = out.shape[:2]
    thickness = max(1, round(min(h, w) / 400))
    if len(masks):
        labels = label_map(masks)
        if labels.shape != (h, w):
            raise InputError(f"masks are {labels.shape[0]}x{labels.shape[1]} but the image is {h}x{w}")
        lut = np.zeros((len(masks) + 1, 3), dtype=np.float32)
        lut[1:] = palette(len(masks))
        fg = labels > 0
        color = lut[labels[fg]]
        out[fg] = ((1.0 - alpha) * out[fg] + alpha * color).round().astype(np.uint8)
        if outline:
            edge = _edges(labels, thickness) & fg
            out[edge] = lut[labels[edge]].astype(np.uint8)
    if points is not None:
        xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        lab = np.ones(len(xy)) if point_labels is None else np.asarray(point_labels).reshape(-1)
        if len(lab) != len(xy):
            raise InputError(f"got {len(xy)} points but {len(lab)} point labels")
        radius = max(3, round(min(h, w) / 120))
        for (x, y), label in zip(xy, lab, strict=True):
            center = (round(x), round(y))
            cv2.circle(out, center, radius + thickness, (255, 255, 255), -1, cv2.LINE_AA)
            cv2.circle(out, center, radius, POSITIVE_COLOR if label > 0 else NEGATIVE_COLOR, -1, cv2.LINE_AA)
    if boxes is not None:
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            cv2.rectangle(out, (round(x0), round(y0)), (round(x1), round(y1)), BOX_COLOR, thickness + 1)
    return out


def save_overlay(path: PathLike, image: ImageLike, masks: Sequence[Any] = (), **kwargs: Any) -> Path:
    """Write `overlay(image, masks, **kwargs)` to `path` (format from the suffix: .png, .jpg, ...)."""
    path = Path(path)
    picture = overlay(image, masks, **kwargs)
    try:
        ok, buf = cv2.imencode(path.suffix.lower() or ".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    except cv2.error:
        ok = False
    if not ok:
        raise InputError(f"cannot write an image with suffix '{path.suffix}'; use .png or .jpg")
    return atomic_write_bytes(path, buf.tobytes())


def _edges(labels: np.ndarray, thickness: int) -> np.ndarray:
    """bool (H, W): pixels whose label differs from a 4-neighbour's, widened to `thickness` pixels."""
    edge = np.zeros(labels.shape, dtype=bool)
    dx = labels[:, 1:] != labels[:, :-1]
    dy = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    if thickness > 1:
        kernel = np.ones((thickness, thickness), dtype=np.uint8)
        edge = cv2.dilate(edge.astype(np.uint8), kernel).astype(bool)
    return edge
