"""The decoding core: one encoded image and the prompt decoding on it, which `Predictor` (a few prompts
per click) and `MaskGenerator` (thousands per image) both run.

`EmbeddedImage` holds what decoding one image needs: the model, the image embedding and the image's two
frames (original (H, W) and input (h, w), see `samkit.transforms`). It keeps the work that depends only
on the image, made once on first use: the decoder's image-side first-block work (`MaskDecoder.prepare`)
and the `Upscaler` of its frames. Both are made under a lock, so threads can share one EmbeddedImage.
Threads are the caller's business: nothing here starts one or changes torch's thread settings.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from samkit.devices import cpu_tuned
from samkit.errors import CheckpointError
from samkit.masks.upscale import Upscaler
from samkit.models.factored import FactoredKeys
from samkit.models.sam import Sam
from samkit.models.transformer import ImageSide
from samkit.transforms import ImagePipeline

# Prompts decoded at once on a CPU: each prompt carries its own (4096, 256) image tokens through the
# decoder, and a few at a time stay in cache (measured on 2 cores: 64 per batch ~66 ms/prompt, 1 ~40 ms).
CPU_DECODE_CHUNK = 1


class EmbeddedImage:
    """An image encoded by `model`, ready for prompts.

    features: (1, 256, g, g) embedding; original_size: (H, W) of the image; input_size: (h, w) of the
    resized image inside the model-input square.
    """

    def __init__(
        self,
        model: Sam,
        features: torch.Tensor,
        original_size: tuple[int, int],
        input_size: tuple[int, int],
    ) -> None:
        self.model = model
        self.features = features
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self._lock = threading.Lock()
        self._side: ImageSide | None = None
        self._upscaler: Upscaler | None = None

    @classmethod
    @torch.inference_mode()
    def encode(cls, model: Sam, image: np.ndarray, pipeline: ImagePipeline | None = None) -> EmbeddedImage:
        """Encode an (H, W, 3) uint8 RGB image (`pipeline`: the model's `ImagePipeline`, made if not given)."""
        pipeline = pipeline or ImagePipeline.of(model)
        resized = pipeline.apply_image(image)
        x = torch.from_numpy(np.array(resized)).to(model.device).permute(2, 0, 1).contiguous()[None]
        return cls.encode_torch(model, x, (image.shape[0], image.shape[1]), pipeline)

    @classmethod
    @torch.inference_mode()
    def encode_torch(
        cls,
        model: Sam,
        image: torch.Tensor,
        original_size: tuple[int, int],
        pipeline: ImagePipeline | None = None,
    ) -> EmbeddedImage:
        """Encode an already resized image: (1, 3, h, w) RGB 0..255, longest side == model.image_size."""
        pipeline = pipeline or ImagePipeline.of(model)
        dtype = next(model.image_encoder.parameters()).dtype
        x = pipeline.to_input_torch(image.float()).to(dtype)
        amp = model.encoder_amp  # set by samkit.load(..., dtype=...)
        with torch.autocast(model.device.type, dtype=amp, enabled=amp is not None):
            features = model.image_encoder(x).float()
        features = check_finite(model, features, "image embedding")
        return cls(model, features, original_size, (int(image.shape[-2]), int(image.shape[-1])))

    @torch.inference_mode()
    def decode(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        min_iou: float | None = None,
        image_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores of B prompts and the low-res logits of only those worth upsampling.

        Prompts in the model-input frame: point_coords (B, N, 2) XY, point_labels (B, N), boxes (B, 4)
        XYXY, mask_input (B, 1, 256, 256). Returns scores (B, C), rows (K,) the prompts with some score
        > min_iou (all B if min_iou is None), and their logits (K, C, 256, 256); C = 3 if
        multimask_output else 1. The mask head (upscaling + hypernetworks) runs only for those K
        prompts. On a CPU the prompts are decoded a few at a time, which keeps the per-prompt image
        tokens in cache and is faster than one large batch.
        image_only: compute the logits only where they reach the image's full-size masks (the tokens
        over the image plus one row / column of margin for the bilinear upsampling); the padding's
        logits then read `OUTSIDE_REGION`. For callers that return masks but not low-res logits.
        """
        features = self.features
        pe, dec = self.model.prompt_encoder, self.model.mask_decoder
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = pe(points, boxes, mask_input)
        side = self.first_block() if mask_input is None and features.shape[0] == 1 else None
        image_pe = pe.get_dense_pe()
        sel = slice(1, None) if multimask_output else slice(0, 1)
        b = sparse.shape[0]
        step = CPU_DECODE_CHUNK if cpu_tuned(features) else b
        ious, rows, logits = [], [], []
        for i in range(0, b, step):
            j = min(b, i + step)
            feats = features if features.shape[0] == 1 else features[i:j]
            dense_ij = dense[i:j] if dense.shape[0] > 1 else dense
            hs, src = dec.attend(feats, image_pe, sparse[i:j], dense_ij, side, factored=True)
            iou = dec.iou_from(hs)[:, sel]
            ious.append(iou)
            keep = torch.arange(i, j, device=iou.device)
            if min_iou is not None:
                ok = (iou > min_iou).any(1)
                keep, hs = keep[ok], hs[ok]
                src = src.select(ok) if isinstance(src, FactoredKeys) else src[ok]
                if not len(keep):
                    continue
            rows.append(keep)
            logits.append(dec.masks_from(hs, src, self.image_region() if image_only else None, sel))
        iou = check_finite(self.model, torch.cat(ious), "predicted IoU")
        if not rows:
            size = pe.mask_input_size
            empty = torch.zeros(0, iou.shape[1], *size, dtype=iou.dtype, device=iou.device)
            return iou, torch.zeros(0, dtype=torch.int64, device=iou.device), empty
        return iou, torch.cat(rows), torch.cat(logits)

    def image_region(self) -> tuple[int, int]:
        """(rows, cols) of embedding tokens whose low-res logits reach the full-size masks: those over
        the unpadded input plus one of margin (bilinear upsampling reads one low-res pixel beyond)."""
        g = self.features.shape[-1]
        px = self.model.image_size // g  # input pixels per token
        h, w = self.input_size
        return min(g, -(-h // px) + 1), min(g, -(-w // px) + 1)

    def first_block(self) -> ImageSide:
        """The decoder's image-only first-block work for this image."""
        with self._lock:
            if self._side is None:
                pe = self.model.prompt_encoder
                no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
                with torch.inference_mode():
                    self._side = self.model.mask_decoder.prepare(self.features, pe.get_dense_pe(), no_mask)
            return self._side

    def upscaler(self) -> Upscaler:
        """The `Upscaler` from this image's low-res logits to its full size: thresholded full-size masks
        by blocks, for segment-everything's many masks."""
        with self._lock:
            if self._upscaler is None:
                model = self.model
                low = model.prompt_encoder.mask_input_size[0]
                self._upscaler = Upscaler(
                    model.image_size, low, self.input_size, self.original_size, device=model.device
                )
            return self._upscaler


def check_finite(model: Sam, values: torch.Tensor, what: str) -> torch.Tensor:
    """`values`, unless they hold NaN or infinity: then the masks would be empty or garbage without a
    word, so raise instead (damaged weights, or an encoder overflowing in reduced precision)."""
    if bool(torch.isfinite(values).all()):
        return values
    raise CheckpointError(
        f"model {model.arch!r} computed a {what} with NaN or infinite values: its weights are "
        "damaged (download or copy them again) or its reduced precision overflows (load it with dtype='fp32')"
    )
