"""Mask operations on tensors: stability, boxes, NMS, RLE (via pycocotools) and small-region cleanup."""

from samkit.masks.boxes import box_iou, box_xyxy_to_xywh, is_box_near_crop_edge, masks_to_boxes
from samkit.masks.nms import batched_nms
from samkit.masks.regions import remove_small_regions
from samkit.masks.rle import (
    coco_encode_rle,
    coco_rle_areas,
    mask_to_rle,
    masks_to_coco_rle,
    rle_area,
    rle_to_mask,
    to_coco_rle,
)
from samkit.masks.scores import mask_iou, stability_score

__all__ = [
    "batched_nms",
    "box_iou",
    "box_xyxy_to_xywh",
    "coco_encode_rle",
    "coco_rle_areas",
    "is_box_near_crop_edge",
    "mask_iou",
    "mask_to_rle",
    "masks_to_boxes",
    "masks_to_coco_rle",
    "remove_small_regions",
    "rle_area",
    "rle_to_mask",
    "stability_score",
    "to_coco_rle",
]
