"""SAM's mask decoder: image embedding + prompt tokens -> low-res mask logits and predicted IoU."""

from __future__ import annotations

import torch
from torch import nn

from samkit.models.common import MLP, LayerNorm2d
from samkit.models.transformer import TwoWayTransformer


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
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings: (1 or B, C, 64, 64); sparse: (B, N, C); dense: (B, C, 64, 64).

        Returns logits (B, 3 or 1, 256, 256) and predicted IoU (B, 3 or 1).
        """
        masks, iou = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou[:, sel]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All 4 mask logits (B, 4, 256, 256) and IoU predictions (B, 4)."""
        b = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1).to(sparse.dtype), sparse], dim=1)
        if image_embeddings.shape[0] == 1 and dense.shape[0] > 1 and dense.stride(0) == 0:
            # One image, B prompts, no mask prompt: the dense embedding is one vector broadcast over the
            # batch, so the image side of the first two-way block is the same for every prompt. Keep it
            # at batch 1; attention broadcasts it, and the first image update makes it batch B.
            dense = dense[:1]
        src = image_embeddings + dense
        _, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        iou_out = hs[:, 0]
        mask_out = hs[:, 1 : 1 + self.num_mask_tokens]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack(
            [mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        _, cu, hu, wu = upscaled.shape
        masks = (hyper @ upscaled.view(b, cu, hu * wu)).view(b, -1, hu, wu)
        return masks, self.iou_prediction_head(iou_out)
