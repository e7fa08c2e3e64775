"""Export-friendly views of a `Sam`: the image encoder alone, and prompt encoder + mask decoder + upscaling.

These modules only re-arrange calls into the model's own submodules so that a trace sees plain tensor
inputs (no Python `None`, no optional prompts); the numbers are those of `samkit.Predictor`.
"""

from __future__ import annotations

import torch
from torch import nn

from samkit.masks.upscale import interpolate_logits
from samkit.models.sam import Sam


class EncoderForExport(nn.Module):
    """image: (1, 3, S, S) normalised, padded bottom-right -> embedding (1, 256, S/16, S/16)."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class DecoderForExport(nn.Module):
    """Prompts on one embedding -> all four mask logits at the original size, IoU and low-res logits.

    Inputs: image_embeddings (1, 256, 64, 64); point_coords (1, N, 2) XY in the model-input frame (the
    original pixels scaled by S / max(H, W)); point_labels (1, N) float: 1 foreground, 0 background,
    2 box top-left, 3 box bottom-right, -1 padding; mask_input (1, 1, 256, 256) low-res logits;
    has_mask_input (1,) 1.0 to use mask_input; orig_im_size (2,) float (H, W).
    Outputs: masks (1, 4, H, W) logits, iou_predictions (1, 4), low_res_masks (1, 4, 256, 256). Index 0 is
    the single-mask output, 1..3 the multimask candidates.
    """

    def __init__(self, model: Sam) -> None:
        super().__init__()
        pe = model.prompt_encoder
        self.pe_layer = pe.pe_layer
        self.input_image_size = pe.input_image_size
        self.point_embeddings = pe.point_embeddings
        self.not_a_point_embed = pe.not_a_point_embed
        self.mask_downscaling = pe.mask_downscaling
        self.no_mask_embed = pe.no_mask_embed
        self.mask_decoder = model.mask_decoder
        self.image_size = model.image_size
        with torch.no_grad():
            self.register_buffer("dense_pe", pe.get_dense_pe().clone(), persistent=False)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb = self.pe_layer.forward_with_coords(coords + 0.5, self.input_image_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
        for k, table in enumerate(self.point_embeddings):
            emb = emb + torch.where(lab == k, table.weight, 0.0)
        return emb

    def _upscale(self, low_res: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        # Same rounding as samkit.transforms.preprocess_shape, in float64 like Python's.
        orig = orig_im_size.to(torch.float64)
        input_size = torch.floor(orig * (self.image_size / torch.max(orig)) + 0.5).to(torch.int64)
        return interpolate_logits(low_res, self.image_size, input_size, orig_im_size.to(torch.int64))

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sparse = self._embed_points(point_coords, point_labels)
        no_mask = self.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask_input * self.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask
        low_res, iou = self.mask_decoder.predict_masks(image_embeddings, self.dense_pe, sparse, dense)
        return self._upscale(low_res, orig_im_size), iou, low_res
