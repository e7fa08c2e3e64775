"""Greedy non-maximum suppression over XYXY boxes, grouped by category."""

from __future__ import annotations

import torch

from samkit.masks.boxes import box_iou

# Rows of the IoU matrix computed at once: bounds the temporary memory to about 4M floats per tensor.
_CHUNK_ELEMENTS = 1 << 22


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Greedy NMS done independently per category; the same keep-set as `torchvision.ops.batched_nms`.

    boxes: (N, 4) XYXY float; scores: (N,); idxs: (N,) int category of each box; a box is dropped when its
    IoU with a higher-scoring kept box of the same category is > `iou_threshold`. Returns int64 indices
    into the inputs of the kept boxes, sorted by score, highest first.
    """
    n = boxes.shape[0]
    device = boxes.device
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if not boxes.is_floating_point():
        boxes = boxes.float()
    # Like torchvision, move each category to its own region of the plane so categories never overlap;
    # doing it the same way keeps the float rounding, and so the keep-set, identical.
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    boxes = (boxes + offsets[:, None]).float()

    # The same (unstable) sort torchvision uses, so equal scores are ordered, and thus resolved, alike.
    order = torch.argsort(scores, descending=True)
    boxes = boxes[order]
    src, dst = _overlap_edges(boxes, iou_threshold)

    # keep[j] is true iff no kept box before j (in score order) overlaps it. Iterating that rule from
    # all-true fixes at least one more position of the score order per round, so it reaches the greedy
    # answer; rounds are few in practice because suppression chains are short, and each costs O(edges).
    keep = torch.ones(n, dtype=torch.bool, device=device)
    while True:
        suppressed = torch.zeros(n, dtype=torch.bool, device=device)
        suppressed[dst[keep[src]]] = True
        new_keep = ~suppressed
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return order[keep]


def _overlap_edges(boxes: torch.Tensor, iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (i, j), i < j, of rows of `boxes` (N, 4) whose IoU is > `iou_threshold`.

    Only the upper triangle is computed, in row chunks, so memory stays O(chunk * N).
    """
    n = boxes.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // n)
    srcs, dsts = [], []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        iou = box_iou(boxes[start:stop], boxes[start:])
        # Column c of this block is box start + c; keep only pairs strictly above the diagonal.
        over = (iou > iou_threshold).triu_(diagonal=1)
        i, j = over.nonzero(as_tuple=True)
        srcs.append(i + start)
        dsts.append(j + start)
    return torch.cat(srcs), torch.cat(dsts)
