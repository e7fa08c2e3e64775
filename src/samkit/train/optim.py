"""The optimiser: AdamW parameter groups (weight decay, layer-wise lr decay) and the lr schedule."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from samkit.models.sam import Sam
from samkit.train.config import ConfigError, OptimConfig


def build_optimizer(
    model: Sam, mode: str, opt: OptimConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and its schedule (warm-up, then step decay)."""
    optimizer = torch.optim.AdamW(param_groups(model, mode, opt), betas=(opt.betas[0], opt.betas[1]))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(opt, step))


def param_groups(model: Sam, mode: str, opt: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on 1-D tensors; layer-wise lr decay on a fine-tuned encoder."""
    decay = opt.layer_decay if mode in ("full", "lora") else 1.0
    scales = layer_scales(model.image_encoder, decay)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = (
            scales.get(name.removeprefix("image_encoder."), 1.0) if name.startswith("image_encoder.") else 1.0
        )
        wd = 0.0 if p.ndim <= 1 else opt.weight_decay
        groups.setdefault((scale, wd), []).append(p)
    if not groups:
        raise ConfigError(f"mode {mode} leaves no trainable parameter")
    return [{"params": ps, "lr": opt.lr * s, "weight_decay": wd} for (s, wd), ps in groups.items()]


def lr_factor(opt: OptimConfig, step: int) -> float:
    """The lr of `step` as a factor of `opt.lr`: linear warm-up, then x decay_factor at each decay step."""
    factor = min(1.0, (step + 1) / opt.warmup) if opt.warmup > 0 else 1.0
    return factor * opt.decay_factor ** sum(step >= s for s in opt.decay_steps)


def layer_scales(encoder: nn.Module, decay: float) -> dict[str, float]:
    """lr scale per encoder parameter: decay ** (blocks above it). Blocks are numbered in registration order;
    parameters outside blocks take the last block seen (so the stem gets the smallest lr, the neck 1)."""
    ids: dict[str, int] = {}
    seen: dict[str, int] = {}
    for name, _ in encoder.named_parameters():
        m = re.match(r"^(.*?blocks\.\d+)\.", name)
        if m:
            seen.setdefault(m.group(1), len(seen) + 1)
            ids[name] = seen[m.group(1)]
        else:
            ids[name] = len(seen)
    top = max(len(seen), 1)
    return {name: decay ** (top - i) for name, i in ids.items()}
