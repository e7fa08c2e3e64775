"""SAM's mask decoder: image embedding + prompt tokens -> low-res mask logits and predicted IoU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from samkit.devices import cpu_tuned
from samkit.models.common import MLP, LayerNorm2d
from samkit.models.transformer import ImageSide, TwoWayTransformer

# Rows of image tokens upscaled at once by `MaskDecoder.masks_from` at inference (16 of 64: ~2 MB of
# activations per band).
_BAND_ROWS = 16


class MaskDecoder(nn.Module):
    """Predicts 1 + `num_multimask_outputs` masks per prompt; the first is the single-mask output."""

    def __init__(
        self,
        transformer_dim: int = 256,
        transformer: nn.Module | None = None,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = (
            transformer if transformer is not None else TwoWayTransformer(embedding_dim=transformer_dim)
        )
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor | None,
        image_pe: torch.Tensor | None,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor | None,
        multimask_output: bool,
        image_side: ImageSide | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings: (1 or B, C, 64, 64); sparse: (B, N, C); dense: (B, C, 64, 64).

        image_side: `prepare()`'s result for this image when the prompts carry no mask input (then the
        embedding, PE and dense embedding are not used). Returns logits (B, 3 or 1, 256, 256) and
        predicted IoU (B, 3 or 1).
        """
        masks, iou = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_side
        )
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou[:, sel]

    @torch.no_grad()
    def prepare(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, no_mask: torch.Tensor
    ) -> ImageSide:
        """The image-only part of the first two-way block for a (1, C, H, W) embedding, to reuse for
        every prompt without a mask input. no_mask: the prompt encoder's no-mask dense embedding
        (1 or C values broadcast over H x W)."""
        return self.transformer.image_side(image_embeddings + no_mask, image_pe)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor | None,
        image_pe: torch.Tensor | None,
        sparse: torch.Tensor,
        dense: torch.Tensor | None,
        image_side: ImageSide | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All 4 mask logits (B, 4, 256, 256) and IoU predictions (B, 4)."""
        hs, src = self.attend(image_embeddings, image_pe, sparse, dense, image_side)
        return self.masks_from(hs, src), self.iou_from(hs)

    def attend(
        self,
        image_embeddings: torch.Tensor | None,
        image_pe: torch.Tensor | None,
        sparse: torch.Tensor,
        dense: torch.Tensor | None,
        image_side: ImageSide | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way transformer: output tokens (B, 1 + 4 + N, C) and image tokens (B, H*W, C)."""
        b = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1).to(sparse.dtype), sparse], dim=1)
        if image_side is not None:
            return self.transformer(None, None, tokens, image_side)
        if image_embeddings.shape[0] == 1 and dense.shape[0] > 1 and dense.stride(0) == 0:
            # One image, B prompts, no mask prompt: the dense embedding is one vector broadcast over the
            # batch, so the image side of the first two-way block is the same for every prompt. Keep it
            # at batch 1; attention broadcasts it, and the first image update makes it batch B.
            dense = dense[:1]
        return self.transformer(image_embeddings + dense, image_pe, tokens)

    def iou_from(self, hs: torch.Tensor) -> torch.Tensor:
        """Predicted IoU (B, 4) of the 4 masks from the transformer's output tokens."""
        return self.iou_prediction_head(hs[:, 0])

    def masks_from(self, hs: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """Mask logits (B, 4, 4h, 4w) from output tokens hs (B, T, C) and image tokens src (B, h*w, C).

        The two stride-2 transposed convolutions of `output_upscaling` run as per-pixel matrix
        products in pixel-major order (no layout changes between them); one permute of the 4 output
        maps at the end puts the pixels in place. Same weights, same result as the convolutions.
        At inference on a CPU the embedding is upscaled a few rows at a time: each band's intermediate
        activations then stay in cache (~25% faster, bit-identical); a GPU takes it whole.
        """
        b, n, c = src.shape
        h = w = math.isqrt(int(n))  # SAM's embeddings are square
        mask_out = hs[:, 1 : 1 + self.num_mask_tokens]
        hyper = torch.stack(
            [mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        inference = not (torch.is_grad_enabled() or torch.jit.is_tracing())
        band = _BAND_ROWS if inference and cpu_tuned(src) else h
        if band >= h:
            return self._mask_band(hyper, src, w)
        out = torch.empty(b, hyper.shape[1], 4 * h, 4 * w, dtype=hyper.dtype, device=hyper.device)
        for y0 in range(0, h, band):
            y1 = min(h, y0 + band)
            out[:, :, 4 * y0 : 4 * y1] = self._mask_band(hyper, src[:, y0 * w : y1 * w], w)
        return out

    def _mask_band(self, hyper: torch.Tensor, src: torch.Tensor, w: int) -> torch.Tensor:
        """Mask logits (B, K, 4r, 4w) of r rows of image tokens src (B, r*w, C); hyper: (B, K, C/8)."""
        b, n, c = src.shape
        r = n // w
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        x = _transposed_conv2x2(src.reshape(b * n, c), conv1.weight, conv1.bias)  # (b*n*4, c/4)
        dtype = x.dtype
        width = (self.transformer_dim // 4,)  # a Python int, so ONNX tracing sees a constant
        x = F.layer_norm(x.float(), width, norm.weight.float(), norm.bias.float(), norm.eps)
        x = _transposed_conv2x2(act1(x.to(dtype)), conv2.weight, conv2.bias)  # (b*n*16, c/8)
        x = act2(x).view(b, n * 16, -1)
        masks = hyper @ x.transpose(1, 2)  # (b, K, n*16), pixels ordered (y, x, i, j, k, l)
        k = masks.shape[1]
        # Output pixel (4y + 2i + k, 4x + 2j + l).
        masks = masks.view(b, k, r, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        return masks.reshape(b, k, 4 * r, 4 * w)


def _transposed_conv2x2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A kernel-2, stride-2 transposed convolution on pixels x (P, Cin) -> (P * 4, Cout).

    weight: (Cin, Cout, 2, 2) as in nn.ConvTranspose2d. Output row 4p + 2i + j is the input pixel p's
    contribution at offset (i, j) of its 2x2 output block.
    """
    cin, cout = weight.shape[:2]
    rows = weight.permute(2, 3, 1, 0).reshape(4 * cout, cin)  # output features ordered (i, j, cout)
    return F.linear(x, rows, bias.repeat(4)).view(-1, cout)
