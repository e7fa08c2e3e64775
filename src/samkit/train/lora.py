"""LoRA (Hu et al. 2021) for the image encoder's linear layers, merged back into plain nn.Linear on export."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * x A^T B^T, with `base` frozen, A (rank, in) random and B (out, rank) zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (base weight + scale * B A)."""
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a).to(self.base.weight.dtype) * self.scale
        return self.base


def add_lora(module: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> int:
    """Wrap every nn.Linear child of `module` (recursively) whose attribute name is in `targets`.

    Returns how many layers were wrapped.
    """
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha))
                count += 1
    return count


def merge_lora(module: nn.Module) -> int:
    """Replace every LoRALinear in `module` by its merged nn.Linear; returns how many were merged."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
                count += 1
    return count
