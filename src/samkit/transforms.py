"""The image pipeline: resize the longest side, normalise, pad; and map points/boxes between frames.

The original frame is the user's image, (H, W). The input frame is the image resized so that its longest
side is the model's `image_size` (1024 for SAM), size (h, w); it is then normalised and padded bottom-right
with zeros to an (S, S) square. `ImagePipeline` is the one implementation of that path: the Predictor, the
OnnxPredictor and the training loop all call it. Nothing here needs torch except the *_torch methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from samkit.errors import StateError

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
            try:
                import cv2
            except ImportError:  # the ONNX runtime install does not pull OpenCV in
                raise StateError(
                    "this model resizes with OpenCV INTER_AREA: pip install opencv-python-headless"
                ) from None
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


class ImagePipeline(ResizeLongestSide):
    """Resize the longest side to `image_size`, normalise, then zero-pad bottom-right to (S, S).

    Padding comes after normalisation, so the encoder sees exactly 0 outside the image whatever the pixel
    statistics. normalize: "mean_std" is (pixel - pixel_mean) / pixel_std on the 0..255 scale; "minmax"
    maps the resized image's own min and max over all channels and pixels to 0 and 1 (LiteMedSAM).
    Points and boxes map to the input frame with the inherited `apply_coords` / `apply_boxes`.
    """

    def __init__(
        self,
        image_size: int,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        normalize: str = "mean_std",
        resize: str = "bilinear",
    ) -> None:
        if normalize not in ("mean_std", "minmax"):
            raise ValueError(f"normalize must be 'mean_std' or 'minmax', got {normalize!r}")
        super().__init__(image_size, resize)
        self.image_size = image_size
        self.normalize = normalize
        self.pixel_mean = tuple(float(v) for v in pixel_mean)
        self.pixel_std = tuple(float(v) for v in pixel_std)

    @classmethod
    def of(cls, model: Any) -> ImagePipeline:
        """The pipeline of a `Sam` model: its image_size, pixel statistics, normalize and resize."""
        mean, std = model.pixel_mean.flatten().tolist(), model.pixel_std.flatten().tolist()
        return cls(model.image_size, mean, std, model.normalize, model.resize)

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the input frame of an (H, W) image."""
        return preprocess_shape(original_size[0], original_size[1], self.image_size)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> the encoder input (1, 3, S, S) float32."""
        return self.to_input(self.apply_image(image))

    def to_input(self, resized: np.ndarray) -> np.ndarray:
        """An input-frame image (h, w, 3) uint8, max(h, w) <= S -> (1, 3, S, S) float32, normalised then padded."""
        x = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1)
        if self.normalize == "minmax":
            lo = x.min()
            x = (x - lo) / max(float(x.max() - lo), 1e-8)
        else:
            mean = np.asarray(self.pixel_mean, dtype=np.float32).reshape(3, 1, 1)
            std = np.asarray(self.pixel_std, dtype=np.float32).reshape(3, 1, 1)
            x = (x - mean) / std
        out = np.zeros((1, 3, self.image_size, self.image_size), dtype=np.float32)
        out[0, :, : x.shape[1], : x.shape[2]] = x
        return out

    def to_input_torch(self, x: torch.Tensor) -> torch.Tensor:
        """`to_input` on tensors, on their device: (B, 3, h, w) float RGB 0..255 -> (B, 3, S, S), each image
        normalised on its own."""
        import torch

        if self.normalize == "minmax":
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            x = (x - lo) / (hi - lo).clamp_min(1e-8)
        else:
            mean = torch.tensor(self.pixel_mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            std = torch.tensor(self.pixel_std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
            x = (x - mean) / std
        return self.pad_torch(x)

    def pad_torch(self, x: torch.Tensor) -> torch.Tensor:
        """(..., h, w) -> (..., S, S) with zeros bottom-right (images after normalisation, masks as they are)."""
        import torch.nn.functional as F

        return F.pad(x, (0, self.image_size - x.shape[-1], 0, self.image_size - x.shape[-2]))
