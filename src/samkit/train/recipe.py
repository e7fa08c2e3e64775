"""The SAM paper's interactive recipe as a loss: a first point or box, then rounds of error-region clicks
with the previous mask fed back, each round's focal + dice + IoU loss backpropagated as soon as it is known."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from samkit.models.sam import Sam
from samkit.train.config import RecipeConfig
from samkit.train.data import Batch
from samkit.train.losses import sam_loss
from samkit.train.prompts import error_points, first_points, jittered_boxes, round_plan
from samkit.train.setup import Precision
from samkit.transforms import ImagePipeline


class InteractiveLoss:
    """The recipe's loss on a model's prompt encoder and mask decoder, given the batch's image embeddings."""

    def __init__(
        self, model: Sam, pipeline: ImagePipeline, recipe: RecipeConfig, precision: Precision
    ) -> None:
        self.model = model
        self.pipeline = pipeline
        self.recipe = recipe
        self.precision = precision

    def backward(
        self, emb: torch.Tensor, batch: Batch, rng: np.random.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch, backpropagated (into .grad) round by round; returns it detached.

        emb: (B, 256, g, g) embeddings of the batch's images. Rounds share only the image embedding (each
        round's mask_input is detached), so each round's graph is freed as soon as its loss is known:
        memory holds one round, not 11 (the default decoder config needed ~19 GB on CPU otherwise). An
        encoder that trains gets its gradient once, at the end, from the gradient accumulated on a
        detached copy of the embedding."""
        leaf = emb.detach().requires_grad_(emb.requires_grad)
        totals: dict[str, float] = {}
        loss = torch.zeros((), device=emb.device)
        n_masks = sum(len(m) for _, _, m in batch)
        for b, (_, _, masks) in enumerate(batch):
            is_point = rng.random(len(masks)) < self.recipe.point_prob
            for point_first, group in ((True, is_point), (False, ~is_point)):
                if not group.any():
                    continue
                share = int(group.sum()) / n_masks
                g_loss, g_stats = self.rounds(leaf[b : b + 1], masks[group], point_first, rng, share)
                loss = loss + g_loss * share
                for k, v in g_stats.items():
                    totals[k] = totals.get(k, 0.0) + v * share
        if leaf.grad is not None:
            emb.backward(leaf.grad)
        return loss, totals

    def rounds(
        self,
        emb: torch.Tensor,
        masks_np: np.ndarray,
        point_first: bool,
        rng: np.random.Generator,
        weight: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The simulated interactive session for M masks of one image; loss averaged over rounds, each
        round's share (x `weight`) backpropagated at once. Returns the loss detached.

        emb: (1, 256, g, g); masks_np: (M, h, w) bool in the input frame.
        """
        recipe, device = self.recipe, emb.device
        pe, dec = self.model.prompt_encoder, self.model.mask_decoder
        masks = torch.from_numpy(masks_np).to(device).float()
        gt = self.pipeline.pad_torch(masks)[:, None]  # (M, 1, S, S)
        low_size = pe.mask_input_size
        gt_low = (F.interpolate(gt, size=low_size, mode="area") > 0.5).float()
        target = gt_low if recipe.loss_resolution == "low" else gt
        stride = self.model.image_size / low_size[0]
        if point_first:
            coords = torch.from_numpy(first_points(masks_np, rng)).to(device)
            labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=device)
            box = None
        else:
            box_np = jittered_boxes(masks_np, rng, recipe.box_noise, recipe.box_noise_max)
            box = torch.from_numpy(box_np).to(device)
            coords = torch.zeros((len(masks_np), 0, 2), device=device)
            labels = torch.zeros((len(masks_np), 0), dtype=torch.int64, device=device)
        mask_input = prev = None
        total = torch.zeros((), device=device)
        stats: dict[str, float] = {}
        plan = round_plan(recipe.rounds, rng)
        dense_pe = pe.get_dense_pe()
        for r, new_point in enumerate(plan):
            if new_point and prev is not None:
                c, lab = error_points(prev > 0, gt_low[:, 0] > 0.5, stride, rng)
                coords = torch.cat([coords, torch.from_numpy(c).to(device)], 1)
                labels = torch.cat([labels, torch.from_numpy(lab).to(device)], 1)
            points = (coords, labels) if coords.shape[1] else None
            multimask = coords.shape[1] == 1 and box is None and mask_input is None
            with self.precision.autocast():
                sparse, dense = pe(points, box, mask_input)
                logits, iou_pred = dec(emb, dense_pe, sparse, dense, multimask)
            full = (
                logits
                if target is gt_low
                else F.interpolate(logits.float(), size=gt.shape[-2:], mode="bilinear")
            )
            loss, st, best = sam_loss(
                full, iou_pred, target, recipe.focal_weight, recipe.dice_weight, recipe.iou_weight
            )
            self.precision.scaler.scale(loss * (weight / len(plan))).backward()
            total = total + loss.detach() / len(plan)
            prev = logits[torch.arange(len(best)), best].detach().float()  # (M, h, w) low-res logits
            mask_input = prev[:, None]
            if r == 0:
                stats["iou_first"] = float(st["iou"])
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + float(v) / len(plan)
        stats["iou_last"] = float(st["iou"])
        return total, stats
