"""MaskGenerator: every mask in an image, from a grid of point prompts over the image and its crops.

The same masks as the reference's SamAutomaticMaskGenerator, computed without ever holding full-size
logits: masks are filtered by predicted IoU on the low-res logits, stability scores and binary masks
come from `Upscaler` (exact up to float rounding) and stay as blocks through the vectorised NMS; only
the masks that survive it are turned into full-size masks, encoded to COCO RLE right away.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils
from tqdm import tqdm

from samkit.decoding import EmbeddedImage
from samkit.devices import can_limit_threads, cpu_tuned, limit_this_thread
from samkit.errors import InputError
from samkit.everything.cleanup import clean_mask
from samkit.everything.grids import Crop, crop_boxes, layer_point_grids
from samkit.everything.learned import (
    CELL,
    PeakSettings,
    between_candidates,
    check_head,
    grid_candidates,
    head_extents,
    head_logits,
    load_head,
    parse_peaks,
    point_boxes,
    take_round,
)
from samkit.everything.settings import DEFAULTS
from samkit.image import ImageLike, load_image
from samkit.masks import (
    batched_nms,
    box_iou,
    box_xyxy_to_xywh,
    coco_rle_areas,
    is_box_near_crop_edge,
    mask_to_rle,
    masks_to_boxes,
)
from samkit.masks.upscale import BlockMasks, Upscaler
from samkit.models.prompt_head import PromptHead
from samkit.models.sam import Sam
from samkit.predictor import Predictor
from samkit.transforms import ImagePipeline

OutputMode = Literal["binary_mask", "uncompressed_rle", "coco_rle"]
PromptSource = Literal["grid", "learned"]
_OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# Bytes of full-size masks pasted at once (bounds the temporary memory of encoding).
_MASK_BYTES = 128 << 20
# Low-res logits turned into block masks at once (their block windows take ~0.25 MB per mask).
_BLOCK_CHUNK = 64


@dataclass
class _Group:
    """Full-size masks of one decoded batch, kept as blocks (`BlockMasks`) until they are encoded: most
    candidates fall to NMS, which needs only their boxes. x0, y0: the batch's crop's top-left corner."""

    upscaler: Upscaler
    blocks: BlockMasks
    x0: int
    y0: int


@dataclass
class _Masks:
    """Masks found so far, all in the original-image frame.

    groups: where the masks are (mask i is member[i] of groups[group[i]]); boxes: int64 (N, 4) XYXY
    pixels (inclusive); iou_preds, stability: float32 (N,); points: float64 (N, 2) (x, y) pixels of
    the prompt that made each mask; crop_boxes: int64 (N, 4) XYXY of the crop each mask came from.
    """

    groups: list[_Group]
    group: torch.Tensor
    member: torch.Tensor
    boxes: torch.Tensor
    iou_preds: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor
    crop_boxes: torch.Tensor

    def __len__(self) -> int:
        return len(self.group)

    def select(self, index: torch.Tensor) -> _Masks:
        """The masks at `index` (int64 indices or a bool mask), in that order."""
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        idx = index.cpu()
        return _Masks(
            self.groups,
            self.group[idx],
            self.member[idx],
            self.boxes[idx],
            self.iou_preds[idx],
            self.stability[idx],
            self.points[idx],
            self.crop_boxes[idx],
        )

    @staticmethod
    def cat(parts: Sequence[_Masks]) -> _Masks:
        offsets = np.cumsum([0] + [len(p.groups) for p in parts])
        return _Masks(
            [g for p in parts for g in p.groups],
            torch.cat([p.group + int(o) for p, o in zip(parts, offsets[:-1], strict=True)]),
            torch.cat([p.member for p in parts]),
            torch.cat([p.boxes for p in parts]),
            torch.cat([p.iou_preds for p in parts]),
            torch.cat([p.stability for p in parts]),
            torch.cat([p.points for p in parts]),
            torch.cat([p.crop_boxes for p in parts]),
        )

    @staticmethod
    def empty() -> _Masks:
        return _Masks(
            [],
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, 4, dtype=torch.int64),
            torch.zeros(0),
            torch.zeros(0),
            torch.zeros(0, 2, dtype=torch.float64),
            torch.zeros(0, 4, dtype=torch.int64),
        )

    def compact(self) -> _Masks:
        """The same masks, with the blocks of masks no longer selected dropped from the groups."""
        groups, member = [], torch.empty_like(self.member)
        group = torch.empty_like(self.group)
        for g, old in enumerate(self.groups):
            here = (self.group == g).nonzero().flatten()
            if not len(here):
                continue
            which = self.member[here]
            groups.append(
                _Group(old.upscaler, old.blocks.select(which.to(old.blocks.full.device)), old.x0, old.y0)
            )
            group[here] = len(groups) - 1
            member[here] = torch.arange(len(here))
        return _Masks(
            groups, group, member, self.boxes, self.iou_preds, self.stability, self.points, self.crop_boxes
        )

    def encode(self, image_size: tuple[int, int]) -> list[dict[str, Any]]:
        """The masks as COCO RLEs ({"size": [H, W], "counts": bytes}) of the whole image, in order."""
        h, w = image_size
        rles: list[dict[str, Any]] = [{}] * len(self)
        chunk = max(1, _MASK_BYTES // (2 * h * w))  # dest and paste()'s own frame
        for g, group in enumerate(self.groups):
            here = (self.group == g).nonzero().flatten()
            for i in range(0, len(here), chunk):
                part = here[i : i + chunk]
                which = self.member[part].to(group.blocks.full.device)
                dest = torch.zeros(len(part), w, h, dtype=torch.uint8, device=which.device)
                group.upscaler.paste(group.blocks, which, dest, group.x0, group.y0, colmajor=True)
                # (D, W, H) in C order is (H, W, D) in Fortran order, the layout pycocotools encodes.
                encoded = mask_utils.encode(dest.cpu().numpy().transpose(2, 1, 0))
                for j, rle in zip(part.tolist(), encoded, strict=True):
                    rles[j] = rle
        return rles


class MaskGenerator:
    """Segment everything: prompts a grid of points over the image (and over crops of it) and keeps the
    good, distinct masks.

    model: a `Sam` (from `samkit.load`). points_per_side: grid side n (n * n points over the image);
    None when `point_grids` is given instead (one (P, 2) array of (x, y) in [0, 1] per crop layer).
    points_per_batch: prompts decoded at once. pred_iou_thresh: keep masks whose predicted IoU is above
    it. stability_score_thresh / stability_score_offset: keep masks whose IoU between the masks
    thresholded at +offset and -offset is at least this. box_nms_thresh: box IoU above which the lower
    scored of two masks from one crop is dropped. crop_n_layers: extra layers of crops (layer i has
    (2**i)**2 crops overlapping by crop_overlap_ratio, scaled down per layer), with
    int(points_per_side / crop_n_points_downscale_factor**i) points per side; crop_nms_thresh: box NMS
    between crops, smaller crops preferred. min_mask_region_area: if > 0, holes and islands smaller
    than this many pixels are removed and duplicates re-suppressed. output_mode: "binary_mask" (bool
    (H, W) arrays), "uncompressed_rle" or "coco_rle" (pycocotools, JSON-ready).
    prompts: "grid" (the point grids above) or "learned": the points a `PromptHead` scores highest on each
    crop's embedding (by default 64-136 of the grid's own points instead of all n * n, up to 320 while
    they keep finding new masks, on crowded images up to 64 more between them, then up to 64 of the head's
    own boxes where they agree with the masks found, and up to 40 box prompts from the points' masks; see
    `PeakSettings`). prompt_head: the head for "learned", a `PromptHead` or a
    safetensors path; "" (or None) loads the one shipped with samkit (trained on vit_t embeddings). A head
    file that records another architecture than `model`'s is refused (`check_head`). peaks: how
    the heat map's peaks become prompts (`PeakSettings`, or its fields as "KEY=VALUE,..." text, read by
    `parse_peaks`).
    threads: on a CPU, batches of prompts decoded at once, each in its own Python thread whose torch ops
    run on one thread (the decoder's many small ops keep the cores busier that way than one batch split
    over the cores op by op); None: as many as the calling thread's torch thread count; 1: one batch
    after another in the calling thread. Only those worker threads are set to one torch thread: torch's
    process-wide setting and every other thread's stay as the caller left them.
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = DEFAULTS.points_per_side,
        points_per_batch: int = DEFAULTS.points_per_batch,
        pred_iou_thresh: float = DEFAULTS.pred_iou_thresh,
        stability_score_thresh: float = DEFAULTS.stability_score_thresh,
        stability_score_offset: float = DEFAULTS.stability_score_offset,
        box_nms_thresh: float = DEFAULTS.box_nms_thresh,
        crop_n_layers: int = DEFAULTS.crop_n_layers,
        crop_nms_thresh: float = DEFAULTS.crop_nms_thresh,
        crop_overlap_ratio: float = DEFAULTS.crop_overlap_ratio,
        crop_n_points_downscale_factor: int = DEFAULTS.crop_n_points_downscale_factor,
        point_grids: Sequence[np.ndarray] | None = None,
        min_mask_region_area: int = DEFAULTS.min_mask_region_area,
        output_mode: OutputMode = "binary_mask",
        prompts: PromptSource = DEFAULTS.prompts,
        prompt_head: PromptHead | str | Path | None = DEFAULTS.prompt_head,
        peaks: PeakSettings | str = DEFAULTS.peaks,
        threads: int | None = None,
    ) -> None:
        if prompts not in ("grid", "learned"):
            raise InputError(f"prompts must be grid or learned, got {prompts!r}")
        if (points_per_side is None) == (point_grids is None):
            raise InputError(
                "give exactly one of points_per_side and point_grids (set points_per_side=None "
                "when passing point_grids)"
            )
        if output_mode not in _OUTPUT_MODES:
            raise InputError(f"output_mode must be one of {', '.join(_OUTPUT_MODES)}, got {output_mode!r}")
        if points_per_batch < 1:
            raise InputError(f"points_per_batch must be at least 1, got {points_per_batch}")
        if threads is not None and threads < 1:
            raise InputError(f"threads must be at least 1, got {threads}")
        if crop_n_layers < 0:
            raise InputError(f"crop_n_layers must be 0 or more, got {crop_n_layers}")
        if points_per_side is not None:
            self.point_grids = layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            grids = [np.asarray(g, dtype=np.float64) for g in point_grids or ()]
            if len(grids) < crop_n_layers + 1 or any(g.ndim != 2 or g.shape[1] != 2 for g in grids):
                raise InputError(
                    f"point_grids must hold one (P, 2) array of (x, y) in [0, 1] per crop layer "
                    f"({crop_n_layers + 1} for crop_n_layers={crop_n_layers})"
                )
            self.point_grids = grids
        self.model = model
        self.pipeline = ImagePipeline.of(model)
        self.threads = threads
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.prompts = prompts
        self.peaks = parse_peaks(peaks) if isinstance(peaks, str) else peaks
        self.head: PromptHead | None = None
        if prompts == "learned":
            head = prompt_head if isinstance(prompt_head, PromptHead) else load_head(prompt_head)
            check_head(head, model)
            self.head = head.eval().to(model.device)
        elif prompt_head is not None and prompt_head != "":
            raise InputError(
                "a prompt head is for learned prompts (prompts='learned'); grid prompts use none"
            )

    @torch.inference_mode()
    def generate(
        self, image: ImageLike, embedded: Predictor | None = None, progress: bool = False
    ) -> list[dict[str, Any]]:
        """All masks of `image` ((H, W, 3) uint8 RGB, gray, PIL image or path), one record per mask:

        segmentation (per output_mode, H x W), area (pixels), bbox (XYWH pixels), predicted_iou,
        point_coords ([[x, y]] original-image pixels), stability_score, crop_box (XYWH pixels).
        embedded: a Predictor of the same model on which this image is already set (e.g. a cached
        embedding); the whole-image crop then reuses its embedding instead of encoding the image again.
        progress: show a progress bar over this image's batches of point prompts (the long part of the
        work: 1,024 prompts at the default grid).
        """
        arr = load_image(image)
        if embedded is not None:
            if embedded.model is not self.model:
                raise InputError("embedded must be a Predictor of this generator's model")
            if embedded.original_size != (arr.shape[0], arr.shape[1]):
                raise InputError(
                    f"embedded holds a {embedded.original_size} image, not this {arr.shape[:2]} one"
                )
        crops = crop_boxes((arr.shape[0], arr.shape[1]), self.crop_n_layers, self.crop_overlap_ratio)
        # Learned prompts are only known once each crop is encoded: no total for the bar then.
        batches = (
            sum(-(-len(self.point_grids[c.layer]) // self.points_per_batch) for c in crops)
            if self.head is None
            else None
        )
        with tqdm(
            total=batches,
            desc="prompt batches",
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            disable=not progress,
        ) as bar:
            masks = self._generate_masks(arr, embedded, bar)
        rles = masks.encode((arr.shape[0], arr.shape[1]))
        if self.min_mask_region_area > 0:
            masks, rles = self._remove_small_regions(masks, rles)
        return self._records(masks, rles)

    # --- stages --------------------------------------------------------------------------------------

    def _generate_masks(
        self, image: np.ndarray, embedded: Predictor | None = None, bar: tqdm | None = None
    ) -> _Masks:
        size = (image.shape[0], image.shape[1])
        crops = crop_boxes(size, self.crop_n_layers, self.crop_overlap_ratio)
        masks = _Masks.cat([self._process_crop(image, crop, size, embedded, bar) for crop in crops])
        if len(crops) > 1 and len(masks):
            # Between crops, prefer the mask from the smaller crop.
            cb = masks.crop_boxes.float()
            scores = 1 / ((cb[:, 2] - cb[:, 0]) * (cb[:, 3] - cb[:, 1]))
            keep = batched_nms(masks.boxes.float(), scores, torch.zeros(len(masks)), self.crop_nms_thresh)
            masks = masks.select(keep)
        return masks

    def _process_crop(
        self,
        image: np.ndarray,
        crop: Crop,
        image_size: tuple[int, int],
        embedded: Predictor | None,
        bar: tqdm | None = None,
    ) -> _Masks:
        """Masks of one crop; the whole-image crop uses `embedded`'s embedding when given."""
        x0, y0, x1, y1 = crop.box
        cropped = image[y0:y1, x0:x1]
        crop_size = (cropped.shape[0], cropped.shape[1])
        if embedded is not None and crop.layer == 0:
            embedded_image = embedded.embedded_image
        else:
            embedded_image = EmbeddedImage.encode(self.model, cropped, self.pipeline)
        upscaler = embedded_image.upscaler()

        def one_batch(batch: np.ndarray, candidates: list[tuple[torch.Tensor, ...]] | None = None) -> _Masks:
            """Points (P, 2); or (P, 6): each a source point and a box prompt (model-input frame).
            `candidates`: collects the boxes of the points' masks (see `_process_batch`)."""
            points, boxes = (batch, None) if batch.shape[1] == 2 else (batch[:, :2], batch[:, 2:])
            masks = self._process_batch(
                embedded_image, points, crop, crop_size, image_size, upscaler, boxes, candidates
            )
            if bar is not None:
                bar.update(1)  # tqdm's update is thread-safe
            return masks

        if self.head is None:
            points = self.point_grids[crop.layer] * np.array([[crop_size[1], crop_size[0]]])
            parts = _map_batches(one_batch, self._batches(points), self.model.device, self.threads)
        else:
            parts = self._learned_parts(embedded_image, upscaler, one_batch)
        masks = _Masks.cat(parts) if parts else _Masks.empty()
        keep = batched_nms(masks.boxes.float(), masks.iou_preds, torch.zeros(len(masks)), self.box_nms_thresh)
        masks = masks.select(keep).compact()
        # Boxes were in the crop's frame (the NMS above and the reference's order depend on it).
        masks.boxes = masks.boxes + torch.tensor([x0, y0, x0, y0])
        masks.points = masks.points + torch.tensor([x0, y0], dtype=torch.float64)
        return masks

    def _batches(self, points: np.ndarray, parts: int = 1) -> list[np.ndarray]:
        """`points` cut into batches of at most points_per_batch, and into at least `parts` batches."""
        size = min(self.points_per_batch, -(-len(points) // max(parts, 1)))
        return [points[i : i + size] for i in range(0, len(points), max(size, 1))]

    def _learned_parts(
        self,
        embedded_image: EmbeddedImage,
        upscaler: Upscaler,
        one_batch: Callable[..., _Masks],
    ) -> list[_Masks]:
        """The masks of the prompt head's candidates, decoded best first in rounds (`PeakSettings`): with
        `cover`, a candidate inside the smallest kept mask of a point decoded in an earlier round is skipped;
        on dense images then the refill points (between the grid's points, or not reached, in no kept mask);
        then the head's own box prompts (`_head_box_prompts`), then the box prompts taken from the points'
        masks (`_box_prompts`)."""
        assert self.head is not None
        peaks = self.peaks
        logits = head_logits(self.head, embedded_image.features)
        sizes = (embedded_image.original_size, embedded_image.input_size)
        points, probs = grid_candidates(logits, *sizes, peaks)
        threads = torch.get_num_threads() if self.threads is None else self.threads
        h, w = upscaler.original_size
        in_h, in_w = embedded_image.input_size
        # The margin's unit: a grid step, or (candidates at cells) one embedding cell, in the image's pixels.
        step = np.array([w, h]) / peaks.grid if peaks.grid else CELL * np.array([w / in_w, h / in_h])
        max_area = peaks.cover_max_area * h * w
        # Each point batch adds the boxes of its masks; the box prompts' own masks add none.
        candidates: list[tuple[torch.Tensor, ...]] | None = [] if peaks.boxes > 0 else None
        parts: list[_Masks] = []
        areas: list[
            torch.Tensor
        ] = []  # each part's mask areas (with cover, refill, fill or split), computed once
        seen = torch.zeros(0, 4)  # the boxes of the masks found so far

        def decode(prompts: np.ndarray, box_candidates: bool = False) -> list[_Masks]:
            """The masks of `prompts` (points, or points with boxes); with `box_candidates` their masks'
            boxes are added to the box prompts' candidates."""
            batch = partial(one_batch, candidates=candidates) if box_candidates else one_batch
            return _map_batches(batch, self._batches(prompts, threads), self.model.device, self.threads)

        def decode_rounds(
            points: np.ndarray,
            probs: np.ndarray,
            available: np.ndarray,
            rule: PeakSettings,
            any_mask: bool,
            max_area: float = max_area,
        ) -> np.ndarray:
            """Decode `points` (best first) in rounds as `take_round` says under `rule`, adding their masks
            to `parts`; with `rule.cover`, a candidate inside a kept mask of an earlier round (the smallest
            of each point, or with `any_mask` any) is then skipped. `available` is updated in place. Returns
            the indices of the points decoded."""
            nonlocal seen
            decoded = 0
            taken = [np.zeros(0, dtype=np.int64)]
            hits = np.zeros(len(points), dtype=np.int64)  # how many decoded points' masks hold each candidate
            rounds: list[tuple[int, int]] = []  # (points, new masks) per round, for `take_round`
            while True:
                take = take_round(probs, available, decoded, rule, rounds)
                if not len(take):
                    break
                available[take] = False
                taken.append(take)
                decoded += len(take)
                found = decode(points[take], box_candidates=True)
                parts.extend(found)
                if rule.cover or peaks.refill or peaks.split or peaks.fill:
                    areas.extend(_part_areas(part, upscaler) for part in found)
                if rule.yield_after or peaks.refill:
                    new, seen = _new_boxes([p.boxes for p in found], seen, self.box_nms_thresh)
                    rounds.append((len(take), new))
                if rule.cover and available.any():
                    margin = rule.cover_margin * step
                    limit = _relative_area(areas, rule.cover_rel, max_area)
                    large = rule.cover_hits_max_area * h * w  # a larger mask covers at its first point
                    for part, part_areas in zip(found, areas[-len(found) :], strict=True):
                        hits += _covered(
                            part,
                            part_areas,
                            points,
                            upscaler,
                            limit,
                            margin,
                            any_mask,
                            large_area=large,
                            large_weight=rule.cover_hits,
                            min_iou=rule.cover_min_iou,
                        )
                    available &= hits < rule.cover_hits
            return np.concatenate(taken)

        available = np.ones(len(points), dtype=bool)
        taken = decode_rounds(points, probs, available, peaks, any_mask=False)
        n_points = len(taken)
        decoded = np.zeros(len(points), dtype=bool)  # the grid points decoded (rounds and refill)
        decoded[taken] = True
        if peaks.refill and peaks.grid and len(seen) >= peaks.refill_after:
            more, more_probs = between_candidates(logits, *sizes, peaks.grid)
            # The grid points not decoded, covered ones too: the refill's own rule below says which are
            # free (with `refill_cover_rel` a point skipped inside a clump's mask can come back).
            untried = np.ones(len(points), dtype=bool)
            untried[taken] = False
            refill = np.concatenate([points[untried], more])
            refill_probs = np.concatenate([probs[untried], more_probs])
            # each refill candidate's grid point (-1: a midpoint)
            refill_grid = np.concatenate([np.flatnonzero(untried), np.full(len(more), -1)])
            order = np.argsort(-refill_probs, kind="stable")
            refill, refill_probs, refill_grid = refill[order], refill_probs[order], refill_grid[order]
            refill_area = _relative_area(areas, peaks.refill_cover_rel, max_area)
            free = _in_no_mask(parts, areas, refill, upscaler, refill_area)
            rule = replace(peaks, min_points=0, max_points=peaks.refill, yield_after=peaks.yield_window)
            done = decode_rounds(refill, refill_probs, free, rule, any_mask=True, max_area=refill_area)
            n_points += len(done)
            decoded[refill_grid[done][refill_grid[done] >= 0]] = True
        if peaks.fill and peaks.grid and parts:
            fill = _fill_points(parts, areas, points, probs, decoded, upscaler, peaks)
            decoded[fill] = True
            n_points += len(fill)
            found = decode(points[fill], box_candidates=True)
            parts += found
            areas.extend(_part_areas(part, upscaler) for part in found)  # the split reads them
        if peaks.split and parts:
            extra = _split_points(parts, areas, points, probs, decoded, upscaler, peaks)
            if peaks.split_until:
                extra = extra[: max(0, peaks.split_until - n_points)]
            parts += decode(extra)
        if peaks.head_boxes and self.head.has_boxes:
            parts += decode(self._head_box_prompts(embedded_image, points, probs, parts))
        if candidates:
            parts += decode(self._box_prompts(candidates, parts, embedded_image))
        return parts

    def _head_box_prompts(
        self, embedded_image: EmbeddedImage, points: np.ndarray, probs: np.ndarray, parts: list[_Masks]
    ) -> np.ndarray:
        """(B, 6): the head's own box prompts (`PeakSettings.head_boxes`), each with its point (x, y crop
        pixels) and box (XYXY model-input frame): the boxes the head gives the candidates at or above the
        threshold, those at most `head_box_max_area` of the image and unlike every mask passing the filters
        so far (box IoU under `head_box_match`), box-NMS'd at box_nms_thresh by the points' scores, best
        first; none when under `head_box_trust` of the head's box-NMS'd boxes match a found mask."""
        assert self.head is not None
        peaks = self.peaks
        ok = probs >= peaks.threshold
        if not ok.any():
            return np.zeros((0, 6))
        pts, scores = points[ok], torch.as_tensor(probs[ok], dtype=torch.float32)
        with torch.inference_mode():
            extents = head_extents(self.head, embedded_image.features)
        sizes = (embedded_image.original_size, embedded_image.input_size)
        boxes = torch.as_tensor(point_boxes(extents, pts, *sizes), dtype=torch.float32)
        in_h, in_w = embedded_image.input_size
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = area <= peaks.head_box_max_area * in_h * in_w
        found = _input_frame_boxes(parts, embedded_image)
        new = box_iou(boxes, found).amax(1) < peaks.head_box_match if len(found) else torch.ones_like(keep)
        if peaks.head_box_trust > 0.0:
            # the head's boxes must agree with the masks found: most of them a found mask already has
            distinct = batched_nms(boxes, scores, torch.zeros(len(boxes)), self.box_nms_thresh)
            if float((~new[distinct]).float().mean()) < peaks.head_box_trust:
                return np.zeros((0, 6))
        idx = (keep & new).nonzero().flatten()
        idx = idx[batched_nms(boxes[idx], scores[idx], torch.zeros(len(idx)), self.box_nms_thresh)]
        idx = idx[: peaks.head_boxes].numpy()
        return np.concatenate([pts[idx], boxes[idx].double().numpy()], axis=1).reshape(-1, 6)

    def _box_prompts(
        self, candidates: list[tuple[torch.Tensor, ...]], parts: list[_Masks], embedded_image: EmbeddedImage
    ) -> np.ndarray:
        """(B, 6): the box prompts after the learned points (`PeakSettings.boxes`), each with the point it
        came from (x, y crop pixels) and the box (XYXY model-input frame): the points' mask boxes over
        `box_min_area` of the image that no mask passing the filters has (IoU < `box_match`), box-NMS'd at
        box_nms_thresh by predicted IoU, best first."""
        peaks = self.peaks
        boxes, scores, areas, source = (torch.cat(c) for c in zip(*candidates, strict=True))
        in_h, in_w = embedded_image.input_size
        ok = areas >= peaks.box_min_area * in_h * in_w
        found = _input_frame_boxes(parts, embedded_image)
        if len(found):
            ok &= box_iou(boxes, found).amax(1) < peaks.box_match
        idx = ok.nonzero().flatten()
        idx = idx[batched_nms(boxes[idx], scores[idx], torch.zeros(len(idx)), self.box_nms_thresh)]
        idx = idx[: peaks.boxes]
        return np.concatenate([source[idx].numpy(), boxes[idx].double().numpy()], axis=1).reshape(-1, 6)

    def _process_batch(
        self,
        embedded_image: EmbeddedImage,
        points: np.ndarray,
        crop: Crop,
        crop_size: tuple[int, int],
        image_size: tuple[int, int],
        upscaler: Upscaler,
        boxes: np.ndarray | None = None,
        candidates: list[tuple[torch.Tensor, ...]] | None = None,
    ) -> _Masks:
        """Masks for one batch of points (P, 2) (x, y) in the crop's pixels; boxes in the crop's frame.
        With `boxes` (P, 4) XYXY in the model-input frame, each is decoded as a box prompt (one mask) and its
        point is only reported as where it came from. `candidates`: the boxes of all the points' masks are
        appended to it (`_mask_boxes`)."""
        device = self.model.device
        # Only prompts with a mask above pred_iou_thresh get their masks computed at all, and only over
        # the image: the Upscaler reads no low-res logit of the padding (see `Upscaler`).
        min_iou = self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else None
        if boxes is None:
            coords = torch.as_tensor(self.pipeline.apply_coords(points, crop_size), device=device)
            labels = torch.ones(len(points), 1, dtype=torch.int, device=device)
            iou, rows, rows_low_res = embedded_image.decode(
                coords[:, None, :], labels, multimask_output=True, min_iou=min_iou, image_only=True
            )
        else:
            box_t = torch.as_tensor(boxes, dtype=torch.float32, device=device)
            iou, rows, rows_low_res = embedded_image.decode(
                None, None, box_t, multimask_output=False, min_iou=min_iou, image_only=True
            )
        if candidates is not None and len(rows):
            candidates.append(
                _mask_boxes(
                    rows_low_res,
                    iou[rows],
                    self.model.mask_threshold,
                    points[rows.cpu().numpy()],
                    self.model.image_size,
                )
            )
        n_out = iou.shape[1]
        iou = iou.flatten(0, 1).float()
        pts = torch.as_tensor(points, dtype=torch.float64).repeat_interleave(n_out, 0)

        keep = torch.arange(len(iou), device=device)
        if min_iou is not None:
            keep = keep[iou[keep] > min_iou]
        where = torch.full((len(points),), -1, dtype=torch.int64, device=device)
        where[rows] = torch.arange(len(rows), device=device)
        threshold = self.model.mask_threshold
        offset = self.stability_score_offset
        h, w = image_size
        blocks, boxes, kept, stabilities = [], [], [], []
        for i in range(0, len(keep), _BLOCK_CHUNK):
            part = keep[i : i + _BLOCK_CHUNK]
            low_res = rows_low_res[where[part // n_out], part % n_out].float()
            # Stability counts and masks from one pass over the blocks (the masks of the candidates
            # that fail stability are dropped right away).
            counts, masks = upscaler.count_and_mask(
                low_res, (threshold + offset, threshold - offset), threshold
            )
            # Integer counts divided as the reference does (int32 / int32 -> float32).
            c = counts.to(torch.int32)
            stability = c[:, 0] / c[:, 1]
            stable = torch.arange(len(part), device=device)
            if self.stability_score_thresh > 0.0:
                stable = (stability >= self.stability_score_thresh).nonzero().flatten()
                masks = masks.select(stable)
            b = upscaler.boxes(masks).cpu()
            ok = (~is_box_near_crop_edge(b, crop.box, [0, 0, w, h])).nonzero().flatten()
            if not len(ok):
                continue
            # Kept as blocks (packed): only the masks that survive NMS are ever made full size.
            blocks.append(masks.select(ok.to(device)).packed())
            boxes.append(b[ok])
            chosen = stable.cpu()[ok]
            kept.append(chosen + i)
            stabilities.append(stability.cpu()[chosen])
        sel = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int64)
        idx = keep.cpu()[sel]
        groups = [_Group(upscaler, BlockMasks.cat(blocks), crop.box[0], crop.box[1])] if blocks else []
        return _Masks(
            groups,
            torch.zeros(len(sel), dtype=torch.int64),
            torch.arange(len(sel)),
            torch.cat(boxes) if boxes else torch.zeros(0, 4, dtype=torch.int64),
            iou.cpu()[idx],
            torch.cat(stabilities) if stabilities else torch.zeros(0),
            pts[idx],
            torch.tensor(crop.box, dtype=torch.int64).expand(len(sel), 4),
        )

    def _remove_small_regions(
        self, masks: _Masks, rles: list[dict[str, Any]]
    ) -> tuple[_Masks, list[dict[str, Any]]]:
        """Fill small holes and drop small islands, then suppress duplicates again, preferring masks
        that needed no change."""
        if not len(masks):
            return masks, rles
        area = self.min_mask_region_area
        new_boxes, unchanged, new_rles = [], [], {}
        for i, rle in enumerate(rles):
            mask = mask_utils.decode(rle).astype(bool)
            cleaned, changed = clean_mask(mask, area)
            new_boxes.append(masks_to_boxes(torch.from_numpy(np.ascontiguousarray(cleaned))[None])[0])
            unchanged.append(not changed)
            if changed:
                new_rles[i] = mask_utils.encode(np.asfortranarray(cleaned, dtype=np.uint8))
        boxes = torch.stack(new_boxes)
        scores = torch.tensor(unchanged, dtype=torch.float32)
        nms_thresh = max(self.box_nms_thresh, self.crop_nms_thresh)
        keep = batched_nms(boxes.float(), scores, torch.zeros(len(boxes)), nms_thresh)
        for i in keep.tolist():
            if i in new_rles:
                masks.boxes[i] = boxes[i]
        return masks.select(keep), [new_rles.get(i, rles[i]) for i in keep.tolist()]

    def _records(self, masks: _Masks, rles: list[dict[str, Any]]) -> list[dict[str, Any]]:
        areas = coco_rle_areas(rles).tolist()
        bboxes = box_xyxy_to_xywh(masks.boxes).tolist()
        crops = box_xyxy_to_xywh(masks.crop_boxes).tolist()
        records = []
        for i, rle in enumerate(rles):
            records.append(
                {
                    "segmentation": self._segmentation(rle),
                    "area": int(areas[i]),
                    "bbox": bboxes[i],
                    "predicted_iou": masks.iou_preds[i].item(),
                    "point_coords": [masks.points[i].tolist()],
                    "stability_score": masks.stability[i].item(),
                    "crop_box": crops[i],
                }
            )
        return records

    def _segmentation(self, rle: dict[str, Any]) -> Any:
        if self.output_mode == "coco_rle":
            return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("utf-8")}
        mask = np.ascontiguousarray(mask_utils.decode(rle), dtype=bool)
        if self.output_mode == "binary_mask":
            return mask
        return mask_to_rle(mask[None])[0]


def _input_frame_boxes(parts: list[_Masks], embedded_image: EmbeddedImage) -> torch.Tensor:
    """(N, 4) float32 XYXY boxes of the masks in `parts` (crop pixels), in the model-input frame."""
    if not parts:
        return torch.zeros(0, 4)
    (in_h, in_w), (h, w) = embedded_image.input_size, embedded_image.original_size
    return torch.cat([p.boxes for p in parts]).float() * torch.tensor([in_w / w, in_h / h] * 2)


def _mask_boxes(
    low_res: torch.Tensor, iou: torch.Tensor, threshold: float, points: np.ndarray, image_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The boxes of K prompts' C masks each: `low_res` (K, C, h, w) logits (the padding far below
    `threshold`), `iou` (K, C) their predicted IoU, `points` (K, 2) the prompts (x, y crop pixels). Returns
    float32 (K * C, 4) XYXY boxes in the model-input frame (`image_size` square; 0 for an empty mask),
    (K * C,) predicted IoU, (K * C,) areas in input pixels, float64 (K * C, 2) source points."""
    masks = (low_res > threshold).flatten(0, 1).cpu()
    scale = image_size / low_res.shape[-1]
    area = masks.flatten(1).sum(1).float() * scale * scale
    box = masks_to_boxes(masks).float()
    box[:, 2:] += 1  # inclusive last pixel -> exclusive edge
    box *= (area > 0)[:, None]
    n_out = low_res.shape[1]
    source = torch.from_numpy(np.repeat(np.asarray(points, dtype=np.float64), n_out, axis=0))
    return box * scale, iou.flatten().float().cpu(), area, source


def _new_boxes(boxes: list[torch.Tensor], seen: torch.Tensor, threshold: float) -> tuple[int, torch.Tensor]:
    """How many of `boxes` (XYXY, in order) have box IoU under `threshold` with every box of `seen` and
    every new box before them, and `seen` with those new boxes added."""
    before = len(seen)
    for box in torch.cat(boxes).float() if boxes else ():
        if not len(seen) or float(box_iou(box[None], seen).max()) < threshold:
            seen = torch.cat([seen, box[None]])
    return len(seen) - before, seen


def _part_blocks(part: _Masks) -> BlockMasks:
    """The masks of `part` (one decoded batch: one group, members in order)."""
    (group,) = part.groups
    return group.blocks.select(part.member.to(group.blocks.full.device))


def _part_areas(part: _Masks, upscaler: Upscaler) -> torch.Tensor:
    """(N,) the pixel areas of `part`'s masks in `upscaler`'s frame, on the CPU."""
    if not len(part):
        return torch.zeros(0, dtype=torch.int64)
    return upscaler.areas(_part_blocks(part)).cpu()


def _relative_area(areas: list[torch.Tensor], rel: float, max_area: float) -> float:
    """`max_area`, or with `rel` > 0 at most `rel` times the median of `areas` (the masks kept so far)."""
    if rel <= 0 or not sum(len(a) for a in areas):
        return max_area
    return min(max_area, rel * float(torch.cat(areas).float().median()))


def _covered(
    part: _Masks,
    areas: torch.Tensor,
    points: np.ndarray,
    upscaler: Upscaler,
    max_area: float,
    margin: np.ndarray,
    any_mask: bool = False,
    large_area: float = float("inf"),
    large_weight: int = 1,
    min_iou: float = 0.0,
) -> np.ndarray:
    """int64 (K,): for each of `points` (K, 2) (x, y), in how many masks of `part` (one decoded batch, masks
    in `upscaler`'s frame; `areas` their `_part_areas`) it lies: the smallest mask each source point kept
    (`any_mask`: every mask of `part`), where that mask has at most `max_area` pixels, and with the points
    `margin` (x, y) pixels left, right, above and below it inside too. A mask over `large_area` pixels
    counts `large_weight` times; a mask whose predicted IoU is under `min_iou` counts not at all (`min_iou`
    0: every mask counts, whatever its score)."""
    if not len(part) or not len(points):
        return np.zeros(len(points), dtype=np.int64)
    blocks = _part_blocks(part)
    # every mask, or only the smallest of each point
    which = torch.arange(len(areas)) if any_mask else _smallest_per_point(part, areas)
    ok = areas[which] <= max_area
    if min_iou > 0.0:  # 0: any mask, whatever its score (a model's predicted IoU can be negative)
        ok &= part.iou_preds[which] >= min_iou
    which = which[ok]
    if not len(which):
        return np.zeros(len(points), dtype=np.int64)
    # Each point and, with a margin, the four points around it: one lookup, all of them must be inside.
    shifts = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)] if np.any(margin > 0) else [(0, 0)]
    probes = np.concatenate([points + np.array(d) * margin for d in shifts])
    inside = upscaler.contains(blocks.select(which.to(blocks.full.device)), torch.from_numpy(probes))
    inside = inside.view(len(which), len(shifts), len(points)).all(1).cpu()
    weight = torch.where(areas[which] > large_area, large_weight, 1).to(torch.int64)
    return (inside.to(torch.int64) * weight[:, None]).sum(0).numpy()


def _in_no_mask(
    parts: list[_Masks], areas: list[torch.Tensor], points: np.ndarray, upscaler: Upscaler, max_area: float
) -> np.ndarray:
    """bool (K,): which of `points` (K, 2) (x, y) lie in no mask of `parts` (`areas`: each part's
    `_part_areas`) of at most `max_area` pixels, whatever its score."""
    free = np.ones(len(points), dtype=bool)
    for part, part_areas in zip(parts, areas, strict=True):
        free &= _covered(part, part_areas, points, upscaler, max_area, np.zeros(2), any_mask=True) == 0
    return free


def _smallest_per_point(part: _Masks, areas: torch.Tensor) -> torch.Tensor:
    """int64 (P,): for each source point of `part` (its masks' `points`), the index of its smallest mask
    (`areas`: the masks' areas; of equal ones, the last)."""
    _, source = torch.unique(part.points, dim=0, return_inverse=True)
    which = torch.full((int(source.max()) + 1,), -1, dtype=torch.int64)
    for i in torch.argsort(areas, descending=True, stable=True).tolist():  # the smallest is written last
        which[source[i]] = i
    return which


def _fill_points(
    parts: list[_Masks],
    areas: list[torch.Tensor],
    points: np.ndarray,
    probs: np.ndarray,
    decoded: np.ndarray,
    upscaler: Upscaler,
    peaks: PeakSettings,
) -> np.ndarray:
    """(F,) int64 indices into `points` of the fill points (`PeakSettings.fill`): in each of fill_grid x fill_grid parts of the image where
    at least `fill_share` of the grid points lie in no kept mask of `parts`, the best-scored such point not
    `decoded`; best first, at most `fill`."""
    h, w = upscaler.original_size
    free = _in_no_mask(parts, areas, points, upscaler, float("inf"))
    n = peaks.fill_grid
    cx = np.minimum((points[:, 0] * n / w).astype(np.int64), n - 1)
    cy = np.minimum((points[:, 1] * n / h).astype(np.int64), n - 1)
    cell = cy * n + cx
    chosen = []
    for c in range(n * n):
        here = cell == c
        if not here.any() or free[here].mean() < peaks.fill_share:
            continue
        options = np.flatnonzero(here & free & ~decoded)
        if len(options):
            chosen.append(int(options[np.argmax(probs[options])]))
    chosen.sort(key=lambda i: -probs[i])
    return np.array(chosen[: peaks.fill], dtype=np.int64)


def _split_points(
    parts: list[_Masks],
    areas: list[torch.Tensor],
    points: np.ndarray,
    probs: np.ndarray,
    decoded: np.ndarray,
    upscaler: Upscaler,
    peaks: PeakSettings,
) -> np.ndarray:
    """(S, 2) the split points (`PeakSettings.split`): for each source point's smallest kept mask in `parts`
    (`areas`: each part's `_part_areas`) of at most `split_max_area` of the image, the candidate of `points`
    not `decoded` inside it farthest from the source point, if at least `split_min_dist` * sqrt(area) away;
    best `probs` first, each once."""
    h, w = upscaler.original_size
    chosen: dict[int, float] = {}
    free = np.flatnonzero(~decoded)
    if not len(free):
        return np.zeros((0, 2))
    for part, part_areas in zip(parts, areas, strict=True):
        if not len(part):
            continue
        which = _smallest_per_point(part, part_areas)
        which = which[part_areas[which] <= peaks.split_max_area * h * w]
        if not len(which):
            continue
        blocks = _part_blocks(part)
        inside = upscaler.contains(
            blocks.select(which.to(blocks.full.device)), torch.from_numpy(points[free])
        )
        inside = inside.cpu().numpy()
        for row, i in enumerate(which.tolist()):
            hold = np.flatnonzero(inside[row])
            if not len(hold):
                continue
            dist = np.hypot(*(points[free[hold]] - part.points[i].numpy()).T)
            far = int(np.argmax(dist))
            if dist[far] >= peaks.split_min_dist * float(part_areas[i]) ** 0.5:
                k = int(free[hold[far]])
                chosen[k] = float(probs[k])
    order = sorted(chosen, key=lambda k: -chosen[k])[: peaks.split]
    return points[order].reshape(-1, 2)


def _map_batches(
    fn: Callable[[Any], _Masks], batches: Sequence[Any], device: torch.device, threads: int | None
) -> list[_Masks]:
    """`fn` over the batches, in order: on a CPU `threads` at once (None: the calling thread's torch
    thread count) in Python threads of one torch thread each (see `MaskGenerator`), else one after another
    in the calling thread, also where a thread's torch thread count cannot be set on its own."""

    def run(batch: Any) -> _Masks:
        with torch.inference_mode():  # grad mode is per thread
            return fn(batch)

    n = torch.get_num_threads() if threads is None else threads
    if not cpu_tuned(device) or n < 2 or len(batches) < 2 or not can_limit_threads():
        return [run(b) for b in batches]
    with ThreadPoolExecutor(min(n, len(batches)), initializer=limit_this_thread, initargs=(1,)) as pool:
        return list(pool.map(run, batches))
