"""Learned prompts for segment-everything: peak picking and its frames, the generator's learned mode on a
tiny random model, the shipped head, the teacher's targets and the CLI flag."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import samkit
from samkit.errors import InputError
from samkit.everything.learned import (
    HEAD_FILE,
    PeakSettings,
    between_candidates,
    box_extent_targets,
    cells_to_points,
    grid_candidates,
    head_metadata,
    learned_candidates,
    learned_points,
    load_head,
    parse_peaks,
    pick_grid_points,
    pick_peaks,
    point_boxes,
    points_to_cells,
    recent_yield,
    save_head,
    take_round,
)
from samkit.models.build import SamConfig, build_sam
from samkit.models.prompt_head import PromptHead

pytestmark = pytest.mark.usefixtures("one_thread")


def _unfiltered(model, head: PromptHead, image: np.ndarray) -> Callable[[PeakSettings], list]:
    """`generate(image)` with learned prompts from `head` under the PeakSettings given, every decoded mask
    kept (no predicted-IoU or stability filter, no NMS), as binary masks."""
    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, output_mode="binary_mask")
    return lambda peaks: samkit.MaskGenerator(
        model, prompts="learned", prompt_head=head, peaks=peaks, **kw
    ).generate(image)


def _logits(peaks: dict[tuple[int, int], float], side: int = 64) -> torch.Tensor:
    """(side, side) logits: -10 everywhere, and the given probability at each (col, row)."""
    out = torch.full((side, side), -10.0)
    for (col, row), p in peaks.items():
        out[row, col] = float(np.log(p / (1 - p)))
    return out


def test_peaks_map_to_cell_centres_in_original_pixels():
    # A 480 x 640 photo is resized to 768 x 1024: 1.6 model pixels per image pixel, 48 rows of cells.
    original, inp = (480, 640), (768, 1024)
    logits = _logits({(10, 5): 0.9, (63, 47): 0.8, (3, 50): 0.99})  # row 50 lies in the padding
    cells = pick_peaks(logits, inp, PeakSettings(threshold=0.5, min_points=1))
    assert cells.tolist() == [[10, 5], [63, 47]]  # best first, the padding cell never picked
    pts = cells_to_points(cells, original, inp)
    np.testing.assert_allclose(pts[0], [10.5 * 16 / 1.6, 5.5 * 16 / 1.6])  # (105, 55)
    np.testing.assert_allclose(pts[1], [635.0, 475.0])  # the last cell on the image
    # and back: each point falls in the cell it came from
    np.testing.assert_array_equal(np.floor(points_to_cells(pts[:1], original, inp)), [[10, 5]])


def test_peak_count_adapts_between_min_and_max():
    logits = _logits({(2 * i, 2 * j): 0.5 + 0.004 * (i + 10 * j) for i in range(10) for j in range(10)})
    inp = (1024, 1024)
    assert len(pick_peaks(logits, inp, PeakSettings(threshold=0.7, min_points=1, max_points=500))) == 50
    assert len(pick_peaks(logits, inp, PeakSettings(threshold=0.99, min_points=7, max_points=500))) == 7
    assert len(pick_peaks(logits, inp, PeakSettings(threshold=0.1, min_points=1, max_points=30))) == 30


def test_neighbouring_cells_are_one_peak():
    logits = _logits({(20, 20): 0.9, (21, 20): 0.8, (23, 20): 0.7})
    cells = pick_peaks(logits, (1024, 1024), PeakSettings(threshold=0.5, min_points=1, nms_radius=1))
    assert cells.tolist() == [[20, 20], [23, 20]]


def test_grid_candidates_are_the_grid_modes_points_scored_by_their_cells():
    from samkit.everything.grids import point_grid

    # 480 x 640 photo -> 768 x 1024 model input: the 32 x 32 grid's point (i, j) (column, row) is at model
    # pixel ((i + 0.5) * 32, (j + 0.5) * 24), in cell (2i + 1, floor(1.5 j + 0.75)).
    original, inp = (480, 640), (768, 1024)
    logits = _logits({(7, 8): 0.9, (9, 8): 0.8, (41, 11): 0.7})  # points (3, 5), (4, 5), (20, 7)
    settings = PeakSettings(threshold=0.5, min_points=1, nms_radius=0, grid=32)
    pts = pick_grid_points(logits, original, inp, settings)
    grid = point_grid(32) * [640, 480]
    np.testing.assert_allclose(pts, grid[[5 * 32 + 3, 5 * 32 + 4, 7 * 32 + 20]])  # best first
    # nms_radius counts grid steps: the runner-up next to the best point is suppressed
    one = pick_grid_points(logits, original, inp, dataclasses.replace(settings, nms_radius=1))
    np.testing.assert_allclose(one, grid[[5 * 32 + 3, 7 * 32 + 20]])
    # the generator's entry point takes the same path when settings.grid is set
    head = PromptHead()
    emb = torch.randn(1, 256, 64, 64)
    with torch.no_grad():
        expected = pick_grid_points(head(emb)[0, 0], original, inp, settings)
    np.testing.assert_allclose(learned_points(head, emb, original, inp, settings), expected)


def test_between_candidates_are_the_grids_midpoints_scored_by_their_cells():
    # 480 x 640 -> 768 x 1024: the midpoint right of and below the 32 x 32 grid's point (i, j) is at model
    # pixel ((i + 1) * 32, (j + 1) * 24), in cell (2i + 2, floor(1.5 (j + 1))).
    original, inp = (480, 640), (768, 1024)
    logits = _logits({(8, 7): 0.9, (2, 1): 0.8})  # midpoints (3, 4) and (0, 0)
    pts, probs = between_candidates(logits, original, inp, 32)
    assert pts.shape == (31 * 31, 2) and np.all(np.diff(probs) <= 0)  # best first
    np.testing.assert_allclose(pts[:2], [[4 * 20, 5 * 15], [20, 15]])  # image pixels: 20 x 15 per step
    np.testing.assert_allclose(probs[:2], [0.9, 0.8], rtol=1e-5)
    assert probs[2] < 1e-3
    # no midpoint is one of the grid's own points
    grid, _ = grid_candidates(logits, original, inp, PeakSettings(grid=32))
    assert not {tuple(p) for p in pts.tolist()} & {tuple(p) for p in grid.tolist()}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = SamConfig("vit", embed_dim=32, depth=1, num_heads=1, global_attn_indexes=(0,), image_size=256)
    return build_sam(cfg)


def test_learned_mode_decodes_the_heads_peaks_through_the_same_filters(tiny_model, photo):
    torch.manual_seed(1)
    head = PromptHead()
    peaks = PeakSettings(threshold=1.0, min_points=6, max_points=6, cover=False, boxes=0)
    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.9, output_mode="coco_rle")
    learned = samkit.MaskGenerator(tiny_model, prompts="learned", prompt_head=head, peaks=peaks, **kw)
    records = learned.generate(photo)

    pred = samkit.Predictor(tiny_model)
    pred.set_image(photo)
    points = learned_points(head, pred.embedding, pred.original_size, pred.input_size, peaks)
    assert points.shape == (6, 2)
    h, w = photo.shape[:2]
    # The same points as a fixed "grid" go through the grid path: the same masks must come out.
    grid = samkit.MaskGenerator(tiny_model, points_per_side=None, point_grids=[points / [w, h]], **kw)
    expected = grid.generate(photo)
    assert 0 < len(records) <= 18
    assert [r["segmentation"] for r in records] == [r["segmentation"] for r in expected]
    for r in records:
        ((x, y),) = r["point_coords"]
        assert np.abs(points - [x, y]).sum(1).min() < 1e-6


def test_rounds_take_the_best_available_candidates_within_the_budget():
    probs = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1, 0.05, 0.01])
    everything = np.ones(8, dtype=bool)
    s = PeakSettings(threshold=0.25, min_points=0, max_points=100, round_points=16)
    np.testing.assert_array_equal(take_round(probs, everything, 0, s), [0, 1, 2, 3])  # those above 0.25
    # Skipped (covered or decoded) candidates make room for the next ones, still best first.
    available = everything.copy()
    available[[0, 2]] = False
    np.testing.assert_array_equal(take_round(probs, available, 2, s), [1, 3])
    # min_points: the best ones even below the threshold, until that many were decoded in all.
    s = dataclasses.replace(s, min_points=6)
    np.testing.assert_array_equal(take_round(probs, everything, 0, s), [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(take_round(probs, available, 4, s), [1, 3])
    # round_points per round, max_points in all.
    s = dataclasses.replace(s, round_points=3, max_points=5)
    np.testing.assert_array_equal(take_round(probs, everything, 0, s), [0, 1, 2])
    np.testing.assert_array_equal(take_round(probs, available, 4, s), [1])
    assert len(take_round(probs, available, 5, s)) == 0
    assert len(take_round(probs, np.zeros(8, dtype=bool), 0, s)) == 0


def test_rounds_stop_when_the_last_points_found_few_new_masks():
    rounds = [(4, 3), (4, 0), (4, 1), (2, 2)]  # (points, new masks) per round
    assert recent_yield(rounds, 4) == pytest.approx(3 / 6)  # the last two rounds: 6 points, 3 new masks
    assert recent_yield(rounds, 100) == pytest.approx(6 / 14)  # all of them
    assert recent_yield([], 8) == 0.0
    probs = np.linspace(0.9, 0.5, 40)
    everything = np.ones(40, dtype=bool)
    s = PeakSettings(
        threshold=0.1,
        min_points=0,
        max_points=30,
        round_points=4,
        yield_after=0,
        yield_window=4,
        min_yield=0.5,
    )
    assert len(take_round(probs, everything, 14, s, rounds)) == 4  # yield_after 0: no yield stop
    s = dataclasses.replace(s, yield_after=14)
    assert len(take_round(probs, everything, 12, s, rounds)) == 4  # before yield_after
    assert len(take_round(probs, everything, 14, s, rounds)) == 4  # 3 new in the last 6 points: 0.5
    assert len(take_round(probs, everything, 14, s, rounds[:-1])) == 0  # 1 new in the last 4: 0.25
    assert len(take_round(probs, everything, 28, s, rounds)) == 2  # max_points still bounds the rounds


def test_new_boxes_are_those_unlike_any_found_before():
    from samkit.everything.generator import _new_boxes

    seen = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = [
        torch.tensor([[0, 0, 10, 9], [20, 20, 30, 30]]),  # IoU 0.9 with the seen box; new
        torch.tensor([[20, 20, 30, 31], [0, 0, 5, 10]]),  # like the new one of this call; IoU 0.5: new
    ]
    n, after = _new_boxes(boxes, seen, 0.7)
    assert n == 2
    np.testing.assert_array_equal(after, [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 10]])
    assert _new_boxes([], seen, 0.7)[0] == 0


def test_yield_stop_decodes_the_points_a_hand_walk_does(photo):
    """With `yield_after`, the rounds end where the last `yield_window` points found under `min_yield` new
    masks per point, counted here by hand from each point's own masks (one point per round, no cover);
    the real vit_t and head, whose masks differ from point to point."""
    model, head = samkit.load("vit_t", dtype="fp32", progress=False), load_head()
    kw = dict(output_mode="coco_rle")
    base = PeakSettings(threshold=0.0, min_points=0, max_points=24, round_points=1, cover=False, boxes=0)
    h, w = photo.shape[:2]
    pred = samkit.Predictor(model)
    pred.set_image(photo)
    candidates, _ = learned_candidates(head, pred.embedding, pred.original_size, pred.input_size, base)
    seen: list[np.ndarray] = []  # XYXY boxes found so far
    new_per_point = []
    for x, y in candidates[: base.max_points]:
        one = samkit.MaskGenerator(
            model, points_per_side=None, point_grids=[np.array([[x / w, y / h]])], box_nms_thresh=1.0, **kw
        ).generate(photo, embedded=pred)
        new = 0
        for r in one:
            bx, by, bw, bh = r["bbox"]
            box = np.array([bx, by, bx + bw, by + bh], dtype=float)
            ious = [_iou(box, b) for b in seen]
            if not ious or max(ious) < 0.7:
                seen.append(box)
                new += 1
        new_per_point.append(new)

    def by_hand(after: int, window: int, min_yield: float) -> int:
        for n in range(after, base.max_points):
            last = new_per_point[n - window : n]
            if sum(last) / len(last) < min_yield:
                return n
        return base.max_points

    stopped_early = 0
    for min_yield in (0.3, 0.6, 1.0, 1.4):
        peaks = dataclasses.replace(base, yield_after=6, yield_window=3, min_yield=min_yield)
        gen = _Counting(model, prompts="learned", prompt_head=head, peaks=peaks, box_nms_thresh=0.7, **kw)
        gen.generate(photo, embedded=pred)
        assert gen.decoded == by_hand(6, 3, min_yield)
        stopped_early += 6 < gen.decoded < base.max_points
    assert stopped_early  # the rule did end the rounds between yield_after and max_points


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class _Counting(samkit.MaskGenerator):
    """A MaskGenerator that counts the prompts it decodes."""

    decoded = 0

    def _process_batch(self, embedded_image, points, *args, **kwargs):  # type: ignore[override]
        self.decoded += len(points)
        return super()._process_batch(embedded_image, points, *args, **kwargs)


def _walk_by_hand(model, head, photo, peaks, kw) -> tuple[list, int]:
    """The points the cover rule decodes, found one at a time with full-size masks: (points, skipped)."""
    h, w = photo.shape[:2]
    pred = samkit.Predictor(model)
    pred.set_image(photo)
    candidates, probs = learned_candidates(head, pred.embedding, pred.original_size, pred.input_size, peaks)
    assert np.all(np.diff(probs) <= 0) and len(candidates) == 32 * 32
    margin = peaks.cover_margin * np.array([w, h]) / peaks.grid
    shifts = [(0, 0)] + ([(-1, 0), (1, 0), (0, -1), (0, 1)] if margin.any() else [])

    def inside(mask, x, y):
        for dx, dy in shifts:
            px, py = x + dx * margin[0], y + dy * margin[1]
            if not mask[min(max(int(np.floor(py)), 0), h - 1), min(max(int(np.floor(px)), 0), w - 1)]:
                return False
        return True

    decoded, covering, skipped = [], [], 0
    for x, y in candidates:
        if len(decoded) == peaks.max_points:
            break
        if any(inside(m, x, y) for m in covering):
            skipped += 1
            continue
        decoded.append((x, y))
        one = samkit.MaskGenerator(
            model, points_per_side=None, point_grids=[np.array([[x / w, y / h]])], box_nms_thresh=1.0, **kw
        ).generate(photo)
        if one:
            smallest = min(one, key=lambda r: r["area"])
            ok = smallest["area"] <= peaks.cover_max_area * h * w
            if ok and smallest["predicted_iou"] >= peaks.cover_min_iou:
                covering.append(smallest["segmentation"])
    return decoded, skipped


@pytest.mark.parametrize("max_area, margin", [(1.0, 0.0), (0.5, 0.0), (1.0, 0.25)])
def test_cover_skips_candidates_inside_a_found_mask(tiny_model, photo, max_area, margin):
    """Decoding best first, a candidate inside the smallest mask an earlier point kept (if that mask is
    not too large, and with the margin around the candidate inside it too) is never decoded; the masks are
    those of the grid path on exactly the points decoded."""
    torch.manual_seed(3)
    head = PromptHead()
    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, output_mode="binary_mask")
    peaks = PeakSettings(
        threshold=0.0,
        min_points=0,
        max_points=10,
        round_points=1,
        cover_max_area=max_area,
        cover_margin=margin,
        cover_min_iou=0.0,  # the random model scores low: any kept mask covers
        boxes=0,
    )
    h, w = photo.shape[:2]
    learned = samkit.MaskGenerator(
        tiny_model, prompts="learned", prompt_head=head, peaks=peaks, box_nms_thresh=0.9, **kw
    )
    records = learned.generate(photo)
    decoded, skipped = _walk_by_hand(tiny_model, head, photo, peaks, kw)
    assert skipped > 0 and len(decoded) == peaks.max_points  # the walk did skip covered candidates
    grid = samkit.MaskGenerator(
        tiny_model, points_per_side=None, point_grids=[np.array(decoded) / [w, h]], box_nms_thresh=0.9, **kw
    ).generate(photo)
    assert len(records) == len(grid) > 0
    for a, b in zip(records, grid, strict=True):
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
        assert a["point_coords"] == b["point_coords"]


def test_cover_with_cell_candidates(tiny_model, photo):
    """Candidates at embedding cells (grid 0): covering and its margin (one cell) work in that frame too."""
    torch.manual_seed(3)
    head = PromptHead()
    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.9, output_mode="coco_rle")
    peaks = PeakSettings(threshold=0.0, min_points=0, max_points=12, round_points=3, grid=0, cover_margin=1.0)
    records = samkit.MaskGenerator(
        tiny_model, prompts="learned", prompt_head=head, peaks=peaks, **kw
    ).generate(photo)
    pred = samkit.Predictor(tiny_model)
    pred.set_image(photo)
    candidates, _ = learned_candidates(head, pred.embedding, pred.original_size, pred.input_size, peaks)
    rows, cols = (-(-s // 16) for s in pred.input_size)
    assert len(candidates) == rows * cols  # every cell over the image
    used = {tuple(r["point_coords"][0]) for r in records}
    assert 0 < len(used) <= 12 and used <= {tuple(p) for p in candidates.tolist()}


def test_without_cover_the_best_candidates_are_decoded(tiny_model, photo):
    torch.manual_seed(3)
    head = PromptHead()
    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.9, output_mode="coco_rle")
    # the random model scores low: cover_min_iou 0 lets any kept mask cover
    peaks = PeakSettings(threshold=0.0, min_points=0, max_points=10, round_points=4, cover_min_iou=0.0)

    def run(p: PeakSettings) -> list:
        gen = samkit.MaskGenerator(tiny_model, prompts="learned", prompt_head=head, peaks=p, **kw)
        return gen.generate(photo)

    plain = run(dataclasses.replace(peaks, cover=False))
    # No mask small enough to cover (cover_max_area 0) decodes the same best 10 candidates.
    assert [r["segmentation"] for r in run(dataclasses.replace(peaks, cover_max_area=0.0))] == [
        r["segmentation"] for r in plain
    ]
    pred = samkit.Predictor(tiny_model)
    pred.set_image(photo)
    candidates, _ = learned_candidates(head, pred.embedding, pred.original_size, pred.input_size, peaks)
    used = {tuple(r["point_coords"][0]) for r in plain}
    assert used <= {tuple(p) for p in candidates[:10].tolist()}
    assert used != {tuple(r["point_coords"][0]) for r in run(peaks)}  # cover decodes other points


def test_refill_decodes_points_in_no_kept_mask_once_enough_masks_are_found(tiny_model, photo):
    """Past `refill_after` masks, up to `refill` more points (midpoints between the grid's points or grid
    points not reached) are decoded, none inside a mask the earlier points kept."""
    torch.manual_seed(3)
    head = PromptHead()
    peaks = PeakSettings(
        threshold=0.0, min_points=0, max_points=8, boxes=0, cover_max_area=0.3, refill_cover_rel=0.0
    )

    run = _unfiltered(tiny_model, head, photo)

    plain = run(peaks)
    too_few = run(dataclasses.replace(peaks, refill=6, refill_after=1000))  # too few masks: no refill
    assert len(plain) > 0 and [r["point_coords"] for r in too_few] == [r["point_coords"] for r in plain]
    refilled = run(dataclasses.replace(peaks, refill=6, refill_after=1))
    before = {tuple(r["point_coords"][0]) for r in plain}
    added = {tuple(r["point_coords"][0]) for r in refilled} - before
    assert 0 < len(added) <= 6
    pred = samkit.Predictor(tiny_model)
    pred.set_image(photo)
    with torch.no_grad():
        logits = head(pred.embedding.clone())[0, 0]
    grid, _ = grid_candidates(logits, pred.original_size, pred.input_size, peaks)
    between, _ = between_candidates(logits, pred.original_size, pred.input_size, peaks.grid)
    allowed = {tuple(p) for p in grid.tolist()} | {tuple(p) for p in between.tolist()}
    assert added <= allowed and added & {tuple(p) for p in between.tolist()}
    h, w = photo.shape[:2]
    small = [r["segmentation"] for r in plain if r["area"] <= 0.3 * h * w]
    for x, y in added:  # the earlier points' kept masks that survived NMS are among those it avoided
        assert not any(m[int(y), int(x)] for m in small)


def test_refill_cover_rel_lets_the_refill_into_masks_larger_than_the_typical_one(tiny_model, photo):
    """With `refill_cover_rel`, only kept masks up to that many times the median mask area keep the refill
    out: near zero, the refill goes inside earlier kept masks (a clump's nuclei); very large, it is the
    plain refill (capped by `cover_max_area`)."""
    torch.manual_seed(3)
    head = PromptHead()
    peaks = PeakSettings(
        threshold=0.0, min_points=0, max_points=8, boxes=0, cover_max_area=0.3, refill=6, refill_after=1
    )

    run = _unfiltered(tiny_model, head, photo)

    plain = run(dataclasses.replace(peaks, refill=0))
    refilled = run(dataclasses.replace(peaks, refill_cover_rel=0.0))  # any kept mask keeps the refill out
    points = lambda records: [tuple(r["point_coords"][0]) for r in records]  # noqa: E731
    assert points(run(dataclasses.replace(peaks, refill_cover_rel=1e9))) == points(refilled)
    into = run(dataclasses.replace(peaks, refill_cover_rel=1e-9))
    added = set(points(into)) - set(points(plain))
    assert 0 < len(added) <= 6
    h, w = photo.shape[:2]
    small = [r["segmentation"] for r in plain if r["area"] <= 0.3 * h * w]
    inside = [(x, y) for x, y in added if any(m[int(y), int(x)] for m in small)]
    assert inside  # the plain refill never goes there (test above)


def test_box_prompts_come_from_the_points_masks(tiny_model, photo):
    """After the points, the best boxes of their masks (by predicted IoU) are decoded as box prompts: found
    here by hand with the predictor's own point and box prompts, on a square image (no padding)."""
    torch.manual_seed(1)
    head = PromptHead()
    square = np.ascontiguousarray(photo[:400, :400])
    peaks = PeakSettings(
        threshold=1.0, min_points=6, max_points=6, cover=False, boxes=4, box_min_area=0.0, box_match=1.01
    )

    run = _unfiltered(tiny_model, head, square)

    with_boxes, points_only = run(peaks), run(dataclasses.replace(peaks, boxes=0))
    pred = samkit.Predictor(tiny_model)
    pred.set_image(square)
    points = learned_points(head, pred.embedding, pred.original_size, pred.input_size, peaks)
    scale = pred.input_size[0] / 400  # model-input pixels per image pixel
    candidates = []  # (predicted IoU, box in image pixels, source point) of every mask of every point
    for x, y in points:
        _, scores, low_res = pred.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
        up = tiny_model.image_size / low_res.shape[-1]
        for score, logits in zip(scores, low_res, strict=True):
            ys, xs = np.nonzero(logits > 0)
            if len(xs):
                box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) * up / scale
                candidates.append((float(score), box, (x, y)))
    candidates.sort(key=lambda c: -c[0])
    assert len(candidates) > 4

    def same(a: np.ndarray, b: np.ndarray) -> bool:
        return (a & b).sum() >= 0.98 * (a | b).sum()

    extra = [
        r for r in with_boxes if not any(same(r["segmentation"], q["segmentation"]) for q in points_only)
    ]
    assert len(with_boxes) == len(points_only) + 4 and len(extra) == 4
    assert sorted(r["point_coords"][0] for r in extra) == sorted([x, y] for _, _, (x, y) in candidates[:4])
    for _, box, (x, y) in candidates[:4]:
        masks, _, _ = pred.predict(box=box, multimask_output=False)
        assert any(r["point_coords"] == [[x, y]] and same(r["segmentation"], masks[0]) for r in extra)


def test_box_prompt_choice_skips_found_small_and_overlapping_boxes(tiny_model):
    """`_box_prompts`: boxes under box_min_area, boxes a found mask already has, and boxes overlapping a
    better one are not decoded; at most `boxes` are, best predicted IoU first, with their source points."""
    from types import SimpleNamespace

    peaks = PeakSettings(boxes=2, box_min_area=0.01, box_match=0.8)
    gen = samkit.MaskGenerator(tiny_model, prompts="learned", prompt_head=PromptHead(), peaks=peaks)
    boxes = torch.tensor(
        [
            [0, 0, 100, 100],  # best
            [0, 0, 100, 95],  # overlaps the best: NMS at box_nms_thresh
            [0, 0, 5, 5],  # 25 px, under 1% of 512 x 512
            [200, 200, 400, 400],  # a found mask has this box
            [300, 0, 500, 150],  # kept
            [0, 300, 150, 500],  # kept but over the budget
        ],
        dtype=torch.float32,
    )
    scores = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.95, 0.94])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    source = torch.arange(12, dtype=torch.float64).reshape(6, 2)
    # The image is 256 x 256 pixels, its model input 512 x 512: a found mask's box is in image pixels.
    embedded = SimpleNamespace(input_size=(512, 512), original_size=(256, 256))
    found = SimpleNamespace(boxes=torch.tensor([[100, 100, 200, 200]]))
    prompts = gen._box_prompts([(boxes, scores, areas, source)], [found], embedded)
    np.testing.assert_array_equal(prompts[:, :2], source[[0, 4]].numpy())
    np.testing.assert_array_equal(prompts[:, 2:], boxes[[0, 4]].numpy())


def test_point_boxes_invert_the_box_branchs_training_targets():
    """A box around a point -> log extents (training) -> the same box back from the cell the point is in,
    in the model-input frame (scaled by input / original size and clipped to the image there)."""
    original, inp = (200, 400), (512, 1024)  # scale 2.56
    points = np.array([[10.0, 20.0], [390.0, 150.0], [100.0, 100.0]])
    boxes = np.array([[0.0, 5.0, 30.0, 40.0], [380.0, 140.0, 400.0, 200.0], [np.nan] * 4])
    targets = box_extent_targets(boxes, points, original, inp)
    assert np.isnan(targets[2]).all() and np.isfinite(targets[:2]).all()
    extents = torch.zeros(4, 64, 64)
    cells = np.floor(points * 2.56 / 16).astype(int)
    for (col, row), t in zip(cells[:2], targets[:2], strict=True):
        extents[:, row, col] = torch.from_numpy(t)
    got = point_boxes(extents, points[:2], original, inp)
    np.testing.assert_allclose(got, boxes[:2] * 2.56, atol=1e-3)
    # elsewhere extents 0: a box of one cell (16 model-input pixels) each way, clipped to the image
    np.testing.assert_allclose(point_boxes(extents, [[1.0, 1.0]], original, inp), [[0, 0, 18.56, 18.56]])


def test_head_box_prompts_are_the_heads_boxes_unlike_any_found_mask(tiny_model):
    """`_head_box_prompts`: the box the head gives each candidate above the threshold, but not one over
    `head_box_max_area` or one a found mask already has (box IoU >= `head_box_match`); box-NMS'd, best
    score first, at most `head_boxes`."""
    from types import SimpleNamespace

    head = PromptHead(boxes=True)
    torch.nn.init.zeros_(head.box_out.weight)
    with torch.no_grad():  # every box: the point +- 2 cells (32 model-input pixels) each way
        head.box_out.bias.fill_(float(np.log(2.0)))
    peaks = PeakSettings(
        threshold=0.1, head_boxes=2, head_box_match=0.5, head_box_max_area=0.02, head_box_trust=0.0
    )
    gen = samkit.MaskGenerator(tiny_model, prompts="learned", prompt_head=head, peaks=peaks)
    # The image is 256 x 256, its model input 512 x 512 (tiny_model's image size); found boxes in image
    # pixels.
    embedded = SimpleNamespace(
        input_size=(512, 512), original_size=(256, 256), features=torch.zeros(1, 256, 32, 32)
    )
    points = np.array([[50.0, 50.0], [52.0, 50.0], [150.0, 150.0], [100.0, 200.0], [200.0, 30.0], [5, 5]])
    probs = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.05])  # the last is under the threshold
    found = SimpleNamespace(boxes=torch.tensor([[134, 134, 166, 166]]))  # the third point's box
    prompts = gen._head_box_prompts(embedded, points, probs, [found])
    # the second overlaps the first (NMS), the third is found, the fourth and fifth fit, the budget is 2
    np.testing.assert_array_equal(prompts[:, :2], points[[0, 3]])
    np.testing.assert_allclose(prompts[:, 2:], [[68, 68, 132, 132], [168, 368, 232, 432]])
    # a box of 64 x 64 model-input pixels is 1.56% of the input: under a 1.5% cap nothing is left
    gen.peaks = dataclasses.replace(peaks, head_box_max_area=0.015)
    assert len(gen._head_box_prompts(embedded, points, probs, [found])) == 0
    # trust: 1 of the head's 4 distinct boxes (after NMS) matches a found mask, a share of 0.25
    gen.peaks = dataclasses.replace(peaks, head_box_trust=0.25)
    assert len(gen._head_box_prompts(embedded, points, probs, [found])) == 2
    gen.peaks = dataclasses.replace(peaks, head_box_trust=0.3)
    assert len(gen._head_box_prompts(embedded, points, probs, [found])) == 0


def test_learned_mode_decodes_the_heads_boxes_after_its_points(tiny_model, photo):
    """With a box branch and `head_boxes`, the generator decodes the chosen head boxes as box prompts (one
    mask each) after the points; a head without the branch, or head_boxes 0, decodes none."""
    torch.manual_seed(0)
    head = PromptHead(boxes=True)
    plain = PromptHead()
    plain.load_state_dict(head.state_dict(), strict=False)
    peaks = PeakSettings(
        threshold=0.0,
        min_points=6,
        max_points=6,
        cover=False,
        boxes=0,
        head_boxes=3,
        head_box_match=1.01,
        head_box_trust=0.0,
    )
    decoded: list[int] = []

    class Counting(samkit.MaskGenerator):
        def _process_batch(self, embedded_image, points, *args):  # type: ignore[override]
            decoded.append(len(points))
            return super()._process_batch(embedded_image, points, *args)

    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, output_mode="binary_mask")
    runs = []
    for h, p in [(head, peaks), (plain, peaks), (head, dataclasses.replace(peaks, head_boxes=0))]:
        decoded.clear()
        gen = Counting(tiny_model, prompts="learned", prompt_head=h, peaks=p, threads=1, **kw)
        records = gen.generate(photo)
        runs.append((sum(decoded), records))
    (n_boxes, with_boxes), (n_plain, _), (n_off, without) = runs
    assert (n_boxes, n_plain, n_off) == (9, 6, 6)
    # every mask is kept here: the three box prompts add one mask each
    assert len(with_boxes) == len(without) + 3


def test_learned_mode_rejects_unknown_prompt_source(tiny_model):
    with pytest.raises(InputError, match="grid or learned"):
        samkit.MaskGenerator(tiny_model, prompts="boxes")


def test_peaks_text_sets_fields_by_their_types():
    """`parse_peaks` (`--peaks`, or `MaskGenerator(peaks="...")`): each value takes its field's type; an unknown
    key, a missing value or a value of the wrong type is refused with the field named."""
    assert parse_peaks("") == PeakSettings()
    peaks = parse_peaks("cover_max_area=0.1, yield_after=128,cover=off")
    assert peaks == dataclasses.replace(PeakSettings(), cover_max_area=0.1, yield_after=128, cover=False)
    assert isinstance(peaks.yield_after, int) and isinstance(peaks.cover_max_area, float)
    assert parse_peaks("boxes=8", peaks) == dataclasses.replace(peaks, boxes=8)  # over other settings
    for text, match in [
        ("max_point=4", "KEY=VALUE pairs of threshold"),
        ("cover_max_area", "'cover_max_area'"),
        ("yield_after=1.5", "yield_after needs int"),
        ("cover=maybe", "cover needs bool"),
    ]:
        with pytest.raises(InputError, match=match):
            parse_peaks(text)


def test_shipped_head_loads_and_is_small():
    assert HEAD_FILE.stat().st_size <= 5 * 2**20
    head = load_head()
    x = torch.randn(1, 256, 64, 64)
    logits = head(x)
    assert logits.shape == (1, 1, 64, 64) and torch.isfinite(logits).all()
    assert head.has_boxes and head.extents(x).shape == (1, 4, 64, 64)


def _head_for(model_path: str, dest) -> str:
    """A random PromptHead saved as a file that records the model at `model_path`."""
    torch.manual_seed(3)
    return str(save_head(PromptHead(), dest, head_metadata(samkit.load(model_path))))


def test_cli_everything_with_learned_prompts(tiny_ckpt, photo, tmp_path):
    from samkit.formats import read_sa1b

    image = tmp_path / "photo.png"
    Image.fromarray(photo).save(image)
    out = tmp_path / "out"
    fast = ["--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
    cmd = [
        sys.executable,
        "-m",
        "samkit.cli",
        "everything",
        str(image),
        "--out",
        str(out),
        "--model",
        tiny_ckpt,
    ]
    # the shipped head reads vit_t's embeddings: refused for this model, in one line, nothing written
    run = subprocess.run([*cmd, "--prompts", "learned", *fast], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "trained on vit_t" in run.stderr and "--prompt-head" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not list(out.glob("*.json"))
    head = _head_for(tiny_ckpt, tmp_path / "head.safetensors")
    learned = [*cmd, "--prompts", "learned", "--prompt-head", head, *fast]
    run = subprocess.run(learned, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    data = read_sa1b(next(out.glob("*.json")))
    # far fewer prompts than the 32 x 32 grid: at most max_points peaks x 3 masks each
    assert 0 < len(data["annotations"]) <= 3 * PeakSettings().max_points
    # --peaks sets PeakSettings fields: at most 4 points and no boxes give at most 4 x 3 masks
    few = [*learned, "--peaks", "min_points=4,max_points=4,boxes=0,head_boxes=0", "--overwrite"]
    run = subprocess.run(few, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert 0 < len(read_sa1b(next(out.glob("*.json")))["annotations"]) <= 12
    bad = subprocess.run([*learned, "--peaks", "max_point=4"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "KEY=VALUE pairs of" in bad.stderr and "'max_point=4'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run([*cmd, "--prompts", "boxes"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
    missing = [*cmd, "--prompts", "learned", "--prompt-head", str(tmp_path / "none.safetensors")]
    run = subprocess.run(missing, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "prompt head file not found" in run.stderr


def test_eval_proposals_with_learned_prompts(tmp_path):
    from test_eval_run import _one_image_coco, _stable_but_unsure_sam

    from samkit.eval import run_eval
    from samkit.eval.run import ProtocolError, _proposer

    data = _one_image_coco(tmp_path / "data")
    model = _stable_but_unsure_sam(tmp_path / "m.safetensors")
    head = _head_for(model, tmp_path / "head.safetensors")
    kw = dict(progress=False, pred_iou_thresh=0.0, prompts="learned")
    report = run_eval("proposals", data, model, prompt_head=head, **kw)
    assert report["meta"]["settings"]["prompts"] == "learned"
    assert report["meta"]["settings"]["prompt_head"] == head
    assert report["items"][0]["n_proposals"] > 0
    few = "min_points=2,max_points=2,boxes=0,head_boxes=0,refill=0"
    report = run_eval("proposals", data, model, prompt_head=head, peaks=few, **kw)
    assert report["meta"]["settings"]["peaks"] == few and 0 < report["items"][0]["n_proposals"] <= 6
    with pytest.raises(InputError, match="max_point=2"):
        run_eval("proposals", data, model, prompt_head=head, peaks="max_point=2", **kw)
    with pytest.raises(ProtocolError, match="--peaks is for the proposals protocol"):
        run_eval("proposals", data, model, progress=False, peaks=few)
    with pytest.raises(InputError, match="trained on vit_t"):  # the shipped head, for another model
        run_eval("proposals", data, model, **kw)
    with pytest.raises(ProtocolError, match="--prompts learned"):
        run_eval("proposals", data, model, progress=False, prompt_head=head)
    with pytest.raises(ProtocolError, match="needs a samkit SAM model"):
        _proposer(object(), None, None, "learned")


def test_a_head_file_records_its_model_and_is_refused_for_another(tiny_model, photo, tmp_path):
    """The shipped head records vit_t; one saved for the tiny model runs on it; a file that records nothing
    (an older head) is taken as it is; a head with grid prompts is a mistake."""
    from samkit.embedding_file import config_id
    from samkit.zoo import registry

    shipped = load_head()
    assert shipped.trained_for is not None and shipped.trained_for["model"] == "vit_t"
    assert shipped.trained_for["model_config"] == config_id(build_sam(registry()["vit_t"].config))
    with pytest.raises(InputError, match="trained on vit_t.s embeddings, not this"):
        samkit.MaskGenerator(tiny_model, prompts="learned")

    peaks = PeakSettings(min_points=4, max_points=4, boxes=0, head_boxes=0)
    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, peaks=peaks, threads=1)
    own = save_head(PromptHead(), tmp_path / "own.safetensors", head_metadata(tiny_model))
    assert load_head(own).trained_for == head_metadata(tiny_model)
    assert len(samkit.MaskGenerator(tiny_model, prompts="learned", prompt_head=own, **kw).generate(photo))
    older = save_head(PromptHead(), tmp_path / "older.safetensors", None)
    assert load_head(older).trained_for is None
    samkit.MaskGenerator(tiny_model, prompts="learned", prompt_head=older)
    with pytest.raises(InputError, match="for learned prompts"):
        samkit.MaskGenerator(tiny_model, prompt_head=own)


def test_damaged_or_foreign_head_files_get_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    from samkit.errors import CheckpointError

    good = save_head(PromptHead(), tmp_path / "head.safetensors", None)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"image_encoder.weight": torch.zeros(2, 2)}, str(foreign))
    for path, words in ((cut, "is corrupt or truncated"), (foreign, "is not a prompt head file")):
        with pytest.raises(CheckpointError, match=words) as err:
            load_head(path)
        assert "\n" not in str(err.value)


def test_cover_rel_lets_later_points_into_masks_larger_than_the_typical_one(tiny_model, photo):
    """With `cover_rel`, a kept mask covers in the rounds only if it is at most that many times the median
    kept area: near zero nothing covers (the best candidates in order, as without `cover`); very large, the
    plain covering rule."""
    torch.manual_seed(3)
    head = PromptHead()
    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.9, output_mode="coco_rle")
    peaks = PeakSettings(
        threshold=0.0, min_points=0, max_points=10, round_points=4, boxes=0, refill=0, cover_min_iou=0.0
    )

    def points(p: PeakSettings) -> list:
        gen = samkit.MaskGenerator(tiny_model, prompts="learned", prompt_head=head, peaks=p, **kw)
        return sorted(tuple(r["point_coords"][0]) for r in gen.generate(photo))

    covered = points(peaks)
    assert points(dataclasses.replace(peaks, cover_rel=1e9)) == covered
    uncovered = points(dataclasses.replace(peaks, cover=False))
    assert uncovered != covered
    assert points(dataclasses.replace(peaks, cover_rel=1e-9)) == uncovered


def test_refill_cover_rel_brings_back_grid_points_the_rounds_skipped(tiny_model, photo):
    """A grid point skipped in the rounds (inside the smallest kept mask of a decoded point) is a refill
    candidate again: with `refill_cover_rel` near zero no kept mask keeps it out, so the refill decodes such
    points too, not only the midpoints between the grid's."""
    torch.manual_seed(3)
    head = PromptHead()
    peaks = PeakSettings(
        threshold=0.0, min_points=0, max_points=8, boxes=0, cover_max_area=0.3, refill=64, refill_after=1
    )

    run = _unfiltered(tiny_model, head, photo)

    plain = run(dataclasses.replace(peaks, refill=0))
    h, w = photo.shape[:2]
    smallest: dict[tuple, dict] = {}  # each decoded point's smallest kept mask (box NMS keeps every mask)
    for r in plain:
        p = tuple(r["point_coords"][0])
        if r["area"] <= 0.3 * h * w and (p not in smallest or r["area"] < smallest[p]["area"]):
            smallest[p] = r
    pred = samkit.Predictor(tiny_model)
    pred.set_image(photo)
    with torch.no_grad():
        logits = head(pred.embedding.clone())[0, 0]
    grid, _ = grid_candidates(logits, pred.original_size, pred.input_size, peaks)
    decoded = {tuple(r["point_coords"][0]) for r in plain}
    skipped = {
        (x, y)
        for x, y in map(tuple, grid.tolist())
        if (x, y) not in decoded and any(r["segmentation"][int(y), int(x)] for r in smallest.values())
    }
    assert skipped  # the rounds did skip grid points
    refilled = run(dataclasses.replace(peaks, refill_cover_rel=1e-9))
    added = {tuple(r["point_coords"][0]) for r in refilled} - decoded
    assert added & skipped


# Candidates decoded one per round, plain points only, each kept mask up to 0.3 of the image covering (the
# random model scores low, so cover_min_iou 0 lets any kept mask cover): for the rules that change covering.
_ONE_BY_ONE = PeakSettings(
    threshold=0.0,
    min_points=0,
    max_points=16,
    round_points=1,
    boxes=0,
    refill=0,
    cover_max_area=0.3,
    cover_min_iou=0.0,
)


def test_cover_hits_lets_a_second_point_into_small_masks(tiny_model, photo):
    """With `cover_hits` 2 a candidate is skipped only once it lies in the kept masks of two decoded points,
    or in one mask over `cover_hits_max_area` of the image: so a share of 0 (every mask counts as large) is
    the plain covering rule, an unreachable count decodes the best candidates in order as without `cover`,
    and 2 with every mask small decodes points the plain rule skips."""
    torch.manual_seed(3)
    head = PromptHead()
    peaks = _ONE_BY_ONE
    run = _unfiltered(tiny_model, head, photo)

    def points(p: PeakSettings) -> list:
        return sorted({tuple(r["point_coords"][0]) for r in run(p)})

    covered = points(peaks)
    assert points(dataclasses.replace(peaks, cover_hits=2, cover_hits_max_area=0.0)) == covered
    uncovered = points(dataclasses.replace(peaks, cover=False))
    assert uncovered != covered
    assert points(dataclasses.replace(peaks, cover_hits=10**6)) == uncovered
    second = points(dataclasses.replace(peaks, cover_hits=2))
    assert second != covered and second != uncovered


def test_fill_decodes_the_best_free_grid_point_of_each_part_of_the_image_nothing_was_found_in(
    tiny_model, photo
):
    """With `fill`, after the rounds each of the fill_grid x fill_grid parts of the image where at least
    `fill_share` of the grid points lie in no kept mask gets one more point: its best-scored grid point in no
    kept mask, not decoded before; at most `fill` of them, best first. An unreachable share adds none."""
    torch.manual_seed(3)
    head = PromptHead()
    peaks = dataclasses.replace(_ONE_BY_ONE, max_points=4, head_boxes=0)
    run = _unfiltered(tiny_model, head, photo)  # every decoded mask is kept

    def points(records: list) -> set:
        return {tuple(r["point_coords"][0]) for r in records}

    plain = run(peaks)
    decoded = points(plain)
    assert points(run(dataclasses.replace(peaks, fill=16, fill_share=1.01))) == decoded
    added = points(run(dataclasses.replace(peaks, fill=16, fill_share=0.0))) - decoded
    assert len(added) >= 2
    pred = samkit.Predictor(tiny_model)
    pred.set_image(photo)
    with torch.no_grad():
        logits = head(pred.embedding.clone())[0, 0]
    grid, probs = grid_candidates(logits, pred.original_size, pred.input_size, peaks)
    h, w = photo.shape[:2]

    def part(x: float, y: float) -> tuple[int, int]:
        return min(int(x * 4 / w), 3), min(int(y * 4 / h), 3)

    free = {
        (x, y): p
        for (x, y), p in zip(map(tuple, grid.tolist()), probs.tolist(), strict=True)
        if (x, y) not in decoded and not any(r["segmentation"][int(y), int(x)] for r in plain)
    }
    assert len({part(x, y) for x, y in added}) == len(added)  # one per part
    for x, y in added:
        assert (x, y) in free  # a grid point in no kept mask, not decoded before
        best = max(p for q, p in free.items() if part(*q) == part(x, y))
        assert free[(x, y)] == best
    # at most `fill`, the best-scored first
    two = points(run(dataclasses.replace(peaks, fill=2, fill_share=0.0))) - decoded
    assert two == set(sorted(added, key=lambda q: -free[q])[:2])


def test_fill_and_split_together_decode_each_point_once(tiny_model, photo):
    """`fill` and `split` on together: the split also reads the fill points' masks and never decodes a fill
    point again (each point gives at most its three masks), and `split_until` counts the fill points."""
    torch.manual_seed(3)
    peaks = dataclasses.replace(_ONE_BY_ONE, max_points=4, head_boxes=0, fill=16, fill_share=0.0)
    run = _unfiltered(tiny_model, PromptHead(), photo)

    def counts(records: list) -> Counter:
        return Counter(tuple(r["point_coords"][0]) for r in records)

    filled = counts(run(peaks))
    split = dataclasses.replace(peaks, split=64, split_min_dist=0.0, split_max_area=1.0, split_until=0)
    both = counts(run(split))
    assert set(filled) < set(both)  # the split added points
    assert max(both.values()) <= 3
    # a cap of the points decoded so far (rounds and fill) leaves the split none, one more leaves it one
    capped = dataclasses.replace(split, split_until=len(filled))
    assert counts(run(capped)) == filled
    assert len(counts(run(dataclasses.replace(capped, split_until=len(filled) + 1)))) == len(filled) + 1


def test_split_decodes_the_far_grid_point_inside_a_kept_mask(tiny_model, photo):
    """With `split`, after the rounds each decoded point's smallest kept mask gets one more point: a grid point
    not decoded before, inside that mask, at least `split_min_dist` * sqrt(area) from the point. An
    unreachable distance adds none (the plain run); `split_until` caps the points decoded in all."""
    torch.manual_seed(3)
    head = PromptHead()
    peaks = PeakSettings(
        threshold=0.0, min_points=0, max_points=8, round_points=4, boxes=0, refill=0, cover_max_area=0.3
    )
    run = _unfiltered(tiny_model, head, photo)

    plain = run(peaks)
    decoded = {tuple(r["point_coords"][0]) for r in plain}
    assert {
        tuple(r["point_coords"][0]) for r in run(dataclasses.replace(peaks, split=8, split_min_dist=1e9))
    } == (decoded)
    smallest: dict[tuple, dict] = {}
    for r in plain:
        p = tuple(r["point_coords"][0])
        if p not in smallest or r["area"] < smallest[p]["area"]:
            smallest[p] = r
    split = run(dataclasses.replace(peaks, split=8, split_min_dist=0.0, split_max_area=1.0))
    added = {tuple(r["point_coords"][0]) for r in split} - decoded
    assert added
    pred = samkit.Predictor(tiny_model)
    pred.set_image(photo)
    with torch.no_grad():
        logits = head(pred.embedding.clone())[0, 0]
    grid, _ = grid_candidates(logits, pred.original_size, pred.input_size, peaks)
    on_grid = set(map(tuple, grid.tolist()))
    for x, y in added:
        assert (x, y) in on_grid
        assert any(r["segmentation"][int(y), int(x)] for r in smallest.values())
    assert len(added) <= 8
    # `split_until` caps the points decoded in all: the rounds' 8 leave none, 10 leave two
    capped = dataclasses.replace(peaks, split=8, split_min_dist=0.0, split_max_area=1.0, split_until=8)
    assert {tuple(r["point_coords"][0]) for r in run(capped)} == decoded
    two = {tuple(r["point_coords"][0]) for r in run(dataclasses.replace(capped, split_until=10))} - decoded
    assert len(two) == min(2, len(added)) and two <= added


def test_cover_min_iou_leaves_low_scored_masks_to_later_points(tiny_model, photo):
    """With `cover_min_iou`, only kept masks whose predicted IoU reaches it cover: unreachable, every
    candidate is decoded in order as without `cover`; at the lowest kept score, the plain covering rule; in
    between, some points the plain rule skips are decoded."""
    torch.manual_seed(3)
    head = PromptHead()
    peaks = _ONE_BY_ONE
    run = _unfiltered(tiny_model, head, photo)  # every decoded mask, with its score

    def points(p: PeakSettings) -> list:
        return sorted({tuple(r["point_coords"][0]) for r in run(p)})

    plain = run(peaks)
    covered = sorted({tuple(r["point_coords"][0]) for r in plain})
    scores = sorted(r["predicted_iou"] for r in plain)
    assert points(dataclasses.replace(peaks, cover_min_iou=scores[0] - 1e-3)) == covered
    uncovered = points(dataclasses.replace(peaks, cover=False))
    assert uncovered != covered
    assert points(dataclasses.replace(peaks, cover_min_iou=scores[-1] + 1.0)) == uncovered
    middle = points(dataclasses.replace(peaks, cover_min_iou=scores[len(scores) // 2]))
    assert middle != covered
