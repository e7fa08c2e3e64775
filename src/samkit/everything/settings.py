"""MaskGenerator's tunable settings and their defaults, in one place (torch-free, so the CLI can show them
in `--help` without importing the model code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class GeneratorSettings:
    """The defaults of `MaskGenerator` (those of SAM's automatic mask generator); `samkit everything`
    makes one flag per field. The fields are explained in `MaskGenerator`'s docstring."""

    points_per_side: int | None = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    prompts: Literal["grid", "learned"] = "grid"
    # learned prompts: a head file trained for the model ("": the one shipped for vit_t)
    prompt_head: str = ""
    # learned prompts: PeakSettings fields as "KEY=VALUE,KEY=VALUE" ("": the defaults)
    peaks: str = ""


DEFAULTS = GeneratorSettings()
