"""Synthetic scenes with exact masks, and copy-paste compositing of real objects onto real backgrounds.

Both are deterministic functions of (seed, index): item i is the same image on every run.
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np

from samkit.train.source import Sample, Source, stack_masks

MIN_AREA = 30  # pixels; smaller (mostly occluded) objects are dropped


def _texture(rng: np.random.Generator, h: int, w: int, textured: bool = True) -> np.ndarray:
    """An (h, w, 3) float texture: flat colour, stripes, checker or smooth noise, plus pixel noise.

    Without `textured`, a flat colour with mild noise."""
    base = rng.uniform(0, 255, 3)
    other = rng.uniform(0, 255, 3)
    kind = rng.integers(4) if textured else 0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        t = np.zeros((h, w), np.float32)
    elif kind == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 24)
        t = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0).astype(np.float32)
    elif kind == 2:
        cell = int(rng.integers(4, 20))
        t = ((yy // cell + xx // cell) % 2).astype(np.float32)
    else:
        small = rng.random((max(2, h // 16), max(2, w // 16))).astype(np.float32)
        t = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    img = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    return img + rng.normal(0, rng.uniform(0, 12), (h, w, 1))


def _shape(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random ellipse, rectangle or polygon as an (h, w) bool mask."""
    canvas = np.zeros((h, w), np.uint8)
    cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
    r = rng.uniform(0.06, 0.3) * min(h, w)
    kind = rng.integers(3)
    if kind == 0:
        axes = (int(r), int(r * rng.uniform(0.4, 1.0)))
        cv2.ellipse(canvas, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif kind == 1:
        half = np.array([r, r * rng.uniform(0.4, 1.0)])
        rect = ((cx, cy), tuple(2 * half), float(rng.uniform(0, 90)))
        cv2.fillPoly(canvas, [cv2.boxPoints(rect).astype(np.int32)], 1)
    else:
        n = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = r * rng.uniform(0.5, 1.0, n)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)
        cv2.fillPoly(canvas, [pts], 1)
    return canvas.astype(bool)


def synthetic_scene(
    rng: np.random.Generator, size: int, max_shapes: int = 6, textured: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """A background with 1..`max_shapes` shapes painted in order (later ones occlude), each with a random
    texture (`textured`) or a flat colour.

    Returns the image (h, w, 3) uint8 with longest side `size`, and the visible part of every shape
    (N, h, w) bool.
    """
    aspect = rng.uniform(0.6, 1.0)
    h, w = (size, int(size * aspect)) if rng.random() < 0.5 else (int(size * aspect), size)
    image = _texture(rng, h, w, textured)
    masks: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        shape = _shape(rng, h, w)
        image[shape] = _texture(rng, h, w, textured)[shape]
        masks = [m & ~shape for m in masks]
        masks.append(shape)
    kept = [m for m in masks if m.sum() >= MIN_AREA]
    return np.clip(image, 0, 255).astype(np.uint8), stack_masks(kept, h, w)


class SyntheticSource(Source):
    """`count` synthetic scenes of longest side `size`; scene i is drawn from the seed (seed, i)."""

    def __init__(
        self, count: int, size: int = 256, seed: int = 0, max_shapes: int = 6, textured: bool = True
    ) -> None:
        self.count, self.size, self.seed = count, size, seed
        self.max_shapes, self.textured = max_shapes, textured
        self.name = f"synthetic:{seed}:{size}:{max_shapes}:{int(textured)}"

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Sample:
        image, masks = synthetic_scene(
            np.random.default_rng([self.seed, i]), self.size, self.max_shapes, self.textured
        )
        return Sample(f"{self.name}/{i}", image, masks)


class CopyPasteSource(Source):
    """Real objects cut out with their masks and pasted onto real background images.

    Item i: background `backgrounds[j]` (its own masks kept, minus what the pasted objects cover) with
    1..`max_objects` objects, each a random mask of a random `objects` image, rescaled (0.5-1.5x, never
    larger than the background) and placed at a random position. Hard edges, no blending.
    """

    def __init__(self, objects: Source, backgrounds: Source, count: int, max_objects: int = 4, seed: int = 0):
        self.objects, self.backgrounds = objects, backgrounds
        self.count, self.max_objects, self.seed = count, max_objects, seed
        parts = f"{objects.ident}|{backgrounds.ident}|{max_objects}|{seed}"
        self.name = f"copy_paste:{hashlib.sha1(parts.encode()).hexdigest()[:12]}"

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Sample:
        rng = np.random.default_rng([self.seed, i])
        bg = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        image = bg.image.copy()
        h, w = image.shape[:2]
        masks = list(bg.masks)
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            src = self.objects[int(rng.integers(len(self.objects)))]
            if len(src.masks) == 0:
                continue
            obj = src.masks[int(rng.integers(len(src.masks)))]
            ys, xs = np.nonzero(obj)
            crop_img = src.image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            crop_mask = obj[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8)
            scale = rng.uniform(0.5, 1.5)
            scale = min(scale, 0.9 * h / crop_mask.shape[0], 0.9 * w / crop_mask.shape[1])
            ch, cw = max(1, int(crop_mask.shape[0] * scale)), max(1, int(crop_mask.shape[1] * scale))
            crop_img = cv2.resize(crop_img, (cw, ch), interpolation=cv2.INTER_LINEAR)
            crop_mask = cv2.resize(crop_mask, (cw, ch), interpolation=cv2.INTER_NEAREST).astype(bool)
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            pasted = np.zeros((h, w), bool)
            pasted[y0 : y0 + ch, x0 : x0 + cw] = crop_mask
            image[pasted] = crop_img[crop_mask]
            masks = [m & ~pasted for m in masks]
            masks.append(pasted)
        kept = [m for m in masks if m.sum() >= MIN_AREA]
        return Sample(f"{self.name}/{i}", image, stack_masks(kept, h, w))
