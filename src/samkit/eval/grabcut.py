"""A classical baseline with the Predictor interface: OpenCV GrabCut (Rother et al. 2004).

It lets every protocol run, and be sanity-checked, without any network weights.
"""

from __future__ import annotations

import cv2
import numpy as np

from samkit.errors import PromptError, StateError
from samkit.image import ImageLike, load_image

LOWRES = 256


class GrabCutPredictor:
    """GrabCut behind `set_image` / `predict`, prompts in original-image pixels.

    Initialisation:
    - box (XYXY): GrabCut's rectangle mode, outside definite background, inside probable foreground.
    - points only: the rectangle is the bounding box of the positive points grown by `point_margin` x the
      image diagonal on each side (clipped to the image).
    - every click is a hard constraint: a disk of `click_radius` px, definite foreground for a positive
      click, definite background for a negative one (on top of the box, when both are given).
    `mask_input` is ignored: GrabCut is recomputed from all the prompts at each call, so a click
    sequence still refines the result. It returns one mask; with `multimask_output=True` the mask is
    repeated 3 times with equal scores. Scores are 1.0 and logits are zeros (C, 256, 256): GrabCut has
    no IoU estimate and no soft output (`provides_logits = False` tells the edge protocol so).
    """

    name = "grabcut"
    provides_logits = False

    def __init__(self, iterations: int = 5, click_radius: int = 5, point_margin: float = 0.15) -> None:
        self.iterations = iterations
        self.click_radius = click_radius
        self.point_margin = point_margin
        self._image: np.ndarray | None = None
        # The last GrabCut input and its result: protocols often ask the same prompt twice (3-mask and
        # single-mask output), and GrabCut is deterministic, so the second call is free.
        self._last: tuple[bytes, np.ndarray] | None = None

    def set_image(self, image: ImageLike) -> None:
        """Keep `image` (path, PIL or (H, W, 3) uint8 RGB array) for the following predictions."""
        self._image = load_image(image)
        self._last: tuple[bytes, np.ndarray] | None = None

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment from points (N, 2) (x, y) with labels (N,) 1/0 and/or a box (4,) XYXY.

        Returns masks (C, H, W) bool, scores (C,) and logits (C, 256, 256), C = 3 if multimask else 1.
        """
        if self._image is None:
            raise StateError("call set_image() before predict()")
        h, w = self._image.shape[:2]
        points = (
            np.zeros((0, 2))
            if point_coords is None
            else np.asarray(point_coords, dtype=np.float64).reshape(-1, 2)
        )
        labels = np.zeros(0) if point_labels is None else np.asarray(point_labels).reshape(-1)
        if len(points) != len(labels):
            raise PromptError(f"got {len(points)} points but {len(labels)} labels; give one label per point")
        if box is None and not (labels == 1).any():
            raise PromptError("GrabCut needs a box or at least one positive point")

        if box is not None:
            x0, y0, x1, y1 = np.asarray(box, dtype=np.float64).reshape(4)
        else:
            pos = points[labels == 1]
            margin = self.point_margin * float(np.hypot(h, w))
            x0, y0 = pos.min(axis=0) - margin
            x1, y1 = pos.max(axis=0) + margin
        x0, x1 = int(np.clip(np.floor(x0), 0, w - 1)), int(np.clip(np.ceil(x1), 0, w - 1))
        y0, y1 = int(np.clip(np.floor(y0), 0, h - 1)), int(np.clip(np.ceil(y1), 0, h - 1))

        init = np.full((h, w), cv2.GC_BGD, dtype=np.uint8)
        init[y0 : y1 + 1, x0 : x1 + 1] = cv2.GC_PR_FGD
        for (x, y), lab in zip(points, labels, strict=True):
            value = cv2.GC_FGD if lab == 1 else cv2.GC_BGD
            cv2.circle(init, (int(round(x)), int(round(y))), self.click_radius, int(value), thickness=-1)

        mask = self._grabcut(init)
        n = 3 if multimask_output else 1
        return (
            np.repeat(mask[None], n, axis=0),
            np.ones(n, dtype=np.float32),
            np.zeros((n, LOWRES, LOWRES), dtype=np.float32),
        )

    def _grabcut(self, init: np.ndarray) -> np.ndarray:
        fg = (init == cv2.GC_FGD) | (init == cv2.GC_PR_FGD)
        bg = (init == cv2.GC_BGD) | (init == cv2.GC_PR_BGD)
        key = init.tobytes()
        if self._last is not None and self._last[0] == key:
            return self._last[1].copy()
        if not fg.any() or not bg.any():
            # GrabCut needs samples of both colour models; with one side empty the prompt decides alone.
            return fg
        mask = init.copy()
        # GrabCut seeds its GMMs with k-means on OpenCV's global RNG: fix it so that a run is repeatable.
        cv2.setRNGSeed(0)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.grabCut(
            self._image[:, :, ::-1].copy(), mask, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK
        )
        out = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
        self._last = (key, out)
        return out.copy()
