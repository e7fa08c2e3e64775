"""PromptHead: where on the image embedding a point prompt pays off (a heat map of prompt locations)."""

from __future__ import annotations

import math

import torch
from torch import nn

from samkit.models.common import LayerNorm2d


class PromptHead(nn.Module):
    """A few convolutions on the image embedding: (B, 256, 64, 64) -> (B, 1, 64, 64) heat-map logits,
    one per embedding cell (16 x 16 model-input pixels); a high logit means a point prompt at that cell's
    centre yields a mask that segment-everything keeps."""

    def __init__(self, in_chans: int = 256, width: int = 64, depth: int = 3, prior: float = 0.01) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_chans, width, 1), LayerNorm2d(width), nn.GELU()]
        for i in range(depth):
            dilation = 2**i  # a wider view per layer: an object's centre depends on where its edges are
            layers += [nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, 1, 3, padding=1)
        nn.init.constant_(self.out.bias, -math.log((1 - prior) / prior))  # start near the positives' rate

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(embedding))
