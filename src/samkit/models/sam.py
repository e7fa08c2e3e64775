"""The SAM composition: image encoder + prompt encoder + mask decoder, with pixel normalisation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from samkit.models.mask_decoder import MaskDecoder
from samkit.models.prompt_encoder import PromptEncoder


class Sam(nn.Module):
    """Segment Anything model. Pre/post-processing of real images lives in `samkit.Predictor`.

    `image_size` is the square model-input side (1024 for SAM and MobileSAM, 256 for LiteMedSAM).
    """

    mask_threshold: float = 0.0

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        image_size: int = 1024,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
        normalize: str = "mean_std",
        resize: str = "bilinear",
    ) -> None:
        super().__init__()
        if normalize not in ("mean_std", "minmax"):
            raise ValueError(f"normalize must be 'mean_std' or 'minmax', got {normalize!r}")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        self.normalize = normalize
        self.resize = resize  # interpolation used by the Predictor to reach `image_size`: bilinear | area
        self.arch = ""  # set by the zoo: "vit_b", "vit_t", ...
        self.encoder_amp: torch.dtype | None = None  # reduced-precision image encoder (samkit.load dtype=)
        self.config: Any = None  # the SamConfig it was built from, set by `build_sam`

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) RGB 0..255 resized so the longest side is `image_size` -> normalised, padded square.

        The tensor form of `samkit.transforms.ImagePipeline` (which documents "mean_std" and "minmax"):
        padding (zeros, bottom-right) comes after normalisation.
        """
        from samkit.transforms import ImagePipeline

        return ImagePipeline.of(self).to_input_torch(x)

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits (B, C, 256, 256) -> logits at the original image size (B, C, H, W)
        (`samkit.masks.upscale.interpolate_logits`, where every front end's upsampling lives)."""
        from samkit.masks.upscale import interpolate_logits

        return interpolate_logits(masks, self.image_size, input_size, original_size)
