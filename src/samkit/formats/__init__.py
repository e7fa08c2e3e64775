"""Readers and writers: SA-1B JSON, COCO instances, PNG masks and label maps, overlays, atomic writes."""

from samkit.formats._atomic import atomic_write_bytes, atomic_write_json, staged_files
from samkit.formats.coco import coco_dict, read_coco, write_coco
from samkit.formats.overlay import overlay, palette, save_overlay
from samkit.formats.png import (
    label_map,
    label_map_to_masks,
    read_label_map,
    read_mask_png,
    write_label_map,
    write_mask_pngs,
)
from samkit.formats.sa1b import read_sa1b, sa1b_dict, sa1b_masks, write_sa1b

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "coco_dict",
    "label_map",
    "label_map_to_masks",
    "overlay",
    "palette",
    "read_coco",
    "read_label_map",
    "read_mask_png",
    "read_sa1b",
    "sa1b_dict",
    "sa1b_masks",
    "save_overlay",
    "staged_files",
    "write_coco",
    "write_label_map",
    "write_mask_pngs",
    "write_sa1b",
]
