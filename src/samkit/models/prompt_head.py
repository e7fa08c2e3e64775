"""PromptHead: where on the image embedding a point prompt pays off (a heat map of prompt locations), and
optionally how far the object under each cell extends (a box per cell)."""

from __future__ import annotations

import math

import torch
from torch import nn

from samkit.models.common import LayerNorm2d


def _dilated_body(in_chans: int, width: int, depth: int) -> nn.Sequential:
    """1 x 1 projection, then `depth` 3 x 3 convolutions dilated 1, 2, 4, ...: a wider view per layer (an
    object's centre and extent depend on where its edges are)."""
    layers: list[nn.Module] = [nn.Conv2d(in_chans, width, 1), LayerNorm2d(width), nn.GELU()]
    for i in range(depth):
        dilation = 2**i
        layers += [nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation), nn.GELU()]
    return nn.Sequential(*layers)


class PromptHead(nn.Module):
    """A few convolutions on the image embedding: (B, 256, 64, 64) -> (B, 1, 64, 64) heat-map logits,
    one per embedding cell (16 x 16 model-input pixels); a high logit means a point prompt at that cell's
    centre yields a mask that segment-everything keeps.

    With `boxes`, a second branch of its own (`extents`) gives per cell the log of the distances, in cells,
    from a point in that cell to the left, top, right and bottom edges of the box of the object it lies in:
    a box prompt per point."""

    def __init__(
        self,
        in_chans: int = 256,
        width: int = 64,
        depth: int = 3,
        prior: float = 0.01,
        boxes: bool = False,
        box_depth: int = 4,
    ) -> None:
        super().__init__()
        # The model whose embeddings the head was trained on, as its file records it (`head_metadata`:
        # format, model name, model_config id); None when unknown (a head built in code, or an older file).
        self.trained_for: dict[str, str] | None = None
        self.body = _dilated_body(in_chans, width, depth)
        self.out = nn.Conv2d(width, 1, 3, padding=1)
        nn.init.constant_(self.out.bias, -math.log((1 - prior) / prior))  # start near the positives' rate
        self.box_body: nn.Module | None = None
        self.box_out: nn.Module | None = None
        if boxes:
            self.box_body = _dilated_body(in_chans, width, box_depth)
            self.box_out = nn.Conv2d(width, 4, 3, padding=1)

    @property
    def has_boxes(self) -> bool:
        return self.box_out is not None

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(embedding))

    def extents(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, 256, side, side) -> (B, 4, side, side) log distances in cells (left, top, right, bottom)."""
        if self.box_body is None or self.box_out is None:
            raise ValueError("this prompt head has no box branch")
        return self.box_out(self.box_body(embedding))
