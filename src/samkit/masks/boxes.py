"""Boxes around masks and box tests used when filtering masks. Boxes are XYXY pixel coordinates."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes around masks, with inclusive pixel coordinates.

    masks: bool (..., H, W). Returns int64 (..., 4) as (x0, y0, x1, y1) where x1/y1 is the last pixel
    column/row of the mask (so a one-pixel mask has x0 == x1); an empty mask gives [0, 0, 0, 0].
    """
    lead = masks.shape[:-2]
    if masks.numel() == 0:
        return torch.zeros(*lead, 4, dtype=torch.int64, device=masks.device)
    h, w = masks.shape[-2:]
    rows, cols = _occupied_rows_cols(masks)
    # argmax returns the first maximal index, so on 0/1 rows it finds the first True.
    y0 = rows.argmax(dim=-1)
    x0 = cols.argmax(dim=-1)
    y1 = (h - 1) - rows.flip(-1).argmax(dim=-1)
    x1 = (w - 1) - cols.flip(-1).argmax(dim=-1)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    nonempty = rows.amax(dim=-1).bool()
    return boxes * nonempty.unsqueeze(-1)


def _occupied_rows_cols(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (..., H) and (..., W): whether each row / column of each mask has a True pixel."""
    if masks.device.type == "cpu":
        # numpy's any() is ~10x faster than torch's on CPU; the two share memory, so nothing is copied.
        arr = masks.detach().bool().numpy()
        return torch.from_numpy(arr.any(axis=-1)).to(torch.uint8), torch.from_numpy(arr.any(axis=-2)).to(
            torch.uint8
        )
    as_u8 = masks.bool().view(torch.uint8)
    return as_u8.amax(dim=-1), as_u8.amax(dim=-2)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) IoU of XYXY boxes `a` (N, 4) and `b` (M, 4), areas (x1 - x0) * (y1 - y0); 0 where both are
    empty."""
    a, b = a.float(), b.float()
    w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(
        min=0
    )
    h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(
        min=0
    )
    inter = w * h
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def box_xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """XYXY (..., 4) -> XYWH (..., 4) with w = x1 - x0, h = y1 - y0 (a new tensor; the input is unchanged)."""
    xy = boxes[..., :2]
    return torch.cat([xy, boxes[..., 2:] - xy], dim=-1)


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """Which boxes touch an edge of their crop that is not also an edge of the image.

    boxes: (N, 4) XYXY in the crop's frame; crop_box and orig_box: XYXY in original-image pixels
    (orig_box is normally [0, 0, W, H]). A side counts as touching when it is within `atol` pixels.
    Returns bool (N,).
    """
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float32, device=boxes.device)
    shift = torch.as_tensor(
        [crop_box[0], crop_box[1], crop_box[0], crop_box[1]], dtype=boxes.dtype, device=boxes.device
    )
    boxes = (boxes + shift).float()
    near_crop = torch.isclose(boxes, crop, atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig, atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=-1)
