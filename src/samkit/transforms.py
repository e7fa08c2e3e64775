"""Image <-> model-frame geometry: resize the longest side, and map points/boxes between frames.

The original frame is the user's image, (H, W). The input frame is the image resized so that its longest
side is the model's `image_size` (1024 for SAM), size (h, w); it is then padded bottom-right to a square.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch only for the *_torch methods, so the ONNX path imports this without torch
    import torch


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) of an (height, width) image resized so its longest side is `long_side` (rounded half up)."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


class ResizeLongestSide:
    """Resizes images and maps XY coordinates from the original frame to the input frame."""

    def __init__(self, target_length: int, interpolation: str = "bilinear") -> None:
        if interpolation not in ("bilinear", "area"):
            raise ValueError(f"interpolation must be 'bilinear' or 'area', got {interpolation!r}")
        self.target_length = target_length
        self.interpolation = interpolation

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8.

        "bilinear": PIL bilinear, as SAM's reference does; "area": OpenCV INTER_AREA, as LiteMedSAM does.
        """
        h, w = preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        if self.interpolation == "area":
            import cv2

            return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) XY in the original frame -> the input frame (float64 copy)."""
        h, w = preprocess_shape(original_size[0], original_size[1], self.target_length)
        out = np.array(coords, dtype=np.float64, copy=True)
        out[..., 0] *= w / original_size[1]
        out[..., 1] *= h / original_size[0]
        return out

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 4) XYXY in the original frame -> the input frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Torch version of `apply_coords`: (..., 2) float tensor."""
        import torch

        h, w = preprocess_shape(original_size[0], original_size[1], self.target_length)
        scale = torch.tensor(
            [w / original_size[1], h / original_size[0]], dtype=torch.float32, device=coords.device
        )
        return coords.to(torch.float32) * scale

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Torch version of `apply_boxes`: (B, 4) -> (B, 4)."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)


def upscale_logits(
    low_res: np.ndarray, image_size: int, input_size: tuple[int, int], original_size: tuple[int, int]
) -> np.ndarray:
    """Low-res logits (C, 256, 256) in the padded model frame -> (C, H, W) logits at the original size.

    The same two bilinear (half-pixel) steps as `Sam.postprocess_masks` — to the padded square, crop the
    unpadded part, to the original size — done by OpenCV, which is ~3x faster than torch on a CPU. The
    logits agree to ~1e-6 relative; a mask pixel can only differ where a logit is within that of 0.
    """
    import cv2

    c = low_res.shape[0]
    out = np.empty((c, original_size[0], original_size[1]), dtype=np.float32)
    big = np.empty((image_size, image_size), dtype=np.float32)
    h, w = input_size
    size = (original_size[1], original_size[0])  # OpenCV sizes are (width, height)
    for i in range(c):  # one plane at a time: no channel transposes, results written in place
        plane = np.ascontiguousarray(low_res[i], dtype=np.float32)
        cv2.resize(plane, (image_size, image_size), dst=big, interpolation=cv2.INTER_LINEAR)
        cv2.resize(big[:h, :w], size, dst=out[i], interpolation=cv2.INTER_LINEAR)
    return out
