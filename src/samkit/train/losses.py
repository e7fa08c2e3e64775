"""The SAM paper's losses: 20 x focal + 1 x dice on the mask, MSE on the predicted IoU.

With several candidate masks (multimask output) only the lowest-loss one gets the mask loss; every
candidate's IoU prediction is trained against its own actual IoU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), mean over pixels. logits, target: (B, C, h, w) -> (B, C)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * ce * (1 - p_t) ** gamma).flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice loss on sigmoid probabilities. logits, target: (B, C, h, w) -> (B, C)."""
    prob = logits.sigmoid().flatten(2)
    t = target.flatten(2)
    return 1 - (2 * (prob * t).sum(-1) + eps) / (prob.sum(-1) + t.sum(-1) + eps)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded (logit > 0) masks with the target. (B, C, h, w) -> (B, C); empty/empty = 1."""
    pred = logits > 0
    t = target > 0.5
    inter = (pred & t).flatten(2).sum(-1).float()
    union = (pred | t).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def sam_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    target: torch.Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """logits: (B, C, h, w); iou_pred: (B, C); target: (B, 1, h, w) in {0, 1}.

    Returns the loss (mean over B), detached per-term means for logging, and the index (B,) of the
    candidate that got the mask loss (the lowest-loss one).
    """
    logits = logits.float()
    target = target.expand_as(logits)
    focal = focal_loss(logits, target)
    dice = dice_loss(logits, target)
    per_mask = focal_weight * focal + dice_weight * dice
    best = per_mask.detach().argmin(dim=1)
    rows = torch.arange(len(best), device=logits.device)
    with torch.no_grad():
        actual = mask_iou(logits, target)
    iou_mse = F.mse_loss(iou_pred.float(), actual, reduction="none").mean(1)
    loss = (per_mask[rows, best] + iou_weight * iou_mse).mean()
    stats = {
        "focal": focal[rows, best].mean().detach(),
        "dice": dice[rows, best].mean().detach(),
        "iou_mse": iou_mse.mean().detach(),
        "iou": actual[rows, best].mean(),
    }
    return loss, stats, best
